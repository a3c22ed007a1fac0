"""The ``checkpoint`` benchmark's asynchronous part: what a save costs training with
``checkpoint.async`` against a synchronous save of the same state, and how much slower the steps
run while the background write goes on.

One torchrun job per ZeRO stage (2 processes by default) builds the model, trains a few steps,
then, ``repeats`` times and interleaved so that the machine's load hits both alike:

- sync: ``pipeline.checkpoint.save`` as training calls it without ``checkpoint.async``;
- async: the same call with a ``BackgroundWriter``: the training-visible part (stage into host
  memory, DeepSpeed's barriers), then ``steps`` training steps while the write runs, then the
  wait for the write (0 when it finished during the steps);
- steps without a write in flight, as many, right after.

``visible_vs_sync`` = median async training-visible time / median synchronous save (goal <= 0.15);
``step_slowdown`` = median step time with a write in flight / without (goal <= 1.10).

With ``decoupled`` the job also builds a second engine with DeepSpeed's decoupled checkpoint
writer (``"checkpoint": {"writer": {"decoupled": true, "type": "python"}}``, a subprocess per
rank) and times its ``save_checkpoint`` plus the extra time of the next step, where DeepSpeed
waits for the subprocess before the optimizer step: the comparison behind docs/DECISIONS.md.
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

DEFAULTS = dict(size="B/16", stages="2,3", precision="bf16", nproc=2, repeats=3, steps=3, batch=2, dir=None,
                decoupled=False)


def run(args: argparse.Namespace | None = None) -> dict:
    """One torchrun job per ZeRO stage; ``args`` may set the keys of DEFAULTS."""
    opts = {k: getattr(args, k, None) if getattr(args, k, None) is not None else v for k, v in DEFAULTS.items()}
    parent = Path(opts["dir"]) if opts["dir"] else Path.cwd() / "runs"
    parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for stage in [int(s) for s in str(opts["stages"]).split(",")]:
        work = Path(tempfile.mkdtemp(prefix=f"bench-checkpoint-async-{stage}-", dir=parent))
        try:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={opts['nproc']}", "-m", "launch.benchmarks.checkpoint_async", "--worker",
                       "--dir", str(work), "--size", opts["size"], "--stages", str(stage),
                       "--precision", opts["precision"], "--repeats", str(opts["repeats"]),
                       "--steps", str(opts["steps"]), "--batch", str(opts["batch"]),
                       *(["--decoupled"] if opts["decoupled"] else [])]
            env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                   "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            result_path = work / "result.json"
            if done.returncode != 0 or not result_path.is_file():
                raise RuntimeError(f"checkpoint async benchmark failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
            results[f"zero{stage}"] = json.loads(result_path.read_text())
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return results


# ------------------------------------------------------------------------------------ in the workers
def worker(opts: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from launch.benchmarks.checkpoint import start_worker
    from pipeline import checkpoint
    from pipeline.distributed.engine import build_engine
    from pipeline.distributed.precision import engine_dtype
    from pipeline.model import build_model

    work = Path(opts.dir)
    env, cfg = start_worker([f"model.size={opts.size}", f"train.zero_stage={opts.stages}",
                             f"train.precision={opts.precision}", f"data.batch_size={opts.batch}",
                             f"train.output_dir={work}"])
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dtype = engine_dtype(cfg.train)
    images = torch.randn(opts.batch, cfg.model.num_channels, *cfg.model.image_hw, dtype=dtype, device=device)

    def build(extra: dict | None = None):
        torch.manual_seed(0)
        if extra:
            cfg.deepspeed.update(extra)
        return build_engine(build_model(cfg.model), cfg, world_size=env.world_size)

    def train_step(engine) -> None:
        loss = engine(images).logits.float().logsumexp(-1).mean()
        engine.backward(loss)
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:  # from a common start to the last rank's end
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - start

    engine = build()
    for _ in range(2):  # every optimizer state exists, the allocator is warm
        train_step(engine)
    writer = checkpoint.BackgroundWriter(rank=env.rank)
    marker = {"world_size": env.world_size, "zero_stage": cfg.train.zero_stage}
    in_flight = torch.zeros(1)

    def save(step: int, background=None) -> None:
        checkpoint.save(engine, output_dir=work, step=step, client_state={"step": step}, marker_info=marker,
                        keep_last=1, rank=env.rank, background=background)

    sync_s, visible_s, wait_s, write_s, during, quiet = [], [], [], [], [], []
    for r in range(opts.repeats):
        sync_s.append(timed(lambda: save(10 * r + 1)))
        checkpoint.wait_for_prune()
        visible_s.append(timed(lambda: save(10 * r + 2, writer)))
        for _ in range(opts.steps):
            in_flight[0] = float(writer.writing)  # rank 0's thread decides: the same verdict on every rank
            dist.broadcast(in_flight, 0)
            seconds = timed(lambda: train_step(engine))
            (during if in_flight.item() else quiet).append(seconds)
        wait_s.append(timed(writer.wait))
        write_s.append(writer.last_write_s)
        quiet.extend(timed(lambda: train_step(engine)) for _ in range(opts.steps))
    result = {"model": opts.size, "zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision,
              "world_size": env.world_size, "batch_per_rank": opts.batch, "repeats": opts.repeats,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "staged_bytes_rank0": writer.buffers.bytes,
              "sync_save_s": _median(sync_s), "sync_save_s_all": _rounded(sync_s),
              "async_visible_s": _median(visible_s), "async_visible_s_all": _rounded(visible_s),
              "async_wait_at_next_save_s_all": _rounded(wait_s),
              "async_background_write_s_rank0_all": _rounded(write_s),
              "visible_vs_sync": round(statistics.median(visible_s) / statistics.median(sync_s), 3),
              "step_s_writing": _median(during), "step_s_writing_all": _rounded(during),
              "step_s_quiet": _median(quiet), "step_s_quiet_all": _rounded(quiet),
              "step_slowdown": (round(statistics.median(during) / statistics.median(quiet), 3)
                                if during and quiet else None)}
    if opts.decoupled:
        try:
            result["deepspeed_decoupled"] = _decoupled(build, train_step, timed, work, opts, quiet)
        except Exception as error:  # 0.19.8 without a model-parallel unit: AttributeError ... 'dp_rank'
            result["deepspeed_decoupled"] = {"error": f"{type(error).__name__}: {error}"}
    if env.rank == 0:
        result["loadavg_at_end"] = os.getloadavg()
        (work / "result.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def _decoupled(build, train_step, timed, work: Path, opts, quiet: list[float]) -> dict:
    """DeepSpeed's decoupled writer: its save_checkpoint, and the next step's extra time (the
    commit waits there for the subprocess); no fsync, no marker of ours."""
    # Its writer placement reads the deepspeed launcher's machine count and rank (KeyError under torchrun).
    os.environ.setdefault("CROSS_SIZE", "1")
    os.environ.setdefault("CROSS_RANK", "0")
    engine = build({"checkpoint": {"writer": {"decoupled": True, "type": "python"}}})
    for _ in range(2):
        train_step(engine)
    root = work / "decoupled"
    calls, next_steps = [], []
    for r in range(opts.repeats):
        calls.append(timed(lambda: engine.save_checkpoint(str(root), tag=f"step-{r}", save_latest=False)))
        next_steps.append(timed(lambda: train_step(engine)))
        for _ in range(opts.steps):
            quiet.append(timed(lambda: train_step(engine)))
    base = statistics.median(quiet)
    visible = [c + max(0.0, n - base) for c, n in zip(calls, next_steps)]
    return {"save_call_s_all": _rounded(calls), "next_step_s_all": _rounded(next_steps), "quiet_step_s": round(base, 3),
            "visible_s": _median(visible), "visible_s_all": _rounded(visible)}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help="where to write (the disk your checkpoints go to); default ./runs")
    parser.add_argument("--size", default=DEFAULTS["size"])
    parser.add_argument("--stages", default=DEFAULTS["stages"], help="ZeRO stages, one job each (default 2,3)")
    parser.add_argument("--precision", default=DEFAULTS["precision"])
    parser.add_argument("--nproc", type=int, default=DEFAULTS["nproc"])
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="steps timed during each background write")
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    parser.add_argument("--decoupled", action="store_true", help="also time DeepSpeed's decoupled writer")
    from launch.benchmarks.checkpoint import worker_or_run

    return worker_or_run(parser.parse_args(argv), worker, run)


if __name__ == "__main__":
    sys.exit(main())
