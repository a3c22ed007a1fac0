"""Elastic resume: the rest of an interrupted epoch on another world size, worker count or batch size.

What the old run trained is worked out here independently of ``elastic.py``'s replay: by running
the real shuffle buffer over each slot's sample ids and taking what it handed out. The exact-once
property is then checked on sample ids (the partition) and on keys (the real loader, with
DataLoader worker processes where the layout has more than one slot). The loader knows nothing
of ZeRO: its state is the same at ZeRO 0-3 (the trainer gathers it into every checkpoint).
"""
from __future__ import annotations

import json
import logging

import pytest

from pipeline.data.elastic import Continuation, Phase, keep_global_batch_accum, segments_of, shuffle_seed
from pipeline.data.partition import TrainLayout
from pipeline.data.stages import seeded_shuffle
from test_data_stream import all_keys, build, data_cfg, take, write_tiny_shards

COUNTS = (9, 4, 13, 7, 11, 3, 6)  # 53 samples in 7 uneven shards
BUFFER = 5


def _ids(layout: TrainLayout, segments) -> list[int]:
    return [layout.shard_offsets[s.shard] + p for s in segments for p in range(s.start, s.stop)]


def _handed_out(items: list[int], count: int, seed: int) -> list[int]:
    """The first ``count`` items a slot's real shuffle buffer hands out."""
    return list(seeded_shuffle(BUFFER, seed)(iter(items)))[:count]


def _phase(layout: TrainLayout, epoch: int, cut_of, batches: int, extra: dict | None = None):
    """Simulate ``batches`` steps on every rank: (trained sample ids, the Phase a checkpoint records).
    ``cut_of(rank, slot)`` -> (sample ids of the slot's slice, shuffle seed); ``extra[(rank, slot)]``
    items the slot also consumed (bad samples it skipped)."""
    trained, consumed = [], []
    for rank in range(layout.world_size):
        per_slot = []
        for slot in range(layout.num_slots):
            items, seed = cut_of(rank, slot)
            count = layout.slot_batches_before(slot, batches) * layout.batch_size + (extra or {}).get((rank, slot), 0)
            trained += _handed_out(items, count, seed)
            per_slot.append(count)
        consumed.append(tuple(per_slot))
    return trained, Phase(layout.world_size, layout.num_slots, layout.batch_size, BUFFER, tuple(consumed))


def _whole_epoch(layout: TrainLayout, epoch: int):
    return lambda rank, slot: (_ids(layout, layout.slot_segments(epoch, rank, slot)),
                               shuffle_seed(layout.seed, epoch, rank, slot, 0))


def _check_rest(layout: TrainLayout, rest: Continuation, trained: list[int]) -> list[list[int]]:
    """Exactly once: the re-cut holds every untrained sample but fewer than one global batch, in
    equal steps per rank, each slot whole batches; returns the re-cut's ids per rank and slot."""
    cuts = [rest.rank_cut(rank) for rank in range(layout.world_size)]
    assert len({c.steps for c in cuts}) == 1
    ids = [[_ids(layout, c.segments[slot]) for slot in range(layout.num_slots)] for c in cuts]
    for cut, rank_ids in zip(cuts, ids):
        assert [len(x) for x in rank_ids] == [cut.slot_batches(k) * layout.batch_size for k in range(layout.num_slots)]
    new = [i for rank_ids in ids for x in rank_ids for i in x]
    assert len(trained) == len(set(trained)) and len(new) == len(set(new)) and not set(new) & set(trained)
    left_out = set(range(layout.num_samples)) - set(trained) - set(new)
    assert len(left_out) == len(rest.left) - cuts[0].steps * layout.global_batch < layout.global_batch
    assert rest.consumed_before == len(trained)
    return ids


# (world size, slots, batch size) before and after; batches trained before the checkpoint
CHANGES = [((2, 2, 2), (1, 2, 2), 3), ((2, 2, 2), (3, 2, 2), 4), ((3, 2, 2), (2, 2, 2), 2),
           ((2, 2, 2), (2, 1, 2), 3), ((2, 1, 2), (3, 2, 1), 5), ((2, 2, 2), (1, 1, 4), 1)]


@pytest.mark.parametrize("before,after,batches", CHANGES)
def test_the_rest_of_the_epoch_is_trained_exactly_once_on_the_new_layout(before, after, batches):
    epoch = 2
    old, new = TrainLayout(COUNTS, before[2], before[0], before[1], 7), TrainLayout(COUNTS, after[2], after[0], after[1], 7)
    extra = {(0, 0): 1, (before[0] - 1, before[1] - 1): 2}  # bad samples: uneven counts, as in a real run
    trained, phase = _phase(old, epoch, _whole_epoch(old, epoch), batches, extra)
    _check_rest(new, Continuation(new, epoch, (phase,)), trained)


def test_two_changes_inside_one_epoch_chain():
    """2 ranks x 2 slots -> 3 x 1 -> 2 x 2 inside one epoch, with the last re-cut resumed once more."""
    epoch, seed = 1, 3
    first, second = TrainLayout(COUNTS, 2, 2, 2, seed), TrainLayout(COUNTS, 2, 3, 1, seed)
    trained, phase0 = _phase(first, epoch, _whole_epoch(first, epoch), 2)
    rest = Continuation(second, epoch, (phase0,))
    ids = _check_rest(second, rest, trained)
    cuts = [rest.rank_cut(r) for r in range(3)]
    more, phase1 = _phase(second, epoch, lambda r, k: (ids[r][k], cuts[r].seeds[k]), 2)
    third = TrainLayout(COUNTS, 2, 2, 2, seed)
    _check_rest(third, Continuation(third, epoch, (phase0, phase1)), trained + more)


def test_segments_of_positions_with_holes():
    order, counts = [2, 0, 1], (5, 6, 7)  # permuted space: shard2[0:7], shard0[0:5], shard1[0:6]
    import numpy as np

    segments = segments_of(order, counts, np.array([0, 1, 3, 6, 7, 8, 12, 17]))
    assert [(s.shard, s.start, s.stop) for s in segments] == [(2, 0, 2), (2, 3, 4), (2, 6, 7), (0, 0, 2), (1, 0, 1),
                                                              (1, 5, 6)]


def test_keep_global_batch_accumulation():
    assert keep_global_batch_accum(64, batch_size=16, world_size=2) == 2
    assert keep_global_batch_accum(64, batch_size=16, world_size=4) == 1
    assert keep_global_batch_accum(64, batch_size=16, world_size=3) is None
    assert keep_global_batch_accum(64, batch_size=16, world_size=8) is None


# --- through the real loader: shards on disk, DataLoader workers, states as a checkpoint keeps them ---

def _run_ranks(pattern: str, world: int, workers: int, steps: int, states: list[dict] | None = None):
    """Every rank's batches (``steps`` each, or the resumed epoch's rest then one more epoch when
    ``steps`` is None) and the loader state after each batch (what the trainer saves)."""
    out = []
    for rank in range(world):
        loader = build(data_cfg(pattern, num_workers=workers, shuffle_buffer=BUFFER), rank=rank, world_size=world)
        if states is not None:
            loader.set_state(json.loads(json.dumps(states)))  # through JSON, as a checkpoint stores it
        count = steps if steps is not None else loader.resume_report["steps"] + loader.steps_per_epoch
        out.append((loader, take(loader, count)))
        loader.close()
    return out


# (ranks, workers) before -> after: 2 -> 1 ranks, 2 -> 3, 3 -> 2, and workers 2 -> 1 on 2 ranks.
LOADER_CHANGES = [((2, 2), (1, 0)), ((2, 0), (3, 0)), ((3, 0), (2, 2)), ((2, 2), (2, 1))]


@pytest.mark.parametrize("before,after", LOADER_CHANGES)
def test_real_loader_continues_the_interrupted_epoch_exactly_once(tmp_path, caplog, before, after):
    pattern = write_tiny_shards(tmp_path)
    old = _run_ranks(pattern, *before, steps=53 // (4 * before[0]) + 2)  # into epoch 1
    trained = [k for _, batches in old for b in batches if b["epoch"] == 1 for k in b["key"]]
    states = [batches[-1]["state"] for _, batches in old]
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        new = _run_ranks(pattern, *after, steps=None, states=states)
    report, global_batch = new[0][0].resume_report, 4 * after[0]
    assert f"world_size {before[0]} -> {after[0]}" in caplog.text or f"num_workers {before[1]} -> {after[1]}" \
        in caplog.text
    assert f"{report['steps']} steps of {global_batch}, {report['left_out']} left out" in caplog.text
    rest = [k for _, batches in new for b in batches[:report["steps"]] for k in b["key"]]
    assert {b["epoch"] for _, batches in new for b in batches[:report["steps"]]} == {1}
    assert len(rest) == len(set(rest)) and not set(rest) & set(trained)  # no sample twice in epoch 1
    assert len(all_keys() - set(trained) - set(rest)) == report["left_out"] < global_batch
    following = [k for _, batches in new for b in batches[report["steps"]:] for k in b["key"]]
    assert {b["epoch"] for _, batches in new for b in batches[report["steps"]:]} == {2}
    assert len(following) == len(set(following)) == 53 - 53 % global_batch  # the next epoch is whole


def test_real_loader_resumed_twice_in_one_epoch_with_bad_samples(tmp_path):
    """2 ranks x 2 workers -> 3 x 0 (one step) -> 2 x 2: the second resume replays both phases;
    a bad sample makes one slot's count uneven."""
    pattern = write_tiny_shards(tmp_path, corrupt={"s2-004": "image", "s4-001": "image"})
    cfg = dict(shuffle_buffer=BUFFER, max_bad_fraction=1.0)
    trained, states = [], None
    for world, workers, steps in ((2, 2, 3), (3, 0, 1)):
        states_next = []
        for rank in range(world):
            loader = build(data_cfg(pattern, num_workers=workers, **cfg), rank=rank, world_size=world)
            if states is not None:
                loader.set_state(states)
            batches = take(loader, steps)
            loader.close()
            trained += [k for b in batches for k in b["key"]]
            states_next.append(batches[-1]["state"])
        states = json.loads(json.dumps(states_next))
    assert len(states[0]["history"]) == 1
    rest = []
    for rank in range(2):
        loader = build(data_cfg(pattern, num_workers=2, **cfg), rank=rank, world_size=2)
        loader.set_state(states)
        assert len(loader.history) == 2
        rest += [k for b in take(loader, loader.resume_report["steps"]) for k in b["key"]]
        loader.close()
    assert len(trained) == len(set(trained)) and len(rest) == len(set(rest)) and not set(rest) & set(trained)
    bad = {"s2-004", "s4-001"}
    assert len(all_keys() - bad - set(trained) - set(rest)) < 8 + len(bad)


def test_keep_global_batch_sets_accumulation_or_refuses_in_one_line(caplog):
    from pipeline.config import Config, ConfigError, DataConfig
    from pipeline.preflight import resume_global_batch

    marker = {"world_size": 2, "global_batch": 64}
    cfg = Config(data=DataConfig(batch_size=16, keep_global_batch=True))
    with caplog.at_level(logging.WARNING, logger="pipeline.preflight"):
        resume_global_batch(cfg, marker, world_size=1)
    assert cfg.train.grad_accum_steps == 4 and "train.grad_accum_steps 1 -> 4 keeps the global batch at 64" in caplog.text
    with pytest.raises(ConfigError, match=r"global batch 64 is not a multiple of data.batch_size 16 x 3 ranks"):
        resume_global_batch(cfg, marker, world_size=3)
    with pytest.raises(ConfigError, match="does not record its global batch"):
        resume_global_batch(cfg, {"world_size": 2}, world_size=1)
    resume_global_batch(cfg, {"world_size": 1}, world_size=1)  # an older checkpoint, the same world size: as it is
    assert cfg.train.grad_accum_steps == 4
    off = Config(data=DataConfig(batch_size=16))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.preflight"):
        resume_global_batch(off, marker, world_size=3)
    assert off.train.grad_accum_steps == 1 and "the global batch changes from 64 to 48 (2 -> 3 ranks" in caplog.text
