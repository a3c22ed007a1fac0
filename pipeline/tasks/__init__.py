"""Training objectives behind one interface (:class:`Task`); ``build_task`` picks one from the config."""
from __future__ import annotations

from pipeline.config import Config
from pipeline.tasks.base import ENCODER_SHAPE_FIELDS, Task
from pipeline.tasks.classification import ClassificationTask
from pipeline.tasks.mae import MAETask
from pipeline.tasks.simmim import SimMIMTask


def build_task(cfg: Config) -> Task:
    """The task of ``train.objective``: classification (the default), mae or simmim."""
    if cfg.train.objective == "mae":
        return MAETask(cfg.model, seed=cfg.train.seed)
    if cfg.train.objective == "simmim":
        return SimMIMTask(cfg.model, seed=cfg.train.seed)
    return ClassificationTask(label_smoothing=cfg.train.label_smoothing, data=cfg.data,
                              num_labels=cfg.model.num_labels, seed=cfg.train.seed)


__all__ = ["ENCODER_SHAPE_FIELDS", "ClassificationTask", "MAETask", "SimMIMTask", "Task", "build_task"]
