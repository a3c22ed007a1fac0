"""HuggingFace file format both ways: transformers' save_pretrained -> ours, ours -> transformers."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from pipeline.config import ModelConfig
from pipeline.model import ViTForImageClassification, build_model, config_from_hf, config_to_hf, from_pretrained
from pipeline.model import save_pretrained

TOL = 1e-5
BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            image_size=[16, 24], patch_size=[4, 6], num_labels=7, hidden_act="gelu_new", layer_norm_eps=1e-6)


@torch.no_grad()
def perturb(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.add_(0.2 * torch.randn(param.shape, generator=generator))


def pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 24, generator=torch.Generator().manual_seed(1))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_transformers_checkpoint_loads_with_identical_logits(tmp_path, safe_serialization):
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(**BASE))
    perturb(hf)
    hf.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    ours = from_pretrained(tmp_path)
    # HF's config.json always carries encoder_stride (16 by default), which wins over ours (the patch size)
    assert isinstance(ours, ViTForImageClassification)
    assert ours.config == ModelConfig(**BASE, encoder_stride=hf.config.encoder_stride)
    with torch.no_grad():
        assert max_diff(ours.eval()(pixels()).logits, hf.eval()(pixels()).logits) <= TOL


def test_transformers_backbone_checkpoint_loads_without_vit_prefix(tmp_path):
    hf = transformers.ViTModel(transformers.ViTConfig(**BASE))  # with pooler, keys without "vit."
    perturb(hf)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, num_labels=3)
    assert ours.classifier.weight.shape == (3, 32)
    with torch.no_grad():
        mine = ours.eval().vit(pixels()).last_hidden_state
        assert max_diff(mine, hf.eval()(pixels()).last_hidden_state) <= TOL


def test_new_num_labels_keeps_fresh_classifier(tmp_path):
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(**BASE))
    perturb(hf)
    hf.save_pretrained(tmp_path)
    same = from_pretrained(tmp_path, num_labels=7)
    assert torch.equal(same.classifier.weight, hf.classifier.weight)  # equal count: head is loaded
    other = from_pretrained(tmp_path, num_labels=4)
    assert other.classifier.weight.shape == (4, 32)
    assert torch.equal(other.vit.layernorm.weight, hf.vit.layernorm.weight)


@pytest.mark.parametrize("overrides", [{}, dict(image_size=32, patch_size=8, qkv_bias=False, pooler_output_size=16)],
                         ids=["rect", "square-no-qkv-bias"])
def test_our_checkpoint_loads_in_transformers_with_identical_logits(tmp_path, overrides):
    cfg = ModelConfig(**{**BASE, **overrides})
    ours = build_model(cfg)
    perturb(ours)
    save_pretrained(ours, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "vit" and written["architectures"] == ["ViTForImageClassification"]
    hf, info = transformers.ViTForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    x = torch.randn(2, 3, *cfg.image_hw)
    with torch.no_grad():
        assert max_diff(ours.eval()(x).logits, hf.eval()(x).logits) <= TOL
    assert max_diff(from_pretrained(tmp_path).eval()(x).logits, ours(x).logits) == 0.0


def test_pruned_model_round_trips(tmp_path):
    ours = build_model(ModelConfig(**BASE))
    perturb(ours)
    ours.prune_heads({0: [0, 2], 1: [3]})
    save_pretrained(ours, tmp_path)
    again = from_pretrained(tmp_path)
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        logits = ours.eval()(pixels()).logits
        assert max_diff(again.eval()(pixels()).logits, logits) == 0.0
        assert max_diff(hf.eval()(pixels()).logits, logits) <= TOL


@pytest.mark.parametrize("cfg", [ModelConfig(**BASE), ModelConfig(hidden_size=48, num_attention_heads=3, num_labels=2),
                                 ModelConfig(**{**BASE, "pooler_output_size": 20, "pooler_act": "relu"})],
                         ids=["rect", "defaults", "pooler"])
def test_config_round_trip(cfg):
    hf_dict = config_to_hf(cfg)
    assert config_from_hf(json.loads(json.dumps(hf_dict))) == cfg
    hf = transformers.ViTConfig(**hf_dict)
    assert hf.num_labels == cfg.num_labels and hf.image_size == cfg.image_size and hf.patch_size == cfg.patch_size
    assert hf.pooler_output_size == (cfg.pooler_output_size or cfg.hidden_size)
    assert config_from_hf(hf.to_dict()) == cfg


def test_missing_directory_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="does not exist") as error:
        from_pretrained(missing)
    assert str(missing) in str(error.value) and "\n" not in str(error.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(ModelConfig(**BASE))))
    with pytest.raises(ValueError, match="model.safetensors"):
        from_pretrained(tmp_path)


def test_wrong_model_type_is_rejected(tmp_path):
    save_pretrained(build_model(ModelConfig(**BASE)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "deit"}))
    with pytest.raises(ValueError, match="model_type"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda state: state.pop("vit.layernorm.weight"), "missing.*vit.layernorm.weight"),
    (lambda state: state.update({"vit.extra.weight": torch.zeros(2)}), "unexpected.*vit.extra.weight"),
    (lambda state: state.update({"classifier.bias": torch.zeros(9)}), "mis-shaped.*classifier.bias"),
], ids=["missing", "unexpected", "mis-shaped"])
def test_mismatched_keys_are_errors(tmp_path, edit, message):
    save_pretrained(build_model(ModelConfig(**BASE)), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message) as error:
        from_pretrained(tmp_path)
    assert "model.safetensors" in str(error.value) and "\n" not in str(error.value)


def test_save_rejects_other_modules(tmp_path):
    with pytest.raises(TypeError, match="ViTForImageClassification"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)
