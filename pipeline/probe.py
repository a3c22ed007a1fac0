"""The representation probe of masked-image pretraining: k-NN top-1 of the encoder's features.

At each evaluation, when the shards carry labels, every validation image's feature (the final CLS
token, or the mean of the patch tokens: ``probe.features``) votes with its k nearest neighbours
(cosine similarity) in a bank of training features: the first ``probe.bank_size`` samples of
``data.train_shards`` in shard order, read once per evaluation with the evaluation transform.
Each neighbour votes for its class with weight exp(similarity / T) and the class with the largest
sum wins: DINO's weighted k-NN (k=20, T=0.07 there and by default here).

Each rank computes the features of its part of the validation set (collected during the
evaluation's own pass, ``collect``) and of the bank; the bank is gathered across ranks on the
device's process group, each rank scores its own queries against the whole bank, and one
all-reduce adds up the hits. A set whose samples carry no ``.cls`` gives no k-NN figure: the
first evaluation finds that out, and the probe stays off from then on.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import Config, ProbeConfig
from pipeline.data import EvalLoader, build_eval_loader
from pipeline.data.device_feed import DeviceFeed, Normalize
from pipeline.distributed.env import DistributedEnv
from pipeline.distributed.precision import autocast_context, engine_dtype
from pipeline.tasks import Task

log = logging.getLogger(__name__)

QUERY_CHUNK = 1024  # validation features scored at once: a (chunk, bank) similarity matrix


def knn_predict(queries: Tensor, bank: Tensor, bank_labels: Tensor, *, k: int, temperature: float,
                num_classes: int) -> Tensor:
    """Class predictions (queries,) by DINO's weighted vote of the ``k`` nearest bank rows by cosine.

    queries (queries, dim), bank (bank, dim), bank_labels (bank,) in [0, num_classes).
    """
    queries, bank = F.normalize(queries.float(), dim=1), F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    predictions = []
    for chunk in queries.split(QUERY_CHUNK):
        similarity = chunk @ bank.T  # (chunk, bank)
        top, index = similarity.topk(k, dim=1)  # (chunk, k)
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        votes.scatter_add_(1, bank_labels[index], (top / temperature).exp())  # (chunk, classes)
        predictions.append(votes.argmax(dim=1))  # ties: the lowest class index
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long, device=queries.device)


def gather_rows(rows: Tensor) -> Tensor:
    """Every rank's ``rows`` (the same shape on every rank), concatenated in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return rows
    parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, rows.contiguous())
    return torch.cat(parts)


class KnnProbe:
    """``begin()`` before an evaluation pass, ``collect()`` per validation batch, ``finish()`` after it."""

    def __init__(self, cfg: ProbeConfig, task: Task, bank_loader: EvalLoader, *, run_cfg: Config,
                 device: torch.device, normalize: Normalize):
        self.cfg, self.task, self.bank_loader = cfg, task, bank_loader
        self.run_cfg, self.device, self.normalize = run_cfg, device, normalize
        self.enabled = True
        self.features: list[Tensor] = []
        self.labels: list[Tensor] = []

    def begin(self) -> None:
        self.features, self.labels = [], []

    def _features(self, engine: Any, images: Tensor) -> Tensor:
        cls, mean = self.task.features(engine, images)
        return (cls if self.cfg.features == "cls" else mean).float()  # (batch, hidden)

    def collect(self, engine: Any, batch: dict) -> None:
        """One validation batch (inside the evaluation's no_grad and autocast): its features, and
        its labels with padding and unlabeled samples set to -1."""
        if not self.enabled:
            return
        labels = batch.get("label")
        if labels is None:
            labels = torch.full((batch["image"].shape[0],), -1, dtype=torch.long, device=self.device)
        self.features.append(self._features(engine, batch["image"]))
        self.labels.append(torch.where(batch["valid"] & (labels >= 0), labels, -1))

    def finish(self, engine: Any) -> dict[str, float]:
        """{"val_knn_top1": ...} over the labeled validation samples, or {} when there are none."""
        if not self.enabled or not self.features:
            return {}
        started = time.perf_counter()
        queries, labels = torch.cat(self.features), torch.cat(self.labels)
        self.features, self.labels = [], []
        labeled = torch.stack([(labels >= 0).sum()]).double()
        dist.all_reduce(labeled)
        if labeled.item() == 0:  # the same answer on every rank: no rank starts the bank pass alone
            log.info("probe: the validation shards carry no labels (.cls); no k-NN figure")
            self.enabled = False
            return {}
        bank, bank_labels = self._bank(engine)
        keep = bank_labels >= 0
        bank, bank_labels = bank[keep], bank_labels[keep]
        if bank.shape[0] == 0:
            log.warning("probe: none of the first %d training samples carries a label (.cls); no k-NN figure",
                        self.cfg.bank_size)
            self.enabled = False
            return {}
        mine = labels >= 0
        predicted = knn_predict(queries[mine], bank, bank_labels, k=self.cfg.k, temperature=self.cfg.temperature,
                                num_classes=int(bank_labels.max()) + 1)
        hits = torch.stack([(predicted == labels[mine]).sum(), mine.sum()]).double()
        dist.all_reduce(hits)
        correct, total = hits.tolist()
        log.info("probe: k-NN (k=%d, %s features) over %d validation samples against a bank of %d in %.1f s",
                 self.cfg.k, self.cfg.features, int(total), bank.shape[0], time.perf_counter() - started)
        return {"val_knn_top1": correct / total}

    def _bank(self, engine: Any) -> tuple[Tensor, Tensor]:
        """Features and labels (-1: none, or padding) of the bank, from every rank."""
        features, labels = [], []
        feed = DeviceFeed(iter(self.bank_loader), device=self.device, dtype=engine_dtype(self.run_cfg.train),
                          normalize=self.normalize)
        for batch in feed:
            with autocast_context(self.run_cfg.train, self.device):
                features.append(self._features(engine, batch["image"]))
            labels.append(torch.where(batch["valid"] & (batch["label"] >= 0), batch["label"], -1))  # "optional"
        return gather_rows(torch.cat(features)), gather_rows(torch.cat(labels))


def build_probe(cfg: Config, task: Task, env: DistributedEnv, *, device: torch.device,
                normalize: Normalize) -> KnnProbe | None:
    """The k-NN probe of this run, or None: it needs ``probe.knn``, validation shards, and a task
    with encoder features (mae, simmim)."""
    if not (cfg.probe.knn and cfg.data.val_shards and task.has_features):
        return None
    bank = build_eval_loader(cfg.data, image_size=cfg.model.image_hw, num_channels=cfg.model.num_channels,
                             rank=env.rank, world_size=env.world_size, sample_keys=task.sample_keys,
                             split="train", max_samples=cfg.probe.bank_size)
    return KnnProbe(cfg.probe, task, bank, run_cfg=cfg, device=device, normalize=normalize)
