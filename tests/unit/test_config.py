"""Config loading: YAML, dotted overrides, refusals with one-line messages."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import MODEL_SIZES, ConfigError, ModelConfig, dump_config, load_config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.hidden_size % cfg.model.num_attention_heads == 0, path


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_named_sizes_fill_fields(tmp_path, size):
    cfg = load_config(write(tmp_path, f"model:\n  size: {size}\n"))
    for key, value in MODEL_SIZES[size].items():
        assert getattr(cfg.model, key) == value


def test_vit_b16_is_the_paper_size(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  size: B/16\n"))
    assert (cfg.model.hidden_size, cfg.model.num_hidden_layers, cfg.model.num_attention_heads,
            cfg.model.intermediate_size, cfg.model.patch_size) == (768, 12, 12, 3072, 16)


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  max_steps: 5\n"),
                      ["train.max_steps=10", "model.size=S/16", "model.hidden_size=192", "optim.lr=3e-4",
                       "data.ledger=true", "model.image_size=[32,48]", "model.patch_size=16"])
    assert cfg.train.max_steps == 10
    assert cfg.model.hidden_size == 192 and cfg.model.num_attention_heads == 6
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.ledger is True
    assert cfg.model.image_hw == (32, 48) and cfg.model.num_patches == 2 * 3


def test_deepspeed_section_passes_through(tmp_path):
    cfg = load_config(write(tmp_path, "deepspeed:\n  zero_optimization:\n    overlap_comm: true\n"))
    assert cfg.deepspeed == {"zero_optimization": {"overlap_comm": True}}


@pytest.mark.parametrize("override, fragment", [
    (["model.hidden_size=100"], "model.hidden_size (100) must be divisible by model.num_attention_heads"),
    (["model.image_size=225"], "model.image_size 225 must be divisible by model.patch_size 16"),
    (["train.max_steps=-3"], "train.max_steps must be positive"),
    (["train.max_steps=ten"], "train.max_steps has the wrong type"),
    (["train.zero_stage=4"], "train.zero_stage must be 0, 1, 2 or 3"),
    (["train.precision=fp8"], "train.precision 'fp8' is unknown"),
    (["train.maxsteps=3"], "unknown key 'train.maxsteps'"),
    (["trian.max_steps=3"], "unknown config section 'trian'"),
    (["model.hidden_act=gelu2"], "model.hidden_act 'gelu2' is unknown"),
    (["model.activation_checkpointing=some"], "model.activation_checkpointing 'some' is not allowed"),
    (["model.size=XL/99"], "model.size 'XL/99' is unknown"),
    (["optim.min_lr=1.0"], "optim.min_lr must be in [0, optim.lr]"),
    (["max_steps"], "must look like section.key=value"),
    (["train.ema_decay=1.0"], "train.ema_decay must be in [0, 1) (0 is off)"),
    (["train.ema_warmup=true"], "train.ema_warmup=true needs train.ema_decay > 0"),
    (["train.ema_decay=0.9", "train.zero_stage=0", "train.precision=fp16"],
     "train.ema_decay with train.precision=fp16 needs train.zero_stage >= 1"),
])
def test_bad_values_are_refused_with_the_key(tmp_path, override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""), override)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line 3"):
        load_config(write(tmp_path, "train:\n  max_steps: [1,\n"))


def test_activation_checkpointing_layers(tmp_path):
    cfg = load_config(write(tmp_path, ""), ["model.num_hidden_layers=5", "model.activation_checkpointing=every-2"])
    assert cfg.model.checkpoint_layer_ids() == {0, 2, 4}
    cfg = load_config(write(tmp_path, ""), ["model.activation_checkpointing=all", "model.num_hidden_layers=3"])
    assert cfg.model.checkpoint_layer_ids() == {0, 1, 2}


def test_cli_reports_config_errors_in_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "launch/pretrain.py"), "--config",
                             str(write(tmp_path, "")), "model.hidden_size=100"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: model.hidden_size (100) must be divisible")


def test_cli_check_prints_resolved_config(tmp_path, digits_shards):
    """Overrides applied, and train.epochs / optim.blr shown as the steps and lr the run would use."""
    import json

    from conftest import shard_overrides

    result = subprocess.run([sys.executable, str(ROOT / "launch/pretrain.py"), "--config",
                             str(ROOT / "configs/digits_tiny.yaml"), "--check", *shard_overrides(digits_shards),
                             "train.max_steps=null", "train.epochs=3", "optim.warmup_epochs=1", "optim.lr=null",
                             "optim.blr=1e-3", "optim.blr_batch=64"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    train = sum(s["num_samples"] for s in json.loads((digits_shards / "manifest.json").read_text())["shards"]
                if s["name"].startswith("train"))
    assert f"max_steps: {3 * (train // 32)}" in result.stdout and "epochs: 3" in result.stdout
    assert f"warmup_steps: {train // 32}" in result.stdout
    assert "lr: 0.0005" in result.stdout  # 1e-3 x 32 images (one process) / 64


def test_size_applies_when_model_config_is_built_directly():
    small = ModelConfig(size="S/16")
    assert (small.hidden_size, small.num_attention_heads, small.intermediate_size) == (384, 6, 1536)
    narrower = ModelConfig(size="S/16", hidden_size=192, image_size=32)
    assert (narrower.hidden_size, narrower.num_attention_heads, narrower.image_size) == (192, 6, 32)
    with pytest.raises(ConfigError, match="model.size 'XL/99' is unknown"):
        ModelConfig(size="XL/99")


def test_fields_in_a_file_win_over_the_size_even_at_b16_values(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  size: L/16\n  hidden_size: 768\n  num_attention_heads: 12\n"))
    assert (cfg.model.size, cfg.model.hidden_size, cfg.model.num_hidden_layers) == ("L/16", 768, 24)
    dump_config(cfg, tmp_path / "dumped.yaml")
    assert load_config(tmp_path / "dumped.yaml").model == cfg.model


def test_an_unquoted_brace_pattern_is_refused_naming_the_shell(tmp_path):
    # What bash makes of data.train_shards=data/digits/train-{000000..000003}.tar, unquoted.
    expanded = [f"data.train_shards=data/digits/train-00000{i}.tar" for i in range(4)]
    with pytest.raises(ConfigError, match=r"'data.train_shards' is given 4 times in a row .*brace expansion"
                                          r".*quote the whole override"):
        load_config(None, ["train.max_steps=3", *expanded])
    # Quoted, the pattern arrives whole; a key repeated further apart is layering, the later wins.
    cfg = load_config(None, ["data.train_shards=data/digits/train-{000000..000003}.tar",
                             "train.max_steps=3", "optim.lr=0.1", "train.max_steps=5"])
    assert cfg.data.train_shards == "data/digits/train-{000000..000003}.tar" and cfg.train.max_steps == 5


def test_a_resolved_model_config_rebuilds_to_itself(tmp_path):
    # A field given beside a size at a ViT-B/16 value stays when the config is rebuilt from its
    # record (a checkpoint's marker, dataclasses.replace): the size fills only fields nobody gave.
    cfg = load_config(write(tmp_path, "model:\n  size: L/16\n  hidden_size: 768\n  num_attention_heads: 12\n"))
    assert ModelConfig(**dataclasses.asdict(cfg.model)) == cfg.model
    assert dataclasses.replace(cfg.model, num_labels=10).hidden_size == 768
