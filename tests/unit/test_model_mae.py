"""Our MAE against transformers' ViTMAEForPreTraining (the reference): same weights and noise in,
same loss, logits, mask and ids_restore out (fp32, 1e-5); the encoder sees the kept tokens only.

As in test_model_parity.py, HF's weights are perturbed away from their init (so every bias, norm,
token and position table matters) and copied into ours with a strict ``load_state_dict``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.vit_mae import modeling_vit_mae

from pipeline.config import ConfigError, ModelConfig
from pipeline.model import ViTMAEForPreTraining, ViTModel, from_pretrained, save_pretrained
from pipeline.model.flops import vit_flops
from pipeline.model.flops_masked import mae_flops, mae_forward_macs_per_image, mae_kept_patches
from pipeline.model.mae import patchify, sincos_2d, unpatchify
from pipeline.model.masking import mae_noise
from test_model_parity import assert_close, perturb  # same tolerance; perturb moves every parameter

BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
            patch_size=4, decoder_hidden_size=16, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
            decoder_intermediate_size=24)
CASES = {
    "square": {},
    "norm-pix-loss": dict(norm_pix_loss=True, hidden_act="gelu_new", layer_norm_eps=1e-6),
    "ratio-0.5-no-qkv-bias": dict(mask_ratio=0.5, qkv_bias=False, image_size=20, patch_size=5),
}
NON_SQUARE = {"wide": dict(image_size=[16, 24]), "tall-norm-pix": dict(image_size=[20, 12], norm_pix_loss=True)}


def make_pair(overrides: dict, impl: str = "sdpa"):
    kwargs = {**BASE, **overrides}
    hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**kwargs, attn_implementation=impl))
    perturb(hf)
    ours = ViTMAEForPreTraining(ModelConfig(**kwargs))
    ours.load_state_dict(hf.state_dict())  # strict: identical names and shapes
    return hf.eval(), ours.eval()


def inputs(cfg: ModelConfig, batch: int = 3, size: tuple[int, int] | None = None):
    height, width = size or cfg.image_hw
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, height, width, generator=generator)
    patches = (height // cfg.patch_hw[0]) * (width // cfg.patch_hw[1])
    return x, mae_noise(batch, patches, generator=generator)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_logits_and_mask_match(case, impl):
    hf, ours = make_pair(CASES[case], impl)
    x, noise = inputs(ours.config)
    with torch.no_grad():
        mine, ref = ours(x, noise=noise), hf(x, noise=noise)
        assert_close(ours.vit(x, noise=noise).last_hidden_state, hf.vit(x, noise=noise).last_hidden_state)
    assert_close(mine.logits, ref.logits)
    assert_close(mine.loss, ref.loss)
    assert torch.equal(mine.mask, ref.mask) and torch.equal(mine.ids_restore, ref.ids_restore)
    assert int(mine.mask.sum()) == 3 * (ours.config.num_patches - mae_kept_patches(ours.config))


@pytest.mark.parametrize("case", list(NON_SQUARE))
def test_non_square_matches_hf_with_its_square_guards_lifted(case, monkeypatch):
    """HF cannot build a non-square MAE: it sizes the sin-cos tables from sqrt(patches), and its
    forward refuses non-square pixels in ``patchify``. The reference is HF's own code with those two
    guards lifted: the table builder returns a right-sized table (its values are replaced by the
    loaded weights anyway), and the loss is HF's ``forward_loss`` with the flag that skips the square
    check. Every number still comes from HF's embeddings, masking, encoder, decoder and loss."""
    kwargs = {**BASE, **NON_SQUARE[case]}
    cfg = ModelConfig(**kwargs)
    monkeypatch.setattr(modeling_vit_mae, "get_2d_sincos_pos_embed",
                        lambda dim, _, add_cls_token=False: np.zeros((cfg.num_patches + 1, dim)))
    hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**kwargs))
    perturb(hf)
    ours = ViTMAEForPreTraining(cfg)
    ours.load_state_dict(hf.state_dict())
    hf.eval(), ours.eval()
    x, noise = inputs(cfg)
    with torch.no_grad():
        encoded = hf.vit(x, noise=noise)
        logits = hf.decoder(encoded.last_hidden_state, encoded.ids_restore).logits
        loss = hf.forward_loss(x, logits, encoded.mask, interpolate_pos_encoding=True)
        mine = ours(x, noise=noise)
    assert_close(mine.logits, logits)
    assert_close(mine.loss, loss)
    assert torch.equal(mine.mask, encoded.mask)


def test_position_tables_are_hf_sincos():
    cfg = ModelConfig(**BASE)
    ours = ViTMAEForPreTraining(cfg)
    for table, width in ((ours.vit.embeddings.position_embeddings, 32), (ours.decoder.decoder_pos_embed, 16)):
        ref = modeling_vit_mae.get_2d_sincos_pos_embed(width, 4, add_cls_token=True)
        torch.testing.assert_close(table[0], torch.from_numpy(ref).float(), rtol=0, atol=1e-7)
    # A rectangular grid: token (row i, column j) carries HF's 1-D table of j, then that of i.
    table = sincos_2d(8, (3, 5))
    one_d = lambda pos: torch.from_numpy(modeling_vit_mae.get_1d_sincos_pos_embed_from_grid(4, np.array([float(pos)])))
    for i in range(3):
        for j in range(5):
            torch.testing.assert_close(table[i * 5 + j], torch.cat((one_d(j), one_d(i)), dim=1)[0].float(),
                                       rtol=0, atol=1e-7)
    # Fixed tables are buffers: in the state dict (HF's names), never handed to an optimizer.
    names = {name for name, _ in ours.named_parameters()}
    assert "vit.embeddings.position_embeddings" not in names and "decoder.decoder_pos_embed" not in names
    assert "decoder.decoder_pos_embed" in ours.state_dict()


@pytest.mark.parametrize("size", [(24, 24), (12, 20)])
def test_interpolate_pos_encoding_matches(size):
    hf, ours = make_pair({})
    x, noise = inputs(ours.config, size=size)
    with torch.no_grad():
        mine = ours(x, noise=noise, interpolate_pos_encoding=True)
        ref = hf(x, noise=noise, interpolate_pos_encoding=True)
    assert mine.logits.shape[1] == (size[0] // 4) * (size[1] // 4)
    assert_close(mine.logits, ref.logits)
    assert_close(mine.loss, ref.loss)


def test_attentions_match_and_encoder_sees_only_kept_tokens():
    hf, ours = make_pair({}, impl="eager")
    x, noise = inputs(ours.config)
    seen = {"encoder": [], "decoder": []}
    for part, layers in (("encoder", ours.vit.encoder.layer), ("decoder", ours.decoder.decoder_layers)):
        for layer in layers:
            layer.register_forward_hook(lambda _m, args, _o, part=part: seen[part].append(args[0].shape[1]))
    with torch.no_grad():
        mine = ours.vit(x, noise=noise, output_attentions=True)
        ours(x, noise=noise)
        ref = hf.vit(x, noise=noise, output_attentions=True)
    for a, b in zip(mine.attentions, ref.attentions, strict=True):
        assert_close(a, b)
    kept = int(16 * (1 - 0.75))
    assert seen["encoder"] == [1 + kept] * 4  # two layers, two forwards
    assert seen["decoder"] == [1 + 16] * 2


def test_encoder_features_are_the_unmasked_encoder():
    """CLS and mean-pooled patch features on all tokens: HF's encoder at mask_ratio 0 with noise that
    keeps the image order, and our classification ViTModel loaded with the encoder's weights (what
    an encoder-only export holds)."""
    hf, ours = make_pair({"mask_ratio": 0.0})
    x, _ = inputs(ours.config)
    in_order = torch.arange(16.0).expand(3, -1)
    backbone = ViTModel(ours.config, add_pooling_layer=False).eval()
    backbone.load_state_dict({k.removeprefix("vit."): v for k, v in ours.state_dict().items() if k.startswith("vit.")})
    with torch.no_grad():
        cls, mean = ours.encoder_features(x)
        ref = hf.vit(x, noise=in_order).last_hidden_state
        plain = backbone(x).last_hidden_state
    assert cls.shape == mean.shape == (3, 32)
    assert_close(cls, ref[:, 0])
    assert_close(mean, ref[:, 1:].mean(dim=1))
    assert_close(cls, plain[:, 0])
    assert_close(mean, plain[:, 1:].mean(dim=1))


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = ModelConfig(**BASE)
    x, noise = inputs(cfg)
    grads, calls = {}, {}
    for spec in ("none", "all", "every-2"):
        torch.manual_seed(0)
        model = ViTMAEForPreTraining(cfg)
        model.set_activation_checkpointing(spec)
        counter = []
        for layer in [*model.vit.encoder.layer, *model.decoder.decoder_layers]:
            layer.register_forward_pre_hook(lambda *_: counter.append(1))  # a recompute ends early
        model.train()(x, noise=noise).loss.backward()
        grads[spec] = {n: p.grad for n, p in model.named_parameters()}
        calls[spec] = len(counter)
    assert all(g is not None and g.abs().sum() > 0 for g in grads["none"].values())  # every parameter learns
    for spec in ("all", "every-2"):
        for name, grad in grads["none"].items():
            torch.testing.assert_close(grads[spec][name], grad, rtol=0, atol=1e-6, msg=f"{spec} {name}")
    assert calls == {"none": 4, "all": 8, "every-2": 6}  # recomputed layers run twice, in encoder and decoder


def test_rectangular_patches_and_patch_layout():
    cfg = ModelConfig(**{**BASE, "image_size": [16, 12], "patch_size": [4, 2]})
    model = ViTMAEForPreTraining(cfg)
    x, noise = inputs(cfg)
    out = model(x, noise=noise)
    assert out.logits.shape == (3, 24, 4 * 2 * 3)
    out.loss.backward()
    patches = patchify(x, (4, 2))
    # patch (row 1, column 3), pixel (row 2, column 1) of the patch, channel 2
    assert patches[0, 1 * 6 + 3, (2 * 2 + 1) * 3 + 2] == x[0, 2, 4 + 2, 6 + 1]
    assert torch.equal(unpatchify(patches, (4, 2), (16, 12), 3), x)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


def test_flops_count_every_matmul_and_meet_the_cost_goal():
    # float64 takes vit.py's explicit attention path, whose matmuls torch's FLOP counter sees
    cfg = ModelConfig(**{**BASE, "image_size": [16, 24]})
    model = ViTMAEForPreTraining(cfg).double().eval()
    x, noise = inputs(cfg)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x.double(), noise=noise)
    assert counter.get_total_flops() == 2 * 3 * mae_forward_macs_per_image(cfg)
    assert mae_flops(cfg, 3) == 3 * counter.get_total_flops()
    # the analytic targets at mask ratio 0.75 and HF's default decoder
    ratio = {size: mae_flops(ModelConfig(size=size), 8) / vit_flops(ModelConfig(size=size), 8)
             for size in ("B/16", "L/16")}
    assert 0.5 < ratio["B/16"] < 0.6 and 0.3 < ratio["L/16"] < 0.35, ratio


def test_save_pretrained_loads_in_transformers_and_back(tmp_path):
    cfg = ModelConfig(**{**BASE, "mask_ratio": 0.5, "norm_pix_loss": True, "hidden_act": "gelu_new"})
    ours = ViTMAEForPreTraining(cfg)
    perturb(ours)
    save_pretrained(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == "vit_mae" and written["architectures"] == ["ViTMAEForPreTraining"]
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info.values()), info
    x, noise = inputs(cfg)
    with torch.no_grad():
        mine, ref = ours.eval()(x, noise=noise), hf.eval()(x, noise=noise)
        assert_close(mine.logits, ref.logits)
        assert_close(mine.loss, ref.loss)
        again = from_pretrained(tmp_path / "ours", architecture="ViTMAEForPreTraining")
        assert again.config == cfg and torch.equal(again.eval()(x, noise=noise).logits, mine.logits)
        hf.save_pretrained(tmp_path / "hf")  # and transformers' own files load here
        theirs = from_pretrained(tmp_path / "hf", architecture="ViTMAEForPreTraining")
        assert theirs.config == cfg
        assert_close(theirs.eval()(x, noise=noise).logits, ref.logits)


def test_input_errors_are_clear():
    model = ViTMAEForPreTraining(ModelConfig(**BASE))
    with pytest.raises(ValueError, match="noise must have shape"):
        model(torch.randn(2, 3, 16, 16), noise=torch.rand(2, 15))
    with pytest.raises(ValueError, match="divisible by 4"):
        ViTMAEForPreTraining(ModelConfig(**{**BASE, "decoder_hidden_size": 18, "decoder_num_attention_heads": 3}))


def test_config_fields_are_checked():
    with pytest.raises(ConfigError, match="model.decoder_hidden_size .30. must be divisible"):
        ModelConfig(decoder_hidden_size=30, decoder_num_attention_heads=4)
    with pytest.raises(ConfigError, match=r"model.mask_ratio must be in \[0, 1\)"):
        ModelConfig(mask_ratio=1.0)
    with pytest.raises(ConfigError, match="model.decoder_num_hidden_layers must be positive"):
        ModelConfig(decoder_num_hidden_layers=0)
    odd = ModelConfig(**{**BASE, "decoder_hidden_size": 18, "decoder_num_attention_heads": 3})
    odd.check_objective("classification")  # the decoder is MAE's business only
    with pytest.raises(ConfigError, match="model.decoder_hidden_size must be a multiple of 4"):
        odd.check_objective("mae")
    ModelConfig(**BASE).check_objective("mae")
