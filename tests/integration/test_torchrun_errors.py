"""A user error reads the same under torchrun as under python: its one line printed once, torchrun's
failure summary naming it (the worker's error file, in the layout of torch's
``elastic.multiprocessing.errors.record``) instead of ``<N/A>``, and ``exit_status`` 2, even over
a finished run's 0. The other rank, stopped by torchrun before training, says nothing of a
checkpoint.

One real torchrun run; the config errors themselves go through the launcher in-process (the same
``main`` each rank runs), where the line, the code and the file are the same.
"""
from __future__ import annotations

import json
import logging
import re
import sys

import pytest

from conftest import ROOT, TINY, TINY_DECODER, shard_overrides, torchrun

sys.path.insert(0, str(ROOT / "launch"))
import pretrain  # noqa: E402  - launch/pretrain.py, the entry point every rank runs


def finished_run(tmp_path):
    """An output directory whose previous run finished: exit_status 0."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "exit_status").write_text("0\n")
    return out


def test_a_config_error_under_torchrun_is_one_line_named_by_torchrun_and_exit_status_2(tmp_path, digits_shards):
    out = finished_run(tmp_path)
    result = torchrun(2, [*TINY, *shard_overrides(digits_shards), "train.objective=mea", f"train.output_dir={out}"],
                      timeout=180)
    log = result.stdout + result.stderr
    line = "train.objective 'mea' is unknown; use one of classification, mae, simmim"
    assert result.returncode == 1, log[-3000:]  # torchrun's own code for any failed worker
    assert log.count(f"error: {line}") == 1, log[-3000:]  # once, not once per rank
    failures, root = log.split("Root Cause (first observed failure):")
    assert f"traceback : {line}" in root and "<N/A>" not in root, root
    assert (out / "exit_status").read_text() == "2\n"  # not the finished run's 0
    assert re.findall(r"exitcode\s*:\s*(-?\d+) \(pid", log) == ["2", "2"]  # every rank: the same code
    # the rank torchrun stopped (if it had not refused by then) announces no checkpoint
    assert "will save a checkpoint" not in log and "received SIGTERM" not in log, log[-3000:]
    assert "pipeline/" not in log  # no traceback of ours


@pytest.fixture
def unlabeled(tmp_path, digits_shards):
    """The digits shards under a manifest that says what make_shards --unlabeled writes (the
    config check reads only the manifest)."""
    out = tmp_path / "unlabeled"
    out.mkdir()
    manifest = json.loads((digits_shards / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "labeled": False}))
    for shard in digits_shards.glob("*.tar"):
        (out / shard.name).symlink_to(shard)
    return out


def mae_checkpoint(out):
    """A checkpoint of an mae run (its COMPLETE marker is all that is read before refusing)."""
    from pipeline.config import load_config

    model = load_config(None, [*TINY, *TINY_DECODER]).model
    tag = out / "checkpoints" / "step-4"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text(json.dumps({"step": 4, "world_size": 1, "zero_stage": 2, "task": "mae",
                                              "model": model.__dict__}))


# (overrides, the line): the config errors a new user met, each through the launcher
CONFIG_ERRORS = {
    "objective typo": (["train.objective=mea"],
                       "train.objective 'mea' is unknown; use one of classification, mae, simmim"),
    "mask ratio": (["model.mask_ratio=1.5"], "model.mask_ratio must be in [0, 1), got 1.5"),
    "probe k": (["probe.k=0"], "probe.k must be positive, got 0"),
    "classification on unlabeled shards": (["UNLABELED"], "train.objective=classification needs labels"),
    "simmim masks everything": (["train.objective=simmim", "model.mask_patch_size=16"],
                                "model.mask_patch_size (16) leaves 1 mask block in a 16x16 image"),
    "a repeated key": (["checkpoint.overwrite=true", "checkpoint.overwrite=false"],
                       "override key 'checkpoint.overwrite' is given 2 times in a row (true, false): give it once"),
    "resuming mae as simmim": (["train.objective=simmim", "MAE_CHECKPOINT"],
                               "was trained with train.objective=mae, not simmim: resume it with "
                               "train.objective=mae"),
}


@pytest.mark.parametrize("case", CONFIG_ERRORS)
def test_each_config_error_is_one_line_exit_2_and_exit_status_2(case, tmp_path, digits_shards, unlabeled, capsys,
                                                                 monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torch's threads in this process stay as they are
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))  # the launcher sets up logging
    extra, expected = CONFIG_ERRORS[case]
    out = finished_run(tmp_path)
    shards = unlabeled if "UNLABELED" in extra else digits_shards
    if "MAE_CHECKPOINT" in extra:
        mae_checkpoint(out)
    extra = [e for e in extra if e not in ("UNLABELED", "MAE_CHECKPOINT")]
    code = pretrain.main(["--config", str(ROOT / "configs/digits_tiny.yaml"), *TINY, *TINY_DECODER[:4],
                          *shard_overrides(shards), f"train.output_dir={out}", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len([e for e in err if e.startswith("error: ")]) == 1 and expected in err[-1], err
    assert (out / "exit_status").read_text() == "2\n"


def test_check_writes_no_exit_status(tmp_path, digits_shards, capsys, monkeypatch):
    """--check validates only: a finished run's exit_status stays as it is."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out = finished_run(tmp_path)
    code = pretrain.main(["--config", str(ROOT / "configs/digits_tiny.yaml"), "--check", "probe.k=0",
                          f"train.output_dir={out}"])
    assert code == 2 and capsys.readouterr().err.strip() == "error: probe.k must be positive, got 0"
    assert (out / "exit_status").read_text() == "0\n"
