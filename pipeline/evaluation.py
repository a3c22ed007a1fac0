"""One pass over the validation set: the task's sums on the device, reduced over ranks, then metrics.

Every rank runs the same number of batches (padding marked ``valid=False``), so the one
all-reduce at the end meets on every rank, and the figures count every sample exactly once.
A representation probe (``pipeline/probe.py``), when given, reads its validation features in
the same pass and adds its figures to the task's. With an EMA of the weights, a second pass
computes the task's figures with the average, reported with ``_ema`` (``val_top1_ema``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.data import EvalLoader
from pipeline.data.device_feed import DeviceFeed, Normalize
from pipeline.distributed.ema import WeightEma
from pipeline.distributed.precision import autocast_context, engine_dtype
from pipeline.probe import KnnProbe
from pipeline.tasks import Task


def evaluate(engine: Any, task: Task, loader: EvalLoader, *, cfg: Config, device: torch.device,
             normalize: Normalize, probe: KnnProbe | None = None, ema: WeightEma | None = None) -> dict[str, float]:
    """The task's metrics (and the probe's) over the whole validation set; with ``ema``, also the
    task's metrics of the averaged weights, each name with ``_ema``."""
    metrics = _evaluate(engine, task, loader, cfg=cfg, device=device, normalize=normalize, probe=probe)
    if ema is not None:
        with ema.in_model():
            averaged = _evaluate(engine, task, loader, cfg=cfg, device=device, normalize=normalize, probe=None)
        metrics.update({f"{name}_ema": value for name, value in averaged.items() if name != "val_samples"})
    return metrics


@torch.no_grad()
def _evaluate(engine: Any, task: Task, loader: EvalLoader, *, cfg: Config, device: torch.device,
              normalize: Normalize, probe: KnnProbe | None) -> dict[str, float]:
    engine.eval()
    try:
        task.start_eval(device)
        if probe is not None:
            probe.begin()
        sums = torch.zeros(len(task.eval_names), dtype=torch.float64, device=device)
        for batch in DeviceFeed(iter(loader), device=device, dtype=engine_dtype(cfg.train), normalize=normalize):
            with autocast_context(cfg.train, device):
                sums += task.eval_sums(engine, batch)
                if probe is not None:
                    probe.collect(engine, batch)
        dist.all_reduce(sums)
        metrics = task.eval_metrics(dict(zip(task.eval_names, sums.tolist())))
        if probe is not None:
            metrics.update(probe.finish(engine))
        return metrics
    finally:
        engine.train()
