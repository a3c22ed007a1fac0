"""The other ways users start a run (DeepSpeed's launcher), and the plot of a finished run."""
from __future__ import annotations

import subprocess
import sys

from conftest import PRETRAIN, ROOT, TINY, metrics, run_env, shard_overrides


def test_deepspeed_launcher_runs_two_ranks(tmp_path, digits_shards):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", str(PRETRAIN), "--config",
               str(ROOT / "configs/digits_tiny.yaml"), *TINY, *shard_overrides(digits_shards),
               f"train.output_dir={out}", "train.max_steps=4", "train.zero_stage=1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=run_env())
    assert result.returncode == 0, result.stderr[-3000:]
    train_rows, val_rows = metrics(out)
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4] and val_rows
    assert "world size 2" in result.stderr  # both launched processes joined one group
    assert "is deprecated" not in result.stderr  # the per-step torch warnings are filtered


def test_plot_draws_the_curves_of_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [f'{{"step": {s}, "loss": {2.3 - s / 10}, "samples_per_s": 100.0}}' for s in range(1, 6)]
    rows.append('{"step": 5, "val_top1": 0.5, "val_top5": 0.9, "val_loss": 1.2}')
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    result = subprocess.run([sys.executable, str(ROOT / "launch/plot.py"), str(run)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    png = (run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_plot_of_a_missing_run_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "launch/plot.py"), str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no metrics.jsonl") and "Traceback" not in result.stderr
