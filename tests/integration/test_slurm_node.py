"""slurm/torchrun_node.py and slurm/lib.sh without a Slurm cluster: exit codes, the signal relay,
rendezvous defaults, and how the batch scripts read their inputs."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"
_spec = importlib.util.spec_from_file_location("torchrun_node", SLURM / "torchrun_node.py")
node = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(node)


def failures(*codes: int) -> dict:
    return {rank: SimpleNamespace(exitcode=code) for rank, code in enumerate(codes)}


def test_exit_code_is_75_only_when_the_workers_exited_75():
    assert node.exit_code(failures(75, 75)) == 75
    assert node.exit_code(failures(75)) == 75
    # The agent SIGTERMs the rest once one worker has exited: a worker past its save dies of it.
    assert node.exit_code(failures(-15, 75)) == 75
    assert node.exit_code(failures(75, 2)) == 2  # one real failure wins: no requeue
    assert node.exit_code(failures(-15, 2)) == 2
    assert node.exit_code(failures(1)) == 1
    assert node.exit_code(failures(-9, 75)) == 128 + 9  # killed by a signal, as a shell reports it
    assert node.exit_code(failures(-15)) == 128 + 15  # terminated by someone else: not a preemption


def _args(*argv: str):
    from torch.distributed.run import parse_args

    return parse_args([*argv, "train.py"])


def test_slurm_defaults():
    srun0, srun1 = {"SLURM_NODEID": "0"}, {"SLURM_NODEID": "1"}
    c10d = ("--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=n1:29999")
    args = _args(*c10d)
    assert node.apply_slurm_defaults(args, srun0) == "host"
    assert args.rdzv_conf == "is_host=0"  # node 0's agent is a client of the wrapper's store
    assert args.signals_to_handle == "SIGINT,SIGHUP,SIGQUIT"  # SIGTERM and SIGUSR1 are the wrapper's
    args = _args(*c10d, "--rdzv_conf=read_timeout=30")
    assert node.apply_slurm_defaults(args, srun1) == "client" and args.rdzv_conf == "read_timeout=30,is_host=0"
    given = _args(*c10d, "--rdzv_conf=is_host=1", "--signals-to-handle=SIGTERM")
    assert node.apply_slurm_defaults(given, srun0) is None
    assert given.rdzv_conf == "is_host=1" and given.signals_to_handle == "SIGTERM"
    assert node.apply_slurm_defaults(_args(*c10d), {}) is None  # not under srun: plain torchrun
    assert node.apply_slurm_defaults(_args("--standalone"), srun0) is None


def test_handles_reads_whether_a_process_catches_the_signal():
    catcher = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                                "signal.signal(signal.SIGUSR1, lambda *a: None)\nprint(1, flush=True)\ntime.sleep(60)"],
                               stdout=subprocess.PIPE)
    plain = subprocess.Popen(["sleep", "60"])
    try:
        catcher.stdout.readline()
        assert node._handles(catcher.pid, signal.SIGUSR1)
        assert not node._handles(catcher.pid, signal.SIGUSR2)
        assert not node._handles(plain.pid, signal.SIGUSR1)
        assert {catcher.pid, plain.pid} <= set(node._children(os.getpid()))
    finally:
        catcher.kill()
        plain.kill()
        catcher.wait()
        plain.wait()


def _clean_env() -> dict:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _torchrun_node(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    config = tmp_path / "fake.yaml"
    config.write_text("train.max_steps: 6\nfake.step_seconds: 0.2\n")
    cmd = [sys.executable, str(SLURM / "torchrun_node.py"), "--standalone", "--nproc_per_node=2",
           "tests/integration/slurm_fake_trainer.py", "--config", str(config), f"train.output_dir={tmp_path / 'run'}",
           *overrides]
    # The workers take a second to install their handlers, as the real trainer takes seconds.
    env = {**_clean_env(), "FAKE_TRAINER_STARTUP_S": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _steps(run_dir: Path, rank: int) -> list[int]:
    path = run_dir / "ledger" / f"rank{rank}.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.mark.timeout(120)
def test_early_signal_is_held_until_the_workers_catch_it_and_75_comes_back(tmp_path):
    """SIGUSR1 before any worker runs: the workers get it once their handlers are in, checkpoint
    and exit 75, and torchrun_node exits 75 (plain torchrun would exit 1)."""
    proc = _torchrun_node(tmp_path)
    deadline = time.monotonic() + 30
    while not node._handles(proc.pid, signal.SIGUSR1):  # the wrapper's own handler is in
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    run_dir = tmp_path / "run"
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    first = _steps(run_dir, 0)
    assert first == _steps(run_dir, 1) == list(range(len(first))) and 1 <= len(first) < 6
    assert checkpoint.name == f"step_{len(first)}.json"


@pytest.mark.timeout(120)
def test_a_real_failure_keeps_its_exit_code(tmp_path):
    proc = _torchrun_node(tmp_path, "no_such.key=1")
    out, _ = proc.communicate(timeout=110)
    assert proc.returncode == 2, out


# --- slurm/lib.sh ----------------------------------------------------------------------------

def lib(snippet: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``snippet`` in bash after sourcing slurm/lib.sh, as a batch script submitted from tmp_path."""
    base = {**_clean_env(), "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_NAME": "vit", "SLURM_JOB_ID": "7",
            "PYTHON": sys.executable, "TRAIN_SCRIPT": "train.py", "PATH": os.environ["PATH"]}
    (tmp_path / "train.py").touch()
    return subprocess.run(["bash", "-c", f"source {SLURM / 'lib.sh'}; {snippet}"], env={**base, **env},
                          capture_output=True, text=True, timeout=30)


def test_scripts_parse():
    for script in ("pretrain.sbatch", "pretrain_srun.sbatch", "lib.sh", "local/start.sh", "local/stop.sh"):
        subprocess.run(["bash", "-n", str(SLURM / script)], check=True)


def test_procs_per_node(tmp_path):
    no_gpu = {"PATH": "/usr/bin:/bin"}  # no nvidia-smi
    assert lib("procs_per_node", tmp_path, **no_gpu).stdout.strip() == "1"
    assert lib("procs_per_node", tmp_path, SLURM_GPUS_ON_NODE="4", **no_gpu).stdout.strip() == "4"
    assert lib("procs_per_node", tmp_path, SLURM_GPUS_ON_NODE="4", NPROC_PER_NODE="2").stdout.strip() == "2"


def test_config_and_overrides_from_args_and_env(tmp_path):
    show = 'resolve_inputs "$@"; printf "%s\\n" "${TRAIN_ARGS[@]}"'
    out = lib(f"set -- c.yaml c=3; {show}", tmp_path, OVERRIDES="a=1 b=2")
    run_dir = tmp_path / "runs" / "vit-7"  # runs/<job name>-<job id> under the submit dir
    assert out.stdout.split() == ["--config", "c.yaml", f"train.output_dir={run_dir}", "a=1", "b=2", "c=3"]
    assert run_dir.is_dir()
    out = lib(f"set -- d=4; {show}", tmp_path, CONFIG="e.yaml", RUN_DIR=str(tmp_path / "mine"))
    assert out.stdout.split() == ["--config", "e.yaml", f"train.output_dir={tmp_path / 'mine'}", "d=4"]


def test_missing_config_or_python_is_a_failure_not_a_requeue(tmp_path):
    out = lib("resolve_inputs", tmp_path)
    assert out.returncode == 2 and "no config" in out.stdout
    out = lib("resolve_inputs c.yaml", tmp_path, PYTHON=str(tmp_path / "nope"))
    assert out.returncode == 2 and "no Python" in out.stdout
