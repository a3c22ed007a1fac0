"""A real training run from S3 whose connections are cut mid-object again and again, against the same
run from local disk: issue 20's "100 cut connections in one run" goal, at the trainer's level.

    PYTHONPATH=. .venv/bin/python docs/benchmarks/remote_training_cuts.py [--cuts 150] [--steps 60] [--json OUT]

Both runs are 2-rank torchrun jobs of the tiny ViT (configs/digits_tiny.yaml, 2 layers, ZeRO-2, fp32,
one DataLoader worker per rank, the sample ledger on) on the same digits shards: one reads them
from local disk, the other from moto's S3 server on loopback through the tests' TCP fault proxy
(tests/remote_stores.py), which cuts the next ``--cuts`` answers after a random number of bytes
(1..``--max-bytes``): mid-body, so each cut read is retried from the byte where it stopped (an answer
shorter than its draw goes through whole). The claim: every step's loss and every rank's ledger (which
samples each step trained) are bitwise those of the local run, through at least ``--min-cuts`` cuts. Not a suite of
launch/benchmark.py (it needs a server); the figures go into docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from pipeline.data.shards import write_shards  # noqa: E402
from remote_stores import FaultProxy, aws_env, s3_server, upload_dir  # noqa: E402

RUN = ["model.size=tiny", "model.num_channels=1", "model.num_labels=10", "model.num_hidden_layers=2",
       "data.batch_size=16", "data.num_workers=1", "data.augment=shift", "data.hflip=false", "data.mean=[0.5]",
       "data.std=[0.5]", "data.val_shards=null", "data.ledger=true", "train.log_every=1", "train.eval_every=0",
       "train.progress_bar=false", "train.zero_stage=2", "train.precision=fp32", "checkpoint.every_steps=0",
       "optim.warmup_steps=0", "optim.lr=2e-3"]


def train(out: Path, shards: list[str], steps: int, env: dict) -> float:
    """A 2-rank run to ``steps``; its wall time. Exits with the log's tail if the run fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "launch/pretrain.py"), "--config", str(ROOT / "configs/digits_tiny.yaml"), *RUN,
               f"data.train_shards=[{','.join(shards)}]", f"train.max_steps={steps}", f"train.output_dir={out}"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{out.name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def losses(out: Path) -> dict[int, float]:
    rows = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def ledgers(out: Path) -> list[list[str]]:
    return [(out / "ledger" / f"rank{rank}.jsonl").read_text().splitlines() for rank in (0, 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", type=int, default=300, help="answers the proxy cuts (default 300)")
    parser.add_argument("--max-bytes", type=int, default=8192, help="a cut comes after 1..this many bytes")
    parser.add_argument("--min-cuts", type=int, default=100, help="cuts the run must go through (issue 20: 100)")
    parser.add_argument("--steps", type=int, default=60, help="steps per run (an epoch is ~50)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="remote-training-cuts-"))
    shards = base / "digits"
    manifest = write_shards("digits", shards, shard_size=200, val_fraction=0.1)
    names = sorted(s["name"] for s in manifest["shards"] if s["name"].startswith("train"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    local_s = train(base / "local", [str(shards / n) for n in names], args.steps, env)
    with s3_server() as endpoint:
        prefix = upload_dir(endpoint, shards)
        proxy = FaultProxy(endpoint)
        try:
            proxy.cut(args.cuts, seed=0, max_bytes=args.max_bytes)
            s3_s = train(base / "s3", [f"{prefix}/{n}" for n in names], args.steps,
                         {**env, **aws_env(endpoint), "AWS_ENDPOINT_URL": proxy.url})
            cuts, sent, gets = proxy.cuts, proxy.sent, len([r for r in proxy.requests if r.method == "GET"])
        finally:
            proxy.close()
    local, remote = losses(base / "local"), losses(base / "s3")
    result = {"steps": args.steps, "cuts_asked": args.cuts, "cuts_made": cuts, "max_bytes": args.max_bytes,
              "server_bytes_sent": sent, "gets": gets, "local_s": round(local_s, 1), "s3_s": round(s3_s, 1),
              "losses_bitwise": remote == local and sorted(local) == list(range(1, args.steps + 1)),
              "ledgers_equal": ledgers(base / "s3") == ledgers(base / "local"),
              "samples_trained": sum(len(json.loads(line)["keys"]) for lines in ledgers(base / "s3") for line in lines)}
    result["ok"] = result["losses_bitwise"] and result["ledgers_equal"] and cuts >= args.min_cuts
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "date_utc": time.strftime(
            "%Y-%m-%d %H:%M", time.gmtime()), "result": result}, indent=1) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
