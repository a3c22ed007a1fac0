# Shared by slurm/pretrain.sbatch and slurm/pretrain_srun.sbatch; sourced in the batch shell.
#
# The preemption contract (DESIGN.md section 3): on SIGUSR1 or SIGTERM the trainer saves a
# checkpoint at the next step boundary and exits 75 (EX_TEMPFAIL). This file relays the warning
# signal from the batch shell to the job step, waits for the step, and requeues the job on 75
# only; any other non-zero code is a real failure and ends the job.
#
# Environment read here (all optional):
#   CONFIG          the YAML config (or give it as the first script argument)
#   OVERRIDES       dotted overrides, space separated: "train.max_steps=100 optim.lr=1e-3"
#   RUN_DIR         run directory (default: runs/<job name>-<job id> under the submit dir)
#   PYTHON          interpreter (default: .venv/bin/python under the submit dir)
#   TRAIN_SCRIPT    the training entry point (default: launch/pretrain.py)
#   NPROC_PER_NODE  processes per node (default: the GPUs of the allocation, else 1)
#   MASTER_PORT     rendezvous port on the first node (default: 29500 + job id % 20000)
#   MAX_REQUEUES    stop requeueing after this many restarts (default: 50)
#   STEP_SIGNAL_GRACE  seconds a new step runs before a held signal is passed on (default: 30)

PREEMPT_EXIT_CODE=75

log() {
    echo "[$(date '+%F %T')] [job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*"
}

# resolve_inputs ARGS...: sets REPO, PYTHON, TRAIN_SCRIPT, CONFIG, TRAIN_ARGS (array), RUN_DIR.
# Script arguments: [CONFIG] [key=value ...]; they come after those from CONFIG/OVERRIDES.
resolve_inputs() {
    REPO=${REPO:-$SLURM_SUBMIT_DIR}
    cd "$REPO" || { log "cannot cd to $REPO"; exit 2; }
    PYTHON=${PYTHON:-$REPO/.venv/bin/python}
    TRAIN_SCRIPT=${TRAIN_SCRIPT:-launch/pretrain.py}
    if [[ $# -gt 0 && $1 != *=* ]]; then
        CONFIG=$1
        shift
    fi
    local overrides
    read -r -a overrides <<<"${OVERRIDES:-}"
    RUN_DIR=${RUN_DIR:-$REPO/runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
    # The run directory comes first, so an explicit train.output_dir override still wins.
    TRAIN_ARGS=(--config "${CONFIG:-}" "train.output_dir=$RUN_DIR" "${overrides[@]}" "$@")

    [[ -n ${CONFIG:-} ]] || { log "no config: pass it as the first argument or set CONFIG"; exit 2; }
    [[ -x $PYTHON ]] || { log "no Python at $PYTHON: run 'make install' or set PYTHON"; exit 2; }
    [[ -f $TRAIN_SCRIPT ]] || { log "no training script $TRAIN_SCRIPT under $REPO"; exit 2; }
    mkdir -p "$RUN_DIR" || exit 2
}

# procs_per_node: NPROC_PER_NODE, else the GPUs Slurm gave this node, else nvidia-smi, else 1.
procs_per_node() {
    local n=""
    if [[ -n ${NPROC_PER_NODE:-} ]]; then
        n=$NPROC_PER_NODE
    elif [[ ${SLURM_GPUS_ON_NODE:-0} =~ ^[1-9][0-9]*$ ]]; then
        n=$SLURM_GPUS_ON_NODE
    elif command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    fi
    [[ $n =~ ^[1-9][0-9]*$ ]] || n=1
    echo "$n"
}

# rendezvous_endpoint: sets HEAD (first node of the allocation) and PORT.
rendezvous_endpoint() {
    HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 20000))}
}

# Keep the job's output file next to the run: runs/<name>-<id>/slurm.out -> the --output file.
link_output() {
    local out
    out=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p')
    [[ -n $out ]] && ln -sfn "$out" "$RUN_DIR/slurm.out"
}

# --- signals -------------------------------------------------------------------------------
# `--signal=B:USR1@<s>` sends USR1 to this shell only; Slurm sends SIGTERM on preemption and
# cancellation. Either way the job step gets USR1 (torchrun_node.py relays it to the workers)
# and the step is left to end by itself. A signal that comes before the step has run for
# STEP_SIGNAL_GRACE seconds (default 30) is held until then: a process still starting up, before
# it installs its handler, would die of it. launch/pretrain.py needs seconds for that (its imports
# come first): 3 s on an idle 2-core machine, 6 s on a loaded one, more where Python loads from a
# network disk.
PREEMPT_PENDING=0
STEP_PID=""
STEP_START=0

on_signal() {
    log "got SIG$1: asking the trainer to checkpoint and exit"
    PREEMPT_PENDING=1
    forward_if_ready
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

forward_if_ready() {
    ((PREEMPT_PENDING)) && [[ -n $STEP_PID ]] || return 0
    ((SECONDS - STEP_START >= ${STEP_SIGNAL_GRACE:-30})) || return 0
    PREEMPT_PENDING=0
    # Without --batch or --full, scancel signals the job's steps but not this shell.
    scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$STEP_PID" 2>/dev/null
}

# run_step CMD...: start the job step (an srun) in the background and wait for it, checking
# every second for a signal to forward (a trapped signal also ends the `sleep` at once).
# srun runs in a process group of its own (setsid): `scancel --full` (and a cancellation)
# signals the batch shell's process group, and srun answers SIGTERM by SIGKILLing every task
# of its step at once (Slurm's srun: "forcing job termination"), so no trainer could save.
# The trainers get the signal from the step itself, or from this shell's USR1.
run_step() {
    setsid "$@" &
    STEP_PID=$!
    STEP_START=$SECONDS
    while kill -0 "$STEP_PID" 2>/dev/null; do
        forward_if_ready
        sleep 1 &
        wait $! 2>/dev/null
    done
    wait "$STEP_PID"
    local rc=$?
    STEP_PID=""
    return "$rc"
}

# finish RC: exit the batch script: 0 done, 75 requeue (unless the job is being cancelled or
# ran out of time), anything else a failure that is not requeued.
finish() {
    local rc=$1 state
    if ((rc == 0)); then
        log "training finished"
        exit 0
    fi
    if ((rc == 130)); then
        log "trainer saved a checkpoint and stopped for a Ctrl-C (exit 130): not requeueing"
        exit "$rc"
    fi
    if ((rc != PREEMPT_EXIT_CODE)); then
        log "training failed with exit code $rc: not requeueing"
        exit "$rc"
    fi
    state=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *JobState=\([A-Z_]*\).*/\1/p')
    if [[ $state != RUNNING && $state != PREEMPTED ]]; then
        log "trainer checkpointed (exit 75) but the job is $state: not requeueing"
        exit "$rc"
    fi
    if ((${SLURM_RESTART_COUNT:-0} >= ${MAX_REQUEUES:-50})); then
        log "trainer checkpointed (exit 75), but the job already restarted ${SLURM_RESTART_COUNT} times (MAX_REQUEUES)"
        exit "$rc"
    fi
    log "trainer checkpointed and exited 75: requeueing; the next run resumes from $RUN_DIR"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        log "scontrol requeue failed: resubmit with RUN_DIR=$RUN_DIR to resume"
        exit "$rc"
    fi
    exit 0
}
