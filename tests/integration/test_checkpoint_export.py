"""`launch/export.py` for every ZeRO stage: HuggingFace's ViTForImageClassification loads the result
and computes what the training run computed."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import checkpoint_runs as runs
from conftest import ROOT, run_env
from pipeline.checkpoint import read_marker
from pipeline.data.device_feed import Normalize
from pipeline.config import ModelConfig, load_config
from pipeline.checkpoint import CheckpointError
from pipeline.checkpoint.export import consolidated_state_dict, export_checkpoint, find_checkpoint
from pipeline.model import build_model


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "checkpoint-runs"


@functools.cache
def export_cli():
    """launch/export.py as a module, for its main() in this process."""
    spec = importlib.util.spec_from_file_location("export_cli", ROOT / "launch/export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deepspeed_weights(tag_dir: Path, stage: int) -> dict[str, torch.Tensor]:
    """DeepSpeed's own answer (it unpickles everything: fine for files this test made)."""
    if stage == 0:
        return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_export_loads_in_transformers_with_our_logits(base, digits_shards, tmp_path, stage):
    from transformers import ViTForImageClassification

    run = runs.checkpoint_run(base, digits_shards, stage)
    out = tmp_path / "hf"
    if stage == 3:  # the command line as a user types it, once; its main() in this process at the other stages
        result = subprocess.run([sys.executable, str(ROOT / "launch/export.py"), "--checkpoint", str(run), "--out",
                                 str(out)], capture_output=True, text=True, timeout=300, env=run_env())
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        assert export_cli().main(["--checkpoint", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in out.iterdir())  # not safetensors' 0600
    assert json.loads((out / "config.json").read_text())["id2label"] == {str(i): str(i) for i in range(10)}

    # Our weights-only reconstruction is DeepSpeed's, bit for bit.
    tag_dir = find_checkpoint(run)
    assert read_marker(tag_dir)["zero_stage"] == stage
    ours, reference = consolidated_state_dict(tag_dir, stage), deepspeed_weights(tag_dir, stage)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k].float()) for k in reference)

    hf = ViTForImageClassification.from_pretrained(out).eval()
    model = build_model(ModelConfig(**read_marker(tag_dir)["model"])).eval()
    model.load_state_dict(reference)
    images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(stage))
    with torch.no_grad():  # the 1-channel model is exported taking RGB: gray images give its logits
        assert (hf(pixel_values=images.expand(-1, 3, -1, -1)).logits - model(images).logits).abs().max().item() <= 1e-5

    # And it computes what the training run computed: the run's last validation loss.
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in logged if "val_loss" in row][-1]
    assert logged["step"] == read_marker(tag_dir)["step"]
    loss, count = validation_loss(hf, run)
    assert count == logged["val_samples"] and loss == pytest.approx(logged["val_loss"], abs=1e-5)

    # --ema: the averaged weights (the shared runs keep an EMA), which compute what the run's
    # evaluation under the average computed, and differ from the weights.
    ema_out = tmp_path / "hf-ema"
    if stage == 3:  # the command line once; the same function in-process at the other stages
        result = subprocess.run([sys.executable, str(ROOT / "launch/export.py"), "--checkpoint", str(run), "--out",
                                 str(ema_out), "--ema"], capture_output=True, text=True, timeout=300, env=run_env())
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        export_checkpoint(run, ema_out, ema=True)
    averaged = ViTForImageClassification.from_pretrained(ema_out).eval()
    loss, count = validation_loss(averaged, run)
    assert count == logged["val_samples"] and loss == pytest.approx(logged["val_loss_ema"], abs=1e-5)
    assert logged["val_loss_ema"] != logged["val_loss"]


def validation_loss(hf, run: Path) -> tuple[float, int]:
    from pipeline.data import build_eval_loader

    cfg = load_config(run / "config.yaml")
    loader = build_eval_loader(cfg.data, image_size=cfg.model.image_hw, num_channels=cfg.model.num_channels,
                               rank=0, world_size=1)
    normalize = Normalize(cfg.data.mean, cfg.data.std, cfg.model.num_channels)  # the loader ships uint8
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            images = normalize(batch["image"])
            logits = hf(pixel_values=images.expand(-1, 3, -1, -1)).logits.float()
            losses = F.cross_entropy(logits, batch["label"], reduction="none")
            total += (losses * batch["valid"]).sum().item()
            count += int(batch["valid"].sum())
    return total / max(count, 1), count


def test_export_refuses_an_output_path_that_is_a_file_in_one_line(base, digits_shards, tmp_path):
    run = runs.checkpoint_run(base, digits_shards, 0)
    (tmp_path / "taken").write_text("")
    result = subprocess.run([sys.executable, str(ROOT / "launch/export.py"), "--checkpoint", str(run), "--out",
                             str(tmp_path / "taken")], capture_output=True, text=True, timeout=120, env=run_env())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: --out '{tmp_path / 'taken'}' is a file; give a " \
                                                     "directory (it is created if missing)"


def test_export_ema_of_a_checkpoint_without_one_is_refused_in_one_line(base, digits_shards, tmp_path):
    source = find_checkpoint(runs.checkpoint_run(base, digits_shards, 0))
    tag = tmp_path / "checkpoints" / "step-2"  # the same checkpoint as a run without train.ema_decay saves it
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_bytes((source / "COMPLETE").read_bytes())
    state = torch.load(source / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    del state["ema"]
    torch.save(state, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError) as info:
        export_checkpoint(tag, tmp_path / "out", ema=True)
    assert "holds no EMA of the weights (it was trained with train.ema_decay=0); export it without --ema" in str(
        info.value) and "\n" not in str(info.value)
    assert consolidated_state_dict(tag, 0).keys() == consolidated_state_dict(source, 0, ema=True).keys()


def test_export_refuses_an_incomplete_checkpoint_in_one_line(tmp_path, capsys):
    tag = tmp_path / "checkpoints" / "step-3"
    tag.mkdir(parents=True)
    assert export_cli().main(["--checkpoint", str(tag), "--out", str(tmp_path / "hf")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "is incomplete (no COMPLETE marker" in line
    assert not (tmp_path / "hf").exists()
