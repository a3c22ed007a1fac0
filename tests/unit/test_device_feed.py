"""DeviceFeed: uint8 host batches -> normalized device batches one batch ahead, and the exactly-once
accounting that the batch in flight needs (real shards, a real DataLoader worker, reused buffers)."""
from __future__ import annotations

import json

import torch

from pipeline.data.batch_ring import DEPTH
from pipeline.data.device_feed import DeviceFeed, Normalize
from test_data_stream import build, data_cfg, take, write_tiny_shards

CPU = torch.device("cpu")


def feed_of(loader, dtype=torch.float32):
    return DeviceFeed(loader.host_batches(borrow=True), device=CPU, dtype=dtype,
                      normalize=Normalize([0.5], [0.5], 1))


def test_normalize_is_the_usual_formula_in_the_engine_dtype():
    images = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    expected = (images.float() / 255 - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    torch.testing.assert_close(Normalize(mean, std, 3)(images), expected)
    assert Normalize(mean, std, 3)(images, torch.bfloat16).dtype == torch.bfloat16


def test_feed_delivers_the_loaders_batches_normalized_through_reused_buffers(tmp_path):
    """Borrowed batches (views of shared-memory slots that the worker refills) are copied out before
    their slot is released: after every slot was reused twice the images are still the right ones."""
    pattern = write_tiny_shards(tmp_path)
    steps = 3 * DEPTH + 2
    plain = take(build(data_cfg(pattern, num_workers=1), world_size=1), steps)
    loader = build(data_cfg(pattern, num_workers=1), world_size=1)
    fed = take(feed_of(loader), steps)
    assert loader.reused_buffer_batches >= steps
    normalize = Normalize([0.5], [0.5], 1)
    for host, device in zip(plain, fed):
        assert host["key"] == device["key"] and torch.equal(host["label"], device["label"])
        assert torch.equal(normalize(host["image"]), device["image"])


def test_a_prefetched_batch_is_not_in_the_saved_state_and_comes_again_after_resume(tmp_path):
    """The trainer saves the state its last trained batch carries; the feed has already taken the
    next batch from the loader (in flight when a stop signal arrives). Resuming from that state
    delivers the in-flight batch again; resuming from the loader's live state would lose it."""
    pattern = write_tiny_shards(tmp_path)
    expected = take(build(data_cfg(pattern), rank=1), 8)
    loader = build(data_cfg(pattern), rank=1)
    feed = feed_of(loader)
    trained = [next(feed) for _ in range(3)]  # batches 0-2 trained; batch 3 is in flight
    saved = json.loads(json.dumps(trained[-1]["state"]))  # what the checkpoint stores
    assert saved["batches"] == 3 and loader.state_dict()["batches"] == 4  # the live state counts batch 3
    resumed = build(data_cfg(pattern), rank=1)
    resumed.set_state(saved)
    again = take(resumed, 5)
    assert [b["key"] for b in trained] + [b["key"] for b in again] == [b["key"] for b in expected]
    lost = build(data_cfg(pattern), rank=1)
    lost.set_state(loader.state_dict())
    assert take(lost, 1)[0]["key"] == expected[4]["key"]  # the live state would skip batch 3


def test_feed_ends_with_its_source_and_keeps_the_fields(tmp_path):
    pattern = write_tiny_shards(tmp_path)
    loader = build(data_cfg(pattern, num_workers=0), world_size=1)
    source = (b for _, b in zip(range(3), loader.host_batches(borrow=True)))
    batches = list(DeviceFeed(source, device=CPU, dtype=torch.bfloat16, normalize=Normalize([0.5], [0.5], 1)))
    assert len(batches) == 3 and all(b["image"].dtype == torch.bfloat16 for b in batches)
    assert {"key", "epoch", "index", "skipped", "state", "label"} <= set(batches[0])
