"""Shards on S3 (moto's server on loopback) vs the same shards on local disk: loader img/s, resume
bytes, and a cached epoch 2.

Run: PYTHONPATH=. .venv/bin/python docs/benchmarks/remote_loader.py [--images 1042] [--rounds 3]
(needs the dev extra: moto[s3] with flask, boto3). JPEG shards like `make gpu-check`'s (440x360, q90) are
written under $TMPDIR. Bytes are counted by a TCP proxy between the loader and the server
(tests/remote_stores.py), i.e. what the server sent. Local and S3 loaders take turns, `--rounds`
times, so machine load hits both; the server runs in this process (a thread), so on a small
machine it takes CPU from the loader's workers: the S3 figure is a lower bound. Not a suite of
launch/benchmark.py (it needs a server); the figures are in docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
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
from pipeline.data.remote import IoOptions, RemoteShard  # noqa: E402
from pipeline.data.sources import resolve_shards  # noqa: E402
from pipeline.data.tar_reader import read_range  # noqa: E402
from remote_stores import FaultProxy, aws_env, s3_server, upload_dir  # noqa: E402


def loader_rate(pattern: str, batches: int, proxy: FaultProxy | None = None, **data) -> tuple[float, int]:
    """(img/s over ``batches`` after 3 warm ones, bytes the server sent once the loader was built)."""
    cfg = DataConfig(train_shards=pattern, batch_size=32, num_workers=2, shuffle_buffer=256, **data)
    train = build_train_loader(cfg, image_size=224, num_channels=3, seed=0, rank=0, world_size=1)
    sent = proxy.sent if proxy else 0  # after the HEAD requests that check the shards
    iterator = iter(train)
    for _ in range(3):  # warm: workers started, clients made, first shards opened
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches * 32 / (time.perf_counter() - start)
    train.close()
    return rate, (proxy.sent - sent if proxy else 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1042)  # one train shard of 1,000
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.gettempdir()) / f"remote-bench-{args.images}"
    shards = write_jpeg_shards(work, images=args.images, height=360, width=440, shards=1)
    manifest = json.loads((shards / "manifest.json").read_text())
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    pattern = f"train-{{000000..{len(train) - 1:06d}}}.tar"
    out: dict = {"images": args.images, "train_samples": sum(s["num_samples"] for s in train)}
    with s3_server() as endpoint:
        os.environ.update(aws_env(endpoint))
        base = upload_dir(endpoint, shards, prefix="jpeg")
        proxy = FaultProxy(endpoint)
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
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
        rates: dict[str, list[float]] = {"local": [], "s3": [], "s3_cache_epoch2": []}
        cache = Path(tempfile.mkdtemp(prefix="remote-bench-cache-"))
        for round_ in range(args.rounds):
            rates["local"].append(loader_rate(str(shards / pattern), args.batches)[0])
            rates["s3"].append(loader_rate(f"{base}/{pattern}", args.batches)[0])
            if round_ == 0:  # epoch 1 fills the cache
                out["cache_epoch1_sent"] = loader_rate(f"{base}/{pattern}", args.batches, proxy, cache_dir=str(cache))[1]
            rate, sent_epoch2 = loader_rate(f"{base}/{pattern}", args.batches, proxy, cache_dir=str(cache))
            rates["s3_cache_epoch2"].append(rate)
            out.setdefault("cache_epoch2_sent", []).append(sent_epoch2)
            print(round_, {k: round(v[-1], 1) for k, v in rates.items()}, flush=True)
        out["img_per_s"] = {k: round(statistics.median(v), 1) for k, v in rates.items()}
        out["s3_over_local"] = round(out["img_per_s"]["s3"] / out["img_per_s"]["local"], 3)
        out["cache_over_local"] = round(out["img_per_s"]["s3_cache_epoch2"] / out["img_per_s"]["local"], 3)
        proxy.close()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
