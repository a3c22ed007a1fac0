#!/usr/bin/env bash
# Stop the local Slurm cluster started by start.sh: cancel its jobs, then stop slurmd (n1, n2),
# slurmctld and munged, by the pids in their pid files (SIGTERM, then SIGKILL after 10 s).
# With --purge also delete $VIT_SLURM_DIR (state, logs, munge key) and the /etc/hosts entry.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
DIR=$VIT_SLURM_DIR

# stop_pidfiles FILE...: SIGTERM those processes together, wait, SIGKILL any left after 10 s.
stop_pidfiles() {
    local f pids=() i
    for f in "$@"; do
        pid_alive "$f" && pids+=("$(<"$f")")
    done
    if ((${#pids[@]})); then
        kill -TERM "${pids[@]}" 2>/dev/null
        for i in $(seq 100); do
            kill -0 "${pids[@]}" 2>/dev/null || break  # true while any is alive
            sleep 0.1
        done
        for i in "${pids[@]}"; do
            kill -0 "$i" 2>/dev/null && { log "pid $i ignored SIGTERM for 10 s: SIGKILL"; kill -KILL "$i"; }
        done
    fi
    rm -f "$@"
}

if [[ -f $SLURM_CONF ]] && pid_alive "$DIR/run/slurmctld.pid"; then
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// } ]]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        for _ in $(seq 50); do
            [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
fi
stop_pidfiles "$DIR/run/slurmd-n1.pid" "$DIR/run/slurmd-n2.pid" "$DIR/run/slurmctld.pid"
stop_pidfiles "$DIR/run/munged.pid"  # last: the others talk to it while they shut down

if [[ ${1:-} == --purge ]]; then
    rm -rf "$DIR"
    sed -i "/$HOSTS_TAG/d" /etc/hosts 2>/dev/null || log "could not edit /etc/hosts"
fi
log "stopped"
