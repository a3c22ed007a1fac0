#!/usr/bin/env bash
# Start a real Slurm cluster on this one machine: munged, slurmctld and two slurmd daemons
# emulating nodes n1 and n2 (one CPU each), all state under $VIT_SLURM_DIR (/tmp/vit-slurm).
# Idempotent: installs slurm-wlm and munge if missing, reuses a cluster that is already up.
# Needs root. Afterwards: export SLURM_CONF=$VIT_SLURM_DIR/slurm.conf (printed at the end).
#
# Environment: VIT_SLURM_DIR, VIT_SLURM_CTLD_PORT (16817), VIT_SLURM_NODE_PORT (17001, n2 +1),
#              VIT_SLURM_START_TIMEOUT (seconds to wait for both nodes to be idle, 60).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
TIMEOUT=${VIT_SLURM_START_TIMEOUT:-60}
DIR=$VIT_SLURM_DIR

[[ $(id -u) == 0 ]] || die "run as root: slurmd and munged run as root here, and /etc/hosts gets n1, n2"

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sinfo >/dev/null && return 0
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    local out="$DIR/log/apt.log"
    if ! apt-get install -y -qq --no-install-recommends slurm-wlm munge >"$out" 2>&1; then
        # Package lists may be missing or stale on a fresh machine.
        apt-get update -qq >>"$out" 2>&1 || true
        apt-get install -y -qq --no-install-recommends slurm-wlm munge >>"$out" 2>&1 \
            || { tail -n 20 "$out" >&2; die "apt-get could not install slurm-wlm and munge (log: $out)"; }
    fi
    command -v slurmctld >/dev/null || die "slurm-wlm installed but slurmctld is not on PATH"
}

add_hosts() {
    # n1 and n2 must resolve (slurmd -N, srun, and torchrun's rendezvous endpoint use them).
    local name
    for name in "${NODES[@]}"; do
        if [[ $(getent hosts "$name" | awk '{print $1}') != 127.0.0.1 ]]; then
            echo "127.0.0.1 ${NODES[*]} $HOSTS_TAG" >>/etc/hosts
            break
        fi
    done
    for name in "${NODES[@]}"; do
        [[ $(getent hosts "$name" | awk '{print $1}') == 127.0.0.1 ]] \
            || die "$name does not resolve to 127.0.0.1 even after adding it to /etc/hosts"
    done
}

render_conf() {
    local first_id=1
    # A new state folder: start job ids from the clock, so they differ from earlier clusters'.
    [[ -e $DIR/state/job_state ]] || first_id=$(( ($(date +%s) / 10) % 50000000 + 1000 ))
    sed -e "s|@HOST@|$(hostname)|g" -e "s|@DIR@|$DIR|g" \
        -e "s|@CTLD_PORT@|$VIT_SLURM_CTLD_PORT|g" \
        -e "s|@NODE_PORTS@|$VIT_SLURM_NODE_PORT-$((VIT_SLURM_NODE_PORT + 1))|g" \
        -e "s|@FIRST_JOB_ID@|$first_id|g" \
        "$HERE/slurm.conf.in" >"$SLURM_CONF.tmp"
    mv "$SLURM_CONF.tmp" "$SLURM_CONF"
}

start_munge() {
    local key="$DIR/munge/munge.key"
    if [[ ! -s $key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$key" --force
        else
            dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        fi
        chmod 0600 "$key"
    fi
    pid_alive "$DIR/run/munged.pid" && return 0
    # --force: munged refuses to run as root, or with its socket under /tmp, without it.
    munged --force --key-file="$key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    local i
    for i in $(seq 50); do
        [[ -S $DIR/munge/munge.socket ]] && return 0
        sleep 0.1
    done
    die "munged did not create its socket (log: $DIR/log/munged.log)"
}

STARTED_NODES=()
start_slurm() {
    if ! pid_alive "$DIR/run/slurmctld.pid"; then
        slurmctld || die "slurmctld did not start (log: $DIR/log/slurmctld.log)"
    fi
    local node
    for node in "${NODES[@]}"; do
        mkdir -p "$DIR/spool/$node"
        if ! pid_alive "$DIR/run/slurmd-$node.pid"; then
            slurmd -N "$node" || die "slurmd -N $node did not start (log: $DIR/log/slurmd-$node.log)"
            STARTED_NODES+=("$node")
        fi
    done
}

# node_up NODE: the node answers (idle, or busy with jobs kept from an earlier start), and a
# slurmd started just now has registered (slurmctld shows the saved state until then).
node_up() {
    local info since
    info=$(scontrol -o show node "$1" 2>/dev/null) || return 1
    [[ $info =~ State=(IDLE|MIXED|ALLOCATED|COMPLETING)[+\ ] ]] || return 1
    [[ " ${STARTED_NODES[*]} " == *" $1 "* ]] || return 0
    since=$(sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p' <<<"$info")
    [[ $since != None && -n $since ]] && (($(date -d "$since" +%s) >= START_EPOCH - 1))
}

wait_up() {
    local deadline=$((SECONDS + TIMEOUT)) states=""
    while ((SECONDS < deadline)); do
        node_up n1 && node_up n2 && return 0
        states=$(sinfo -h -N -o '%N=%t' 2>/dev/null | sort -u | tr '\n' ' ' || true)
        # A node left down or drained by an earlier run: ask to resume it.
        if [[ $states =~ (down|drain) ]]; then
            scontrol update NodeName=n1,n2 State=RESUME >/dev/null 2>&1 || true
        fi
        sleep 0.5
    done
    tail -n 5 "$DIR"/log/slurm*.log >&2 || true
    die "nodes not idle after ${TIMEOUT}s (sinfo: ${states:-no answer}); logs in $DIR/log"
}

t0=$SECONDS
START_EPOCH=$(date +%s)
mkdir -p "$DIR"/{log,run,state,spool,munge}
chmod 0700 "$DIR/munge"
install_packages
add_hosts
render_conf
start_munge
start_slurm
wait_up
log "up in $((SECONDS - t0))s: nodes n1 n2 idle; use: export SLURM_CONF=$SLURM_CONF"
