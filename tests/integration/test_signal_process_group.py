"""SIGTERM to the whole process group (what Slurm does on scancel or preemption) saves and exits 75.

The DataLoader workers are in that group too; they must leave the signal to the trainer.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import PRETRAIN, ROOT, TINY, run_env, shard_overrides


def test_sigterm_to_the_process_group_checkpoints_and_exits_75(tmp_path, digits_shards):
    out = tmp_path / "run"
    command = [sys.executable, str(PRETRAIN), "--config", str(ROOT / "configs/digits_tiny.yaml"), *TINY,
               *shard_overrides(digits_shards), f"train.output_dir={out}", "train.max_steps=2000",
               "data.ledger=true", "data.num_workers=2", "data.val_shards=null"]
    proc = subprocess.Popen(command, env=run_env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ledger = out / "ledger" / "rank0.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (ledger.is_file() and len(ledger.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # trainer and its two DataLoader workers alike
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 75, stderr[-3000:]
    assert "DataLoader worker" not in stderr
    complete = sorted((out / "checkpoints").glob("step-*/COMPLETE"))
    assert complete, stderr[-2000:]
    assert (out / "exit_status").read_text().strip() == "75"
