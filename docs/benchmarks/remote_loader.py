"""Shards on S3 (moto's server on loopback) vs the same shards on local disk: loader img/s, resume
bytes, and a cached epoch 2; with ``--boundaries``, the prefetch of the next shard (prefetch.py).

Run: PYTHONPATH=. .venv/bin/python docs/benchmarks/remote_loader.py [--images 1042] [--rounds 3]
(needs the dev extra: moto[s3] with flask, boto3). JPEG shards like `make gpu-check`'s (440x360, q90) are
written under $TMPDIR.

``--boundaries``: many small shards (``--images 2084 --shards 20``: 100 samples each), read from
local disk and from S3 with ``data.io_prefetch`` on and off, with no added latency and with
``--latency-ms`` held back before every answer's first byte (by the proxy, per request: a
distant store's first-byte latency), all taking turns ``--rounds`` times. The same settings
are then timed at the reader alone (``prefetch.read_pieces`` over every train shard, one slot),
with ``--decode-ms`` of sleep per sample standing in for a worker's decode: what a shard boundary
costs a worker, apart from the machine's load on the decoding itself. Bytes are counted by a TCP proxy between the loader and the server
(tests/remote_stores.py), i.e. what the server sent. Local and S3 loaders take turns, `--rounds`
times, so machine load hits both; the server runs in this process (a thread), so on a small
machine it takes CPU from the loader's workers: the S3 figure is a lower bound. Not a suite of
launch/benchmark.py (it needs a server); the figures are in docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from launch.benchmarks.gpu_check_data import write_jpeg_shards  # noqa: E402
from pipeline.config import DataConfig  # noqa: E402
from pipeline.data import build_train_loader  # noqa: E402
from pipeline.data.prefetch import Piece, read_pieces  # noqa: E402
from pipeline.data.remote import IoOptions, RemoteShard  # noqa: E402
from pipeline.data.sources import resolve_shards  # noqa: E402
from pipeline.data.tar_reader import read_range  # noqa: E402
from remote_stores import FaultProxy, aws_env, s3_server, upload_dir  # noqa: E402


SERVER_CPU: dict[str, list[float]] = {}  # per loader_rate label: this process's CPU s per wall s while timed


def loader_rate(pattern: str, batches: int, proxy: FaultProxy | None = None, label: str | None = None,
                workers: int = 2, **data) -> tuple[float, int]:
    """(img/s over ``batches`` after 3 warm ones, bytes the server sent once the loader was built).
    With ``label``: also the CPU this process (the S3 server's and the proxy's threads; the loader's
    workers are other processes) used per second while timed, into SERVER_CPU."""
    cfg = DataConfig(train_shards=pattern, batch_size=32, num_workers=workers, shuffle_buffer=256, **data)
    train = build_train_loader(cfg, image_size=224, num_channels=3, seed=0, rank=0, world_size=1)
    sent = proxy.sent if proxy else 0  # after the HEAD requests that check the shards
    iterator = iter(train)
    for _ in range(3):  # warm: workers started, clients made, first shards opened
        next(iterator)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    rate = batches * 32 / elapsed
    if label:
        SERVER_CPU.setdefault(label, []).append((time.process_time() - cpu) / elapsed)
    train.close()
    return rate, (proxy.sent - sent if proxy else 0)


def boundaries(args, shards: Path, pattern: str, base: str, proxy: FaultProxy, out: dict) -> None:
    """Loader img/s over many small shards: local, and S3 with the prefetch on and off, with and
    without a first-byte latency; every setting once per round."""
    settings = {"local": (None, 0.0, True)}
    for latency in (0.0, args.latency_ms / 1000):
        for prefetch in (True, False):
            settings[f"s3_{latency * 1000:g}ms_prefetch_{'on' if prefetch else 'off'}"] = (base, latency, prefetch)
    rates: dict[str, list[float]] = {name: [] for name in settings}
    for round_ in range(args.rounds):
        for name, (where, latency, prefetch) in settings.items():
            proxy.latency = latency
            location = str(shards / pattern) if where is None else f"{where}/{pattern}"
            rates[name].append(loader_rate(location, args.batches, io_prefetch=prefetch)[0])
        proxy.latency = 0.0
        print(round_, {k: round(v[-1], 1) for k, v in rates.items()}, flush=True)
    out["img_per_s"] = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    out["over_local"] = {k: round(out["img_per_s"][k] / out["img_per_s"]["local"], 3) for k in rates}
    out["rounds"] = [{k: round(v[i], 1) for k, v in rates.items()} for i in range(args.rounds)]
    out["reader"] = reader_rates(args, shards, pattern, settings, proxy)


def reader_rates(args, shards: Path, pattern: str, settings: dict, proxy: FaultProxy) -> dict:
    """img/s of one slot reading every train shard (read_pieces) with ``--decode-ms`` of sleep per
    sample, and the seconds each shard boundary cost over that sleep, per setting (medians)."""
    rates: dict[str, list[float]] = {name: [] for name in settings}
    stalls: dict[str, list[float]] = {name: [] for name in settings}
    (first,) = resolve_shards(f"{settings['s3_0ms_prefetch_on'][0]}/train-000000.tar")
    assert sum(1 for _ in read_pieces([Piece(first.source, 0, 1)])) == 1  # this process's boto3 client, made
    for _ in range(args.rounds):
        for name, (where, latency, prefetch) in settings.items():
            proxy.latency = latency
            location = str(shards / pattern) if where is None else f"{where}/{pattern}"
            found = resolve_shards(location, io=IoOptions.from_config(DataConfig(io_prefetch=prefetch)))
            pieces = [Piece(s.source, 0, s.num_samples) for s in found]
            start, n = time.perf_counter(), 0
            for _, _, _ in read_pieces(pieces):
                time.sleep(args.decode_ms / 1000)
                n += 1
            elapsed = time.perf_counter() - start
            rates[name].append(n / elapsed)
            stalls[name].append((elapsed - n * args.decode_ms / 1000) / len(pieces))
        proxy.latency = 0.0
    return {"decode_ms": args.decode_ms, "shards": len(pieces),
            "img_per_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
            "s_per_boundary": {k: round(statistics.median(v), 4) for k, v in stalls.items()},
            "rounds_img_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1042)  # one train shard of 1,000
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--shards", type=int, default=1, help="train shards the images are cut into")
    parser.add_argument("--workers", type=int, default=2, help="the loader's DataLoader workers (default 2)")
    parser.add_argument("--boundaries", action="store_true", help="the prefetch comparison (module doc)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="with --boundaries: first-byte latency")
    parser.add_argument("--decode-ms", type=float, default=2.0, help="with --boundaries: the reader's sleep per sample")
    args = parser.parse_args()
    work = Path(tempfile.gettempdir()) / f"remote-bench-{args.images}-{args.shards}"
    shards = write_jpeg_shards(work, images=args.images, height=360, width=440, shards=args.shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    pattern = f"train-{{000000..{len(train) - 1:06d}}}.tar"
    out: dict = {"images": args.images, "train_samples": sum(s["num_samples"] for s in train),
                 "train_shards": len(train), "batches": args.batches}
    with s3_server() as endpoint:
        os.environ.update(aws_env(endpoint))
        base = upload_dir(endpoint, shards, prefix="jpeg")
        proxy = FaultProxy(endpoint)
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        if args.boundaries:
            out["latency_ms"] = args.latency_ms
            boundaries(args, shards, pattern, base, proxy, out)
            proxy.close()
            print(json.dumps(out, indent=1))
            return
        io = IoOptions.from_config(DataConfig())

        # Resume cost: the middle of the (one, ~1,000-sample) shard to its end.
        (shard,) = resolve_shards(f"{base}/train-000000.tar", io=io)
        remote, n = shard.remote, shard.num_samples
        needed = remote.size - remote.offsets[n // 2]
        streaming = RemoteShard(remote.url, None, remote.size, io)  # no offsets: read from the start
        sent = {}
        for name, source in (("range", remote), ("streaming", streaming)):
            before = proxy.sent
            assert sum(1 for _ in read_range(source, n // 2, n)) == n - n // 2
            sent[name] = proxy.sent - before
        out["resume"] = {"samples": n, "start": n // 2, "sample_bytes": needed, "sent_range": sent["range"],
                         "sent_streaming": sent["streaming"], "range_ratio": round(sent["range"] / needed, 4),
                         "streaming_ratio": round(sent["streaming"] / needed, 4)}
        print("resume", out["resume"], flush=True)

        # Throughput: local and S3 taking turns; then a cached run's second pass.
        # "s3_direct": the loader talks to moto's server itself, without the counting proxy (two of this
        # process's threads per connection fewer); the server runs in this process either way.
        rates: dict[str, list[float]] = {"local": [], "s3": [], "s3_direct": [], "s3_cache_epoch2": []}
        cache = Path(tempfile.mkdtemp(prefix="remote-bench-cache-"))
        for round_ in range(args.rounds):
            rate = functools.partial(loader_rate, batches=args.batches, workers=args.workers)
            rates["local"].append(rate(str(shards / pattern), label="local")[0])
            rates["s3"].append(rate(f"{base}/{pattern}", label="s3")[0])
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            rates["s3_direct"].append(rate(f"{base}/{pattern}", label="s3_direct")[0])
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            if round_ == 0:  # epoch 1 fills the cache
                out["cache_epoch1_sent"] = rate(f"{base}/{pattern}", proxy=proxy, cache_dir=str(cache))[1]
            cached, sent_epoch2 = rate(f"{base}/{pattern}", proxy=proxy, cache_dir=str(cache))
            rates["s3_cache_epoch2"].append(cached)
            out.setdefault("cache_epoch2_sent", []).append(sent_epoch2)
            print(round_, {k: round(v[-1], 1) for k, v in rates.items()}, flush=True)
        out["img_per_s"] = {k: round(statistics.median(v), 1) for k, v in rates.items()}
        out["s3_over_local"] = round(out["img_per_s"]["s3"] / out["img_per_s"]["local"], 3)
        out["cache_over_local"] = round(out["img_per_s"]["s3_cache_epoch2"] / out["img_per_s"]["local"], 3)
        out["s3_direct_over_local"] = round(out["img_per_s"]["s3_direct"] / out["img_per_s"]["local"], 3)
        # Cores the server (and proxy) took from the loader's 2 workers while they were timed.
        out["server_cores"] = {k: round(statistics.median(v), 3) for k, v in SERVER_CPU.items()}
        proxy.close()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
