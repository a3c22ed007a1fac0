"""Who reads which samples: the exact partition of an epoch over ranks and loader workers.

Pure functions of (shard sample counts, seed, epoch, batch size, world size, workers); no I/O.

Training, epoch ``e`` (N samples, B per-rank batch, W ranks, K slots per rank, G = B * W):

1. Permute the shards with a generator seeded by (seed, e) and lay their samples end to end:
   one index space of N samples.
2. Every rank runs S = floor(N / G) steps. The first S * G samples are cut into W * K
   contiguous slices of whole batches; the last N - S * G (< G) are this epoch's remainder
   (a different set each epoch, as the shard order changes).
3. Slot k of a rank owns the rank's batches k, k + K, k + 2K, ... (the order in which a
   DataLoader with K workers hands them out, round-robin). Its slice holds exactly that many
   batches. Slices may begin and end inside a shard: the reader skips by tar headers.

Slots, not worker processes, own data: a worker serves whichever slot comes next in its
round-robin turn, so a resumed DataLoader (whose worker 0 starts at any batch) reads exactly
the same samples. Evaluation has no shuffle and no remainder; see :class:`EvalLayout`.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers and tags; stable across machines and Python versions."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Segment:
    """Samples ``start`` to ``stop - 1`` (positions inside the shard) of shard ``shard``."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def shard_offsets(counts: tuple[int, ...]) -> tuple[int, ...]:
    """Index of each shard's first sample in the unpermuted dataset: sample id = offset + position."""
    return tuple(itertools.accumulate(counts, initial=0))[:-1]


def cut(order: list[int], counts: tuple[int, ...], begin: int, end: int) -> list[Segment]:
    """Segments covering positions [begin, end) of the shards laid end to end in ``order``."""
    segments, offset = [], 0
    for shard in order:
        count = counts[shard]
        lo, hi = max(begin, offset), min(end, offset + count)
        if lo < hi:
            segments.append(Segment(shard, lo - offset, hi - offset))
        offset += count
        if offset >= end:
            break
    return segments


@dataclass(frozen=True)
class TrainLayout:
    counts: tuple[int, ...]  # samples per shard, in the order the shards were given
    batch_size: int  # per rank
    world_size: int
    num_slots: int  # DataLoader workers per rank (1 when loading in the main process)
    seed: int
    aug_repeats: int = 1  # > 1: epochs come in cycles of repeated samples, mapped by repeats.py

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def remainder(self) -> int:
        """Samples left out of every epoch (fewer than one global batch)."""
        return self.num_samples - self.steps_per_epoch * self.global_batch

    @cached_property
    def shard_offsets(self) -> tuple[int, ...]:
        return shard_offsets(self.counts)

    def slot_batches(self, slot: int) -> int:
        """Batches slot ``slot`` produces per epoch (slots differ by at most one)."""
        return len(range(slot, self.steps_per_epoch, self.num_slots))

    def slot_batches_before(self, slot: int, batches: int) -> int:
        """How many of the rank's first ``batches`` batches of an epoch slot ``slot`` made."""
        return len(range(slot, batches, self.num_slots))

    def shard_order(self, epoch: int) -> list[int]:
        rng = np.random.default_rng(mix_seed(self.seed, epoch, "shard-order"))
        return [int(i) for i in rng.permutation(len(self.counts))]

    def slot_range(self, rank: int, slot: int) -> tuple[int, int]:
        """[begin, end) of the slot's slice in the epoch's permuted index space."""
        begin = rank * self.steps_per_epoch * self.batch_size
        begin += sum(self.slot_batches(k) for k in range(slot)) * self.batch_size
        return begin, begin + self.slot_batches(slot) * self.batch_size

    def slot_segments(self, epoch: int, rank: int, slot: int) -> list[Segment]:
        begin, end = self.slot_range(rank, slot)
        return cut(self.shard_order(epoch), self.counts, begin, end)


@dataclass(frozen=True)
class EvalLayout:
    """Every sample once, in shard order; every rank the same number of (padded) batches.

    Rank r reads the contiguous part [r*N//W, (r+1)*N//W) (parts differ by at most one); every
    rank runs ceil(ceil(N/W) / B) batches. Slot k fills its batches k, k+K, ... from a
    contiguous piece of the rank's part; slots after the last sample get padding only.
    """

    counts: tuple[int, ...]
    batch_size: int
    world_size: int
    num_slots: int

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def num_batches(self) -> int:
        return math.ceil(math.ceil(self.num_samples / self.world_size) / self.batch_size)

    def slot_batches(self, slot: int) -> int:
        return len(range(slot, self.num_batches, self.num_slots))

    def rank_range(self, rank: int) -> tuple[int, int]:
        n, w = self.num_samples, self.world_size
        return rank * n // w, (rank + 1) * n // w

    def slot_range(self, rank: int, slot: int) -> tuple[int, int]:
        lo, hi = self.rank_range(rank)
        before = sum(self.slot_batches(k) for k in range(slot)) * self.batch_size
        begin = min(lo + before, hi)
        return begin, min(begin + self.slot_batches(slot) * self.batch_size, hi)

    def slot_segments(self, rank: int, slot: int) -> list[Segment]:
        begin, end = self.slot_range(rank, slot)
        return cut(list(range(len(self.counts))), self.counts, begin, end)
