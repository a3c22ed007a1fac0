"""Our SimMIM against transformers' ViTForMaskedImageModeling (same weights and mask in, same loss
and reconstruction out, fp32, 1e-5), and the SimMIM paper's mask generator."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import ConfigError, ModelConfig
from pipeline.model import ViTForMaskedImageModeling, from_pretrained, save_pretrained
from pipeline.model.flops_masked import simmim_flops, simmim_forward_macs_per_image
from pipeline.model.masking import mae_noise, num_masked_blocks, simmim_mask
from test_model_parity import assert_close, perturb  # same tolerance; perturb moves every parameter

BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
            patch_size=4, encoder_stride=4, mask_patch_size=8)
CASES = {"square": {}, "stride-2-gelu-new": dict(patch_size=2, encoder_stride=2, mask_patch_size=4,
                                                 hidden_act="gelu_new", qkv_bias=False)}


def make_pair(overrides: dict, impl: str = "sdpa"):
    kwargs = {**BASE, **overrides}
    hf_kwargs = {k: v for k, v in kwargs.items() if k != "mask_patch_size"}
    hf = transformers.ViTForMaskedImageModeling(transformers.ViTConfig(**hf_kwargs, attn_implementation=impl))
    perturb(hf)  # the mask token too (its init is zero)
    ours = ViTForMaskedImageModeling(ModelConfig(**kwargs))
    ours.load_state_dict(hf.state_dict())  # strict: identical names and shapes
    return hf.eval(), ours.eval()


def inputs(cfg: ModelConfig, batch: int = 3, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *cfg.image_hw, generator=generator)
    mask = simmim_mask(batch, image_size=cfg.image_hw, patch_size=cfg.patch_hw, mask_patch_size=cfg.mask_patch_size,
                       mask_ratio=cfg.simmim_mask_ratio, generator=generator)
    return x, mask


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_reconstruction_match(case, impl):
    hf, ours = make_pair(CASES[case], impl)
    x, mask = inputs(ours.config)
    with torch.no_grad():
        mine, ref = ours(x, bool_masked_pos=mask), hf(x, bool_masked_pos=mask)
        unmasked = ours(x)
        assert_close(unmasked.reconstruction, hf(x).reconstruction)
    assert_close(mine.reconstruction, ref.reconstruction)
    assert mine.logits is mine.reconstruction and "logits" not in mine  # an alias, not a second entry
    assert_close(mine.loss, ref.loss)
    assert unmasked.loss is None
    assert (mine.reconstruction - unmasked.reconstruction).abs().max() > 1e-3  # the mask token mattered


@pytest.mark.parametrize("image_size", [[16, 24], [24, 8]], ids=["wide", "tall"])
def test_non_square_matches_hf_on_the_actual_grid(image_size):
    """HF's forward takes sqrt(tokens) as both sides of the patch grid, so it cannot reshape a
    non-square one. The reference is HF's forward with that one step given the actual grid: HF's
    encoder (with mask token) and HF's decoder modules, then HF's loss formula on the real mask."""
    hf, ours = make_pair(dict(image_size=image_size))
    x, mask = inputs(ours.config)
    grid_h, grid_w = image_size[0] // 4, image_size[1] // 4
    with torch.no_grad():
        tokens = hf.vit(x, bool_masked_pos=mask).last_hidden_state[:, 1:]
        reconstruction = hf.decoder(tokens.permute(0, 2, 1).reshape(3, 32, grid_h, grid_w))
        pixel_mask = mask.reshape(-1, grid_h, grid_w).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
        l1 = torch.nn.functional.l1_loss(x, reconstruction, reduction="none")
        loss = (l1 * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / 3
        mine = ours(x, bool_masked_pos=mask)
    assert_close(mine.reconstruction, reconstruction)
    assert_close(mine.loss, loss)


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = ModelConfig(**BASE)
    x, mask = inputs(cfg)
    grads = {}
    for spec in ("none", "all"):
        torch.manual_seed(0)
        model = ViTForMaskedImageModeling(cfg)
        with torch.no_grad():
            model.vit.embeddings.mask_token.normal_()  # zero at init; give it a gradient to compare
        model.set_activation_checkpointing(spec)
        model.train()(x, bool_masked_pos=mask).loss.backward()
        grads[spec] = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads["none"].values())
    for name, grad in grads["none"].items():
        torch.testing.assert_close(grads["all"][name], grad, rtol=0, atol=1e-6, msg=name)


# expected: ceil(blocks * ratio), by hand; 25 x 0.28 and 50 x 0.14 are 7.000000000000001 in floats
@pytest.mark.parametrize("image_size, patch, block, ratio, expected", [
    (16, 4, 8, 0.6, 3), ((32, 48), 4, 8, 0.6, 15), (16, (2, 4), 8, 0.5, 2), (20, 2, 4, 0.7, 18),
    (20, 2, 4, 0.28, 7), ((20, 40), 4, 4, 0.14, 7)])
def test_mask_generator_masks_whole_blocks_at_the_ratio(image_size, patch, block, ratio, expected):
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
    mask = simmim_mask(64, image_size=image_size, patch_size=patch, mask_patch_size=block, mask_ratio=ratio,
                       generator=torch.Generator().manual_seed(0))
    grid_h, grid_w = height // patch_h, width // patch_w
    assert mask.dtype == torch.bool and mask.shape == (64, grid_h * grid_w)
    # each block is all masked or all kept: read it at block resolution and blow it back up
    per_block = mask.view(64, height // block, block // patch_h, width // block, block // patch_w)[:, :, 0, :, 0]
    assert torch.equal(mask, per_block.repeat_interleave(block // patch_h, 1)
                       .repeat_interleave(block // patch_w, 2).flatten(1))
    assert (per_block.flatten(1).sum(dim=1) == expected).all()
    assert len({tuple(row.tolist()) for row in mask}) > 1  # samples differ


def test_mask_count_is_the_papers_ceiling():
    assert num_masked_blocks(36, 0.6) == 22  # SimMIM at 192 px / 32: ceil(21.6)
    assert num_masked_blocks(49, 0.6) == 30  # ceil(29.4), where rounding would give 29
    assert num_masked_blocks(25, 0.28) == 7 and num_masked_blocks(50, 0.14) == 7  # 7.000000000000001 in floats
    assert 25 * 0.28 > 7 and 50 * 0.14 > 7  # (so the ceiling alone would give 8)
    assert num_masked_blocks(16, 0.0) == 0 and num_masked_blocks(16, 1.0) == 16


def test_masks_and_noise_are_functions_of_the_generator():
    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return (simmim_mask(4, image_size=16, patch_size=4, mask_patch_size=8, mask_ratio=0.6, generator=generator),
                mae_noise(4, 16, generator=generator))

    (mask_a, noise_a), (mask_b, noise_b), (mask_c, noise_c) = draw(5), draw(5), draw(6)
    assert torch.equal(mask_a, mask_b) and torch.equal(noise_a, noise_b)
    assert not torch.equal(mask_a, mask_c) and not torch.equal(noise_a, noise_c)
    assert noise_a.shape == (4, 16) and 0 <= noise_a.min() and noise_a.max() < 1
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    draw(5)
    assert torch.equal(torch.rand(1), before)  # the global generator is untouched


def test_mask_generator_errors_name_the_problem():
    with pytest.raises(ValueError, match="must divide the image size"):
        simmim_mask(1, image_size=20, patch_size=4, mask_patch_size=8, mask_ratio=0.6, generator=torch.Generator())
    with pytest.raises(ValueError, match="multiple of the patch size"):
        simmim_mask(1, image_size=24, patch_size=(4, 3), mask_patch_size=8, mask_ratio=0.6,
                    generator=torch.Generator())


def test_flops_count_every_matmul():
    cfg = ModelConfig(**{**BASE, "image_size": [16, 24]})
    model = ViTForMaskedImageModeling(cfg).double().eval()  # float64: the explicit attention path
    x, mask = inputs(cfg)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x.double(), bool_masked_pos=mask)
    assert counter.get_total_flops() == 2 * 3 * simmim_forward_macs_per_image(cfg)
    assert simmim_flops(cfg, 3) == 3 * counter.get_total_flops()


def test_save_pretrained_loads_in_transformers_and_back(tmp_path):
    cfg = ModelConfig(**{**BASE, "image_size": [16, 24], "simmim_mask_ratio": 0.5, "layer_norm_eps": 1e-6})
    ours = ViTForMaskedImageModeling(cfg)
    perturb(ours)
    save_pretrained(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == "vit" and written["architectures"] == ["ViTForMaskedImageModeling"]
    hf, info = transformers.ViTForMaskedImageModeling.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info.values()), info
    x, mask = inputs(cfg)
    with torch.no_grad():
        tokens = ours.eval().vit(x, bool_masked_pos=mask).last_hidden_state
        assert_close(tokens, hf.eval().vit(x, bool_masked_pos=mask).last_hidden_state)
        again = from_pretrained(tmp_path / "ours", architecture="ViTForMaskedImageModeling")
        assert again.config == cfg
        assert torch.equal(again.eval()(x, bool_masked_pos=mask).loss, ours(x, bool_masked_pos=mask).loss)
        hf, _ = make_pair({})
        hf.save_pretrained(tmp_path / "hf")  # transformers' own files load here
        theirs = from_pretrained(tmp_path / "hf", architecture="ViTForMaskedImageModeling")
        # the mask settings are ours, not in HF's config.json: absent, they keep our defaults (a
        # block size derived from the image: 8 px here, 2x2 blocks of 16 px)
        assert theirs.config == ModelConfig(**{k: v for k, v in BASE.items() if k != "mask_patch_size"})
        x, mask = inputs(ModelConfig(**BASE))
        assert_close(theirs.eval()(x, bool_masked_pos=mask).loss, hf.eval()(x, bool_masked_pos=mask).loss)


def test_model_errors_name_the_fix():
    with pytest.raises(ValueError, match="square patch"):
        ViTForMaskedImageModeling(ModelConfig(**{**BASE, "patch_size": [4, 2], "mask_patch_size": 8}))
    model = ViTForMaskedImageModeling(ModelConfig(**{**BASE, "encoder_stride": 2, "mask_patch_size": 8}))
    with pytest.raises(ValueError, match="encoder_stride"):
        model(torch.randn(1, 3, 16, 16), bool_masked_pos=torch.zeros(1, 16, dtype=torch.bool))


@pytest.mark.parametrize("overrides, message", [
    (dict(encoder_stride=2), "must be square and equal to model.encoder_stride"),
    (dict(patch_size=[4, 2], mask_patch_size=8), "must be square"),
    (dict(mask_patch_size=32), r"model.image_size 16 must be divisible by model.mask_patch_size \(32\)"),
    (dict(patch_size=4, mask_patch_size=2, image_size=16), r"model.mask_patch_size \(2\) must be a multiple"),
], ids=["stride", "rect-patch", "block-vs-image", "block-vs-patch"])
def test_config_is_checked_for_simmim_only(overrides, message):
    cfg = ModelConfig(**{**BASE, **overrides})
    cfg.check_objective("classification")
    with pytest.raises(ConfigError, match=message):
        cfg.check_objective("simmim")
    with pytest.raises(ConfigError, match=r"model.simmim_mask_ratio must be in \[0, 1\]"):
        ModelConfig(simmim_mask_ratio=1.5)
