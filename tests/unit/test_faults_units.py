"""The pieces behind issue 16's fault handling, each in seconds: exit codes from the error class,
Ctrl-C as a stop request (a second one aborts), one-line storage errors, the report that ranks
share through the c10d store, and helper processes that die with their parent."""
from __future__ import annotations

import datetime
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.errors import (PipelineError, StorageError, TrainingError, UserError, exit_code_for, one_line,
                             storage_error)

ROOT = Path(__file__).resolve().parents[2]


def test_exit_codes_follow_from_the_class():
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import ConfigError
    from pipeline.data.errors import DataError
    from pipeline.distributed.env import DistributedEnvError

    for cls in (ConfigError, DataError, CheckpointError, DistributedEnvError, StorageError):
        assert issubclass(cls, UserError) and exit_code_for(cls("x")) == 2, cls
    assert exit_code_for(TrainingError("x")) == 1 and isinstance(TrainingError("x"), PipelineError)
    assert exit_code_for(KeyboardInterrupt()) == 130 and exit_code_for(ValueError("x")) == 1


def test_errors_module_is_the_bottom_floor():
    """errors.py and the modules every layer uses with it import the standard library only."""
    import ast

    for name in ("errors.py", "storage.py", "lifetime.py", "preemption.py"):
        tree = ast.parse((ROOT / "pipeline" / name).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert imported <= set(sys.stdlib_module_names) | {"pipeline", "__future__"}, (name, imported)
        pipeline_imports = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                            and (n.module or "").startswith("pipeline")}
        assert pipeline_imports <= {"pipeline.errors", "pipeline.storage"}, (name, pipeline_imports)


def test_storage_error_is_one_line_with_what_where_and_why():
    error = storage_error("metrics", "/run/metrics.jsonl",
                          OSError(errno.ENOSPC, "No space left on device", b"/run/metrics.jsonl"))
    assert one_line(error) == ("could not write metrics to '/run/metrics.jsonl': [Errno 28] No space left on "
                               "device; free space or fix the permissions there, or set train.output_dir to "
                               "another disk")


def test_writing_turns_write_failures_into_storage_errors(tmp_path):
    from pipeline.storage import writing

    with pytest.raises(StorageError, match=r"could not write the ledger to '/x/l': \[Errno 30\] Read-only"):
        with writing("the ledger", tmp_path):
            raise OSError(errno.EROFS, "Read-only file system", "/x/l")
    # torch.save's RuntimeError on a disk that takes writes is not a storage problem: it stays as it is
    with pytest.raises(RuntimeError, match="unexpected pos"):
        with writing("checkpoint step-4", tmp_path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5248 vs 5140")
    with pytest.raises(KeyError):  # nor is anything else
        with writing("metrics", tmp_path):
            raise KeyError("x")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KB tmpfs (root only, as CI runs): a disk that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root); "
                    "tests/integration/test_faults.py covers the full disk with a patched writer")
def test_torch_save_on_a_full_disk_is_a_storage_error_with_the_os_reason(small_tmpfs):
    import torch

    from pipeline.storage import rewrite_small_file, writing

    status = small_tmpfs / "exit_status"
    rewrite_small_file(status, "running\n")  # holds a block before the disk fills
    with pytest.raises(StorageError, match=r"could not write checkpoint step-4 to .*\[Errno 28\] No space left"):
        with writing("checkpoint step-4", small_tmpfs):
            torch.save(torch.zeros(100_000), small_tmpfs / "shard.pt")  # 400 KB on a 64 KB disk
    with pytest.raises(OSError):
        (small_tmpfs / "new").write_text("2\n")  # the disk is full for new files...
    rewrite_small_file(status, "2\n")  # ...but the exit status still fits in its block
    assert status.read_text() == "2\n"


def _run(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, **kw)


def test_first_sigint_is_a_stop_request_that_exits_130_and_a_second_aborts_at_once(tmp_path):
    status = tmp_path / "exit_status"
    result = _run(f"""
        import os, signal, time
        from pathlib import Path
        from pipeline.preemption import StopFlag
        flag = StopFlag().install()
        flag.exit_status_path = Path({str(status)!r})
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        print(flag.requested, flag.signal_name, flag.exit_code, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # a later SIGTERM changes nothing: still a Ctrl-C stop
        print(flag.signal_name, flag.exit_code, flush=True)
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C: the default action, at once
        time.sleep(5)
        print("still alive", flush=True)
    """)
    assert result.stdout.splitlines() == ["True SIGINT 130", "SIGINT 130"], result.stderr
    assert result.returncode == -signal.SIGINT
    assert status.read_text() == "130\n"  # written at the first Ctrl-C: right even after the abort
    assert "press Ctrl-C again to abort at once without saving" in result.stderr


def test_a_stop_signal_while_waiting_for_the_other_ranks_ends_the_wait_at_once(tmp_path):
    """A TCPStore that waits for a second rank blocks in C++, where no Python handler runs."""
    status = tmp_path / "exit_status"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import datetime, sys
        from pathlib import Path
        import torch.distributed as dist
        from pipeline.preemption import StopFlag
        flag = StopFlag().install()
        flag.exit_status_path = Path({str(status)!r})
        with flag.ending_the_wait("waiting for the other ranks"):
            print("waiting", flush=True)
            dist.TCPStore("127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=True)
        print("the wait ended by itself", flush=True)
    """)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    assert child.stdout.readline() == "waiting\n"
    time.sleep(0.5)
    child.send_signal(signal.SIGTERM)
    started = time.monotonic()
    out, err = child.communicate(timeout=30)
    # at once, not when the store's 60 s wait times out (30: a margin for a loaded machine)
    assert child.returncode == 75 and time.monotonic() - started < 30, (out, err)
    assert "received SIGTERM while waiting for the other ranks: nothing trained yet" in err
    assert status.read_text() == "75\n"


def test_sigterm_and_sigusr1_mean_requeue():
    from pipeline.preemption import StopFlag

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    flag = StopFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.signal_name == "SIGUSR1" and flag.exit_code == 75
    finally:
        flag.uninstall()
    # what was there before install(): Python's default, or SIG_IGN under nohup
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_ranks_share_one_report_through_the_store():
    from torch.distributed import TCPStore

    from pipeline.distributed.faults import Failure, classify, peer_report, publish

    store = TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=5))
    first = classify(StorageError("could not write metrics to '/r/metrics.jsonl': [Errno 28] No space"), rank=0)
    assert first == Failure(2, "could not write metrics to '/r/metrics.jsonl': [Errno 28] No space", 0, True)
    assert publish(store, first)
    assert not publish(store, Failure(2, "another", 1, True))  # the first report stays the report
    assert peer_report(store, rank=1, wait_s=1) == first
    assert peer_report(store, rank=0, wait_s=1) is None  # a rank does not adopt its own report
    lost = classify(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1"), 1)
    assert lost.code == 1 and not lost.known
    empty = TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=60))
    started = time.monotonic()  # after its own 0.5 s, not the store's 60 s
    assert peer_report(empty, rank=1, wait_s=0.5) is None and time.monotonic() - started < 30


def test_without_the_store_a_report_is_read_from_the_run_directory_when_it_is_this_runs(tmp_path):
    import json

    from pipeline.distributed import faults

    report = faults.Failure(2, "could not write metrics to '/r': [Errno 28] No space left on device", 0, True)
    faults._write_report_file(tmp_path, report)
    assert faults.peer_report(None, rank=1, wait_s=0.2, report_dir=tmp_path) == report
    assert faults.peer_report(None, rank=0, wait_s=0.2, report_dir=tmp_path) is None  # its own
    stale = faults._STARTED - 60  # a report an earlier run left behind
    os.utime(tmp_path / faults.REPORT_FILE, (stale, stale))
    assert faults.peer_report(None, rank=1, wait_s=0.2, report_dir=tmp_path) is None
    assert json.loads((tmp_path / faults.REPORT_FILE).read_text())["line"] == report.line


def test_a_helper_dies_with_its_parent_even_after_kill_9(tmp_path):
    pid_file = tmp_path / "child"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import os, time; from pipeline.lifetime import die_with_parent; "
            "assert die_with_parent(os.getppid()); open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
            "time.sleep(60)"])
        time.sleep(60)
    """)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 30
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30  # at once; the child's own sleep is 60 s
    while _alive(child):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
