"""Resuming the wrong thing is refused in one line before any weights are touched; starting over
needs checkpoint.overwrite=true and then really starts over."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import checkpoint_runs as runs
from conftest import PRETRAIN, ROOT, run_env
from pipeline.checkpoint import COMPLETE


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "checkpoint-runs"


def single_process(overrides: list[str]) -> subprocess.CompletedProcess:
    """One rank without torchrun: the refusals come before any collective, so one process shows them."""
    command = [sys.executable, str(PRETRAIN), "--config", str(ROOT / "configs/digits_tiny.yaml"), *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=run_env(), cwd=ROOT)


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in directory.rglob("*") if p.is_file()}


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, last
    assert "Traceback" not in result.stderr
    assert "DeepSpeed engine" not in result.stderr  # refused before the model or the engine existed


def test_another_model_shape_is_refused_naming_the_fields(base, digits_shards, tmp_path):
    source = runs.uninterrupted(base, digits_shards, 2)
    before = snapshot(source / "checkpoints")
    out = tmp_path / "run"
    result = single_process([*runs.common(digits_shards, 2), f"train.output_dir={out}", "model.hidden_size=32",
                             "model.num_hidden_layers=3", f"checkpoint.resume={source}"])
    assert_refused(result, "saved with another model shape", "model.hidden_size (checkpoint 64, config 32)",
                   "model.num_hidden_layers (checkpoint 2, config 3)")
    assert "model.num_attention_heads" not in result.stderr
    assert snapshot(source / "checkpoints") == before
    assert not (out / "checkpoints").exists()


def test_resume_none_on_an_existing_run_is_refused_unless_overwrite(base, digits_shards, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs.uninterrupted(base, digits_shards, 2), out)
    before = snapshot(out / "checkpoints")
    result = single_process([*runs.common(digits_shards, 2), f"train.output_dir={out}", "checkpoint.resume=none"])
    assert_refused(result, "already holds checkpoints", "checkpoint.overwrite=true")
    assert snapshot(out / "checkpoints") == before

    # With overwrite=true (a 2-rank run at ZeRO-1, shared with the export tests) the old run is gone.
    restarted = runs.short_run(base, digits_shards, 1)
    root = restarted / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-2"] and (root / "step-2" / COMPLETE).is_file()
    assert (root / "latest").read_text().strip() == "step-2"
    assert [line["step"] for line in runs.ledger_lines(restarted, 0)] == [1, 2]  # the old ledger went too


def test_resume_from_an_incomplete_path_is_refused(base, digits_shards, tmp_path):
    partial = tmp_path / "elsewhere" / "checkpoints" / "step-7"
    partial.mkdir(parents=True)
    result = single_process([*runs.common(digits_shards, 2), f"train.output_dir={tmp_path / 'run'}",
                             f"checkpoint.resume={partial}"])
    assert_refused(result, "is incomplete (no COMPLETE marker")
    assert os.listdir(partial) == []
