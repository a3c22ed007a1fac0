"""Shards on object storage: a real S3 server (moto) and a real HTTP server on loopback, with a
fault proxy between them and the loader that cuts connections mid-object and counts bytes."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import DataError, build_train_loader
from pipeline.data.errors import StoreUnavailable
from pipeline.data.remote import IoOptions, RangeFile
from pipeline.data.sources import resolve_shards
from pipeline.data.tar_reader import read_range
from remote_stores import FaultProxy, http_server, shards_on_s3

TRAIN = "train-{000000..000008}.tar"


@pytest.fixture(scope="module")
def store(digits_shards):
    """moto's S3 server with the digits shards under s3://shards/digits, a fault proxy in front."""
    with shards_on_s3(digits_shards) as (base, proxy):
        yield base, proxy, digits_shards


def io_options(**kw) -> IoOptions:
    aws = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    return IoOptions(**{"retries": 30, "timeout_s": 20.0, **kw, "aws_env": aws})


def items(source, start, stop, **kw) -> list[tuple]:
    """read_range's items, comparable: key, sid, and every field's bytes (the URL left out)."""
    return [(i["__key__"], i.get("__sid__"), i.get("__bad__"),
             sorted((k, bytes(v)) for k, v in i.items() if not k.startswith("__")))
            for i in read_range(source, start, stop, **kw)]


def test_range_file_reads_exact_bytes_from_s3_and_http(store):
    base, _, local = store
    data = (local / "train-000001.tar").read_bytes()
    rng = random.Random(0)
    with http_server(local) as http:
        for url in (f"{base}/train-000001.tar", f"{http}/train-000001.tar"):
            begin = rng.randrange(len(data) // 2)
            end = rng.randrange(begin + 1, len(data) + 1)
            with RangeFile(url, io_options(), begin=begin, end=end) as stream:
                assert stream.read(700) == data[begin:begin + 700]
                at = rng.randrange(begin, end)
                stream.seek(at)  # backwards or forwards
                assert stream.read() == data[at:end]
            with RangeFile(url, io_options()) as whole:
                assert whole.read() == data and whole.requests == 1


def test_a_slice_and_a_resume_read_only_their_own_bytes(store):
    """Resume cost: starting at sample 100 of 200 transfers the bytes of samples 100..199 (plus one
    request's headers), not the prefix; the items are those of the local shard."""
    base, proxy, local = store
    (remote,) = resolve_shards(f"{base}/train-000002.tar", io=io_options())
    (here,) = resolve_shards(str(local / "train-000002.tar"))
    offsets, size = remote.remote.offsets, remote.remote.size
    for start, stop in ((100, 200), (37, 64)):
        before = proxy.sent
        got = items(remote.source, start, stop, skip={start + 3}, first_id=11)
        sent = proxy.sent - before
        needed = (offsets[stop] if stop < len(offsets) else size) - offsets[start]
        assert got == items(here.source, start, stop, skip={start + 3}, first_id=11)
        assert needed <= sent <= 1.1 * needed, (start, stop, sent, needed)


def test_cut_connections_resume_at_the_byte_and_the_stream_is_the_local_one(store):
    """read_range over s3:// and http(s):// through 60 cuts at random byte counts: every item equal."""
    base, proxy, local = store
    with http_server(local) as http:
        http_proxy = FaultProxy(http)
        try:
            for url, fault in ((f"{base}/train-000003.tar", proxy), (f"{http_proxy.url}/train-000003.tar", http_proxy)):
                (remote,) = resolve_shards(url, f"{base}/manifest.json", io=io_options())
                cuts = fault.cuts
                fault.cut(30, seed=len(url), max_bytes=20_000)
                assert items(remote.source, 0, 200) == items(str(local / "train-000003.tar"), 0, 200)
                assert fault.cuts - cuts == 30
        finally:
            http_proxy.close()


def test_loader_through_100_cuts_is_bitwise_the_local_loader_and_resumes(store):
    """The training stream (rank 1 of 2) from S3 with 100 cut connections equals the
    one from local disk batch for batch (keys, labels, pixels), and so does a resume mid-epoch."""
    base, proxy, local = store

    def loader(pattern: str):
        cfg = DataConfig(train_shards=pattern, batch_size=16, num_workers=1, shuffle_buffer=64, augment="shift",
                         hflip=False, mean=[0.5], std=[0.5], io_retries=30)
        return build_train_loader(cfg, image_size=16, num_channels=1, seed=3, rank=1, world_size=2)

    def batches(train, n, state=None):
        if state is not None:
            train.set_state(state)
        out = []
        for batch in train:
            out.append((batch["key"], batch["label"].clone(), batch["image"].clone(), batch["state"]))
            if len(out) == n:
                break
        train.close()
        return out

    steps = 20  # of 50 per epoch: the slice starts and ends inside shards
    expected = batches(loader(str(local / TRAIN)), steps)
    cuts = proxy.cuts
    proxy.cut(150, seed=7, max_bytes=4_000)  # (an answer shorter than its budget is not cut)
    got = batches(loader(f"{base}/{TRAIN}"), steps)
    assert proxy.cuts - cuts >= 100
    for (k1, l1, i1, s1), (k2, l2, i2, s2) in zip(expected, got, strict=True):
        assert k1 == k2 and s1 == s2 and torch.equal(l1, l2) and torch.equal(i1, i2)
    resumed = batches(loader(f"{base}/{TRAIN}"), 6, state=expected[11][3])
    for (k1, l1, i1, _), (k2, l2, i2, _) in zip(expected[12:18], resumed, strict=True):
        assert k1 == k2 and torch.equal(l1, l2) and torch.equal(i1, i2)


def test_a_store_down_briefly_is_survived_and_longer_than_the_timeout_gives_up_in_one_line(store):
    base, proxy, local = store
    (remote,) = resolve_shards(f"{base}/train-000004.tar", io=io_options())
    expected = items(str(local / "train-000004.tar"), 0, 50)
    proxy.down(1.0)
    assert items(remote.source, 0, 50) == expected  # retried through a second of resets
    short = resolve_shards(f"{base}/train-000004.tar", io=io_options(retries=100, timeout_s=1.0))[0]
    proxy.down(600.0)  # down until the reader gives up (its 1 s), however slowly this machine runs
    try:
        with pytest.raises(StoreUnavailable) as raised:
            items(short.source, 20, 50)
    finally:
        proxy.up()
    message = str(raised.value)
    offset = short.remote.offsets[20]
    assert "\n" not in message and raised.value.exit_code == 75
    assert f"shard '{base}/train-000004.tar' at byte {offset}" in message and "data.io_timeout_s=1" in message


def test_a_worker_that_gives_up_stops_the_loader_with_one_line(store):
    base, proxy, _ = store
    cfg = DataConfig(train_shards=f"{base}/{TRAIN}", batch_size=16, num_workers=1, shuffle_buffer=16,
                     augment="shift", hflip=False, mean=[0.5], std=[0.5], io_retries=2, io_timeout_s=0.5)
    train = build_train_loader(cfg, image_size=16, num_channels=1, seed=0, rank=0, world_size=1)
    proxy.down(600.0)  # until the worker gives up (0.5 s), however slowly it starts
    try:
        with pytest.raises(StoreUnavailable) as raised:
            next(iter(train))
    finally:
        proxy.up()
        train.close()
    assert "\n" not in str(raised.value) and str(raised.value).startswith("gave up reading shard 's3://shards/digits/")


def test_missing_bucket_key_and_manifest_are_one_line_user_errors(store):
    base, _, local = store
    io = io_options(retries=1)
    cases = {
        "s3://no-such-bucket/digits/train-000000.tar": "the bucket does not exist",
        f"{base}/train-000099.tar": "is not listed in the manifest",
        "s3://shards/elsewhere/train-000000.tar": "cannot read the manifest: cannot read 's3://shards/elsewhere/manifest",
    }
    for url, words in cases.items():
        with pytest.raises(DataError) as raised:
            resolve_shards(url, io=io)
        assert words in str(raised.value) and "\n" not in str(raised.value), str(raised.value)
    with http_server(local) as http:  # listed in the manifest, missing on the server
        with pytest.raises(DataError, match=r"cannot read '.*/train-000000.tar': HTTP 404"):
            resolve_shards(f"{http}/missing/train-000000.tar", f"{http}/manifest.json", io=io)


def test_a_refused_credential_is_a_one_line_user_error(store):
    """moto checks signatures once told to (its own HTTP API, /moto-api/reset-auth): the test's
    access key is then unknown to it, as a revoked or mistyped key is to S3."""
    import requests

    base, proxy, _ = store
    io = io_options(retries=3)
    host, port = proxy.upstream
    reset = f"http://{host}:{port}/moto-api/reset-auth"
    assert requests.post(reset, data=b"0", timeout=10).ok  # every request from now on is authenticated
    try:
        with pytest.raises(DataError) as raised:
            resolve_shards(f"{base}/train-000000.tar", io=io)
    finally:
        assert requests.post(reset, data=b"inf", timeout=10).ok
    message = str(raised.value)
    assert "the access key is refused" in message and "AWS" in message and "\n" not in message, message


def test_cache_fills_is_reused_evicts_and_refetches_a_truncated_shard(store, tmp_path):
    base, proxy, local = store
    cache = tmp_path / "cache"
    shard_bytes = (local / "train-000005.tar").stat().st_size
    io = io_options(cache_dir=str(cache), cache_limit_gb=2.5 * shard_bytes / 1e9)
    shards = resolve_shards(f"{base}/{TRAIN}", io=io)
    local_items = {i: items(str(local / f"train-00000{i}.tar"), 0, 40) for i in (5, 6, 7)}
    before = proxy.sent
    assert items(shards[5].source, 0, 40) == local_items[5]
    assert shard_bytes <= proxy.sent - before <= 1.1 * shard_bytes  # fetched whole, once
    before = proxy.sent
    assert items(shards[5].source, 0, 40) == local_items[5]  # "epoch 2": from the cache
    assert proxy.sent == before
    cached = sorted(p for p in cache.iterdir() if p.suffix == ".tar")
    assert len(cached) == 1
    with open(cached[0], "r+b") as truncate:
        truncate.truncate(shard_bytes // 3)
    assert items(shards[5].source, 0, 40) == local_items[5]  # detected by size, fetched again
    assert proxy.sent - before >= shard_bytes and cached[0].stat().st_size == shard_bytes
    os.utime(cached[0], (1, 1))  # the least recently used
    for i in (6, 7):
        assert items(shards[i].source, 0, 40) == local_items[i]
    left = sorted(p.name for p in cache.iterdir() if p.suffix == ".tar")
    assert len(left) == 2 and cached[0].name not in left  # evicted at the limit


def test_make_shards_writes_to_s3_and_refuses_to_overwrite(store, tmp_path, capsys):
    from launch.make_shards import main
    from torchvision.io import encode_png

    for index in range(24):  # a tiny image folder: 2 classes of 12
        folder = tmp_path / "images" / f"c{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.full((1, 4, 4), index, dtype=torch.uint8)
        (folder / f"{index}.png").write_bytes(encode_png(pixels).numpy().tobytes())
    args = ["--source", str(tmp_path / "images"), "--out", "s3://shards/made", "--shard-size", "10",
            "--val-fraction", "0", "--quiet"]
    assert main(args) == 0
    shards = resolve_shards("s3://shards/made/train-{000000..000002}.tar", io=io_options())
    assert [s.num_samples for s in shards] == [10, 10, 4] and shards[0].remote.offsets[0] == 0
    assert items(shards[1].source, 7, 10) == items(shards[1].source, 0, 10)[7:]
    assert main(args) == 2 and "already holds a dataset" in capsys.readouterr().err


def test_new_data_fields_are_validated():
    for field, value in (("io_retries", -1), ("io_timeout_s", 0), ("cache_limit_gb", -1)):
        with pytest.raises(ValueError, match=f"data.{field}"):
            DataConfig(**{field: value})
