"""StepLookAhead: host batches fetched a step ahead, so that a store that gives up is agreed as a
stop while every rank still holds the batches of the step where the ranks stop."""
from __future__ import annotations

import time

import pytest
import torch

from pipeline.data.batch_ring import BatchRing
from pipeline.data.device_feed import DeviceFeed, Normalize
from pipeline.data.errors import StoreUnavailable
from pipeline.data.lookahead import StepLookAhead
from test_data_stream import build, data_cfg, take, write_tiny_shards

CPU = torch.device("cpu")


class Source:
    """Batches 0, 1, ... (``index``); the store gives up at batch ``fails_at``; counts the pulls."""

    def __init__(self, fails_at: int | None = None):
        self.fails_at, self.pulled = fails_at, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.pulled == self.fails_at:
            self.fails_at = None  # a generator that raised is over: the next pull would end it
            raise StoreUnavailable(f"gave up reading shard 's3://b/train-000001.tar' at byte {self.pulled * 100} "
                                   "after 3 failed tries in 1.0 s; last error: ConnectionRefusedError")
        self.pulled += 1
        return {"index": self.pulled - 1, "image": torch.zeros(1, 1, 2, 2, dtype=torch.uint8)}


def trained_steps(*, per_step: int, steps: int, fails_at: int | None) -> tuple[int, list[int], bool]:
    """The trainer's schedule on one rank, with StepAgreement's lag (a flag posted after step k is
    read after step k+1; the post before the first step is "after step 0"): (the step the run stops
    at, the batch indices trained, whether the store's failure was raised instead)."""
    ahead = StepLookAhead(Source(fails_at), per_step=per_step, steps=steps)
    feed = DeviceFeed(ahead, device=CPU, dtype=torch.float32, normalize=Normalize([0.5], [0.5], 1))
    trained, posted = [], []
    try:
        ahead.require(1)
    except StoreUnavailable:
        return 0, trained, True
    ahead.fetch(2)
    posted.append(ahead.failure is not None)
    for step in range(1, steps + 1):
        trained += [next(feed)["index"] for _ in range(per_step)]
        ahead.fetch(step + 2)
        posted.append(ahead.failure is not None)
        if step == steps:
            break
        if posted[step - 1]:  # read after this step: every rank stops here
            return step, trained, False
    return steps, trained, False


@pytest.mark.parametrize("per_step", [1, 3])
def test_a_store_that_gives_up_stops_a_step_early_with_every_batch_trained_up_to_it(per_step):
    steps = 6
    for fails_at in range(per_step * steps):
        stop, trained, raised = trained_steps(per_step=per_step, steps=steps, fails_at=fails_at)
        failing_step = fails_at // per_step + 1  # the step whose batch could not be read
        if failing_step == 1:  # no earlier post to stop on: raised, nothing trained
            assert raised and trained == []
            continue
        assert not raised
        assert stop == failing_step - 1, (fails_at, stop)  # the last step every batch of which was read
        assert trained == list(range(stop * per_step))  # in order, each once, none past the stop


@pytest.mark.parametrize("per_step", [1, 2])
def test_nothing_is_read_past_the_last_step(per_step):
    source = Source()
    ahead = StepLookAhead(source, per_step=per_step, steps=3)
    ahead.fetch(10)
    assert source.pulled == 3 * per_step and ahead.failure is None
    assert [b["index"] for b in ahead] == list(range(3 * per_step))
    assert source.pulled == 3 * per_step


def test_the_failure_is_kept_and_the_batches_before_it_are_delivered():
    ahead = StepLookAhead(Source(fails_at=5), per_step=2, steps=10)
    assert ahead.fetch(2) is None and len(ahead.held) == 4
    failure = ahead.fetch(4)
    assert isinstance(failure, StoreUnavailable) and ahead.failure is failure and ahead.fetched == 5
    ahead.require(2)  # batches 0-3 are held: nothing to raise
    with pytest.raises(StoreUnavailable):
        ahead.require(3)  # batch 5 is not
    assert [next(ahead)["index"] for _ in range(5)] == list(range(5))
    with pytest.raises(StoreUnavailable):
        next(ahead)


def test_the_feed_raises_the_batch_aheads_error_only_when_that_batch_is_asked_for():
    ahead = StepLookAhead(Source(fails_at=2), per_step=1, steps=5)
    ahead.fetch(2)
    feed = DeviceFeed(ahead, device=CPU, dtype=torch.float32, normalize=Normalize([0.5], [0.5], 1))
    assert next(feed)["index"] == 0
    assert next(feed)["index"] == 1  # batch 2, fetched ahead while handing this one out, failed
    with pytest.raises(StoreUnavailable, match="at byte 200"):
        next(feed)


def test_the_batches_held_ahead_leave_the_workers_reused_buffers(tmp_path):
    """Three borrowed batches held (two steps of 2 micro-batches, less the one copied out) on top of
    the DataLoader's prefetching: with the ring deepened for them, every batch of a worker still
    comes through a reused shared buffer, and the images are the loader's."""
    pattern = write_tiny_shards(tmp_path)
    per_step, steps = 2, 12
    assert BatchRing.depth_for(1, StepLookAhead.most_held(per_step)) == BatchRing.depth_for(1, 0) + 3
    plain = take(build(data_cfg(pattern, num_workers=1), world_size=1), per_step * steps)
    loader = build(data_cfg(pattern, num_workers=1), world_size=1)
    batches = loader.host_batches(borrow=True, hold=StepLookAhead.most_held(per_step))
    ahead = StepLookAhead(batches, per_step=per_step, steps=steps)
    feed = DeviceFeed(ahead, device=CPU, dtype=torch.float32, normalize=Normalize([0.5], [0.5], 1))
    ahead.fetch(2)
    fed = []
    for step in range(1, steps + 1):
        fed += [next(feed) for _ in range(per_step)]
        ahead.fetch(step + 2)
        time.sleep(0.05)  # a logging step's wait for the device: the worker runs as far ahead as it may
    loader.close()
    assert loader.reused_buffer_batches == per_step * steps
    normalize = Normalize([0.5], [0.5], 1)
    for host, device in zip(plain, fed, strict=True):
        assert host["key"] == device["key"] and torch.equal(normalize(host["image"]), device["image"])
