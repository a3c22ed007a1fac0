"""Our ViT against transformers' ViT (the reference): same weights in, same numbers out (fp32, 1e-5).

Each test builds the HF model, perturbs its weights away from the near-trivial init (so biases,
LayerNorm scales, CLS and position embeddings all matter), copies them into ours with a strict
``load_state_dict`` (which also proves the parameter names and shapes agree), and compares.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.activations import ACT2FN

from pipeline.config import HIDDEN_ACTS, ModelConfig
from pipeline.model import ViTForImageClassification, ViTModel
from pipeline.model.activations import ACTIVATIONS

TOL = 1e-5
BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            image_size=16, patch_size=4, num_labels=5)
CASES = {
    "square": {},
    "nonsquare-image-no-qkv-bias": dict(image_size=[16, 24], qkv_bias=False, hidden_act="gelu_new"),
    "nonsquare-patch": dict(image_size=[12, 20], patch_size=[3, 5], hidden_act="quick_gelu", layer_norm_eps=1e-6),
    "tall-image-wide-patch": dict(image_size=[20, 12], patch_size=[4, 2], num_attention_heads=2,
                                  hidden_act="silu", layer_norm_eps=1e-5),
    "dropout-off-in-eval": dict(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3,
                                hidden_act="gelu_pytorch_tanh"),
}
IMPLS = ["eager", "sdpa"]


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours.float() - ref.float()).abs().max().item()  # float: masks and indices compare too
    assert diff <= TOL, f"max abs diff {diff:.3g} > {TOL}"


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(0.2 * torch.randn(param.shape, generator=generator))


def make_pair(kind: str, impl: str, overrides: dict, **model_kwargs):
    """(HF model, our model) of ``kind`` ("classifier" or "backbone") holding the same weights, in eval mode."""
    kwargs = {**BASE, **overrides}
    torch.manual_seed(0)
    hf_config = transformers.ViTConfig(**kwargs, attn_implementation=impl)
    if kind == "classifier":
        hf, ours = transformers.ViTForImageClassification(hf_config), ViTForImageClassification(ModelConfig(**kwargs))
    else:
        hf, ours = transformers.ViTModel(hf_config, **model_kwargs), ViTModel(ModelConfig(**kwargs), **model_kwargs)
    perturb(hf)
    ours.load_state_dict(hf.state_dict())  # strict: identical keys and shapes
    return hf.eval(), ours.eval()


def pixels(cfg_overrides: dict, batch: int = 2, size: tuple[int, int] | None = None) -> torch.Tensor:
    image = {**BASE, **cfg_overrides}["image_size"]
    height, width = size or ((image, image) if isinstance(image, int) else image)
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_last_hidden_state_match(case, impl):
    hf, ours = make_pair("classifier", impl, CASES[case])
    x = pixels(CASES[case])
    with torch.no_grad():
        assert_close(ours(x).logits, hf(x).logits)
        assert_close(ours.vit(x).last_hidden_state, hf.vit(x).last_hidden_state)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("overrides", [dict(pooler_output_size=24, pooler_act="relu"),
                                       dict(image_size=[16, 24], patch_size=[4, 8])], ids=["relu-24", "tanh-rect"])
def test_pooler_output_matches(overrides, impl):
    hf, ours = make_pair("backbone", impl, overrides, add_pooling_layer=True)
    x = pixels(overrides)
    with torch.no_grad():
        mine, ref = ours(x), hf(x)
    assert_close(mine.last_hidden_state, ref.last_hidden_state)
    assert_close(mine.pooler_output, ref.pooler_output)


@pytest.mark.parametrize("case", list(CASES))
def test_attentions_and_hidden_states_match(case):
    # transformers only returns attention maps in eager mode
    hf, ours = make_pair("classifier", "eager", CASES[case])
    x = pixels(CASES[case])
    with torch.no_grad():
        mine = ours(x, output_attentions=True, output_hidden_states=True)
        ref = hf(x, output_attentions=True, output_hidden_states=True)
    assert_close(mine.logits, ref.logits)
    assert len(mine.attentions) == len(ref.attentions) == BASE["num_hidden_layers"]
    assert len(mine.hidden_states) == len(ref.hidden_states) == BASE["num_hidden_layers"] + 1
    for a, b in zip(mine.attentions, ref.attentions, strict=True):
        assert_close(a, b)
    for a, b in zip(mine.hidden_states, ref.hidden_states):
        assert_close(a, b)


@pytest.mark.parametrize("output_attentions", [False, True])
@pytest.mark.parametrize("mask", [[1.0, 0.0, 1.0, 0.5], [[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]],
                         ids=["per-head", "per-layer"])
def test_head_mask_matches(mask, output_attentions):
    # transformers' SDPA path treats head_mask as an additive bias, so eager is the reference
    hf, ours = make_pair("classifier", "eager", {})
    x, head_mask = pixels({}), torch.tensor(mask)
    with torch.no_grad():
        mine = ours(x, head_mask=head_mask, output_attentions=output_attentions)
        ref = hf(x, head_mask=head_mask, output_attentions=True)
        unmasked = ours(x)
    assert_close(mine.logits, ref.logits)
    assert (mine.logits - unmasked.logits).abs().max() > 1e-3  # the mask did something
    if output_attentions:
        assert len(ref.attentions) == BASE["num_hidden_layers"]  # an empty tuple would zip to nothing
        for a, b in zip(mine.attentions, ref.attentions, strict=True):
            assert_close(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_prune_heads_matches(impl):
    hf, ours = make_pair("classifier", impl, dict(num_hidden_layers=3))
    # second round uses the original numbering and repeats an already pruned head
    for heads in ({0: [1], 2: [0, 3]}, {0: [1, 3], 1: [2]}):
        hf.prune_heads(heads)
        ours.prune_heads(heads)
    assert ours.vit.encoder.layer[0].attention.attention.num_attention_heads == 2
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    x = pixels({})
    with torch.no_grad():
        assert_close(ours(x).logits, hf(x).logits)
        if impl == "eager":
            ours_attentions, hf_attentions = ours(x, output_attentions=True).attentions, hf(x, output_attentions=True).attentions
            assert len(hf_attentions) == 3  # one per layer: an empty tuple would zip to nothing
            for a, b in zip(ours_attentions, hf_attentions, strict=True):
                assert_close(a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [(24, 24), (24, 32), (8, 12), (16, 16)])
def test_interpolate_pos_encoding_matches(size, impl):
    hf, ours = make_pair("backbone", impl, {}, add_pooling_layer=False)
    x = pixels({}, size=size)
    with torch.no_grad():
        mine = ours(x, interpolate_pos_encoding=True).last_hidden_state
        ref = hf(x, interpolate_pos_encoding=True).last_hidden_state
    assert mine.shape[1] == (size[0] // 4) * (size[1] // 4) + 1
    assert_close(mine, ref)


def test_bool_masked_pos_matches():
    hf, ours = make_pair("backbone", "eager", {}, add_pooling_layer=False, use_mask_token=True)
    with torch.no_grad():
        ours.embeddings.mask_token.normal_()  # init is zero; make the replacement visible
        hf.embeddings.mask_token.copy_(ours.embeddings.mask_token)
    x = pixels({})
    masked = torch.rand(2, 16, generator=torch.Generator().manual_seed(2)) < 0.5
    with torch.no_grad():
        mine = ours(x, bool_masked_pos=masked).last_hidden_state
        assert_close(mine, hf(x, bool_masked_pos=masked).last_hidden_state)
        assert (mine - ours(x).last_hidden_state).abs().max() > 1e-3


@pytest.mark.parametrize("name", HIDDEN_ACTS)
def test_every_activation_matches(name):
    x = torch.linspace(-20, 20, 4001)
    torch.testing.assert_close(ACTIVATIONS[name](x), ACT2FN[name](x), rtol=1e-6, atol=1e-6)
    hf, ours = make_pair("backbone", "eager", dict(hidden_act=name, num_hidden_layers=1), add_pooling_layer=False)
    x = pixels({})
    with torch.no_grad():
        assert_close(ours(x).last_hidden_state, hf(x).last_hidden_state)


# --- where transformers has no answer: our own behaviour ------------------------------------

def test_interpolation_from_non_square_grid_uses_the_actual_grid():
    cfg = ModelConfig(**{**BASE, "image_size": [16, 24], "patch_size": [4, 3]})  # stored grid 4 x 8
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    embeddings = model.embeddings
    same = pixels(dict(image_size=[16, 24]))
    with torch.no_grad():
        assert torch.equal(model(same, interpolate_pos_encoding=True).last_hidden_state,
                           model(same).last_hidden_state)
        new = embeddings.interpolate_pos_encoding(torch.zeros(1, 1, 32), 20, 18)  # grid 5 x 6
        grid = embeddings.position_embeddings[:, 1:].reshape(1, 4, 8, 32).permute(0, 3, 1, 2)
        expected = F.interpolate(grid, size=(5, 6), mode="bicubic", align_corners=False)
        assert_close(new[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 30, 32))
        assert torch.equal(new[:, :1], embeddings.position_embeddings[:, :1])
        out = model(torch.randn(2, 3, 20, 18), interpolate_pos_encoding=True).last_hidden_state
    assert out.shape == (2, 31, 32) and torch.isfinite(out).all()


def test_input_errors_are_clear():
    model = ViTModel(ModelConfig(**BASE), add_pooling_layer=False)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model(torch.randn(1, 3, 16, 20))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="use_mask_token=True"):
        model(torch.randn(1, 3, 16, 16), bool_masked_pos=torch.zeros(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="head_mask"):
        model(torch.randn(1, 3, 16, 16), head_mask=torch.ones(3, 4))
