"""Elastic resume: the rest of an interrupted epoch, re-cut over another set of ranks and workers.

An epoch is one global order of N samples (``partition.py``). A checkpoint taken mid-epoch says,
for every rank and slot of the layout that was reading, how many items its shuffle buffer had
handed out. The shuffle's picks depend on item counts only, so replaying it over positions
(``replayed_positions``, no I/O, no decode) tells exactly which positions of each slot were
consumed: not a prefix, but a prefix plus holes inside the last buffer's window.

A *phase* is one stretch of an epoch on one layout (world size, slots, batch size, shuffle
buffer) and what each of its slots consumed. Phase 0 reads the whole epoch on the layout of
``TrainLayout``; phase i > 0 reads, in the epoch's order, the positions no earlier phase consumed,
cut the same way: ``floor(M / G)`` whole global batches of the M remaining positions, split into
``world_size x slots`` contiguous pieces, the last ``M mod G`` (fewer than one global batch) left
out. A resume on a changed layout appends the interrupted phase to the epoch's history and reads
the next one; several changes inside one epoch chain. The next epoch starts fresh (phase 0).

The loader's state thus becomes global: (epoch, history of phases with every rank's counts).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .partition import Segment, TrainLayout, mix_seed
from .stages import replayed_positions


def shuffle_seed(seed: int, epoch: int, rank: int, slot: int, phase: int) -> int:
    """The seed of a slot's shuffle buffer; phase 0 keeps the one a run without a resume uses."""
    if phase == 0:
        return mix_seed(seed, epoch, rank, slot, "shuffle")
    return mix_seed(seed, epoch, rank, slot, "shuffle", phase)


@dataclass(frozen=True)
class Phase:
    """One stretch of an epoch read on one layout, and the items each (rank, slot) consumed."""

    world_size: int
    num_slots: int
    batch_size: int
    shuffle_buffer: int
    consumed: tuple[tuple[int, ...], ...]  # [rank][slot]: items handed out (bad ones included)

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "num_slots": self.num_slots, "batch_size": self.batch_size,
                "shuffle_buffer": self.shuffle_buffer, "consumed": [list(c) for c in self.consumed]}

    @classmethod
    def from_dict(cls, d: dict) -> Phase:
        return cls(int(d["world_size"]), int(d["num_slots"]), int(d["batch_size"]), int(d["shuffle_buffer"]),
                   tuple(tuple(int(n) for n in c) for c in d["consumed"]))


def phase_layout(num_left: int, batch_size: int, world_size: int, num_slots: int, seed: int) -> TrainLayout:
    """The cut of a phase over its ``num_left`` positions: TrainLayout's cut, positions for samples."""
    return TrainLayout((num_left,), batch_size, world_size, num_slots, seed)


def remaining_positions(num_samples: int, seed: int, epoch: int, history: tuple[Phase, ...]) -> np.ndarray:
    """Positions of the epoch's order (ascending) that no phase of ``history`` consumed."""
    left = np.arange(num_samples, dtype=np.int64)
    for index, phase in enumerate(history):
        cut = phase_layout(len(left), phase.batch_size, phase.world_size, phase.num_slots, seed)
        taken = np.zeros(len(left), dtype=bool)
        for rank in range(phase.world_size):
            for slot in range(phase.num_slots):
                begin, end = cut.slot_range(rank, slot)
                picks = replayed_positions(end - begin, phase.consumed[rank][slot], phase.shuffle_buffer,
                                           shuffle_seed(seed, epoch, rank, slot, index))
                taken[begin + np.fromiter(picks, dtype=np.int64, count=len(picks))] = True
        left = left[~taken]
    return left


def segments_of(order: list[int], counts: tuple[int, ...], positions: np.ndarray) -> list[Segment]:
    """Segments holding exactly ``positions`` (ascending) of the shards laid end to end in ``order``."""
    if len(positions) == 0:
        return []
    ends = list(np.cumsum([counts[s] for s in order]))  # end of each shard in the permuted space
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    segments = []
    for run_begin, run_end in zip(positions[np.r_[0, breaks]].tolist(),
                                  (positions[np.r_[breaks - 1, len(positions) - 1]] + 1).tolist()):
        k = bisect.bisect_right(ends, run_begin)  # the shard holding run_begin
        while run_begin < run_end:
            shard_begin = ends[k] - counts[order[k]]
            stop = min(run_end, ends[k])
            segments.append(Segment(order[k], run_begin - shard_begin, stop - shard_begin))
            run_begin, k = stop, k + 1
    return segments


@dataclass(frozen=True)
class RankCut:
    """What one rank reads of one epoch, or of the rest of one: per slot, segments and shuffle seed."""

    epoch: int
    steps: int  # the rank's batches (the same on every rank)
    num_slots: int
    segments: tuple[tuple[Segment, ...], ...]  # per slot
    seeds: tuple[int, ...]  # per slot

    def slot_batches(self, slot: int) -> int:
        return len(range(slot, self.steps, self.num_slots))


@dataclass(frozen=True)
class Continuation:
    """The rest of epoch ``epoch`` after ``history``, cut over ``layout``'s ranks and slots."""

    layout: TrainLayout
    epoch: int
    history: tuple[Phase, ...]

    @cached_property
    def left(self) -> np.ndarray:
        return remaining_positions(self.layout.num_samples, self.layout.seed, self.epoch, self.history)

    @cached_property
    def cut(self) -> TrainLayout:
        lay = self.layout
        return phase_layout(len(self.left), lay.batch_size, lay.world_size, lay.num_slots, lay.seed)

    @property
    def consumed_before(self) -> int:
        return self.layout.num_samples - len(self.left)

    def rank_cut(self, rank: int) -> RankCut:
        lay, cut, order = self.layout, self.cut, self.layout.shard_order(self.epoch)
        segments, seeds = [], []
        for slot in range(lay.num_slots):
            begin, end = cut.slot_range(rank, slot)
            segments.append(tuple(segments_of(order, lay.counts, self.left[begin:end])))
            seeds.append(shuffle_seed(lay.seed, self.epoch, rank, slot, len(self.history)))
        return RankCut(self.epoch, cut.steps_per_epoch, lay.num_slots, tuple(segments), tuple(seeds))


def keep_global_batch_accum(saved_global_batch: int, *, batch_size: int, world_size: int) -> int | None:
    """``train.grad_accum_steps`` that keeps ``saved_global_batch`` on this world size, or None where
    ``data.batch_size x world size`` does not divide it."""
    per_step = batch_size * world_size
    if saved_global_batch % per_step:
        return None
    return saved_global_batch // per_step
