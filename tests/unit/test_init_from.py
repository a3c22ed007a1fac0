"""train.init_from: exactly the encoder of a pretrained model moves into a fresh model of the run's
task (HF directories here; a run's sharded ZeRO checkpoint in test_train_masked.py), strictly."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import CheckpointError, ResumePlan
from pipeline.config import ModelConfig
from pipeline.init_from import encoder_keys, load_encoder, starting_weights
from pipeline.model import ViTForImageClassification, ViTForMaskedImageModeling, ViTMAEForPreTraining, save_pretrained
from pipeline.model.vit import ViTModel
from pipeline.tasks import ClassificationTask, MAETask

CFG = ModelConfig(size="tiny", num_channels=1, num_hidden_layers=2, num_labels=10, decoder_hidden_size=32,
                  decoder_num_hidden_layers=1, decoder_num_attention_heads=4, decoder_intermediate_size=64,
                  encoder_stride=4, mask_patch_size=8)


def fresh(cls, seed: int, **changes):
    torch.manual_seed(seed)
    return cls(dataclasses.replace(CFG, **changes))


def assert_encoder_only(target: torch.nn.Module, before: dict, source: dict) -> None:
    """Every encoder tensor of ``target`` is the source's; everything else is what it was."""
    after = target.state_dict()
    encoder = encoder_keys(after)
    assert encoder and all(torch.equal(after[k], source[k]) for k in encoder)
    assert all(torch.equal(after[k], before[k]) for k in after if k not in encoder)
    assert all(not torch.equal(after[k], before[k]) for k in encoder if k.endswith("query.weight"))


@pytest.mark.parametrize("source_cls", [ViTMAEForPreTraining, ViTForMaskedImageModeling, ViTForImageClassification])
def test_a_classifier_takes_the_encoder_of_any_objective(tmp_path, source_cls):
    source = fresh(source_cls, 1)
    save_pretrained(source, tmp_path)
    target = fresh(ViTForImageClassification, 2, num_labels=7)  # a new head: another label count
    before = {k: v.clone() for k, v in target.state_dict().items()}
    assert load_encoder(target, tmp_path) == ["classifier"]
    assert_encoder_only(target, before, source.state_dict())


def test_mae_takes_a_bare_vit_model_and_keeps_its_decoder(tmp_path):
    source = fresh(ViTModel, 1)  # HF's ViTModel: keys without "vit.", a pooler
    save_pretrained(source, tmp_path)
    target = fresh(ViTMAEForPreTraining, 2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    assert load_encoder(target, tmp_path) == ["decoder"]
    assert_encoder_only(target, before, {f"vit.{k}": v for k, v in source.state_dict().items()})


def test_a_different_encoder_is_refused_in_one_line(tmp_path):
    save_pretrained(fresh(ViTMAEForPreTraining, 1, num_hidden_layers=3), tmp_path / "deeper")
    with pytest.raises(CheckpointError) as caught:
        load_encoder(fresh(ViTForImageClassification, 2), tmp_path / "deeper")
    message = str(caught.value)
    assert "\n" not in message and "unexpected ['vit.encoder.layer.2." in message
    assert "give the model section the encoder's shape" in message
    save_pretrained(fresh(ViTMAEForPreTraining, 1, hidden_size=32, num_attention_heads=2, intermediate_size=64),
                    tmp_path / "narrower")
    with pytest.raises(CheckpointError, match=r"mis-shaped \['vit\.embeddings\.cls_token \(1, 1, 32\) vs \(1, 1, 64\)"):
        load_encoder(fresh(ViTForImageClassification, 2), tmp_path / "narrower")
    with pytest.raises(CheckpointError, match="train.init_from=.*nowhere: no such path"):
        load_encoder(fresh(ViTForImageClassification, 2), tmp_path / "nowhere")


def test_resume_keeps_its_objective_and_ignores_init_from(tmp_path):
    model = fresh(ViTMAEForPreTraining, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = ResumePlan(tag_dir=Path("/runs/x/checkpoints/step-40"), marker={"step": 40, "task": "mae"}, universal=False)
    starting_weights(model, task=MAETask(CFG), init_from=str(tmp_path / "nowhere"), plan=plan)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="was trained with train.objective=mae, not classification; set "
                                              "train.objective=mae to continue it"):
        starting_weights(fresh(ViTForImageClassification, 2), task=ClassificationTask(), init_from=None, plan=plan)
