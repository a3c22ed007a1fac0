"""Mistakes that used to pass --check and crash after the engine was built: refused up front, in one line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.validate import validate_run
from test_data_stream import write_tiny_shards

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))  # manifest.json lists 10 classes


CASES = {
    "labels": (["model.num_labels=5"], "model.num_labels=5 is smaller than the 10 classes of .*manifest.json; "
                                       "set model.num_labels=10$"),
    "channels": (["model.num_channels=4"], r"model.num_channels=4 is not an image the loader makes; use 1 "
                                           r"\(grayscale\) or 3 \(RGB\)$"),
    "nested typo": (["deepspeed.zero_optimization.reduce_bucket_sz=5"],
                    r"^deepspeed.zero_optimization.reduce_bucket_sz: Extra inputs are not permitted "
                    r"\(DeepSpeedZeroConfig\); check the spelling"),
    "nested value": (["train.zero_stage=3", "deepspeed.zero_optimization.stage3_max_live_parameters=lots"],
                     r"^deepspeed.zero_optimization.stage3_max_live_parameters: Input should be a valid integer"),
    "unknown top-level": (["deepspeed.foo=1"], r"^deepspeed.foo is not a DeepSpeed config key; known keys: .*"
                                               r"zero_optimization"),
    "top-level typo": (["deepspeed.wall_clock_breakdwn=true"], "did you mean deepspeed.wall_clock_breakdown?"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_mistake_is_one_line(shards, case):
    overrides, message = CASES[case]
    cfg = load_config(ROOT / "configs/digits_tiny.yaml", [f"data.train_shards={shards}", *overrides])
    with pytest.raises(ConfigError, match=message) as error:
        validate_run(cfg, world_size=2)
    assert "\n" not in str(error.value)


def test_classification_on_unlabeled_shards_is_refused(tmp_path, shards):
    """A manifest that says "labeled": false (make_shards --unlabeled) cannot train a classifier."""
    import json
    import shutil

    unlabeled = tmp_path / "unlabeled"
    shutil.copytree(Path(shards).parent, unlabeled)
    manifest = json.loads((unlabeled / "manifest.json").read_text())
    (unlabeled / "manifest.json").write_text(json.dumps({**manifest, "labeled": False}))
    pattern = str(unlabeled / Path(shards).name)
    cfg = load_config(ROOT / "configs/digits_tiny.yaml", [f"data.train_shards={pattern}"])
    with pytest.raises(ConfigError, match=r"needs labels, but the manifest .* carry none .*train.objective=mae"):
        validate_run(cfg, world_size=2)
    masked = load_config(ROOT / "configs/digits_tiny.yaml", [f"data.train_shards={pattern}", "train.objective=mae",
                                                             "model.decoder_hidden_size=64",
                                                             "model.decoder_num_attention_heads=4",
                                                             "model.decoder_intermediate_size=128"])
    validate_run(masked, world_size=2)  # the objectives without labels take them


def test_a_good_config_passes(shards):
    cfg = load_config(ROOT / "configs/digits_tiny.yaml",
                      [f"data.train_shards={shards}", "model.num_labels=10", "train.zero_stage=3",
                       "deepspeed.zero_optimization.stage3_max_live_parameters=1000",
                       "deepspeed.tensorboard.enabled=false"])
    validate_run(cfg, world_size=2)


def test_check_refuses_with_exit_2(shards):
    result = subprocess.run([sys.executable, str(ROOT / "launch/pretrain.py"), "--config",
                             str(ROOT / "configs/digits_tiny.yaml"), "--check", f"data.train_shards={shards}",
                             "model.num_labels=5"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: model.num_labels=5 is smaller than the 10 classes")
