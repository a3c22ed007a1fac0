"""The EMA at ZeRO 0-3 on 2 ranks (tests/integration/ema_ranks.py, one torchrun for the four stages):
each rank's partition average is timm's ModelEmaV3 of the whole model, bitwise; evaluation under it
and back; the checkpoint round trip; another layout's average laid onto the partitions.

(The trainer's use of it runs in the shared runs: checkpoint_runs.py and test_train_distributed.py
turn train.ema_decay on.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, run_env

SCRIPT = Path(__file__).with_name("ema_ranks.py")


def test_partition_ema_is_the_whole_model_ema_at_every_zero_stage(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
               str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=run_env())
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        stages = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(stages) == ["zero0", "zero1", "zero2", "zero3"]
        for name, got in stages.items():
            assert got["skipped_step_left_weights"], (rank, name)  # the non-finite step was skipped...
            assert got["equal_to_timm"], (rank, name, got["max_abs_diff_to_timm"])  # ...and the EMA skipped it
            assert got["in_model_max_abs_diff"] <= 1e-5, (rank, name, got)  # the engine computes with the average
            assert got["restored_bitwise"], (rank, name)  # and with the weights again after
            assert got["consolidated_equal"] and got["restored_from_checkpoint"], (rank, name)
            assert got.get("load_full_equal", name == "zero0"), (rank, name)
            # Each rank keeps the EMA of its own partition only: half (plus padding) on 2 ranks.
            share = got["ema_bytes"] / got["param_bytes"]
            assert share == 1.0 if name == "zero0" else 0.5 <= share <= 0.51, (rank, name, share)
