"""The partition alone (no I/O): exactly-once, equal steps, pure in its inputs."""
from __future__ import annotations

import random

import pytest

from pipeline.data.partition import EvalLayout, TrainLayout, cut
from pipeline.data.stages import replayed_positions, seeded_shuffle


def _expand(layout, segments):
    offsets = layout.shard_offsets
    return [offsets[s.shard] + p for s in segments for p in range(s.start, s.stop)]


CASES = [((9, 4, 13, 7, 11, 3, 6), 4, 2, 2), ((100,), 8, 4, 3), ((5, 5, 5), 2, 3, 4), ((1,) * 37, 3, 2, 5),
         ((17, 0, 9), 5, 1, 1), ((1000, 1, 2), 16, 8, 8)]


@pytest.mark.parametrize("counts,batch,world,slots", CASES)
def test_train_layout_covers_each_sample_once(counts, batch, world, slots):
    layout = TrainLayout(counts, batch, world, slots, seed=3)
    n, g = sum(counts), batch * world
    assert layout.steps_per_epoch == n // g and layout.remainder == n % g < g
    for epoch in range(3):
        seen = []
        for rank in range(world):
            rank_batches = 0
            for slot in range(slots):
                ids = _expand(layout, layout.slot_segments(epoch, rank, slot))
                assert len(ids) == layout.slot_batches(slot) * batch
                rank_batches += layout.slot_batches(slot)
                seen += ids
            assert rank_batches == layout.steps_per_epoch  # equal steps on every rank
        assert len(seen) == len(set(seen)) == n - layout.remainder


def test_shard_order_is_seeded_by_seed_and_epoch():
    a = TrainLayout((3,) * 20, 2, 2, 2, seed=0)
    assert a.shard_order(0) == TrainLayout((3,) * 20, 2, 2, 2, seed=0).shard_order(0)
    assert a.shard_order(0) != a.shard_order(1)
    assert a.shard_order(0) != TrainLayout((3,) * 20, 2, 2, 2, seed=1).shard_order(0)


def test_remainder_changes_with_the_epoch():
    layout = TrainLayout((7,) * 9, 4, 2, 1, seed=0)  # 63 samples, G = 8: 7 left out per epoch
    left = [set(range(63)) - {i for r in range(2) for i in _expand(layout, layout.slot_segments(e, r, 0))}
            for e in range(4)]
    assert all(len(x) == 7 for x in left) and len({frozenset(x) for x in left}) > 1


@pytest.mark.parametrize("counts,batch,world,slots", CASES + [((3,), 4, 2, 2)])
def test_eval_layout_every_sample_once_equal_batches(counts, batch, world, slots):
    layout = EvalLayout(counts, batch, world, slots)
    seen = []
    for rank in range(world):
        assert sum(layout.slot_batches(s) for s in range(slots)) == layout.num_batches
        for slot in range(slots):
            begin, end = layout.slot_range(rank, slot)
            assert end - begin <= layout.slot_batches(slot) * batch
            seen += list(range(begin, end))
            assert sum(len(s) for s in layout.slot_segments(rank, slot)) == end - begin
    assert seen == list(range(sum(counts)))


def test_cut_inside_shards():
    segs = cut([2, 0, 1], (5, 6, 7), 3, 15)  # layout: shard2[0:7], shard0[0:5], shard1[0:6]
    assert [(s.shard, s.start, s.stop) for s in segs] == [(2, 3, 7), (0, 0, 5), (1, 0, 3)]


def test_replay_of_positions_matches_the_real_shuffle():
    items = [f"sample{i}" for i in range(50)]
    order = list(seeded_shuffle(16, 7)(iter(items)))
    for consumed in (0, 1, 17, 49, 50):
        assert {items[p] for p in replayed_positions(50, consumed, 16, 7)} == set(order[:consumed])
    assert sorted(order) == sorted(items) and order != items
    random.seed(0)  # the global generator does not influence the seeded shuffle
    assert list(seeded_shuffle(16, 7)(iter(items))) == order
