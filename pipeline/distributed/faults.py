"""Every rank ends a failed run with the same exit code and the same one line.

When one rank fails for a reason it knows (a user error such as too many bad samples, a full
disk), the other ranks only see their next collective fail ("Connection closed by peer") and
would end with exit 1 and a gloo traceback. So the rank that knows writes its code and line into
the c10d store before it tears anything down, and a rank whose own error has no known cause reads
it there (for a few seconds at most) and ends with that code and line instead.

Under torchrun the store is the agent's, which outlives every worker. Without torchrun (srun
without it, the deepspeed launcher) it lives in rank 0's process, and the other ranks' collectives
fail only once that process has exited, store and all (destroying the process group does not
close gloo's connections): so a rank 0 that reports there also leaves the report in the run
directory (``.failure.json``, shared by all ranks like the checkpoints), where the others find it.
A file older than the reader's own start belongs to an earlier run and is ignored.

The line also goes to torchrun's error file (``TORCHELASTIC_ERROR_FILE``), so that torchrun's
failure summary shows it in place of "To enable traceback see ...".
"""
from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import EXIT_USER_ERROR, PipelineError, exit_code_for, is_storage_error, one_line, os_reason

log = logging.getLogger(__name__)

_CLAIM = "pipeline/failure/claimed"
_REPORT = "pipeline/failure/report"
REPORT_FILE = ".failure.json"
_STARTED = time.time()  # this process's start, near enough: older report files are not this run's
# How a collective reports a peer that is gone (gloo, NCCL, the store).
_PEER_LOST = re.compile(r"Connection (closed|reset) by peer|Broken pipe|connectFullMesh|remote process exited|"
                        r"NCCL communicator was aborted", re.IGNORECASE)
PEER_WAIT_S = 3.0  # how long a rank with an unexplained error looks for a peer's report
STORE_TIMEOUT_S = 2.0  # no store operation on the way out may take longer


@dataclass(frozen=True)
class Failure:
    code: int
    line: str  # one line, no traceback
    rank: int
    known: bool  # the cause is known (the line says it all); else the traceback is worth logging


def classify(error: BaseException, rank: int) -> Failure:
    """This rank's failure. Known causes: the errors that end a run on purpose (errors.py), and
    a write the operating system refused (disk full, read-only, no permission), which is an
    environment error (exit 2)."""
    if isinstance(error, PipelineError):
        return Failure(exit_code_for(error), one_line(error), rank, known=True)
    if is_storage_error(error):  # raised outside the writers' own handling (storage.writing)
        where = getattr(error, "filename", None) or "?"
        where = os.fsdecode(where) if isinstance(where, bytes) else where
        verb = "write" if error.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG) else "access"
        line = f"could not {verb} '{where}': {os_reason(error)}; check the disk and the permissions there"
        return Failure(EXIT_USER_ERROR, line, rank, known=True)
    return Failure(exit_code_for(error), f"{type(error).__name__}: {one_line(error)}", rank, known=False)


def _store():
    try:
        import torch.distributed as dist

        if not dist.is_initialized():
            return None
        store = dist.distributed_c10d._get_default_store()  # noqa: SLF001 - the one handle on it
        store.set_timeout(datetime.timedelta(seconds=STORE_TIMEOUT_S))
        return store
    except Exception:  # noqa: BLE001 - no process group, or its store is gone: nothing to share
        return None


def publish(store, failure: Failure) -> bool:
    """Write ``failure`` into the store unless another rank's report came first."""
    try:
        if store.add(_CLAIM, 1) != 1:
            return False
        store.set(_REPORT, json.dumps(asdict(failure)))
        return True
    except Exception:  # noqa: BLE001 - the store's host is gone: each rank reports its own
        return False


def peer_report(store, rank: int, wait_s: float, report_dir: Path | None = None) -> Failure | None:
    """Another rank's report, if one comes within ``wait_s``: in the store, or in ``report_dir``
    (where rank 0 leaves it when its process holds the store, and exits with it)."""
    deadline = time.monotonic() + wait_s
    while True:
        report = _read_report_file(report_dir)
        if report is None and store is not None:
            try:
                if store.check([_REPORT]):
                    report = Failure(**json.loads(store.get(_REPORT)))
            except Exception:  # noqa: BLE001 - the store's host is gone: the file alone from here on
                store = None
        if report is not None and report.rank != rank:
            return report
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _read_report_file(report_dir: Path | None) -> Failure | None:
    path = None if report_dir is None else report_dir / REPORT_FILE
    try:
        if path is None or path.stat().st_mtime < _STARTED:
            return None
        return Failure(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_report_file(report_dir: Path | None, failure: Failure) -> None:
    if report_dir is None:
        return
    tmp = report_dir / f"{REPORT_FILE}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(asdict(failure)))
        os.replace(tmp, report_dir / REPORT_FILE)
    except OSError:  # a full or read-only disk: the other ranks then report their own errors
        pass


def agree(failure: Failure, *, world_size: int, hosts_store: bool,
          report_dir: Path | None = None) -> tuple[Failure, bool]:
    """The failure every rank reports, and whether it was adopted from another rank. A known
    cause is reported at once; an unexplained error (typically a collective that failed because
    a peer left) first looks for a peer's report."""
    if world_size < 2:
        return failure, False
    store = _store()
    if store is None:
        return failure, False
    if not failure.known:
        peer = peer_report(store, failure.rank, PEER_WAIT_S, report_dir)
        if peer is not None:
            return peer, True
    if publish(store, failure) and hosts_store:
        _write_report_file(report_dir, failure)
    return failure, False


def report_failure(error: BaseException, *, rank: int, world_size: int, output_dir: str | Path | None = None) -> int:
    """Log how this rank ends (one line, or a traceback for an unexplained error) and return its
    exit code, agreed with the other ranks. Call it from the ``except`` that ends the run."""
    # Under torchrun the store is the agent's; otherwise rank 0's process holds it.
    hosts_store = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    report_dir = Path(output_dir) if output_dir is not None and Path(output_dir).is_dir() else None
    failure, adopted = agree(classify(error, rank), world_size=world_size, hosts_store=hosts_store,
                             report_dir=report_dir)
    if adopted:
        log.error("stopped because rank %d failed: %s", failure.rank, failure.line)
    elif failure.known:
        log.error("%s", failure.line)
    elif _PEER_LOST.search(str(error)):  # a peer ended without a report: killed, or its node lost
        log.error("another rank ended without saying why (killed, or its machine lost); this rank's "
                  "collective failed with: %s", failure.line)
    else:
        log.error("training failed", exc_info=error)
    if failure.known:
        write_torchrun_error_file(failure.line if not adopted else f"rank {failure.rank}: {failure.line}")
    return failure.code


def write_torchrun_error_file(line: str) -> None:
    """torchrun prints this file's message as the failure's "traceback" in its summary. The layout
    is the one ``elastic.multiprocessing.errors.record`` writes (``ErrorHandler.record_exception``),
    with the one line in place of a Python traceback: torchrun then also records the exit code in it
    without warning about the file's format."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    stamp = str(int(time.time()))
    try:
        with open(path, "w") as handle:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": stamp}}}, handle)
    except OSError:  # a full disk: torchrun then prints its generic line
        pass


def _refusal_marker() -> Path | None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    return Path(path).parent.parent / "pipeline-refusal" if path else None


def first_to_say_it(code: int) -> bool:
    """Whether this rank is the first of its node to report a mistake found before the process
    group (the same on every rank there): torchrun gives each attempt a folder that holds every
    local rank's error file, and the first rank to create a marker there (with its exit code)
    prints the line; the others leave it to torchrun's summary. True without torchrun, or where
    the marker cannot be made."""
    marker = _refusal_marker()
    if marker is None:
        return True
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    except OSError:
        return True
    with os.fdopen(fd, "w") as handle:
        handle.write(str(code))
    return True


def peer_refusal_code() -> int | None:
    """The exit code of a rank of this node that refused the run before the process group
    (``first_to_say_it``), if one did: a rank that torchrun stops because of it ends with the same
    code, as every rank of a failed run does."""
    marker = _refusal_marker()
    try:
        return int(marker.read_text()) if marker is not None else None
    except (OSError, ValueError):
        return None
