"""data.aug_repeats: every sample R times in a row of the global order, copies on different ranks,
an epoch of today's length, and each cycle of R epochs a partition; through the real loader."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
import torch

from pipeline.data import DataError, LedgerWriter, read_ledger
from pipeline.data.partition import TrainLayout
from pipeline.data.repeats import slot_picks
from test_data_stream import COUNTS, all_keys, build, data_cfg, take, write_tiny_shards


@pytest.mark.parametrize("world, repeats, slots", [(2, 3, 2), (3, 2, 1), (4, 3, 3), (1, 2, 2)])
def test_each_cycle_is_a_partition_with_copies_in_a_row_on_different_ranks(world, repeats, slots):
    layout = TrainLayout(COUNTS, 2, world, slots, seed=1, aug_repeats=repeats)
    m = layout.steps_per_epoch * layout.global_batch
    for cycle in range(2):
        copies = defaultdict(list)  # position in the cycle's order -> [(epoch, rank, copy)]
        for epoch in range(cycle * repeats, (cycle + 1) * repeats):
            per_epoch = 0
            for rank in range(world):
                for slot in range(slots):
                    _, _, picks = slot_picks(layout, epoch, rank, slot)
                    per_epoch += len(picks)
                    for position, copy in picks:
                        copies[position].append((epoch, rank, copy))
            assert per_epoch == m  # today's epoch length
        assert sorted(copies) == list(range(m))  # the first M of the cycle's order; the rest left out
        for uses in copies.values():
            assert sorted(c for _, _, c in uses) == list(range(repeats))  # exactly R times, numbered
            assert len({r for _, r, _ in uses}) == min(repeats, world)  # as many ranks as there are


def _keys_by_rank(pattern, repeats, steps, workers=0):
    return {rank: take(build(data_cfg(pattern, num_workers=workers, aug_repeats=repeats), rank=rank), steps)
            for rank in (0, 1)}


def test_ledger_every_sample_exactly_r_times_per_cycle_copies_on_both_ranks(tmp_path):
    pattern = write_tiny_shards(tmp_path)
    repeats, steps = 3, 53 // 8  # 6 steps of 2 ranks x 4 per epoch, as without repeats
    batches = _keys_by_rank(pattern, repeats, 2 * repeats * steps)
    for rank, rank_batches in batches.items():  # the run's ledger: keys per rank and step
        with LedgerWriter(tmp_path / "run", rank) as ledger:
            for step, batch in enumerate(rank_batches, 1):
                ledger.write(step, batch["key"])
    ledger = read_ledger(tmp_path / "run")
    for cycle in range(2):
        seen, ranks, images = Counter(), defaultdict(set), defaultdict(list)
        for rank, rank_batches in batches.items():
            for step in range(cycle * repeats * steps, (cycle + 1) * repeats * steps):
                assert ledger[rank][step + 1] == rank_batches[step]["key"]
                for key, image in zip(ledger[rank][step + 1], rank_batches[step]["image"]):
                    seen[key] += 1
                    ranks[key].add(rank)
                    images[key].append(image)
        assert len(seen) == 48 and set(seen) <= all_keys() and set(seen.values()) == {repeats}
        assert all(r == {0, 1} for r in ranks.values())  # copies on different ranks
        distinct = sum(len({bytes(i.numpy()) for i in imgs}) for imgs in images.values())
        assert distinct > 0.9 * 3 * 48  # independent augmentations (an 8x8 crop+flip may coincide)
    epoch0 = [k for rank in (0, 1) for b in batches[rank][:steps] for k in b["key"]]
    assert len(epoch0) == 48 and len(set(epoch0)) < 48  # an epoch: today's length, repeated samples
    same_step = sum(len(set(a["key"]) & set(b["key"])) for a, b in zip(batches[0], batches[1]))
    assert same_step > 0.5 * 48 * 2  # DeiT: copies share a step on other ranks


def test_repeats_resume_exactly_and_refuse_another_layout(tmp_path):
    pattern = write_tiny_shards(tmp_path)
    cfg = data_cfg(pattern, num_workers=0, aug_repeats=2)
    full = take(build(cfg, rank=1), 16)
    first = build(cfg, rank=1)
    head = take(first, 9)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build(cfg, rank=1)
    resumed.set_state(state)
    for a, b in zip(full, head + take(resumed, 7)):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    with pytest.raises(DataError, match="aug_repeats 2 -> 3"):
        build(data_cfg(pattern, num_workers=0, aug_repeats=3), rank=1).set_state(state)
    with pytest.raises(DataError, match="world_size 2 -> 1"):
        build(cfg, rank=0, world_size=1).set_state(state)


def test_repeats_off_is_todays_stream(tmp_path):
    pattern = write_tiny_shards(tmp_path)
    today = take(build(data_cfg(pattern, num_workers=0)), 7)
    assert "aug_repeats" not in build(data_cfg(pattern, num_workers=0)).state_dict()
    again = take(build(data_cfg(pattern, num_workers=0, aug_repeats=1)), 7)
    assert all(a["key"] == b["key"] and torch.equal(a["image"], b["image"]) for a, b in zip(today, again))
