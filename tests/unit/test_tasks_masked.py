"""The mae and simmim tasks: config, evaluation sums that count every real sample exactly once,
masks that are a function of the batch (so a resumed run draws the same ones), FLOPs, features."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_DECODER
from pipeline.config import ConfigError, load_config
from pipeline.model import mae_flops, simmim_flops
from pipeline.tasks import ClassificationTask, MAETask, SimMIMTask, build_task

SMALL = ["model.size=tiny", "model.num_channels=1", "model.num_hidden_layers=2", *TINY_DECODER]


def task_and_model(objective: str):
    cfg = load_config(None, [*SMALL, f"train.objective={objective}"])
    task = build_task(cfg)
    torch.manual_seed(0)
    return cfg, task, task.build_model(cfg.model).eval()


def test_objective_picks_the_task_and_classification_stays_the_default():
    assert type(build_task(load_config(None, []))) is ClassificationTask
    assert type(build_task(load_config(None, [*SMALL, "train.objective=mae"]))) is MAETask
    assert type(build_task(load_config(None, [*SMALL, "train.objective=simmim"]))) is SimMIMTask
    with pytest.raises(ConfigError, match="train.objective 'byol' is unknown; use one of classification, mae, simmim"):
        load_config(None, ["train.objective=byol"])


def test_each_objective_checks_its_model_fields_at_load():
    # An encoder_stride given apart from the patch size: SimMIM's decoder cannot use 16 with 4-pixel patches.
    with pytest.raises(ConfigError, match=r"model.patch_size 4 must be square and equal to model.encoder_stride "
                                          r"\(16\)"):
        load_config(None, ["model.size=tiny", "train.objective=simmim", "model.encoder_stride=16"])
    with pytest.raises(ConfigError, match="model.decoder_hidden_size must be a multiple of 4"):
        load_config(None, [*SMALL, "model.decoder_hidden_size=30", "model.decoder_num_attention_heads=3",
                           "train.objective=mae"])
    load_config(None, ["model.size=tiny", "train.objective=mae"])  # HF's MAE defaults fit any width


@pytest.mark.parametrize("size, patch, blocks", [("tiny", 4, 8), ("B/16", 16, 32)])
def test_simmim_defaults_follow_the_patch_and_image(size, patch, blocks):
    """encoder_stride unset is the patch size (HF's configs pair them); the mask block is SimMIM's
    32 px where the image holds 2x2 of them, else the largest multiple of the patch that does."""
    model = load_config(None, [f"model.size={size}", "train.objective=simmim"]).model
    assert (model.encoder_stride, model.mask_patch_size) == (patch, blocks)
    assert load_config(None, ["model.size=tiny", "model.image_size=32"]).model.mask_patch_size == 16


@pytest.mark.parametrize("image, block", [(32, 32), (16, 16)])
def test_simmim_refuses_a_mask_block_as_large_as_the_image(image, block):
    """One block per image masks all of it: simmim_mask's ratio 0.6 came out as 1.0."""
    with pytest.raises(ConfigError, match=rf"model.mask_patch_size \({block}\) leaves 1 mask block in a "
                                          rf"{image}x{image} image: SimMIM would mask all of it.*"
                                          rf"model.mask_patch_size={image // 2}"):
        load_config(None, ["model.size=tiny", f"model.image_size={image}", f"model.mask_patch_size={block}",
                           "train.objective=simmim"])


@pytest.mark.parametrize("objective", ["mae", "simmim"])
def test_eval_sums_count_real_samples_only(objective):
    """Padding (valid=False) changes nothing: the figure is the model's own loss on the real samples
    with the masks the evaluation drew for them."""
    cfg, task, model = task_and_model(objective)
    images = torch.randn(5, 1, 16, 16)
    valid = torch.tensor([True, True, True, False, False])
    task.start_eval(torch.device("cpu"))
    with torch.no_grad():
        sums = task.eval_sums(model, {"image": images, "valid": valid})
        task.start_eval(torch.device("cpu"))  # the same draws again, for the reference
        if objective == "mae":
            noise = task.noise(images, task.eval_generator)[:3]
            expected = model(images[:3], noise=noise).loss
        else:
            masked = task.mask(images, task.eval_generator)[:3]
            expected = model(images[:3], bool_masked_pos=masked).loss
    metrics = task.eval_metrics(dict(zip(task.eval_names, sums.tolist())))
    assert metrics["val_samples"] == 3
    assert metrics["val_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert sums.dtype == torch.float64
    padding_only = task.eval_sums(model, {"image": images, "valid": torch.zeros(5, dtype=torch.bool)})
    assert padding_only.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("objective", ["mae", "simmim"])
def test_training_masks_are_a_function_of_the_batch(objective):
    """Same (epoch, index): the same loss whatever the global generators did in between; another
    batch number: other masks. A batch without them draws from the global generator."""
    _, task, model = task_and_model(objective)
    images = torch.randn(4, 1, 16, 16)
    batch = {"image": images, "epoch": 1, "index": 7}
    with torch.no_grad():
        first = task.loss(model, batch)
        torch.rand(100)  # e.g. a DataLoader iterator taking its seed
        again = task.loss(model, batch)
        other = task.loss(model, {**batch, "index": 8})
        torch.manual_seed(3)
        free = task.loss(model, {"image": images})
        torch.manual_seed(3)
        assert task.loss(model, {"image": images}) == free
    assert first == again and first != other


def test_flops_shape_fields_and_features():
    cfg, mae, model = task_and_model("mae")
    assert mae.flops(cfg.model, 8) == mae_flops(cfg.model, 8)
    assert mae.sample_keys == () and {"decoder_hidden_size", "hidden_size"} <= set(mae.shape_fields)
    cls, mean = mae.features(model, torch.randn(3, 1, 16, 16))
    assert cls.shape == mean.shape == (3, 64)
    cfg, simmim, _ = task_and_model("simmim")
    assert simmim.flops(cfg.model, 8) == simmim_flops(cfg.model, 8)
    assert "encoder_stride" in simmim.shape_fields and "num_labels" not in simmim.shape_fields
