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

from pipeline.storage import writing

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
            if resume_step is not None and path.is_file():
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and _row_step(line) <= resume_step]
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                tmp.replace(path)
            self._file = path.open("a", buffering=1)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with writing("metrics", self.path):
            self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        with writing("metrics", self.path):
            self._file.close()


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return sys.maxsize  # a torn last line of a killed run: dropped


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
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        with writing("TensorBoard events", self.log_dir):
            self._writer.close()


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
    return measure_matmul_flops(dtype, size=1024, repeats=4)


def measure_matmul_flops(dtype: torch.dtype, *, size: int, repeats: int, device: str = "cpu") -> float:
    """Best-of-``repeats`` FLOP/s of a square ``torch.mm`` (the ceiling a step's matmuls face)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.mm(a, b)  # warm-up: thread pool, kernel choice
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class ProgressBar:
    """A one-line progress display on rank 0 (step, loss, lr, images/s); silent elsewhere."""

    def __init__(self, total: int, *, initial: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr,
                             desc="train", mininterval=1.0)

    def update(self, step: int, **fields: Any) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()},
                              refresh=False)
        self._bar.update(step - self._bar.n)  # redraws at most once per mininterval

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """Python logging with the rank in every line; other ranks only warn, to keep output readable."""
    logging.basicConfig(level=level if rank == 0 else logging.WARNING, force=True, stream=sys.stderr,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
