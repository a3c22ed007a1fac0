"""The training stream with real webdataset shards, real DataLoader workers and real rank processes."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torchvision.io import encode_png
from webdataset.writer import TarWriter

from pipeline.config import DataConfig
from pipeline.data import DataError, LedgerWriter, batch_ring, build_eval_loader, build_train_loader, read_ledger
from pipeline.data.batch_ring import DEPTH, BatchRing

COUNTS = (9, 4, 13, 7, 11, 3, 6)  # 53 samples in 7 uneven shards


def png(index: int) -> bytes:
    """An 8x8 grey image that differs for every index."""
    g = torch.Generator().manual_seed(index)
    return encode_png(torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8, generator=g)).numpy().tobytes()


def write_tiny_shards(root: Path, counts=COUNTS, prefix: str = "train", manifest: bool = True,
                      corrupt: dict | None = None) -> str:
    """Shards ``<prefix>-00000k.tar`` with keys ``s<shard>-<pos>``; returns the brace pattern.

    ``corrupt`` maps a key to "image" (undecodable bytes), "nolabel" or "badlabel".
    """
    root.mkdir(parents=True, exist_ok=True)
    corrupt = corrupt or {}
    index = 0
    for shard, count in enumerate(counts):
        with TarWriter(str(root / f"{prefix}-{shard:06d}.tar"), encoder=False, mtime=0) as writer:
            for pos in range(count):
                key = f"s{shard}-{pos:03d}"
                sample = {"__key__": key, "png": png(index), "cls": str(index % 10).encode()}
                kind = corrupt.get(key)
                if kind == "image":
                    sample["png"] = b"\x89PNG not really"
                elif kind == "nolabel":
                    del sample["cls"]
                elif kind == "badlabel":
                    sample["cls"] = b"seven"
                writer.write(sample)
                index += 1
    if manifest:
        shards = [{"name": f"{prefix}-{i:06d}.tar", "split": prefix, "num_samples": c} for i, c in enumerate(counts)]
        (root / "manifest.json").write_text(json.dumps({"version": 1, "classes": [str(d) for d in range(10)],
                                                        "shards": shards}))
    return str(root / f"{prefix}-{{000000..{len(counts) - 1:06d}}}.tar")


def all_keys(counts=COUNTS) -> set[str]:
    return {f"s{s}-{p:03d}" for s, c in enumerate(counts) for p in range(c)}


def data_cfg(pattern: str, **kw) -> DataConfig:
    base = dict(train_shards=pattern, batch_size=4, num_workers=2, shuffle_buffer=8, augment="rrc",
                crop_scale=[0.5, 1.0], hflip=True, mean=[0.5], std=[0.5], max_bad_fraction=0.0)
    return DataConfig(**{**base, **kw})


def take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def build(cfg, rank=0, world_size=2, seed=0):
    return build_train_loader(cfg, image_size=8, num_channels=1, seed=seed, rank=rank, world_size=world_size)


# --- 2 ranks x 2 workers, real processes -----------------------------------------------------------

def _rank_main(rank: int, pattern: str, out: str, steps: int) -> None:
    # A spawned child would spawn its DataLoader workers too (slow); torchrun's ranks fork them.
    mp.set_start_method("fork", force=True)
    loader = build(data_cfg(pattern), rank=rank, world_size=2)
    with LedgerWriter(out, rank) as ledger:
        for step, batch in enumerate(take(loader, steps)):
            ledger.write(step, batch["key"])
    Path(out, f"steps{rank}.json").write_text(json.dumps(loader.steps_per_epoch))


def test_two_ranks_two_workers_every_sample_once_per_epoch(tmp_path):
    pattern = write_tiny_shards(tmp_path / "shards")
    steps_per_epoch = 53 // 8  # 6 steps of 2 x 4; 5 samples left out per epoch
    epochs = 3
    mp.start_processes(_rank_main, args=(pattern, str(tmp_path / "run"), epochs * steps_per_epoch),
                       nprocs=2, start_method="spawn")
    assert [json.loads((tmp_path / "run" / f"steps{r}.json").read_text()) for r in range(2)] == [6, 6]
    ledger = read_ledger(tmp_path / "run")
    assert sorted(ledger) == [0, 1] and all(len(ledger[r]) == epochs * steps_per_epoch for r in range(2))
    epoch_keys = []
    for epoch in range(epochs):
        keys = [k for r in range(2) for s in range(epoch * 6, epoch * 6 + 6) for k in ledger[r][s]]
        assert len(keys) == len(set(keys)) == 48 and set(keys) <= all_keys()
        epoch_keys.append(keys)
    assert epoch_keys[0] != epoch_keys[1]  # reshuffled every epoch
    # The stream is a function of (seed, epoch, world size, workers): this process sees the same.
    in_process = [b["key"] for b in take(build(data_cfg(pattern), rank=1), 6)]
    assert in_process == [ledger[1][s] for s in range(6)]


# --- determinism and resume (ranks as parameters, real DataLoader workers) --------------------------

def test_same_seed_same_stream_different_seed_different(tmp_path):
    pattern = write_tiny_shards(tmp_path)
    a = take(build(data_cfg(pattern), seed=5), 8)
    b = take(build(data_cfg(pattern), seed=5), 8)
    c = take(build(data_cfg(pattern), seed=6), 8)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert [x["key"] for x in a] != [x["key"] for x in c]
    assert a[0]["image"].shape == (4, 1, 8, 8) and a[0]["image"].dtype == torch.uint8  # normalized on the device
    assert a[0]["label"].dtype == torch.long and [x["epoch"] for x in a] == [0] * 6 + [1] * 2


@pytest.mark.parametrize("stop_at", [3, 6, 7])  # mid-epoch (odd: worker 1 is next), at a boundary, past it
def test_restored_state_continues_the_stream_exactly(tmp_path, stop_at):
    pattern = write_tiny_shards(tmp_path)
    full = take(build(data_cfg(pattern), rank=1), 14)
    first = build(data_cfg(pattern), rank=1)
    head = take(first, stop_at)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert state["world_size"] == 2 and state["num_workers"] == 2
    resumed = build(data_cfg(pattern), rank=1)
    resumed.set_state(state)
    tail = take(resumed, 14 - stop_at)
    for a, b in zip(full, head + tail):
        assert a["key"] == b["key"] and a["epoch"] == b["epoch"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_resume_decodes_only_what_it_delivers(tmp_path, monkeypatch):
    from pipeline.data import stages

    pattern = write_tiny_shards(tmp_path)
    cfg = data_cfg(pattern, num_workers=0)  # decoding in this process, where it can be counted
    first = build(cfg)
    take(first, 4)
    state = first.state_dict()
    calls = Counter()
    real = stages.decode

    def counting_decode(data, channels):
        calls["n"] += 1
        return real(data, channels)

    monkeypatch.setattr(stages, "decode", counting_decode)
    resumed = build(cfg)
    resumed.set_state(state)
    take(resumed, 2)
    assert calls["n"] == 2 * 4  # the 4 x 4 replayed samples were never decoded


def test_other_shards_resume_at_the_next_epoch(tmp_path, caplog):
    """Another dataset (here one shard fewer) gives the old epoch's order no meaning: the next epoch
    starts, and the log says what was skipped. (Another layout continues the epoch: test_data_elastic.)"""
    pattern = write_tiny_shards(tmp_path)
    old = build(data_cfg(pattern), rank=0, world_size=2)
    take(old, 2)
    state = old.state_dict()
    new = build(data_cfg([pattern.replace("{000000..000006}", f"{i:06d}") for i in range(6)]), rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        new.set_state(state)
    assert new.skipped_on_resume == 53 - 2 * 8
    assert "num_samples 53 -> 47" in caplog.text and "skipping 37 samples" in caplog.text
    batches = take(new, new.steps_per_epoch)
    assert new.steps_per_epoch == 11 and all(b["epoch"] == 1 for b in batches)
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == 44


def test_pipe_urls_and_shards_without_manifest(tmp_path):
    pattern = write_tiny_shards(tmp_path / "a")
    piped = [f"pipe:cat {tmp_path}/a/train-{i:06d}.tar" for i in range(7)]
    assert [b["key"] for b in take(build(data_cfg(piped)), 7)] == [b["key"] for b in take(build(data_cfg(pattern)), 7)]
    bare = write_tiny_shards(tmp_path / "b", manifest=False)  # counted from tar headers
    assert build(data_cfg(bare)).steps_per_epoch == 6
    two_sources = build(data_cfg([pattern, bare]))  # several sources: one index space
    assert two_sources.steps_per_epoch == 106 // 8


def test_missing_shard_is_named_before_training(tmp_path):
    pattern = write_tiny_shards(tmp_path)
    missing = str(tmp_path / "train-000009.tar")
    with pytest.raises(DataError, match="train-000009.tar' does not exist"):
        build(data_cfg([pattern, missing]))
    (tmp_path / "other-000000.tar").write_bytes((tmp_path / "train-000000.tar").read_bytes())
    with pytest.raises(DataError, match="not listed in the manifest"):
        build(data_cfg(str(tmp_path / "other-000000.tar")))
    with pytest.raises(DataError, match="fewer than one global batch"):
        build(data_cfg(pattern, batch_size=64))


def test_eval_loader_pads_to_equal_batches(tmp_path):
    pattern = write_tiny_shards(tmp_path, prefix="val")
    cfg = data_cfg(str(tmp_path / "nothing.tar"), val_shards=pattern, eval_batch_size=4, crop_pct=1.0)
    keys, batches = [], []
    for rank in range(2):
        loader = build_eval_loader(cfg, image_size=8, num_channels=1, rank=rank, world_size=2)
        got = list(loader)
        batches.append(len(got))
        for b in got:
            assert b["image"].shape == (4, 1, 8, 8) and b["valid"].dtype == torch.bool
            assert (b["label"][~b["valid"]] == -100).all()
            keys += [k for k, v in zip(b["key"], b["valid"]) if v]
    assert batches == [7, 7] == [loader.num_batches] * 2  # ceil(ceil(53 / 2) / 4)
    assert sorted(keys) == sorted(all_keys())
    assert build_eval_loader(data_cfg(pattern), image_size=8, num_channels=1, rank=0, world_size=1) is None


def test_ledger_appends_and_drops_steps_after_the_resumed_checkpoint(tmp_path):
    with LedgerWriter(tmp_path, 3) as ledger:
        for step in range(1, 6):
            ledger.write(step, [f"k{step}"])
    with LedgerWriter(tmp_path, 3, resume_step=3) as ledger:  # steps 4 and 5 were lost with the crash
        ledger.write(4, ["again4"])
    lines = (tmp_path / "ledger" / "rank3.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert read_ledger(tmp_path) == {3: {1: ["k1"], 2: ["k2"], 3: ["k3"], 4: ["again4"]}}


def test_close_stops_the_workers(tmp_path):
    loader = build(data_cfg(write_tiny_shards(tmp_path)))
    batches = iter(loader)
    next(batches)
    workers = loader._iterator._workers
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    loader.close()
    assert not any(w.is_alive() for w in workers)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_workers_come_from_a_fork_server_that_ignores_stop_signals(tmp_path):
    """Workers are not forked from the trainer (a fork of a multi-threaded Python 3.11 process
    can hang in the child); their server, like them, leaves SIGTERM and SIGUSR1 to the trainer."""
    import os
    import signal
    import time
    from multiprocessing import forkserver

    loader = build(data_cfg(write_tiny_shards(tmp_path)))
    batches = iter(loader)
    next(batches)
    server = forkserver._forkserver._forkserver_pid
    try:
        assert server is not None and server != os.getpid()
        for worker in loader._iterator._workers:
            assert int(_status(worker.pid)["PPid"]) == server
        stops = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGUSR1 - 1))
        for pid in (server, *(w.pid for w in loader._iterator._workers)):
            # a worker other than the one that made the first batch may still be starting (its
            # init_worker not yet run): wait for it, a bounded while, rather than read it early
            deadline = time.monotonic() + 30
            while int(_status(pid)["SigIgn"], 16) & stops != stops and time.monotonic() < deadline:
                time.sleep(0.05)
            assert int(_status(pid)["SigIgn"], 16) & stops == stops, (pid, _status(pid)["SigIgn"])
    finally:
        loader.close()


_FORKED_SERVER = """
import json, os, sys, torch
from multiprocessing import forkserver
sys.path.insert(0, sys.argv[3])
from test_data_stream import build, data_cfg, take
from pipeline.data.worker import start_worker_server

held = open(sys.argv[2], "w")  # a file of the trainer's, which the server must not hold
start_worker_server(1, fork=True)
server = forkserver._forkserver._forkserver_pid
by_workers = take(build(data_cfg(sys.argv[1], num_workers=1), world_size=1), 5)
in_process = take(build(data_cfg(sys.argv[1], num_workers=0), world_size=1), 5)
same = all(a["key"] == b["key"] and torch.equal(a["image"], b["image"]) for a, b in zip(by_workers, in_process))
print(json.dumps({"server": server, "same": same}), flush=True)
sys.stdin.read()  # until the test kills this process
"""


def test_the_launchers_fork_server_is_a_fork_that_keeps_nothing_of_the_trainer_and_dies_with_it(tmp_path):
    """launch/pretrain.py starts the workers' server by fork while it has no other thread (the
    imports are done: ~4 s of CPU per rank saved). The server runs no code of the trainer's
    (the trainer's files are not open in it) and ends when the trainer is killed with -9."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pattern = write_tiny_shards(tmp_path / "shards")
    held = tmp_path / "held-by-the-trainer"
    trainer = subprocess.Popen([sys.executable, "-c", _FORKED_SERVER, pattern, str(held), str(Path(__file__).parent)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        report = json.loads(trainer.stdout.readline())
        server = report["server"]
        assert report["same"]  # its workers give the in-process batches
        assert int(_status(server)["PPid"]) == trainer.pid  # a fork of the trainer, not an interpreter of its own
        assert Path(f"/proc/{server}/comm").read_text().strip() == "data-server"
        assert Path(f"/proc/{server}/cmdline").read_bytes() == Path(f"/proc/{trainer.pid}/cmdline").read_bytes()
        open_files = {os.readlink(f) for f in Path(f"/proc/{server}/fd").iterdir() if f.is_symlink()}
        assert str(held) not in open_files and str(held) in {os.readlink(f) for f in Path(f"/proc/{trainer.pid}/fd").iterdir()}
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=30)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{server}").exists() and _status(server).get("State", "").split()[0] != "Z":
            assert time.monotonic() < deadline, "the fork server outlived its trainer"
            time.sleep(0.05)
    finally:
        trainer.kill()
        trainer.wait()


def test_zero_and_one_worker_are_the_same_stream(tmp_path):
    pattern = write_tiny_shards(tmp_path)
    full = take(build(data_cfg(pattern, num_workers=1)), 9)
    first = build(data_cfg(pattern, num_workers=0))
    head = take(first, 4)
    resumed = build(data_cfg(pattern, num_workers=1))
    resumed.set_state(first.state_dict())
    assert [b["key"] for b in head + take(resumed, 5)] == [b["key"] for b in full]


def test_batches_through_reused_shared_buffers_equal_in_process_ones(tmp_path):
    """1 worker fills reused shared-memory buffers (BatchRing); 0 workers build batches in-process."""
    pattern = write_tiny_shards(tmp_path)
    through_ring = build(data_cfg(pattern, num_workers=1), world_size=1)
    steps = 3 * DEPTH + 2  # every buffer reused at least twice
    a, b = take(through_ring, steps), take(build(data_cfg(pattern, num_workers=0), world_size=1), steps)
    assert through_ring.reused_buffer_batches == steps
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


def test_short_shared_memory_falls_back_to_fresh_batches(tmp_path, monkeypatch, caplog):
    pattern = write_tiny_shards(tmp_path)
    expected = take(build(data_cfg(pattern, num_workers=1), world_size=1), 6)
    monkeypatch.setattr(batch_ring, "MAX_SHM_SHARE", 0.0)
    loader = build(data_cfg(pattern, num_workers=1), world_size=1)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.batch_ring"):
        got = take(loader, 6)
    assert "too little for" in caplog.text and loader.reused_buffer_batches == 0
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(expected, got))


def test_a_buffer_is_reused_only_after_its_release():
    ring = BatchRing(num_workers=2, batch_shape=(2, 1, 4, 4), depth=2)
    assert [ring.claim(1)[0] for _ in range(2)] == [0, 1]  # batches 0, 1: two fresh buffers
    assert ring.claim(1) is None  # batch 2 would reuse buffer 0, still holding batch 0: sent fresh
    ring.release(1)  # batch 0 done
    assert ring.claim(1) is None  # batch 3 -> buffer 1, still holding batch 1
    ring.release(1), ring.release(1)  # batches 1 and 2 done
    slot, buffer = ring.claim(1)  # batch 4 -> buffer 0
    assert slot == 0 and buffer.data_ptr() == ring.buffers[1, 0].data_ptr() and buffer.is_shared()
    assert ring.claim(0)[0] == 0  # workers count their own batches


def test_starting_the_loaders_leaves_the_global_torch_rng_alone(tmp_path):
    """A DataLoader draws its workers' base seed when an iterator starts (each epoch, each evaluation);
    from the global RNG, that draw came at another point of a resumed run than of the uninterrupted
    one, and drop path (which draws from it) masked other paths after every resume."""
    pattern = write_tiny_shards(tmp_path / "train")
    val = write_tiny_shards(tmp_path / "val", prefix="val")
    cfg = data_cfg(pattern, num_workers=0, val_shards=val, eval_batch_size=4, crop_pct=1.0, augment="none")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    take(build(cfg, rank=0, world_size=1), 7)  # into a second epoch: two iterators
    list(build_eval_loader(cfg, image_size=8, num_channels=1, rank=0, world_size=1))
    assert torch.equal(torch.get_rng_state(), before)
