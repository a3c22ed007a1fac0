"""The evaluation loader: every sample of a rank's part exactly once per pass, padded so that every
rank runs the same number of batches (``batch["valid"]`` marks the real samples). Also the k-NN
probe's bank: the first samples of the train shards, in shard order, with the eval transform.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import DataConfig

from .loader import _Decoding, _image_hw, _next, label_mode
from .partition import EvalLayout, shard_offsets
from .remote import IoOptions
from .sources import Shard, resolve_shards
from .stages import DecodeSample, DropConsumed, EvalBatches, SkipBad, SliceReader
from .transforms import check_channels, eval_transform
from .worker import init_worker, private_generator, worker_context


class EvalStream(IterableDataset):
    """One rank's evaluation pass: every sample of its part once, padded to equal batch counts."""

    def __init__(self, shards: list[Shard], layout: EvalLayout, rank: int, decoding: _Decoding):
        self.urls, self.offsets = [s.source for s in shards], shard_offsets(layout.counts)
        self.layout, self.rank, self.decoding = layout, rank, decoding
        self.image_shape = (decoding.num_channels, *decoding.image_size)  # of the padding images

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        lay, where = self.layout, f"rank {self.rank} eval slot {slot}"
        segments = lay.slot_segments(self.rank, slot)
        decode = DecodeSample(self.decoding.transform, self.decoding.num_channels, labels=self.decoding.labels)
        return iter(wds.DataPipeline(
            # raw samples of this slot's contiguous piece, in shard order
            SliceReader(self.urls, self.offsets, segments),
            # number the items so that batches can count the bad ones
            DropConsumed(0),
            # decode + resize + center crop; bad samples are skipped, counted and logged
            wds.map(decode, handler=SkipBad(where)),
            # the slot's batches, padded after the last sample (batch["valid"] marks real ones)
            EvalBatches(lay.batch_size, lay.slot_batches(slot), total=sum(len(s) for s in segments),
                        first_index=slot, stride=lay.num_slots, image_shape=self.image_shape,
                        labels=self.decoding.labels != "none"),
        ))


class EvalLoader:
    """One pass per ``iter()``: ``num_batches`` batches on every rank, with ``batch["valid"]``."""

    def __init__(self, stream: EvalStream, *, num_workers: int):
        self.stream, self.num_workers = stream, num_workers
        self.num_batches = stream.layout.num_batches
        self.num_samples = stream.layout.num_samples
        self.skipped = 0  # bad samples in the last pass on this rank

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, in_order=True,
                            worker_init_fn=init_worker, generator=private_generator(),
                            multiprocessing_context=worker_context(self.num_workers))
        self.skipped, iterator = 0, iter(loader)
        for expected in range(self.num_batches):
            batch = _next(iterator)
            if batch["index"] != expected:
                raise RuntimeError(f"eval loader order broke: got batch {batch['index']}, expected {expected}")
            self.skipped += batch["skipped"]
            if "label" in batch:
                batch["label"] = torch.tensor(batch["label"], dtype=torch.long)
            batch["valid"] = torch.tensor(batch["valid"], dtype=torch.bool)
            yield batch


def build_eval_loader(cfg: DataConfig, *, image_size: int | tuple[int, int], num_channels: int, rank: int,
                      world_size: int, sample_keys: tuple[str, ...] = ("cls",), split: str = "val",
                      max_samples: int | None = None, shards: list[Shard] | None = None) -> EvalLoader | None:
    """The evaluation loader of ``rank`` over ``data.val_shards``, or None when they are not set.

    ``split="train"`` reads ``data.train_shards`` instead (once, in shard order, eval transform,
    no shuffle): the k-NN probe's bank. ``max_samples`` keeps only the first samples, in shard order.
    ``shards``: the split's shards already resolved (preflight), else resolved here.
    """
    spec = cfg.val_shards if split == "val" else cfg.train_shards
    if not spec:
        return None
    check_channels(num_channels)
    if shards is None:
        shards = resolve_shards(spec, cfg.manifest, what=f"data.{split}_shards", io=IoOptions.from_config(cfg))
    if max_samples is not None:  # the first max_samples: whole shards, then part of one (read by range)
        kept, left = [], max_samples
        for shard in shards:
            if left > 0:
                kept.append(Shard(shard.url, min(shard.num_samples, left), shard.remote))
            left -= shard.num_samples
        shards = kept
    batch_size = cfg.eval_batch_size or cfg.batch_size
    layout = EvalLayout(tuple(s.num_samples for s in shards), batch_size, world_size, max(1, cfg.num_workers))
    hw = _image_hw(image_size)
    decoding = _Decoding(eval_transform(hw, crop_pct=cfg.crop_pct), num_channels, hw,
                         label_mode(sample_keys, evaluation=True))
    stream = EvalStream(shards, layout, rank, decoding)
    return EvalLoader(stream, num_workers=cfg.num_workers)
