"""Training-side behaviour of the model: gradients, activation checkpointing, attention paths, init, FLOPs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import MODEL_SIZES, ConfigError, ModelConfig
from pipeline.model import ViTForImageClassification, ViTModel, build_model, vit_flops

SIZES = {
    "tiny": ModelConfig(**MODEL_SIZES["tiny"], num_labels=10),
    # S/16's width and depth at a CPU-friendly resolution (4 patches)
    "small": ModelConfig(**{**MODEL_SIZES["S/16"], "image_size": 32}, num_labels=10),
    "tiny-rect": ModelConfig(**{**MODEL_SIZES["tiny"], "image_size": [16, 24], "patch_size": [4, 6]},
                             num_labels=10, hidden_act="gelu_new"),
}


def batch(cfg: ModelConfig, size: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, cfg.num_channels, *cfg.image_hw, generator=generator)
    return images, torch.randint(0, cfg.num_labels, (size,), generator=generator)


def loss_and_grads(model: torch.nn.Module, cfg: ModelConfig, seed: int = 0, **forward_kwargs):
    images, labels = batch(cfg)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks for every model compared
    loss = model(images, labels=labels, **forward_kwargs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def count_layer_calls(model: ViTForImageClassification) -> list[int]:
    """Install hooks that count how often each ViTLayer runs forward (recomputation runs it twice)."""
    calls = [0] * len(model.vit.encoder.layer)
    for i, layer in enumerate(model.vit.encoder.layer):
        layer.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("size", list(SIZES))
def test_forward_backward_every_parameter_gets_a_gradient(size):
    cfg = SIZES[size]
    model = build_model(cfg).train()
    loss, grads = loss_and_grads(model, cfg)
    assert torch.isfinite(loss) and loss.item() > 0
    assert set(grads) == {name for name, _ in model.named_parameters()}
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        # A key bias shifts every score in a softmax row equally, so its true gradient is zero.
        if not name.endswith("key.bias"):
            assert grad.abs().sum() > 0, f"{name} got a zero gradient"


@pytest.mark.parametrize("spec, runs_per_layer", [("all", [2, 2, 2, 2]), ("every-2", [2, 1, 2, 1]),
                                                  ("every-3", [2, 1, 1, 2])])
def test_activation_checkpointing_gives_same_loss_and_gradients(spec, runs_per_layer):
    # dropout on: recomputation must replay the same random masks
    base = ModelConfig(**MODEL_SIZES["tiny"], num_labels=10, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    reference = build_model(base).train()
    checkpointed = build_model(ModelConfig(**{**vars(base), "activation_checkpointing": spec})).train()
    checkpointed.load_state_dict(reference.state_dict())
    calls = count_layer_calls(checkpointed)
    loss_ref, grads_ref = loss_and_grads(reference, base)
    loss, grads = loss_and_grads(checkpointed, base)
    assert calls == runs_per_layer  # the checkpointed layers really were recomputed in backward
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-6, atol=1e-7, msg=name)
    # the outputs differ between seeds, so equality above is not a dropout-free accident
    assert not torch.equal(loss_and_grads(reference, base, seed=1)[0], loss_ref)


def test_set_activation_checkpointing_after_construction():
    cfg = SIZES["tiny"]
    model = build_model(cfg).train()
    calls = count_layer_calls(model)
    model.set_activation_checkpointing("all")
    loss_and_grads(model, cfg)
    assert calls == [2, 2, 2, 2] and model.config.activation_checkpointing == "all"
    calls[:] = [0] * 4
    with torch.no_grad():  # no backward coming: no recomputation
        model(batch(cfg)[0])
    model.eval()
    model(batch(cfg)[0]).logits.sum().backward()
    assert calls == [2, 2, 2, 2]
    model.train().set_activation_checkpointing("none")
    calls[:] = [0] * 4
    loss_and_grads(model, cfg)
    assert calls == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        model.set_activation_checkpointing("every-0")


def test_sdpa_path_equals_explicit_path():
    cfg = SIZES["tiny-rect"]
    model = build_model(cfg).train()
    loss_fast, grads_fast = loss_and_grads(model, cfg)  # no maps requested: fused SDPA
    loss_explicit, grads_explicit = loss_and_grads(model, cfg, output_attentions=True)
    loss_masked, _ = loss_and_grads(model, cfg, head_mask=torch.ones(cfg.num_attention_heads))
    torch.testing.assert_close(loss_explicit, loss_fast, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss_masked, loss_fast, rtol=0, atol=1e-6)
    for name in grads_fast:
        torch.testing.assert_close(grads_explicit[name], grads_fast[name], rtol=1e-4, atol=1e-6, msg=name)


def test_init_statistics():
    std = 0.05  # not the default, to see that initializer_range is used
    cfg = ModelConfig(**{**MODEL_SIZES["S/16"], "image_size": 64, "num_hidden_layers": 2}, num_labels=10,
                      initializer_range=std)
    model = build_model(cfg)
    backbone = ViTModel(cfg, use_mask_token=True)
    for name, param in model.named_parameters():
        if name.endswith(("layernorm.weight", "layernorm_before.weight", "layernorm_after.weight")):
            assert torch.equal(param, torch.ones_like(param)), name
        elif name.endswith("bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
        else:  # Linear / Conv2d weights, CLS token, position embeddings: truncated normal(0, std)
            assert param.abs().max() <= 2.0, name  # HF truncates at +-2 (absolute)
            if param.numel() >= 1000:
                assert abs(param.std().item() - std) < 0.1 * std, name
                assert abs(param.mean().item()) < 0.1 * std, name
    assert torch.equal(backbone.embeddings.mask_token, torch.zeros_like(backbone.embeddings.mask_token))
    assert abs(backbone.embeddings.cls_token.std().item() - std) < 0.2 * std  # 384 values


def test_init_truncates_at_2_absolute_as_hf_does():
    """At std 0.05 the cut at +-2 is 40 sigma away and never shows. At std 2 it is at +-1 sigma:
    an untruncated normal puts 32% of its values beyond it, a truncated one has std
    2 * sqrt(1 - 2 phi(1) / (Phi(1) - Phi(-1))) = 1.079 instead of 2."""
    import math

    std = 2.0
    cfg = ModelConfig(**MODEL_SIZES["tiny"], num_labels=10, initializer_range=std)
    weight = build_model(cfg).vit.encoder.layer[0].intermediate.dense.weight  # 16384 values
    assert weight.abs().max() <= 2.0
    phi, mass = math.exp(-0.5) / math.sqrt(2 * math.pi), math.erf(1 / math.sqrt(2))
    assert abs(weight.std().item() - std * math.sqrt(1 - 2 * phi / mass)) < 0.03


def test_label_smoothing_and_label_checks():
    cfg = SIZES["tiny"]
    model = build_model(cfg).eval()
    images, _ = batch(cfg)
    with torch.no_grad():
        model.classifier.weight.mul_(50)
        labels = model(images).logits.argmax(-1)  # confident and right: smoothing raises the loss visibly
        out = model(images, labels=labels, label_smoothing=0.1)
        plain = model(images, labels=labels).loss
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels, label_smoothing=0.1))
    torch.testing.assert_close(plain, F.cross_entropy(out.logits, labels))
    assert out.loss - plain > 0.1
    with pytest.raises(ValueError, match="class indices"):
        model(images, labels=labels.float())


@pytest.mark.parametrize("size", list(SIZES))
def test_vit_flops_match_the_flop_counter(size):
    cfg = SIZES[size]
    model = build_model(cfg).eval()
    images, _ = batch(cfg, size=2)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        # explicit attention path: torch's counter does not see the CPU SDPA kernel
        model(images, output_attentions=True)
    assert vit_flops(cfg, 2) == 3 * counter.get_total_flops()
    assert vit_flops(cfg, 8) == 4 * vit_flops(cfg, 2)


def test_bf16_weights_take_fp32_images():
    cfg = SIZES["tiny"]
    model = build_model(cfg).to(torch.bfloat16)
    images, labels = batch(cfg)
    out = model(images, labels=labels)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert torch.isfinite(out.loss)
