"""launch/export.py on mae and simmim runs (the sharded ZeRO checkpoints of masked_runs.py):
transformers loads the pretraining models and gives their outputs; --encoder-only gives the
encoder's features on all tokens, and with --num-labels a classifier to fine-tune."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

import masked_runs as runs
from conftest import ROOT
from pipeline.checkpoint.export import trained_model
from pipeline.model import mae_noise, simmim_mask

sys.path.insert(0, str(ROOT / "launch"))
import export as export_cli  # noqa: E402  (launch/export.py, run in this process: no second start-up)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "masked-runs"


def export(run: Path, out: Path, *flags: str) -> int:
    return export_cli.main(["--checkpoint", str(run), "--out", str(out), *flags])


def images() -> torch.Tensor:
    return torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def test_mae_exports_as_vitmae_and_its_encoder_alone(base, digits_shards, tmp_path):
    run = runs.stage_run(base, digits_shards, "mae", 3).out
    ours = trained_model(run / "checkpoints" / f"step-{runs.STEPS}")
    x = images()
    noise = mae_noise(3, ours.config.num_patches, generator=torch.Generator().manual_seed(1))

    assert export(run, tmp_path / "full") == 0
    hf = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "full").eval()
    with torch.no_grad():
        expected, got = ours(x, noise=noise), hf(pixel_values=x, noise=noise)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-5)

    assert export(run, tmp_path / "encoder", "--encoder-only") == 0
    assert json.loads((tmp_path / "encoder" / "config.json").read_text())["architectures"] == ["ViTModel"]
    encoder = transformers.ViTModel.from_pretrained(tmp_path / "encoder", add_pooling_layer=False).eval()
    with torch.no_grad():
        features = ours.vit(x, masking=False).last_hidden_state  # the full model's encoder on all tokens
        torch.testing.assert_close(encoder(pixel_values=x).last_hidden_state, features, rtol=0, atol=1e-5)


def test_simmim_exports_for_masked_image_modeling_and_as_a_classifier(base, digits_shards, tmp_path):
    run = runs.stage_run(base, digits_shards, "simmim", 2).out
    ours = trained_model(run / "checkpoints" / f"step-{runs.STEPS}")
    x = images()
    cfg = ours.config
    masked = simmim_mask(3, image_size=cfg.image_hw, patch_size=cfg.patch_hw, mask_patch_size=cfg.mask_patch_size,
                         mask_ratio=cfg.simmim_mask_ratio, generator=torch.Generator().manual_seed(1))
    assert export(run, tmp_path / "full") == 0
    hf = transformers.ViTForMaskedImageModeling.from_pretrained(tmp_path / "full").eval()
    with torch.no_grad():
        expected, got = ours(x, bool_masked_pos=masked), hf(pixel_values=x, bool_masked_pos=masked)
    torch.testing.assert_close(got.reconstruction, expected.reconstruction, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-5)

    assert export(run, tmp_path / "classifier", "--encoder-only", "--num-labels", "10") == 0
    classifier = transformers.ViTForImageClassification.from_pretrained(tmp_path / "classifier").eval()
    assert classifier.config.num_channels == 3  # taking RGB, as HF's image pipeline feeds it
    assert classifier.config.id2label[3] == "3"  # the digits' class names, from the manifest
    patch = "vit.embeddings.patch_embeddings.projection.weight"
    state, trained = classifier.state_dict(), ours.state_dict()
    assert all(torch.equal(state[k], trained[k]) for k in trained if k.startswith("vit.encoder."))
    torch.testing.assert_close(state[patch].sum(dim=1, keepdim=True), trained[patch])  # luma split of the gray weights
    assert state["classifier.weight"].shape == (10, cfg.hidden_size)


def test_num_labels_needs_encoder_only(base, digits_shards, tmp_path, capsys):
    run = runs.stage_run(base, digits_shards, "mae", 3).out
    assert export(run, tmp_path / "x", "--num-labels", "10") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --num-labels 10 needs --encoder-only: it puts a new classifier on the checkpoint's encoder; "
        "a classification checkpoint keeps its own classifier without it")
    assert export(run, tmp_path / "y", "--encoder-only", "--num-labels", "0") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: --num-labels 0: give a positive count of classes"


def test_linear_probe_cli_probes_a_run_and_its_encoder_export_alike(base, digits_shards, tmp_path, capsys):
    """launch/linear_probe.py: a run directory (its own shards) and its --encoder-only export (HF's
    ViTModel, shards named) hold the same encoder, so they give the same figures."""
    import linear_probe as probe_cli  # launch/linear_probe.py

    run = runs.stage_run(base, digits_shards, "mae", 3).out
    assert export(run, tmp_path / "encoder", "--encoder-only") == 0
    capsys.readouterr()
    assert probe_cli.main(["--model", str(run)]) == 0
    from_run = capsys.readouterr().out.strip().splitlines()[-1]
    assert probe_cli.main(["--model", str(tmp_path / "encoder"), "--shards", str(digits_shards)]) == 0
    from_export = capsys.readouterr().out.strip().splitlines()[-1]
    assert "k-NN top-1" in from_run and "linear-probe top-1" in from_run
    assert from_run.split(": ", 1)[1] == from_export.split(": ", 1)[1], (from_run, from_export)
    # an HF directory without shards, and unlabeled shards, are refused in one line
    assert probe_cli.main(["--model", str(tmp_path / "encoder")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --model {tmp_path / 'encoder'} is an HF directory: give the "
                                               "shards to probe on with --shards DIR")
