"""Training from S3 (moto's server on loopback, behind a fault proxy): 2 ranks whose store goes
away mid-run save a checkpoint and exit 75, and the requeued run, with the store back, is bitwise
the uninterrupted run of the same shards on local disk (checkpoint_runs').

The stop is the store's, not a signal's: after step 2 the proxy resets every connection, the next
read a worker needs gives up (data.io_retries=3), and the rank that hit it posts the stop a step
ahead (pipeline/data/lookahead.py). What follows the agreed stop (the final save, exit 75, the
resume) is the code path of a SIGUSR1 stop, which the local-disk checkpoint tests signal.
"""
from __future__ import annotations

import os
import re

import pytest

import checkpoint_runs as runs
from checkpoint_runs import launch, ledger_lines, ledger_steps, run, train_rows, wait_until
from remote_stores import FaultProxy, aws_env, s3_server, upload_dir

STAGE = 2
DOWN_AFTER = 2  # steps trained with the store up
# Gives up after 4 refused tries (well under a second); the generous timeout keeps a loaded
# machine's slow answers from counting as failures while the store is up.
IO = ["data.io_retries=3", "data.io_timeout_s=60"]
GAVE_UP = re.compile(r"gave up reading shard 's3://shards/digits/train-\d{6}\.tar' at byte \d+ after \d+ failed "
                     r"tries .*; last error: .+; checkpoint saved at step (\d+), exiting 75$")


@pytest.fixture(scope="module")
def s3_pair(tmp_path_factory, digits_shards):
    base = tmp_path_factory.getbasetemp() / "checkpoint-runs"
    full = runs.uninterrupted(base, digits_shards, STAGE)  # shared with the checkpoint tests
    with s3_server() as endpoint:
        saved = dict(os.environ)
        os.environ.update(aws_env(endpoint))
        proxy = FaultProxy(endpoint)
        os.environ["AWS_ENDPOINT_URL"] = proxy.url  # run_env() hands the environment to torchrun
        try:
            prefix = upload_dir(endpoint, digits_shards)
            names = sorted(p.name for p in digits_shards.glob("*.tar"))
            train = ",".join(f"{prefix}/{n}" for n in names if n.startswith("train"))
            val = ",".join(f"{prefix}/{n}" for n in names if n.startswith("val"))
            overrides = [o for o in runs.common(digits_shards, STAGE) if not o.startswith(("data.train_shards",
                                                                                          "data.val_shards"))]
            overrides += [f"data.train_shards=[{train}]", f"data.val_shards=[{val}]", *IO]
            out = base / "s3-store-lost"
            first = launch(2, out, overrides)
            both = lambda: ledger_steps(out, 0) >= DOWN_AFTER and ledger_steps(out, 1) >= DOWN_AFTER  # noqa: E731
            wait_until(both, first, f"step {DOWN_AFTER}")
            proxy.down(600.0)  # until the run has ended, however slowly this machine runs it
            first.wait()
            proxy.up()
            status = (out / "exit_status").read_text().strip() if (out / "exit_status").is_file() else None
            stopped = {rank: ledger_steps(out, rank) for rank in (0, 1)}
            root = out / "checkpoints"
            complete = sorted(int(p.name[5:]) for p in root.glob("step-*") if (p / "COMPLETE").is_file())
            second = run(2, out, overrides)
        finally:
            proxy.close()
            os.environ.clear()
            os.environ.update(saved)
    return full, out, first, second, status, stopped, complete


def test_a_store_lost_mid_run_saves_the_next_step_and_exits_75(s3_pair):
    full, out, first, second, status, stopped, complete = s3_pair
    log = first.log
    assert status == "75", log[-3000:]
    lines = [line for line in log.splitlines() if "gave up reading shard" in line]
    assert lines and len(set(lines)) == len(lines), lines  # one line per rank whose store gave up, said once
    steps = {int(GAVE_UP.search(line).group(1)) for line in lines if GAVE_UP.search(line)}
    assert len(steps) == 1 and len(lines) == len([line for line in lines if GAVE_UP.search(line)]), lines
    (step,) = steps
    assert DOWN_AFTER <= step < runs.STEPS and stopped == {0: step, 1: step}, (step, stopped)
    seen = [int(n) for n in re.findall(r"after step (\d+): the data store gave up on a batch fetched ahead", log)]
    # Every step logs here (train.log_every=1) and reads its own flags at once: the ranks stop at the
    # step after which the store's failure was first seen (a step that does not read them stops one
    # step later: test_train_single_rank's store test).
    assert seen and min(seen) == step, (seen, step)
    assert complete[-1] == step  # the stop's checkpoint, whole, beside the periodic ones before it
    assert re.search(rf"resumed from \S*step-{step} at step {step}", second.log), second.log[-3000:]
    assert "gave up" not in second.log


def test_the_requeued_run_is_bitwise_the_local_run(s3_pair):
    full, out, first, second, status, stopped, complete = s3_pair
    assert second.returncode == 0, second.log[-3000:]
    rows, expected = train_rows(out), train_rows(full)
    assert sorted(rows) == sorted(expected) == list(range(1, runs.STEPS + 1))
    assert [rows[s]["loss"] for s in sorted(rows)] == [expected[s]["loss"] for s in sorted(expected)]
    for rank in (0, 1):
        assert ledger_lines(out, rank) == ledger_lines(full, rank)  # every key once, at the same step
