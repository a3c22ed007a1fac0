# Shared by start.sh and stop.sh: where the local cluster lives. Sourced, not run.
VIT_SLURM_DIR=${VIT_SLURM_DIR:-/tmp/vit-slurm}
VIT_SLURM_CTLD_PORT=${VIT_SLURM_CTLD_PORT:-16817}
VIT_SLURM_NODE_PORT=${VIT_SLURM_NODE_PORT:-17001}   # n1 listens here, n2 on the next port
export SLURM_CONF="$VIT_SLURM_DIR/slurm.conf"
NODES=(n1 n2)
HOSTS_TAG="# vit-slurm local cluster"

log() { echo "[vit-slurm] $*" >&2; }
die() { echo "[vit-slurm] error: $*" >&2; exit 1; }

# pid_alive FILE: the pid in FILE names a live process.
pid_alive() {
    local pid
    [[ -s $1 ]] && pid=$(<"$1") && [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}
