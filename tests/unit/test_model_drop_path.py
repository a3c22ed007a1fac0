"""Stochastic depth (model.drop_path_rate) against torchvision's and timm's, and inert at rate 0."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision.ops

from pipeline.config import MODEL_SIZES, ModelConfig
from pipeline.model import build_model
from pipeline.model.vit import DropPath

TINY = ModelConfig(**MODEL_SIZES["tiny"], num_labels=10)


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, TINY.num_channels, *TINY.image_hw, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_path_is_torchvisions_row_stochastic_depth_bitwise(p):
    branch = torch.randn(64, 5, 8)
    torch.manual_seed(3)
    ours = DropPath(p).train()(branch)
    torch.manual_seed(3)
    reference = torchvision.ops.stochastic_depth(branch, p, mode="row", training=True)
    assert torch.equal(ours, reference)


def test_drop_path_keeps_the_expectation_and_drops_whole_samples():
    p, n = 0.3, 200_000
    torch.manual_seed(0)
    out = DropPath(p).train()(torch.ones(n, 3, 2))
    per_sample = out.flatten(1)
    assert torch.all(per_sample == per_sample[:, :1])  # one draw per sample, the whole branch
    dropped = (per_sample[:, 0] == 0).float().mean().item()
    # Binomial: the standard error of both figures is about 0.001 at n = 200,000.
    assert dropped == pytest.approx(p, abs=0.005)
    assert out.mean().item() == pytest.approx(1.0, abs=0.01)
    assert torch.equal(out.unique(), torch.tensor([0.0, 1 / (1 - p)]))


def test_rates_rise_linearly_over_the_layers_as_in_timm():
    from timm.models.vision_transformer import VisionTransformer

    cfg = dataclasses.replace(TINY, drop_path_rate=0.2)
    ours = [layer.drop_path.p for layer in build_model(cfg).vit.encoder.layer]
    assert [layer.output.drop_path.p for layer in build_model(cfg).vit.encoder.layer] == ours  # both branches
    timm_vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                                 drop_path_rate=0.2, num_classes=10)
    # timm puts an Identity where the rate is 0 (the first block)
    assert ours == [getattr(block.drop_path1, "drop_prob", 0.0) for block in timm_vit.blocks]
    assert ours[0] == 0.0 and ours[-1] == pytest.approx(0.2)


def test_rate_zero_is_inert_and_rate_adds_no_parameters():
    torch.manual_seed(0)
    plain = build_model(TINY).train()
    torch.manual_seed(0)
    dropping = build_model(dataclasses.replace(TINY, drop_path_rate=0.5)).train()
    assert plain.state_dict().keys() == dropping.state_dict().keys()  # HF's state dict, exports unchanged
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), dropping.state_dict().values()))
    branch = torch.randn(3, 5, 8)
    assert DropPath(0.0).train()(branch) is branch  # rate 0: not even a multiplication
    # Rate 0 draws nothing from the global generator: dropout and every later draw stay as they were.
    state = torch.get_rng_state()
    plain(images())
    assert torch.equal(torch.get_rng_state(), state)
    # In evaluation the rate changes nothing, bitwise.
    assert torch.equal(plain.eval()(images()).logits, dropping.eval()(images()).logits)
    # In training it does: whole samples lose branches.
    torch.manual_seed(1)
    assert not torch.equal(dropping.train()(images()).logits, plain.eval()(images()).logits)


def test_activation_checkpointing_recomputes_the_same_drop_path_masks():
    cfg = dataclasses.replace(TINY, drop_path_rate=0.5)
    results = []
    for spec in ("none", "all"):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(cfg, activation_checkpointing=spec)).train()
        torch.manual_seed(7)
        loss = model(images(), labels=torch.arange(4)).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_a_model_with_drop_path_builds_on_the_meta_device():
    with torch.device("meta"):  # how preflight counts parameters
        model = build_model(dataclasses.replace(TINY, drop_path_rate=0.1))
    assert model.vit.encoder.layer[-1].drop_path.p == pytest.approx(0.1)
