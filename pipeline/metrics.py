"""Metrics behind a tiny interface: ``log(metrics, step)`` and ``close()``.

Rank 0 writes ``metrics.jsonl`` and TensorBoard events; the other ranks log nothing, so every
figure is written once. Throughput and MFU come from wall-clock time and the ViT's analytic FLOPs.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.storage import keep_rows_up_to, writing

log = logging.getLogger(__name__)


class MetricsWriter(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


class JsonlWriter:
    """One JSON object per line; appended, so a resumed run continues the same file.

    With ``resume_step``, rows after that step are dropped first: an interrupted run wrote
    them after its last checkpoint, and the resumed run writes those steps again. A write the
    disk refuses (full, read-only) is a one-line StorageError (storage.py)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        with writing("metrics", path):
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                keep_rows_up_to(path, resume_step)
            self._file = path.open("a", buffering=1)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with writing("metrics", self.path):
            self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        with writing("metrics", self.path):
            self._file.close()


class TensorBoardWriter:
    """TensorBoard's event file. Its writer thread keeps a failed write (a full disk) to itself;
    the next ``log`` or ``close`` raises it here, as a one-line StorageError."""

    def __init__(self, log_dir: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        # purge_step hides the events an interrupted (or overwritten) run wrote after resume_step.
        purge = None if resume_step is None else resume_step + 1
        with writing("TensorBoard events", log_dir):
            self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        with writing("TensorBoard events", self.log_dir):
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._writer.add_scalar(tensorboard_tag(key), value, step)

    def close(self) -> None:
        with writing("TensorBoard events", self.log_dir):
            self._writer.close()


def tensorboard_tag(key: str) -> str:
    """Grouped as TensorBoard shows sections: ``val_top1`` -> ``val/top1``, ``loss`` -> ``train/loss``."""
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


class NullWriter:
    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class MultiWriter:
    def __init__(self, writers: list[MetricsWriter]):
        self._writers = writers

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for writer in self._writers:
            writer.log(metrics, step)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()


def build_metrics_writer(output_dir: str | Path, *, rank: int, resume_step: int | None = None) -> MetricsWriter:
    """The one place that decides who logs: rank 0 writes JSONL and TensorBoard, others nothing."""
    if rank != 0:
        return NullWriter()
    output_dir = Path(output_dir)
    writers: list[MetricsWriter] = [JsonlWriter(output_dir / "metrics.jsonl", resume_step)]
    try:
        writers.append(TensorBoardWriter(output_dir / "tensorboard", resume_step))
    except ImportError:  # tensorboard is a declared dependency; keep training if an env lacks it
        log.warning("tensorboard is not installed; writing metrics.jsonl only")
    return MultiWriter(writers)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# Dense peak FLOP/s by device name, for MFU on GPUs (bf16/fp16 tensor cores; fp32 via TF32).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The FLOP/s a matrix multiply can reach here: a table for GPUs, measured on CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops if dtype != torch.float32 else flops / 2
        return float("nan")
    # 256: bf16 matmuls on CPUs without bf16 instructions are slow, and a 1024 one cost each rank
    # 11 s of CPU at every start, to reach a lower best than 256 does (docs/DECISIONS.md)
    return measure_matmul_flops(dtype, size=256, repeats=4)


def measure_matmul_flops(dtype: torch.dtype, *, size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Best-of-``repeats`` FLOP/s of a square ``torch.mm`` (the ceiling a step's matmuls face; the
    benchmarks' reference too)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: thread pool, kernel choice
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


class Progress:
    """Rank 0's view of the run: a tqdm bar on a terminal, else one plain log line per metrics row.

    A bar in a file (Slurm's output, a redirected log) is a wall of carriage returns, and with
    ``train.progress_bar=false`` a run would say nothing between its start and the first
    evaluation; so without a bar, every metrics row is also printed as one line."""

    def __init__(self, total: int, *, initial: int, enabled: bool, bar: bool = True):
        self.total, self.enabled, self._bar = total, enabled, None
        if enabled and bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr,
                             desc="train", mininterval=1.0)

    def update(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)  # redraws at most once per mininterval

    def log(self, step: int, row: dict[str, Any]) -> None:
        """A metrics row: the bar's figures, or a line of its own."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix({"loss": f"{row['loss']:.4g}", "lr": f"{row['lr']:.3g}",
                                   "img/s": f"{row['samples_per_s']:.0f}"}, refresh=False)
            return
        eta = row["step_time_s"] * (self.total - step)
        log.info("step %d/%d  loss %.4f  lr %.3g  %.0f img/s  data wait %.1f%%  ETA %s", step, self.total,
                 row["loss"], row["lr"], row["samples_per_s"], 100 * row["data_wait_fraction"], _duration(eta))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """Python logging with the rank in every line; other ranks only warn, to keep output readable."""
    logging.basicConfig(level=level if rank == 0 else logging.WARNING, force=True, stream=sys.stderr,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
