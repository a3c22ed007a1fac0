"""Repeated augmentation (``data.aug_repeats``, DeiT's RASampler) on the exact, resumable stream.

With R = aug_repeats > 1, epochs come in cycles of R. Cycle c lays the shards out in one seeded
order (as an epoch does without repeats) and takes its first M = S x G samples (S steps of a
global batch G: today's epoch length); the rest, fewer than G, is the cycle's remainder. Each
of those M distinct samples is written R times in a row: the cycle's *global order* is
d0 d0 d0 d1 d1 d1 ..., R x M positions, and epoch R*c + q is its part [q*M, (q+1)*M). So an
epoch keeps today's length (1/R of the distinct samples, each R times), and the R epochs of a
cycle are a partition: every sample exactly R times.

Position p of an epoch goes to rank p mod W, as in DeiT (rank r takes indices[r::W]): the R
copies of a sample land on R consecutive ranks, so on as many different ranks as there are, up
to R. Rank r's j-th position (its ``TrainLayout`` index, rank-major) is p = j * W + r. Within a
rank the distinct samples only move forward with j, so every loader slot reads one contiguous
stretch of the cycle's order (samples of other ranks in it are skipped by tar header, without
reading their bytes) and hands each read sample out once per copy it owns. Ranks use the same
shuffle seed per slot, so copies that share a position j also share a step (DeiT's batches hold
the copies together).

Each copy carries ``__copy__`` (its number 0..R-1), which the decoder mixes into the sample's
augmentation seed: copies are augmented independently, and a resume redoes them exactly.
"""
from __future__ import annotations

from collections.abc import Iterator

from .partition import Segment, TrainLayout, cut
from .prefetch import Piece, read_pieces


def position_copy(layout: TrainLayout, epoch: int, rank: int, j: int) -> tuple[int, int]:
    """(distinct sample's position in the cycle's order, copy number) of rank ``rank``'s j-th position."""
    repeats, world = layout.aug_repeats, layout.world_size
    global_position = (epoch % repeats) * layout.steps_per_epoch * layout.global_batch + j * world + rank
    return divmod(global_position, repeats)


def slot_picks(layout: TrainLayout, epoch: int, rank: int, slot: int
               ) -> tuple[list[Segment], int, list[tuple[int, int]]]:
    """What one slot reads and hands out in ``epoch``: (segments of the cycle's order to read,
    the first segment's position in that order, [(position in the cycle's order, copy)] for each
    of the slot's positions, in order)."""
    begin, end = layout.slot_range(rank, slot)
    first = rank * layout.steps_per_epoch * layout.batch_size  # the rank's first layout position
    picks = [position_copy(layout, epoch, rank, x - first) for x in range(begin, end)]
    if not picks:
        return [], 0, []
    lo, hi = picks[0][0], picks[-1][0] + 1
    order = layout.shard_order(epoch // layout.aug_repeats)
    return cut(order, layout.counts, lo, hi), lo, picks


class RepeatReader:
    """Source stage, like ``SliceReader``: one raw item per slot position, copies included.

    Samples of the stretch that no position of this slot needs (another rank's), and those whose
    every copy a resume already consumed, are skipped by tar header. ``replayed`` positions come
    out as placeholders, as ``SliceReader``'s do.
    """

    def __init__(self, urls: list[str], offsets: tuple[int, ...], segments: list[Segment], first: int,
                 picks: list[tuple[int, int]], replayed: set[int] = frozenset()):
        self.urls, self.offsets, self.segments, self.first = urls, offsets, segments, first
        self.picks, self.replayed = picks, replayed

    def __call__(self) -> Iterator[dict]:
        wanted: dict[int, list[tuple[int, int]]] = {}  # stretch position -> [(slot position, copy)]
        for n, (position, copy) in enumerate(self.picks):
            wanted.setdefault(position - self.first, []).append((n, copy))
        read = {q for q, uses in wanted.items() if any(n not in self.replayed for n, _ in uses)}
        pieces, shifts, base = [], [], 0  # base: stretch position of the segment's first sample
        for seg in self.segments:
            skip = {seg.start + q - base for q in range(base, base + len(seg)) if q not in read}
            pieces.append(Piece(self.urls[seg.shard], seg.start, seg.stop, skip, self.offsets[seg.shard]))
            shifts.append(base - seg.start)  # shard position -> stretch position
            base += len(seg)
        for index, position, item in read_pieces(pieces):  # the next remote piece opened ahead
            for n, copy in wanted.get(position + shifts[index], ()):
                if n in self.replayed:
                    yield {"__key__": item["__key__"], "__skip__": True}
                elif "__bad__" in item:
                    yield dict(item)
                else:
                    yield {**item, "__copy__": copy}
