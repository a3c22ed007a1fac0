"""torchrun for one Slurm task per node, keeping what the sbatch scripts need from the trainer.

Run it exactly like ``python -m torch.distributed.run`` (same arguments). Plain torchrun under
Slurm loses three things:

- Its exit code is 1 whenever a worker failed, so the trainer's 75 (EX_TEMPFAIL: "checkpoint
  saved, requeue me") cannot be told apart from a crash.
- Its workers run in sessions of their own, so a signal that Slurm sends to the task's process
  group (proctrack/pgid) never reaches them; and torchrun's own SIGTERM handler gives them only
  ``--shutdown-timeout`` seconds (30) before SIGKILL, which can cut a checkpoint save short.
- The c10d rendezvous store lives in the first node's agent. When that agent ends first, the
  others lose the store while they still watch their workers, and end with
  RendezvousConnectionError (exit 1) or "Error waiting on exit barrier" (pytorch#69520).

So this wrapper:

- relays SIGUSR1 and SIGTERM to the worker processes and leaves them to the trainer's own
  handlers (flag, checkpoint at the next step, exit 75), while torchrun's agent keeps watching
  them. A worker gets the signal only once it catches it (SigCgt in /proc/<pid>/status), so a
  signal that comes while the trainer is still starting waits for it instead of killing it;
- exits 0 on success, 75 when the workers exited 75 (see ``exit_code``), and otherwise the
  first failure's code (128 + N for a worker killed by signal N);
- under srun (SLURM_NODEID set) and unless ``--rdzv_conf`` says ``is_host``: hosts the c10d
  store itself on node 0 (every agent, node 0's included, is a client of it) and keeps it up
  until every node's wrapper has reported its end, at most ``TORCHRUN_NODE_LINGER_S`` (60) s.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import threading
import time

PREEMPT_EXIT_CODE = 75
RELAYED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Left to torchrun's agent: it stops the workers on these (interactive use, lost terminal).
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
TORCHRUN_DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
DONE_KEY = "torchrun_node/nodes_done"


def _log(msg: str) -> None:
    node = os.environ.get("SLURMD_NODENAME", "?")
    print(f"[torchrun_node {node}] {msg}", file=sys.stderr, flush=True)


# --- signals ---------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (torchrun's workers), read from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def _handles(pid: int, signum: int) -> bool:
    """True once ``pid`` catches (or ignores) ``signum``: a worker still starting up would die of it."""
    try:
        with open(f"/proc/{pid}/status") as f:
            masks = dict(line.split(":", 1) for line in f if line.startswith(("SigCgt", "SigIgn")))
    except OSError:
        return False
    bit = 1 << (signum - 1)
    return any(int(v, 16) & bit for v in masks.values())


_received: list[int] = []  # appended to by the signal handler; read by the relay thread


def _on_signal(signum: int, _frame) -> None:
    # Only record it: a handler may run nested in another one, so no locks here.
    _received.append(signum)


def _relay_loop(poll_s: float = 0.25) -> None:
    """Deliver every received signal once to every worker, as soon as that worker handles it."""
    delivered: set[tuple[int, int]] = set()
    while True:
        time.sleep(poll_s)
        if not _received:
            continue
        for signum in set(_received):
            for pid in _children(os.getpid()):
                if (pid, signum) in delivered or not _handles(pid, signum):
                    continue
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    continue
                delivered.add((pid, signum))
                _log(f"relayed {signal.Signals(signum).name} to worker {pid}")


# --- torchrun arguments, exit code ---------------------------------------------------------------

def apply_slurm_defaults(args: argparse.Namespace, env: dict) -> str | None:
    """Adjust torchrun's parsed arguments for Slurm. Returns this wrapper's part in the c10d store:
    "host" (node 0), "client", or None (not under srun, not c10d, or is_host given).

    Signals: torchrun's agent keeps SIGINT/SIGHUP/SIGQUIT, this wrapper takes SIGTERM and SIGUSR1.
    Rendezvous: with c10d under srun, every agent is a client (is_host=0) of the store that the
    wrapper on node 0 hosts; an is_host the caller gave is left alone.
    """
    if args.signals_to_handle == TORCHRUN_DEFAULT_SIGNALS:
        args.signals_to_handle = AGENT_SIGNALS
    if args.rdzv_backend != "c10d" or args.standalone or "SLURM_NODEID" not in env:
        return None
    if "is_host" in args.rdzv_conf:
        return None
    args.rdzv_conf = ",".join(filter(None, [args.rdzv_conf, "is_host=0"]))
    return "host" if env["SLURM_NODEID"] == "0" else "client"


def exit_code(failures: dict) -> int:
    """One exit code for this node from torchrun's failed workers (``{rank: ProcessFailure}``).

    75 when the workers exited 75, except those that torchrun's agent itself then stopped with
    SIGTERM: once one worker has exited, the agent terminates the others, and a worker that is
    already past its save and shutting down dies of that signal (-15). Otherwise the first real
    failure: a positive exit code, else 128 + N for a worker killed by signal N.
    """
    codes = [f.exitcode for f in failures.values()]
    real = [c for c in codes if c not in (PREEMPT_EXIT_CODE, -signal.SIGTERM)]
    if not real and PREEMPT_EXIT_CODE in codes:
        return PREEMPT_EXIT_CODE
    real = real or codes
    positive = [c for c in real if c > 0]
    if positive:
        return positive[0]
    return 128 - real[0] if real and real[0] < 0 else 1


# --- the rendezvous store ----------------------------------------------------------------------

def _endpoint(args: argparse.Namespace) -> tuple[str, int]:
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    return parse_rendezvous_endpoint(args.rdzv_endpoint, default_port=29400)


def host_store(args: argparse.Namespace):
    """The c10d store for every node's agent, in this process so that it outlives the agent."""
    from torch.distributed import TCPStore

    host, port = _endpoint(args)
    return TCPStore(host, port, is_master=True, wait_for_workers=False, multi_tenant=True,
                    timeout=datetime.timedelta(seconds=60))


def report_done(args: argparse.Namespace, store, nnodes: int) -> None:
    """Count this node as done; on node 0 (``store`` given), wait for every node first."""
    from torch.distributed import TCPStore

    try:
        if store is None:
            host, port = _endpoint(args)
            TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=10)).add(DONE_KEY, 1)
            return
        store.add(DONE_KEY, 1)
        deadline = time.monotonic() + float(os.environ.get("TORCHRUN_NODE_LINGER_S", 60))
        while store.add(DONE_KEY, 0) < nnodes and time.monotonic() < deadline:
            time.sleep(0.2)
    except Exception as e:  # noqa: BLE001 - the store's host already gone: nothing left to coordinate
        _log(f"could not report the end of this node to the rendezvous store: {e}")


def main(argv: list[str]) -> int:
    # Installed before torchrun starts its workers; torchrun only replaces the AGENT_SIGNALS handlers.
    for sig in RELAYED_SIGNALS:
        signal.signal(sig, _on_signal)
    threading.Thread(target=_relay_loop, name="signal-relay", daemon=True).start()

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    role = apply_slurm_defaults(args, dict(os.environ))
    store = host_store(args) if role == "host" else None
    code = 0
    try:
        run(args)
    except ChildFailedError as e:
        code = exit_code(e.failures)
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
        note = " (checkpointed after a preemption signal)" if code == PREEMPT_EXIT_CODE else ""
        _log(f"worker exit codes by rank {codes}: exiting {code}{note}")
    finally:
        if role:
            nnodes = int(os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
            report_done(args, store, nnodes)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
