"""The ``checkpoint`` benchmark: save and load time and bytes of a sharded DeepSpeed checkpoint,
against the disk's raw sequential speed measured in the same run.

A torchrun job (2 processes by default) builds the model (ViT-B/16), takes one training step so
that every optimizer state exists, then:

- save: ``pipeline.checkpoint.save`` as training calls it (DeepSpeed's write, fsync of every
  file, barrier, marker, pointer, prune), ``repeats`` times; split into write / fsync (+ waiting
  for the slowest rank) / commit; old checkpoints are pruned in the background afterwards, as
  training steps run; here the next save starts after it (``background_prune_s``, not in the save);
- load cold: the pages of the checkpoint are dropped from the page cache first
  (``posix_fadvise(DONTNEED)`` after the fsync, no privileges needed), then
  ``pipeline.checkpoint.load``; load warm: the same again with the pages cached;
- raw: one file of the checkpoint's size written in 8 MiB blocks + fsync by rank 0 alone, and
  the same bytes split over the ranks written concurrently (as the checkpoint is); then read
  back cold; ``repeats`` times, medians reported (all values in ``raw_all_s``).

``save_vs_raw`` = raw write time / save time (1.0: the save runs at the disk's speed).

Then ``checkpoint.async`` (``checkpoint_async.py``), one job per ZeRO stage of ``async_stages``
(default 2 and 3; empty to skip): the training-visible time of an asynchronous save against a
synchronous save of the same state, interleaved, and the steps' slowdown during the background
write (``result["async"]``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULTS = dict(size="B/16", zero_stage=2, precision="bf16", nproc=2, repeats=3, dir=None, async_stages="2,3")
BLOCK = 8 << 20


def run(args: argparse.Namespace | None = None) -> dict:
    """Run the benchmark; ``args`` may set size, zero_stage, precision, nproc, repeats, dir."""
    opts = {k: getattr(args, k, None) if getattr(args, k, None) is not None else v for k, v in DEFAULTS.items()}
    parent = Path(opts["dir"]) if opts["dir"] else Path.cwd() / "runs"
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=parent))
    try:
        result_path = work / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={opts['nproc']}",
                   "-m", "launch.benchmarks.checkpoint", "--worker", "--dir", str(work), "--size", opts["size"],
                   "--zero-stage", str(opts["zero_stage"]), "--precision", opts["precision"],
                   "--repeats", str(opts["repeats"])]
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0 or not result_path.is_file():
            raise RuntimeError(f"checkpoint benchmark failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
        result = json.loads(result_path.read_text())
        result["directory"] = str(parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if opts["async_stages"]:
        from launch.benchmarks import checkpoint_async

        result["async"] = checkpoint_async.run(argparse.Namespace(
            size=opts["size"], stages=opts["async_stages"], precision=opts["precision"], nproc=opts["nproc"],
            repeats=opts["repeats"], dir=str(parent)))
    return result


# ------------------------------------------------------------------------------------ in the workers
def _drop_cache(path: Path) -> None:
    """Evict a directory's (clean, fsynced) pages from the page cache, so that the next read hits the disk."""
    for file in (path.rglob("*") if path.is_dir() else [path]):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _write(path: Path, size: int) -> None:
    block = os.urandom(BLOCK)
    with open(path, "wb", buffering=0) as handle:
        left = size
        while left > 0:
            left -= handle.write(block[: min(left, BLOCK)])
        os.fsync(handle.fileno())


def _read(path: Path) -> int:
    total = 0
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(BLOCK):
            total += len(chunk)
    return total


CPU_S: dict[str, list[float]] = {}  # this process's CPU seconds per measured operation


def _timed(fn, dist, name: str = "") -> float:
    """Wall time of ``fn`` run on every rank, from a common start to the last rank's end."""
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    CPU_S.setdefault(name, []).append(time.process_time() - cpu)
    dist.barrier()
    return time.perf_counter() - start


def _dir_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


def start_worker(overrides: list[str]):
    """A benchmark worker's (env, config): the process group joined, the heap kept as the trainer
    keeps it on CPU."""
    import torch

    from pipeline.config import load_config
    from pipeline.distributed.engine import init_process_group
    from pipeline.distributed.env import resolve_env

    env = resolve_env()
    if not torch.cuda.is_available():
        from pipeline.heap import keep_heap

        keep_heap()  # as the trainer does on CPU
    init_process_group(env, timeout_s=1800)
    return env, load_config(None, overrides)


def worker(opts: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from pipeline import checkpoint
    from pipeline.tasks import ClassificationTask
    from pipeline.distributed.engine import build_engine
    from pipeline.model import build_model
    from pipeline.distributed.precision import engine_dtype

    work = Path(opts.dir)
    env, cfg = start_worker([f"model.size={opts.size}", f"train.zero_stage={opts.zero_stage}",
                             f"train.precision={opts.precision}", "data.batch_size=1", f"train.output_dir={work}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    engine = build_engine(model, cfg, world_size=env.world_size)
    dtype = engine_dtype(cfg.train)
    images = torch.randn(1, cfg.model.num_channels, *cfg.model.image_hw, dtype=dtype)
    loss = engine(images).logits.float().logsumexp(-1).mean()  # one step: every optimizer state exists
    engine.backward(loss)
    engine.step()

    marker = {"world_size": env.world_size, "zero_stage": cfg.train.zero_stage, "model": cfg.model.__dict__}
    saves, phases, prune_waits = [], [], []
    for step in range(1, opts.repeats + 1):
        timings: dict = {}
        saves.append(_timed(lambda: checkpoint.save(engine, output_dir=work, step=step, client_state={"step": step},
                                                     marker_info=marker, keep_last=1, rank=env.rank,
                                                     timings=timings), dist, "save"))
        phases.append(timings)
        # In training, steps run while the previous checkpoint is pruned in the background.
        prune_waits.append(_timed(checkpoint.wait_for_prune, dist, "prune"))
    tag_dir = checkpoint.latest_complete(work)
    files = _dir_bytes(tag_dir)
    total = sum(files.values())
    plan = checkpoint.plan_resume(tag_dir, model_config=cfg.model.__dict__, zero_stage=cfg.train.zero_stage,
                                  world_size=env.world_size, shape_fields=ClassificationTask.shape_fields)
    loads_cold, loads_warm = [], []
    for _ in range(opts.repeats):
        _drop_cache(tag_dir)
        loads_cold.append(_timed(lambda: checkpoint.load(engine, plan, output_dir=work), dist, "load_cold"))
        loads_warm.append(_timed(lambda: checkpoint.load(engine, plan, output_dir=work), dist))

    raw = work / "raw"
    raw.mkdir(exist_ok=True)
    single, mine = raw / "single.bin", raw / f"rank{env.rank}.bin"
    share = total // env.world_size
    raw_s = {"single_write": [], "single_read": [], "split_write": [], "split_read": []}
    for _ in range(opts.repeats):
        raw_s["single_write"].append(_timed(lambda: _write(single, total) if env.rank == 0 else None, dist,
                                                   "raw_write_1_stream"))
        _drop_cache(single)
        raw_s["single_read"].append(_timed(lambda: _read(single) if env.rank == 0 else None, dist))
        if env.rank == 0:
            single.unlink(missing_ok=True)
        raw_s["split_write"].append(_timed(lambda: _write(mine, share), dist, "raw_write_per_rank"))
        _drop_cache(mine)
        raw_s["split_read"].append(_timed(lambda: _read(mine), dist))
        mine.unlink(missing_ok=True)
    raw_single_write, raw_single_read, raw_split_write, raw_split_read = (
        statistics.median(raw_s[k]) for k in ("single_write", "single_read", "split_write", "split_read"))

    if env.rank == 0:
        mb = total / 1e6
        cpu = {name: round(statistics.median(values), 3) for name, values in CPU_S.items() if name}
        save_s, load_s = statistics.median(saves), statistics.median(loads_cold)
        result = {
            "model": opts.size, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision, "world_size": env.world_size,
            "bytes_written": total, "files": files, "repeats": opts.repeats,
            "save_s": round(save_s, 3), "save_s_all": [round(s, 3) for s in saves],
            "save_phases_rank0_s": {k: round(statistics.median(p[k] for p in phases), 3) for k in phases[0]},
            "save_phases_rank0_all_s": [{k: round(v, 3) for k, v in p.items()} for p in phases],
            "background_prune_s": round(statistics.median(prune_waits), 3),
            "save_MBps": round(mb / save_s, 1),
            "load_cold_s": round(load_s, 3), "load_cold_s_all": [round(s, 3) for s in loads_cold],
            "load_warm_s": round(statistics.median(loads_warm), 3),
            "load_cold_MBps": round(mb / load_s, 1),
            "raw_write_1_stream_s": round(raw_single_write, 3), "raw_write_1_stream_MBps": round(mb / raw_single_write, 1),
            "raw_write_per_rank_s": round(raw_split_write, 3),
            "raw_write_per_rank_MBps": round(share * env.world_size / 1e6 / raw_split_write, 1),
            "raw_read_1_stream_cold_s": round(raw_single_read, 3),
            "raw_read_1_stream_cold_MBps": round(mb / raw_single_read, 1),
            "raw_read_per_rank_cold_s": round(raw_split_read, 3),
            "raw_all_s": {k: [round(t, 3) for t in v] for k, v in raw_s.items()},
            "cpu_s_rank0": cpu,  # CPU seconds of rank 0's process: near the wall time = CPU-bound
            "loadavg_at_end": os.getloadavg(),
            "save_vs_raw": round(min(raw_single_write, raw_split_write) / save_s, 2),
            "load_vs_raw": round(min(raw_single_read, raw_split_read) / load_s, 2),
        }
        (work / "result.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help="where to write (the disk your checkpoints go to); default ./runs")
    parser.add_argument("--size", default=DEFAULTS["size"])
    parser.add_argument("--zero-stage", dest="zero_stage", type=int, default=DEFAULTS["zero_stage"])
    parser.add_argument("--precision", default=DEFAULTS["precision"])
    parser.add_argument("--nproc", type=int, default=DEFAULTS["nproc"])
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"])
    parser.add_argument("--async-stages", dest="async_stages", default=DEFAULTS["async_stages"],
                        help="ZeRO stages of the checkpoint.async comparison (default 2,3; '' to skip)")
    return worker_or_run(parser.parse_args(argv), worker, run)


def worker_or_run(args: argparse.Namespace, worker, run) -> int:
    """``--worker``: one torchrun process's part; else start the jobs and print their figures."""
    if args.worker:
        worker(args)
    else:
        print(json.dumps(run(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
