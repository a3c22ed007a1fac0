"""The next remote piece opened ahead (pipeline/data/prefetch.py), against moto's S3 server through
a proxy that logs every request, holds back answers as a distant store does, and cuts them.

Ordering is asserted from the proxy's request log at points where the reader is known to be
inside a piece (the test holds the generator there), never from wall-clock durations."""
from __future__ import annotations

import os
import random
import threading
import time

import numpy as np
import pytest
import torch

from pipeline.data import prefetch as prefetch_module
from pipeline.data.errors import StoreUnavailable
from pipeline.data.partition import Segment
from pipeline.data.prefetch import THREAD_NAME, Piece, Prefetch, read_pieces
from pipeline.data.remote import IoOptions
from pipeline.data.sources import resolve_shards
from pipeline.data.stages import SliceReader, replayed_positions
from remote_stores import shards_on_s3

TRAIN = "train-{000000..000007}.tar"  # 200 samples each


@pytest.fixture(scope="module")
def store(digits_shards):
    with shards_on_s3(digits_shards) as (base, proxy):
        yield base, proxy, digits_shards


@pytest.fixture
def proxy(store):
    """The store's proxy, its latency and cuts reset after the test."""
    _, proxy, _ = store
    yield proxy
    proxy.latency = 0.0
    proxy.cut(0)


def io_options(**kw) -> IoOptions:
    aws = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    return IoOptions(**{"retries": 30, "timeout_s": 20.0, **kw, "aws_env": aws})


def comparable(items) -> list[tuple]:
    """Items as key, sid, bad reason and every field's bytes (the URL left out)."""
    return [(i["__key__"], i.get("__sid__"), i.get("__bad__"), i.get("__skip__"),
             sorted((k, bytes(v)) for k, v in i.items() if not k.startswith("__")))
            for i in items]


def name(piece: Piece) -> str:
    return os.path.basename(piece.source if isinstance(piece.source, str) else piece.source.url)


def window(piece: Piece) -> tuple[int, int]:
    """The bytes of the piece's samples as a Range header gives them (last byte inclusive)."""
    begin, end = piece.source.window(piece.start, piece.stop)
    return begin, end - 1


def prefetching() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]


def settled(timeout: float = 60.0) -> bool:
    """Wait until no prefetch thread runs (its head is in memory, or it failed); False on timeout."""
    deadline = time.monotonic() + timeout
    while prefetching():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def pieces_of(shards, *spans: tuple[int, int, int]) -> list[Piece]:
    return [Piece(shards[k].source, start, stop, first_id=200 * k) for k, start, stop in spans]


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "control-without"])
def test_the_next_piece_is_requested_while_the_current_one_is_read(store, proxy, prefetch):
    """With a 0.2 s first-byte latency on every answer: the next piece's GET reaches the server
    while the reader is still at the current piece's last item, and the switch makes no request
    (one GET per piece, for exactly its bytes). Without prefetch (the control) the GET only
    comes once the reader gets there: the observation can tell the two apart."""
    base, _, _ = store
    shards = resolve_shards(f"{base}/{TRAIN}", io=io_options(prefetch=prefetch))
    pieces = pieces_of(shards, (3, 20, 60), (4, 0, 50), (5, 150, 200))
    proxy.latency = 0.2
    start = len(proxy.requests)
    early = {}  # piece index -> GETs of the next piece made before the reader left this one
    for index, position, _ in read_pieces(pieces):
        if position == pieces[index].stop - 1 and index + 1 < len(pieces):
            assert settled()
            early[index] = [r for r in proxy.requests[start:] if r.method == "GET"
                            and r.path.endswith(name(pieces[index + 1]))]
    gets = [(os.path.basename(r.path), r.range) for r in proxy.requests[start:] if r.method == "GET"]
    assert gets == [(name(p), window(p)) for p in pieces]  # one each, the piece's bytes; none after the last
    if prefetch:
        assert [[r.range for r in early[i]] for i in (0, 1)] == [[window(pieces[1])], [window(pieces[2])]]
    else:
        assert early == {0: [], 1: []}


def test_a_slice_with_prefetch_is_the_local_one_and_asks_for_no_byte_beyond_it(store, proxy):
    """SliceReader over S3 (pieces that start and end inside shards), whole and resumed mid-slice
    (the consumed items are placeholders): item for item the local reader's, one GET per piece
    for exactly its bytes, and the server sent those bytes and a few headers, no more."""
    base, _, local = store
    remote = resolve_shards(f"{base}/{TRAIN}", io=io_options())
    here = resolve_shards(str(local / TRAIN))
    offsets = tuple(200 * k for k in range(len(remote)))
    segments = [Segment(2, 130, 200), Segment(7, 0, 200), Segment(4, 10, 75)]
    length = sum(len(s) for s in segments)
    pieces = pieces_of(remote, *((s.shard, s.start, s.stop) for s in segments))
    needed = sum(window(p)[1] + 1 - window(p)[0] for p in pieces)
    for replayed in (set(), replayed_positions(length, 150, 32, seed=5)):  # 150 consumed: mid-shard 7
        start, before = len(proxy.requests), proxy.sent
        got = comparable(SliceReader([s.source for s in remote], offsets, segments, replayed)())
        sent = proxy.sent - before
        assert got == comparable(SliceReader([s.source for s in here], offsets, segments, replayed)())
        assert len(got) == length and sum(1 for g in got if g[3]) == len(replayed)
        gets = [(os.path.basename(r.path), r.range) for r in proxy.requests[start:] if r.method == "GET"]
        assert gets == [(name(p), window(p)) for p in pieces]
        assert needed <= sent <= needed + 2_000 * len(pieces), (sent, needed)  # + each answer's headers


def test_a_prefetch_cut_mid_answer_resumes_at_the_byte_and_the_stream_is_exact(store, proxy):
    """Five cuts, all in the prefetch's answers (the next shard only): all retried while the
    reader is still at the current piece's first item, and the items are the local shards'."""
    base, _, local = store
    pieces = pieces_of(resolve_shards(f"{base}/{TRAIN}", io=io_options()), (1, 0, 100), (6, 50, 200))
    expected = comparable(item for _, _, item in read_pieces(pieces_of(resolve_shards(str(local / TRAIN)),
                                                                       (1, 0, 100), (6, 50, 200))))
    start, cuts = len(proxy.requests), proxy.cuts
    proxy.cut(5, seed=3, max_bytes=3_000, path=name(pieces[1]))
    got, during = [], None
    for index, position, item in read_pieces(pieces):
        if (index, position) == (0, 0):
            assert settled()
            during = [r.range for r in proxy.requests[start:] if r.method == "GET" and r.path.endswith(name(pieces[1]))]
        got.append(item)
    assert proxy.cuts - cuts == 5
    begin, last = window(pieces[1])
    assert len(during) == 6 and all(begin <= first and end == last for first, end in during), during
    assert [first for first, _ in during] == sorted(first for first, _ in during)  # never behind the byte
    assert comparable(got) == expected


def test_a_prefetch_that_gives_up_raises_only_when_its_piece_is_read(store, proxy):
    """Every answer for the next shard cut: the prefetch gives up (io_retries=2: 3 GETs) while the
    current piece is read; the current piece is read whole, then its successor raises the reader's
    StoreUnavailable, naming that shard and byte, and nobody tries again."""
    base, _, _ = store
    pieces = pieces_of(resolve_shards(f"{base}/{TRAIN}", io=io_options(retries=2, timeout_s=10.0)),
                       (1, 0, 60), (6, 20, 80))
    start = len(proxy.requests)
    proxy.cut(10**6, max_bytes=1, path=name(pieces[1]))

    def tries() -> int:
        return len([r for r in proxy.requests[start:] if r.method == "GET" and r.path.endswith(name(pieces[1]))])

    read, during = [], None
    with pytest.raises(StoreUnavailable) as raised:
        for index, position, _ in read_pieces(pieces):
            if (index, position) == (0, 0):
                assert settled()  # given up by now, with 59 items of this piece still to come
                during = tries()
            read.append((index, position))
    assert read == [(0, p) for p in range(60)] and during == 3
    message, (begin, _) = str(raised.value), window(pieces[1])
    assert f"gave up reading shard '{pieces[1].source.url}' at byte {begin} after 3 failed tries" in message
    assert "data.io_retries=2" in message and "\n" not in message
    assert tries() == 3


@pytest.mark.parametrize("stage", ["retrying", "answer-in-flight"])
def test_closing_mid_stream_calls_the_prefetch_off(store, proxy, monkeypatch, stage):
    """A reader closed while its prefetch backs off between retries, or waits for an answer the
    store holds back: no prefetch thread is left, and the stream it opened is closed."""
    base, _, _ = store
    opened = []
    real = prefetch_module.open_stream
    monkeypatch.setattr(prefetch_module, "open_stream", lambda *a, **kw: opened.append(real(*a, **kw)) or opened[-1])
    pieces = pieces_of(resolve_shards(f"{base}/{TRAIN}", io=io_options(retries=10**6, timeout_s=600.0)),
                       (2, 0, 40), (5, 0, 40))
    start = len(proxy.requests)
    if stage == "retrying":
        proxy.cut(10**6, max_bytes=1, path=name(pieces[1]))
    else:  # closing waits (up to CANCEL_WAIT_S) for the answer, then the thread ends without another request
        proxy.latency = 2.0
        monkeypatch.setattr(prefetch_module, "CANCEL_WAIT_S", 60.0)
    stream = read_pieces(pieces)
    next(stream)
    deadline = time.monotonic() + 60
    while len([r for r in proxy.requests[start:] if r.path.endswith(name(pieces[1]))]) < (2 if stage == "retrying" else 1):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert prefetching()
    stream.close()
    assert not prefetching()
    assert len(opened) == 1 and opened[0][0].closed and opened[0][0]._body is None


def test_a_prefetch_draws_nothing_from_the_global_generators(store, proxy):
    """Workers seed Python's, numpy's and torch's global generators per sample for augmentation:
    a prefetch, retries and backoff included, must not draw from them."""
    base, _, local = store
    (piece,) = pieces_of(resolve_shards(f"{base}/{TRAIN}", io=io_options()), (6, 0, 200))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    proxy.cut(4, seed=1, max_bytes=3_000, path=name(piece))
    stream, _ = Prefetch(piece).take()
    with stream:
        data = stream.read()
    assert stream.retries == 4 and data == (local / name(piece)).read_bytes()[slice(*piece.source.window(0, 200))]
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])


def test_with_a_cache_the_next_shard_is_fetched_ahead_and_the_last_fetches_nothing(store, proxy, tmp_path):
    """data.cache_dir: the next piece's shard is in the node's cache before the reader gets to it,
    a slot's last piece fetches nothing more, and the items are the local shards'."""
    base, _, local = store
    cache = tmp_path / "cache"
    spans = ((2, 150, 200), (3, 0, 30), (7, 10, 20))
    pieces = pieces_of(resolve_shards(f"{base}/{TRAIN}", io=io_options(cache_dir=str(cache))), *spans)
    cached_at = {}  # piece index -> shards in the cache once its first item is read
    got = []
    for index, position, item in read_pieces(pieces):
        if position == pieces[index].start:
            assert settled()
            cached_at[index] = sorted(p.name.split("-", 1)[1] for p in cache.iterdir() if p.suffix == ".tar")
        got.append(item)
    assert cached_at == {0: ["train-000002.tar", "train-000003.tar"],
                         1: ["train-000002.tar", "train-000003.tar", "train-000007.tar"],
                         2: ["train-000002.tar", "train-000003.tar", "train-000007.tar"]}
    assert not [p for p in cache.iterdir() if ".tmp." in p.name]
    assert comparable(got) == comparable(item for _, _, item in read_pieces(pieces_of(resolve_shards(
        str(local / TRAIN)), *spans)))
