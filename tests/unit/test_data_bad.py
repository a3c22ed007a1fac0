"""Bad data never kills a run: skipped, counted, logged; beyond data.max_bad_fraction a DataError."""
from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline.data import DataError
from test_data_stream import build, data_cfg, take, write_tiny_shards

COUNTS = (9, 4, 13, 7, 11, 3, 5)  # 52 samples: no remainder with a global batch of 4
CORRUPT = {"s0-003": "image", "s1-001": "nolabel", "s4-007": "badlabel"}
TRUNCATED_AT = ("s2-005", 8)  # shard 2 cut inside this sample's image: it and the 7 after it are lost
BAD = set(CORRUPT) | {f"s2-{p:03d}" for p in range(5, 13)}


def write_bad_shards(root: Path) -> str:
    pattern = write_tiny_shards(root, counts=COUNTS, corrupt=CORRUPT)
    path = root / "train-000002.tar"
    with tarfile.open(path) as tar:
        offset = tar.getmember(f"{TRUNCATED_AT[0]}.png").offset_data + 10
    path.write_bytes(path.read_bytes()[:offset])
    return pattern


def cfg(pattern, **kw):
    return data_cfg(pattern, **{"max_bad_fraction": 1.0, **kw})


def test_bad_samples_are_skipped_counted_and_the_run_goes_on(tmp_path):
    loader = build(cfg(write_bad_shards(tmp_path)), world_size=1)
    assert loader.steps_per_epoch == 13
    batches = take(loader, 26)
    for epoch in range(2):
        got = [b for b in batches if b["epoch"] == epoch]
        keys = [k for b in got for k in b["key"]]
        assert len(got) == 13 and all(len(b["key"]) == 4 for b in got)
        assert sum(b["skipped"] for b in got) == len(BAD) == 11
        assert not set(keys) & BAD  # never delivered
        assert set(keys) == {f"s{s}-{p:03d}" for s, c in enumerate(COUNTS) for p in range(c)} - BAD
    state = loader.state_dict()
    assert state["bad"] == 22 and state["seen"] == 26 * 4 + 22


@pytest.mark.parametrize("stop_at", [5, 12, 15])
def test_resume_is_exact_with_bad_samples(tmp_path, stop_at):
    pattern = write_bad_shards(tmp_path)
    full = take(build(cfg(pattern), world_size=1), 20)
    first = build(cfg(pattern), world_size=1)
    head = take(first, stop_at)
    resumed = build(cfg(pattern), world_size=1)
    resumed.set_state(json.loads(json.dumps(first.state_dict())))
    tail = take(resumed, 20 - stop_at)
    for a, b in zip(full, head + tail):
        assert a["key"] == b["key"] and a["skipped"] == b["skipped"] and torch.equal(a["image"], b["image"])


def test_bad_samples_are_logged_with_their_shard_and_key(tmp_path, caplog):
    corrupt_only = write_tiny_shards(tmp_path / "a", counts=COUNTS, corrupt=CORRUPT)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        take(build(cfg(corrupt_only, num_workers=0), world_size=1), 13)
    text, shard = caplog.text, str(tmp_path / "a" / "train-00000{}.tar")
    assert f"s0-003 of shard {shard.format(0)}: image does not decode" in text
    assert f"s1-001 of shard {shard.format(1)}: missing label" in text
    assert f"s4-007 of shard {shard.format(4)}: label b'seven' is not an integer" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        take(build(cfg(write_bad_shards(tmp_path / "b"), num_workers=0), world_size=1), 13)
    assert "train-000002.tar#6: unreadable tar (ReadError" in caplog.text


def test_too_many_bad_samples_stop_the_run_naming_the_shards(tmp_path):
    loader = build(cfg(write_bad_shards(tmp_path), max_bad_fraction=0.05), world_size=1)
    with pytest.raises(DataError, match="11 of 63 samples were bad .*data.max_bad_fraction=0.05") as error:
        take(loader, 13)
    shard = str(tmp_path / "train-00000{}.tar")
    assert (f"bad samples per shard: {shard.format(2)} (8), " in str(error.value)
            and all(f"{shard.format(s)} (1)" in str(error.value) for s in (0, 1, 4)))


def test_a_slice_without_any_good_sample_is_a_clear_error(tmp_path):
    everything = {f"s{s}-{p:03d}": "image" for s, c in enumerate(COUNTS) for p in range(c)}
    loader = build(cfg(write_tiny_shards(tmp_path, counts=COUNTS, corrupt=everything)), world_size=1)
    with pytest.raises(DataError) as error:
        take(loader, 1)
    assert str(error.value).startswith("rank 0 slot") and "not one decodable sample in any shard" in str(error.value)
    assert "\n" not in str(error.value)  # the worker's traceback is not part of the message


def test_eval_counts_bad_samples_and_keeps_batches_equal(tmp_path):
    from pipeline.data import build_eval_loader

    pattern = write_bad_shards(tmp_path)
    config = cfg("unused.tar", val_shards=pattern, eval_batch_size=4, crop_pct=1.0)
    valid, skipped, lengths = 0, 0, []
    for rank in range(2):
        loader = build_eval_loader(config, image_size=8, num_channels=1, rank=rank, world_size=2)
        got = list(loader)
        lengths.append(len(got))
        valid += sum(int(b["valid"].sum()) for b in got)
        skipped += loader.skipped
    assert lengths == [7, 7] and valid == 52 - 11 and skipped == 11


# Three of four shards nearly all bad (one good sample each): whatever the shard order, one
# rank's half of the epoch holds two of them, 2 good samples for 40 places. Repeating them
# twice is not enough; borrowing the samples that follow the slice is.
MOSTLY_BAD_COUNTS = (20, 20, 20, 20)
MOSTLY_BAD = {f"s{s}-{p:03d}": "image" for s in range(3) for p in range(1, 20)}


@pytest.mark.parametrize("rank", [0, 1])
def test_a_slice_short_of_good_samples_borrows_and_the_run_goes_on(tmp_path, rank, caplog):
    pattern = write_tiny_shards(tmp_path, counts=MOSTLY_BAD_COUNTS, corrupt=MOSTLY_BAD)
    config = cfg(pattern, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        full = take(build(config, rank=rank, world_size=2), 20)  # two epochs of 10 steps
    assert "borrowing the good samples that follow it" in caplog.text
    good = {f"s{s}-{p:03d}" for s, c in enumerate(MOSTLY_BAD_COUNTS) for p in range(c)} - set(MOSTLY_BAD)
    assert all(len(b["key"]) == 4 and set(b["key"]) <= good for b in full)
    for stop_at in (1, 7):  # inside the borrowed part of a slice
        first = build(config, rank=rank, world_size=2)
        head = take(first, stop_at)
        resumed = build(config, rank=rank, world_size=2)
        resumed.set_state(json.loads(json.dumps(first.state_dict())))
        for a, b in zip(full, head + take(resumed, 20 - stop_at)):
            assert a["key"] == b["key"] and a["skipped"] == b["skipped"] and torch.equal(a["image"], b["image"])


def test_both_ranks_run_every_step_and_deliver_every_good_sample(tmp_path):
    pattern = write_tiny_shards(tmp_path, counts=MOSTLY_BAD_COUNTS, corrupt=MOSTLY_BAD)
    loaders = [build(cfg(pattern, num_workers=2), rank=rank, world_size=2) for rank in range(2)]
    epochs = [take(loader, 10) for loader in loaders]
    assert [len(e) for e in epochs] == [10, 10]
    good = {f"s{s}-{p:03d}" for s, c in enumerate(MOSTLY_BAD_COUNTS) for p in range(c)} - set(MOSTLY_BAD)
    assert {k for e in epochs for b in e for k in b["key"]} == good
    assert sum(b["skipped"] for e in epochs for b in e) == len(MOSTLY_BAD)  # each bad sample counted once
    by_shard = [loader.bad_shards for loader in loaders]  # what the max_bad_fraction refusal would list
    assert [sum(counts.values()) for counts in by_shard] == [sum(b["skipped"] for b in e) for e in epochs]
    named = {url.rsplit("/", 1)[-1] for counts in by_shard for url in counts}
    assert named == {f"train-00000{s}.tar" for s in range(3)}
