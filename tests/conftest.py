"""Shared fixtures: digits shards written once per session, and real torchrun launches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# One torch thread per process of the suite (pytest's workers and what they start), unless the
# environment says otherwise: two workers and the ranks they launch share 2 cores, and a second
# thread that waits for a busy core makes small matrices many times slower (the MAE demo's probes
# in a test: 32-48 s with 2 threads on the loaded VM, 4 s with 1). Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "launch" / "pretrain.py"

# Small, fast, and still a real run: 2 ranks, a tiny ViT, a few steps. No DataLoader workers: a
# rank's worker server and worker are two more processes on 2 shared cores (a 4-step launch took
# 10.2-10.7 s with them, 9.3 s without). The runs whose subject involves workers (resume and elastic
# re-cuts, stop signals, Slurm) add WORKERS.
WORKERS = "data.num_workers=1"
TINY = ["model.size=tiny", "model.num_channels=1", "model.num_labels=10", "model.num_hidden_layers=2",
        "data.batch_size=16", "data.num_workers=0", "data.augment=shift", "data.hflip=false",
        "data.mean=[0.5]", "data.std=[0.5]", "train.log_every=1", "train.progress_bar=false",
        "optim.warmup_steps=0", "optim.lr=2e-3"]
# MAE/SimMIM heads to match: a small decoder, SimMIM's stride and blocks for 16x16 images of 4x4 patches.
TINY_DECODER = ["model.decoder_hidden_size=32", "model.decoder_num_hidden_layers=1",
                "model.decoder_num_attention_heads=4", "model.decoder_intermediate_size=64", "model.encoder_stride=4",
                "model.mask_patch_size=8"]


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """A trainer run in-process ends by ignoring stop signals (as its process is about to exit);
    the next test, and Ctrl-C on pytest, get the handlers back."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-process gloo group for in-process engines. The group outlives the module (torch has
    one per process, and DeepSpeed keeps its own handle on it); the environment it reads (rank,
    local rank, world size) is set again for each module that uses it, and restored after."""
    import torch.distributed as dist

    from pipeline.distributed.engine import init_process_group
    from pipeline.distributed.env import resolve_env

    saved = dict(os.environ)
    os.environ["DS_ACCELERATOR"] = "cpu"
    env = resolve_env({})
    if dist.is_initialized():
        env.export()
    else:
        init_process_group(env, timeout_s=60)
    yield env
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """make_shards.py's digits (its command line: test_readme_commands.py), written in this process."""
    from pipeline.data.shards import write_shards

    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", out, shard_size=200, val_fraction=0.1)
    return out


def shard_overrides(shards: Path) -> list[str]:
    manifest = json.loads((shards / "manifest.json").read_text())
    names = [s["name"] if isinstance(s, dict) else s for s in manifest["shards"]]
    train = ",".join(str(shards / n) for n in names if n.startswith("train"))
    val = ",".join(str(shards / n) for n in names if n.startswith("val"))
    return [f"data.train_shards=[{train}]", f"data.val_shards=[{val}]"]


def first_train_shards(shards: Path, count: int) -> str:
    """The override that trains on the first ``count`` training shards only (shorter epochs); given
    after shard_overrides, it replaces that one's list."""
    return "data.train_shards=[" + ",".join(str(shards / f"train-{i:06d}.tar") for i in range(count)) + "]"


def run_env(threads: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu", PIPELINE_DIST_TIMEOUT_S="120",
               PYTHONPATH=str(ROOT))
    return env


def torchrun(nproc: int, overrides: list[str], *, timeout: float = 300, config: str | None = None,
             env: dict | None = None, script: Path = PRETRAIN) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N launch/pretrain.py ...`, as a user types it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), "--config", config or str(ROOT / "configs/digits_tiny.yaml"), *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env or run_env())


def runs_script(pid: int, script: str = "launch/pretrain.py") -> bool:
    """Whether process ``pid`` is a Python running ``script`` (``python [-u] script ...``; torchrun and
    launchers that only name it in their arguments are not)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    program = next((a for a in argv[1:] if not a.startswith("-")), "")
    return Path(argv[0]).name.startswith("python") and program.endswith(script)


def is_trainer(pid: int, script: str = "launch/pretrain.py") -> bool:
    """A training process: it runs ``script`` and its parent does not. Its DataLoader workers' fork
    server (forked from it at start) and the workers (forked from the server) run it too."""
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return runs_script(pid, script) and not runs_script(parent, script)


def metrics(output_dir: Path, val_key: str = "val_top1") -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows: those with ``val_key``) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if val_key in r]


def ledger(output_dir: Path, rank: int) -> list[dict]:
    path = output_dir / "ledger" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


# `make test` runs the suite on two pytest-xdist workers. A file's tests stay on one worker, in their
# order (its module fixtures run once); files that share runs through a cache of their own
# (checkpoint_runs.py, masked_runs.py) or one local Slurm cluster share a worker too.
# (xdist's own `--dist loadgroup` renames node ids, which pytest 9 no longer allows: its groups
# were silently ignored here, and the shared runs were made once per worker.)
SHARED_WORKER = {
    **dict.fromkeys(["test_checkpoint_async", "test_checkpoint_export", "test_checkpoint_refusal",
                     "test_checkpoint_preemption", "test_checkpoint_resume", "test_faults", "test_s3_resume"],
                    "checkpoint_runs"),
    **dict.fromkeys(["test_train_masked", "test_export_masked"], "masked_runs"),
    **dict.fromkeys(["test_slurm", "test_slurm_mechanics", "test_slurm_node"], "slurm"),
}


def worker_group(nodeid: str) -> str:
    stem = Path(nodeid.split("::", 1)[0]).stem
    return SHARED_WORKER.get(stem, stem)


# The longest groups first (by their time alone on 2 cores, 2026-12-06: ~450 s for checkpoint_runs,
# ~160 s Slurm, ~110 s masked_runs, ~100 s gpu_check), so that the two workers end together; the rest (many short files) fill in behind them in their usual order.
LONGEST_FIRST = ["checkpoint_runs", "slurm", "masked_runs", "test_gpu_check", "test_train_distributed",
                 "test_benchmarks", "test_train_compile", "test_guard"]


def pytest_collection_modifyitems(items):
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(worker_group(item.nodeid), len(rank)))  # stable: files keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scheduling by module, with the groups above as the modules, in the order above
    (not xdist's: most tests first, which puts 117 import checks before a 450 s group)."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    config.option.loadscopereorder = False
    return SharedRunScheduling(config, log)


def pytest_collection_finish(session):
    """What the test modules imported (torch, transformers, DeepSpeed, timm: millions of objects)
    lives as long as the session: out of every later garbage collection, as the launch scripts do
    (pipeline/startup.py). The unit tests' gen-2 collections took 18 s of a 3-minute run, 10 s frozen."""
    import gc

    gc.freeze()
