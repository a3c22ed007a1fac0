"""The ``data`` benchmark: training-loader images/s per worker against a decode+crop ceiling.

Synthetic ImageNet-like JPEGs (about 500x375, textured so that they compress like photos) are
written into class folders in a temporary directory and sharded with ``make_shards``. Then:

- ceiling: decode + RandomResizedCrop of the same bytes in a tight loop, one thread, no tar,
  no loader (what a worker could do at best);
- transform: the full worker transform (decode, crop, flip; uint8) in the same loop;
- auto_augment: that transform with and without ``data.auto_augment`` (``--auto-augment``,
  default rand-m9-mstd0.5-inc1; '' skips it), alternated, CPU time (goal: >= 0.75x);
- loader: the real training loader (tar reading, shuffle buffer, decode, augment, collate,
  transfer to the main process; normalization happens on the trainer's device) with 0
  (in-process), 1 and 2 workers,
  timed after the first batch (worker start and the first shuffle-buffer fill excluded), and
  compared with the mean of the ceilings measured just before and just after it; every setting
  runs once per round (``rounds``, default 3), and each figure is the median over the rounds.

Each figure is given per wall-clock second and per CPU second (the CPU time of the process
doing the work: this thread for the tight loops, the worker processes for the loader, read from
/proc). On a machine shared with other jobs the wall-clock figures move with the load; the
CPU-time figures much less. ``per_worker_vs_ceiling`` (CPU time) is the figure of merit
(goal: >= 0.9). With 2+ workers, ``per_worker_vs_parallel_ceiling`` also compares each worker
with as many tight loops running at once: on a machine with as many cores as workers, the
loops alone already lose to shared caches and clocks what the loader is then blamed for.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torchvision.io import decode_image, encode_jpeg
from torchvision.transforms import v2

from launch.benchmarks.common import descendants_cpu_s
from pipeline.config import DataConfig
from pipeline.data import build_train_loader
from pipeline.data.shards import write_shards
from pipeline.data.transforms import decode, train_transform
from pipeline.heap import keep_heap

DEFAULTS = dict(images=256, image_size=224, batch_size=32, workers=[0, 1, 2], seconds=5.0, rounds=3, seed=0,
                auto_augment="rand-m9-mstd0.5-inc1")


def synthetic_jpegs(count: int, seed: int, height: int = 375, width: int = 500) -> list[bytes]:
    """Photo-like JPEGs: smooth colour fields + mid-frequency structure + grain, quality 90."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(count):
        def field(h: int, w: int, scale: float) -> torch.Tensor:
            coarse = torch.randn(1, 3, h, w, generator=g) * scale
            return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)

        # about 110 KB per image at quality 90, ImageNet's average file size
        x = 128 + field(4, 5, 50) + field(24, 32, 40) + field(96, 128, 30) + torch.randn(1, 3, height, width,
                                                                                     generator=g) * 18
        images.append(encode_jpeg(x.clamp(0, 255).to(torch.uint8)[0], quality=90).numpy().tobytes())
    return images


def _rate(count: int, seconds: float) -> float:
    return round(count / max(seconds, 1e-9), 1)


def tight_loop(data: list[bytes], step, seconds: float) -> dict:
    """Images/s of ``step(bytes)`` over ``data`` repeated for about ``seconds`` (one thread)."""
    done, start, cpu_start = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - start < seconds:
        for item in data:
            step(item)
        done += len(data)
    return {"images_per_s": _rate(done, time.perf_counter() - start),
            "images_per_cpu_s": _rate(done, time.thread_time() - cpu_start)}


class DecodeCrop:
    """The ceiling: decode from a bytearray + RandomResizedCrop, nothing else."""

    def __init__(self, size: int):
        self.crop = v2.RandomResizedCrop(size, antialias=True)

    def __call__(self, data: bytearray) -> torch.Tensor:
        return self.crop(decode_image(torch.frombuffer(data, dtype=torch.uint8)))


class FullTransform:
    """What a worker does per image: decode, then the training augmentation (uint8 out)."""

    def __init__(self, size: int, cfg: DataConfig):
        self.transform = train_transform((size, size), augment=cfg.augment, crop_scale=tuple(cfg.crop_scale),
                                         hflip=cfg.hflip, shift_pixels=cfg.shift_pixels,
                                         auto_augment=cfg.auto_augment, mean=tuple(cfg.mean))

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.transform(decode(data, 3))


def _ceiling_in_child(jpegs: list[bytearray], size: int, seconds: float, results) -> None:
    torch.set_num_threads(1)
    results.put(tight_loop(jpegs, DecodeCrop(size), seconds))


def parallel_ceiling(jpegs: list[bytearray], size: int, seconds: float, processes: int) -> dict:
    """The ceiling with ``processes`` tight loops at once (one per worker, forked): what each
    worker could do at best while the others also run (shared caches, memory bandwidth and
    clock), mean over the loops."""
    context = mp.get_context("fork")
    results = context.Queue()
    children = [context.Process(target=_ceiling_in_child, args=(jpegs, size, seconds, results))
                for _ in range(processes)]
    for child in children:
        child.start()
    figures = [results.get() for _ in children]
    for child in children:
        child.join()
    return {k: round(sum(f[k] for f in figures) / len(figures), 1) for k in figures[0]}


def loader_rate(cfg: DataConfig, size: int, seconds: float) -> dict:
    loader = build_train_loader(cfg, image_size=size, num_channels=3, seed=0, rank=0, world_size=1)
    batches = iter(loader)
    first_start = time.perf_counter()
    next(batches)  # worker start and the first shuffle-buffer fill
    first = time.perf_counter() - first_start
    workers_before, main_before = descendants_cpu_s(), time.process_time()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += len(next(batches)["key"])
    rate = _rate(done, time.perf_counter() - start)
    main_cpu = time.process_time() - main_before
    workers_after = descendants_cpu_s()
    worker_cpu = sum(t - workers_before.get(pid, 0.0) for pid, t in workers_after.items())
    del batches
    workers = max(1, cfg.num_workers)
    # Without workers, everything runs in this process: its CPU time is the worker's.
    per_cpu = _rate(done, worker_cpu) if cfg.num_workers else _rate(done, main_cpu)
    return {"images_per_s": rate, "images_per_s_per_worker": round(rate / workers, 1),
            "images_per_worker_cpu_s": per_cpu, "main_process_cpu_ms_per_image": round(1e3 * main_cpu / done, 3),
            "first_batch_s": round(first, 2), "images_timed": done}


def auto_augment_cost(jpegs: list[bytearray], size: int, base: DataConfig, spec: str, seconds: float,
                      rounds: int) -> dict:
    """Decode + crop + flip with and without ``data.auto_augment``, alternated (``rounds`` times each,
    so load on a shared machine hits both); the median of the per-round CPU-time ratios."""
    plain = FullTransform(size, base)
    augmented = FullTransform(size, DataConfig(**{**base.__dict__, "auto_augment": spec}))
    pairs = [(tight_loop(jpegs, plain, seconds / 2), tight_loop(jpegs, augmented, seconds / 2))
             for _ in range(max(1, rounds))]
    return {"spec": spec,
            "without_images_per_cpu_s": statistics.median(a["images_per_cpu_s"] for a, _ in pairs),
            "with_images_per_cpu_s": statistics.median(b["images_per_cpu_s"] for _, b in pairs),
            "with_vs_without": round(statistics.median(b["images_per_cpu_s"] / a["images_per_cpu_s"]
                                                       for a, b in pairs), 3)}


def run(args: argparse.Namespace | None = None) -> dict:
    """Run the benchmark; ``args`` may set images, image_size, batch_size, workers, seconds, rounds, seed."""
    opts = {k: getattr(args, k, None) if getattr(args, k, None) is not None else v for k, v in DEFAULTS.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ceiling is one worker's: one thread, like a DataLoader worker
    keep_heap()  # this process plays the trainer, which keeps its heap on CPU (pipeline/heap.py)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
            encoded = synthetic_jpegs(opts["images"], opts["seed"])
            # The tight loops decode from bytearrays made beforehand, like the shard reader's: no copy
            jpegs = [bytearray(data) for data in encoded]
            for i, data in enumerate(encoded):
                folder = Path(tmp, "src", f"class{i % 4}")
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"img{i:05d}.jpg").write_bytes(data)
            manifest = write_shards(str(Path(tmp, "src")), Path(tmp, "shards"), shard_size=64, val_fraction=0.0)
            pattern = str(Path(tmp, "shards", manifest["splits"]["train"]["pattern"]))
            base = DataConfig(train_shards=pattern, batch_size=opts["batch_size"], shuffle_buffer=256,
                              augment="rrc", hflip=True, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
            size, seconds = opts["image_size"], opts["seconds"]
            result = {
                "images": len(jpegs),
                "mean_jpeg_kb": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1),
                "image_size": size,
                "batch_size": opts["batch_size"],
                "ceiling_decode_crop": tight_loop(jpegs, DecodeCrop(size), seconds),
                "transform_tight_loop": tight_loop(jpegs, FullTransform(size, base), seconds),
                "loader": {},
            }
            if opts["auto_augment"]:
                result["auto_augment"] = auto_augment_cost(jpegs, size, base, opts["auto_augment"], seconds,
                                                           opts["rounds"])
            # Rounds: every loader setting once per round, each next to its own ceiling measurement
            # (the mean of one just before and one just after), so that load changes on a shared
            # machine hit both sides of a ratio; the median over rounds is the figure.
            ceiling = result["ceiling_decode_crop"]
            rounds = {workers: [] for workers in opts["workers"]}
            for _ in range(max(1, opts["rounds"])):
                for workers in opts["workers"]:
                    cfg = DataConfig(**{**base.__dict__, "num_workers": workers})
                    figures = loader_rate(cfg, size, seconds)
                    after = tight_loop(jpegs, DecodeCrop(size), seconds / 2)
                    near = {k: (ceiling[k] + after[k]) / 2 for k in ceiling}
                    figures["ceiling_images_per_cpu_s"] = round(near["images_per_cpu_s"], 1)
                    figures["per_worker_vs_ceiling"] = round(figures["images_per_worker_cpu_s"]
                                                             / near["images_per_cpu_s"], 3)
                    figures["per_worker_vs_ceiling_wall"] = round(figures["images_per_s_per_worker"]
                                                                  / near["images_per_s"], 3)
                    if workers >= 2:  # the same, against as many tight loops running at once
                        together = parallel_ceiling(jpegs, size, seconds / 2, workers)
                        figures["parallel_ceiling_images_per_cpu_s"] = together["images_per_cpu_s"]
                        figures["per_worker_vs_parallel_ceiling"] = round(figures["images_per_worker_cpu_s"]
                                                                          / together["images_per_cpu_s"], 3)
                    rounds[workers].append(figures)
                    ceiling = after
            for workers, runs in rounds.items():
                summary = {key: statistics.median(run[key] for run in runs)
                           for key in runs[0] if isinstance(runs[0][key], (int, float))}
                result["loader"][f"{workers}_workers"] = {**summary, "rounds": runs}
            return result
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
