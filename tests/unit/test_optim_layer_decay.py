"""optim.layer_decay against MAE's param_groups_lrd, and epochs / blr turned into steps / lr."""
from __future__ import annotations

import re

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.model import build_model
from pipeline.optim import WarmupCosine, build_optimizer, build_scheduler, param_groups, resolve_schedule

DEPTH = 4  # the tiny size's layers


def cfg_of(*overrides):
    return load_config(None, ["data.train_shards=x.tar", "model.size=tiny", "model.num_labels=10", *overrides])


# --- MAE's reference, on a timm VisionTransformer (MAE's models_vit subclasses it) ----------
# MAE (github.com/facebookresearch/mae, util/lr_decay.py) is not on PyPI. What follows is its
# documented behaviour, written here as a test-side reference:
# - layer id: "cls_token" and "pos_embed" 0, names starting "patch_embed" 0, "blocks.{i}.*" i + 1,
#   anything else (the final norm, the head) num_layers = depth + 1;
# - a parameter is undecayed when it is 1-D or its name is in no_weight_decay_list (MAE passes
#   the model's no_weight_decay(): pos_embed, cls_token, dist_token);
# - one group per (layer id, decayed or not), lr_scale = layer_decay ** (num_layers - id), and
#   MAE's lr_sched sets each group's lr to lr * lr_scale.

def mae_layer_id(name: str, num_layers: int) -> int:
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def mae_param_groups_lrd(model, weight_decay: float, no_weight_decay_list, layer_decay: float) -> list[dict]:
    num_layers = len(model.blocks) + 1
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim == 1 or name in no_weight_decay_list
        lid = mae_layer_id(name, num_layers)
        key = f"layer_{lid}_{'no_decay' if skip else 'decay'}"
        group = groups.setdefault(key, {"lr_scale": layer_decay ** (num_layers - lid),
                                        "weight_decay": 0.0 if skip else weight_decay, "params": []})
        group["params"].append(name)
    return list(groups.values())


# Where each of our (HF) parameters lives in timm's ViT: query/key/value go into one fused qkv.
HF_TO_TIMM = [
    (r"vit\.embeddings\.cls_token", "cls_token"),
    (r"vit\.embeddings\.position_embeddings", "pos_embed"),
    (r"vit\.embeddings\.patch_embeddings\.projection\.(\w+)", r"patch_embed.proj.\1"),
    (r"vit\.encoder\.layer\.(\d+)\.layernorm_before\.(\w+)", r"blocks.\1.norm1.\2"),
    (r"vit\.encoder\.layer\.(\d+)\.attention\.attention\.(?:query|key|value)\.(\w+)", r"blocks.\1.attn.qkv.\2"),
    (r"vit\.encoder\.layer\.(\d+)\.attention\.output\.dense\.(\w+)", r"blocks.\1.attn.proj.\2"),
    (r"vit\.encoder\.layer\.(\d+)\.layernorm_after\.(\w+)", r"blocks.\1.norm2.\2"),
    (r"vit\.encoder\.layer\.(\d+)\.intermediate\.dense\.(\w+)", r"blocks.\1.mlp.fc1.\2"),
    (r"vit\.encoder\.layer\.(\d+)\.output\.dense\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
    (r"vit\.layernorm\.(\w+)", r"norm.\1"),
    (r"classifier\.(\w+)", r"head.\1"),
]


def timm_name(hf_name: str) -> str:
    for pattern, replacement in HF_TO_TIMM:
        if re.fullmatch(pattern, hf_name):
            return re.sub(pattern, replacement, hf_name)
    raise KeyError(hf_name)


@pytest.mark.parametrize("decay", [0.65, 0.75])
def test_groups_equal_maes_param_groups_lrd_on_the_same_vit(decay):
    from timm.models.vision_transformer import VisionTransformer

    cfg = cfg_of()
    ours = build_model(cfg.model)
    timm_vit = VisionTransformer(img_size=16, patch_size=4, in_chans=3, embed_dim=64, depth=DEPTH, num_heads=4,
                                 mlp_ratio=4.0, num_classes=10)
    names = {id(p): n for n, p in ours.named_parameters()}
    assert set(map(timm_name, names.values())) == {n for n, _ in timm_vit.named_parameters()}  # the same model
    reference = mae_param_groups_lrd(timm_vit, 0.05, timm_vit.no_weight_decay(), decay)
    got = param_groups(ours, 0.05, layer_decay=decay, lr=2e-3)

    def summary(groups):
        return sorted((round(g["lr_scale"], 12), g["weight_decay"], frozenset(g["params"])) for g in groups)

    mapped = [{**g, "params": {timm_name(names[id(p)]) for p in g["params"]}} for g in got]
    assert summary(mapped) == summary(reference)
    assert len(got) == 2 * (DEPTH + 2)  # the embeddings, each layer and the top, decayed or not
    assert all(g["lr"] == pytest.approx(2e-3 * g["lr_scale"]) for g in got)
    assert [g["lr_scale"] for g in got] == sorted((g["lr_scale"] for g in got), reverse=True)  # first: scale 1


def test_mae_pretraining_model_decoder_and_mask_token_fall_with_the_top():
    cfg = cfg_of("train.objective=mae", "model.decoder_hidden_size=32", "model.decoder_num_hidden_layers=1",
                 "model.decoder_num_attention_heads=4")
    from pipeline.tasks import build_task

    model = build_task(cfg).build_model(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    where = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in param_groups(model, 0.05, layer_decay=0.5)
             for p in g["params"]}
    assert where["decoder.decoder_layers.0.attention.attention.query.weight"] == (1.0, 0.05)
    assert where["decoder.mask_token"] == (1.0, 0.0)
    assert where["vit.embeddings.cls_token"] == (0.5 ** (DEPTH + 1), 0.0)
    assert where["vit.encoder.layer.3.output.dense.weight"] == (0.5, 0.05)


def test_without_layer_decay_the_two_groups_of_today():
    model = build_model(cfg_of().model)
    groups = param_groups(model, 0.05)
    assert [g["name"] for g in groups] == ["decay", "no_decay"] and all("lr_scale" not in g for g in groups)
    opt = build_optimizer(model, cfg_of().optim)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3]


def test_scales_survive_the_schedule():
    cfg = cfg_of("optim.layer_decay=0.5", "optim.lr=1e-3", "optim.warmup_steps=3").optim
    model = build_model(cfg_of().model)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    schedule = WarmupCosine(cfg, 10)
    for step in range(5):
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * g["lr_scale"] * schedule(step)
                                                                      for g in opt.param_groups])
        opt.step()
        sched.step()


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_a_bad_layer_decay_is_refused_in_one_line(value):
    with pytest.raises(ConfigError, match="optim.layer_decay must be in"):
        cfg_of(f"optim.layer_decay={value}")


# --- epochs and blr -------------------------------------------------------------------------

def test_epochs_and_blr_become_steps_and_lr():
    cfg = cfg_of("data.batch_size=32", "train.grad_accum_steps=2", "train.epochs=3", "optim.warmup_epochs=0.5",
                 "optim.blr=5e-4", "optim.blr_batch=256", "optim.min_lr=1e-6")
    assert cfg.train.max_steps is None and cfg.optim.lr is None
    # 1000 samples, 4 ranks: 1000 // 128 = 7 batches per rank and epoch, 3.5 optimizer steps of 256 images.
    resolved = resolve_schedule(cfg, world_size=4, num_samples=1000)
    assert resolved.train.max_steps == 3 * 7 // 2 == 10
    assert resolved.optim.warmup_steps == round(0.5 * 3.5) == 2
    assert resolved.optim.lr == pytest.approx(5e-4 * 256 / 256)
    # A resolved config (the run's config.yaml) resolves to itself; max_steps + epochs that agree are accepted.
    assert resolve_schedule(resolved, world_size=4, num_samples=1000) == resolved
    # Without epochs or blr nothing changes and nothing needs counting.
    plain = cfg_of()
    assert resolve_schedule(plain, world_size=2) is plain and plain.train.max_steps == 1000 and plain.optim.lr == 1e-3


@pytest.mark.parametrize("overrides, message", [
    (["train.epochs=3", "train.max_steps=50"], "train.max_steps=50 and train.epochs=3"),
    (["optim.warmup_epochs=1", "optim.warmup_steps=9"], "optim.warmup_steps=9 and optim.warmup_epochs=1"),
    (["optim.blr=1e-3", "optim.lr=0.1"], "optim.lr=0.1 and optim.blr=0.001"),
    (["optim.blr=1e-6", "optim.min_lr=1e-5"], "optim.min_lr must be in"),
    (["train.epochs=1", "data.batch_size=512"], "shorter than one optimizer step"),
])
def test_conflicting_lengths_and_lrs_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        resolve_schedule(cfg_of(*overrides), world_size=2, num_samples=1000)
    assert "\n" not in str(error.value)
