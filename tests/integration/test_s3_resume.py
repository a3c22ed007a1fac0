"""Training from S3 (moto's server on loopback): 2 ranks stopped by SIGUSR1 mid-run and resumed,
bitwise against the uninterrupted run of the same shards on local disk (checkpoint_runs')."""
from __future__ import annotations

import os
import signal

import pytest

import checkpoint_runs as runs
from checkpoint_runs import launch, ledger_lines, ledger_steps, run, train_rows, wait_until
from remote_stores import aws_env, s3_server, upload_dir

STAGE = 2


@pytest.fixture(scope="module")
def s3_pair(tmp_path_factory, digits_shards):
    base = tmp_path_factory.getbasetemp() / "checkpoint-runs"
    full = runs.uninterrupted(base, digits_shards, STAGE)  # shared with the checkpoint tests
    with s3_server() as endpoint:
        saved = dict(os.environ)
        os.environ.update(aws_env(endpoint))  # run_env() hands the environment to torchrun
        try:
            prefix = upload_dir(endpoint, digits_shards)
            names = sorted(p.name for p in digits_shards.glob("*.tar"))
            train = ",".join(f"{prefix}/{n}" for n in names if n.startswith("train"))
            val = ",".join(f"{prefix}/{n}" for n in names if n.startswith("val"))
            overrides = [o for o in runs.common(digits_shards, STAGE) if not o.startswith(("data.train_shards",
                                                                                          "data.val_shards"))]
            overrides += [f"data.train_shards=[{train}]", f"data.val_shards=[{val}]"]
            out = base / "s3-preempted"
            first = launch(2, out, overrides)
            wait_until(lambda: ledger_steps(out, 0) >= 6 and ledger_steps(out, 1) >= 6, first, "step 6")
            for pid in first.worker_pids():
                os.kill(pid, signal.SIGUSR1)
            first.wait()
            status = (out / "exit_status").read_text().strip() if (out / "exit_status").is_file() else None
            second = run(2, out, overrides)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return full, out, first, second, status


def test_an_s3_run_stopped_and_resumed_is_bitwise_the_local_run(s3_pair):
    full, out, first, second, status = s3_pair
    assert status == "75", first.log[-3000:]
    assert second.returncode == 0, second.log[-3000:]
    assert "resumed from" in second.log
    rows, expected = train_rows(out), train_rows(full)
    assert sorted(rows) == sorted(expected) == list(range(1, runs.STEPS + 1))
    assert [rows[s]["loss"] for s in sorted(rows)] == [expected[s]["loss"] for s in sorted(expected)]
    for rank in (0, 1):
        assert ledger_lines(out, rank) == ledger_lines(full, rank)  # every key once, at the same step
