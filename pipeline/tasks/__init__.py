"""Training objectives behind one interface (:class:`Task`); ``build_task`` picks one from the config."""
from __future__ import annotations

from pipeline.config import Config
from pipeline.tasks.base import ENCODER_SHAPE_FIELDS, Task
from pipeline.tasks.classification import ClassificationTask


def build_task(cfg: Config) -> Task:
    """The task ``cfg`` trains (classification for now; objectives plug in here)."""
    return ClassificationTask(label_smoothing=cfg.train.label_smoothing)


__all__ = ["ENCODER_SHAPE_FIELDS", "ClassificationTask", "Task", "build_task"]
