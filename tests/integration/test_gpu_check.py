"""`make gpu-check` in its CPU form (tiny sizes): every phase runs the real trainer and judges it,
so the GPU machine check cannot rot between the times a GPU is at hand."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, run_env


def test_gpu_check_runs_every_phase_on_tiny_sizes(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, str(ROOT / "launch/gpu_check.py"), "--tiny", "--out", str(out)],
                            capture_output=True, text=True, timeout=900, cwd=ROOT, env=run_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    results = report["results"]
    assert set(results) == {"throughput", "sync", "matrix", "resume", "export"}
    # classification, and MAE on the same labeled shards (labels unused) next to the MAE model alone
    assert [(r["name"], r["objective"]) for r in results["throughput"]] == [("tiny eager", "classification"),
                                                                            ("tiny MAE eager", "mae")]
    for row in results["throughput"]:
        assert row["trainer_images_per_s"] > 0 and row["model_images_per_s"] > 0
        assert 0 <= row["data_wait_fraction"] <= 1 and row["trainer_mfu"] > 0 and row["model_mfu"] > 0
    (matrix,) = results["matrix"]  # one run on CPUs (fp16's refusal there: test_train_distributed.py)
    assert matrix["name"] == "matrix-bf16-zero3" and matrix["last_loss"] < matrix["first_loss"]
    (resumed,) = results["resume"]
    assert resumed["stopped_status"] == "75" and resumed["losses_bitwise"] and resumed["ledgers_equal"]
    assert results["export"][0]["max_logit_difference"] <= 1e-5  # the export tests' tolerance: "the same logits"
    assert "ok   resume" in result.stdout and "FAIL" not in result.stdout
