"""Messages a new user met that said the wrong thing, and torch's thread count (issue 22):
an export of unlabeled shards, ``train.init_from`` of an ``--encoder-only`` export, the demo's
overrides against the user's, and the threads a single process picks when OMP_NUM_THREADS is unset.
"""
from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
import transformers

from pipeline.config import load_config
from pipeline.distributed.env import set_torch_threads, torch_threads

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=16,
             patch_size=4, num_channels=1)


@pytest.mark.parametrize("cores, ranks, workers, threads", [(2, 1, 1, 1), (16, 1, 4, 12), (16, 2, 2, 6),
                                                            (2, 2, 1, 1), (64, 8, 0, 8)])
def test_torch_threads_are_the_cores_left_after_the_data_workers(cores, ranks, workers, threads):
    assert torch_threads(cores=cores, local_world_size=ranks, num_workers=workers) == threads


def test_torch_threads_are_set_and_logged_only_where_the_user_has_not(monkeypatch, caplog):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(6)))
        with caplog.at_level(logging.INFO):
            assert set_torch_threads(num_workers=2, local_world_size=1) == 4
        assert torch.get_num_threads() == 4
        assert "torch threads: 4 (6 cores, 1 rank(s) on this machine, 2 data worker(s) each)" in caplog.text
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert set_torch_threads(num_workers=2, local_world_size=1) is None  # the user's choice stands
    finally:
        torch.set_num_threads(before)


def test_init_from_an_encoder_only_export_names_its_class(tmp_path):
    from pipeline.init_from import pretrained_encoder

    config = transformers.ViTConfig(**SMALL)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "encoder")
    _, where = pretrained_encoder(tmp_path / "encoder")
    assert where == f"HF directory {tmp_path / 'encoder'} (ViTModel)"


def test_an_export_of_unlabeled_shards_says_they_are_unlabeled(tmp_path, caplog):
    from pipeline.checkpoint.export_meta import export_model
    from pipeline.model import ViTForImageClassification

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train-000000.tar").write_bytes(b"")
    (shards / "manifest.json").write_text(json.dumps({"labeled": False, "shards": [
        {"name": "train-000000.tar", "num_samples": 0}]}))
    run = load_config(None, [*(f"model.{k}={v}" for k, v in SMALL.items()), "model.num_labels=2",
                             f"data.train_shards={shards}/train-000000.tar", "data.mean=[0.5]", "data.std=[0.5]"])
    with caplog.at_level(logging.INFO):
        export_model(ViTForImageClassification(run.model), tmp_path / "hf", run=run)
    assert f"the shards {shards}/train-000000.tar are unlabeled" in caplog.text
    assert "no manifest.json" not in caplog.text


def test_the_demo_lets_the_users_overrides_replace_its_own():
    sys.path.insert(0, str(ROOT))
    from launch.demo import with_defaults

    defaults = ["checkpoint.resume=none", "checkpoint.overwrite=true"]
    assert with_defaults(defaults, ["checkpoint.overwrite=false", "train.max_steps=5"]) == [
        "checkpoint.resume=none", "checkpoint.overwrite=false", "train.max_steps=5"]
    load_config(None, with_defaults(defaults, ["checkpoint.overwrite=false"]))  # no repeated key


def test_the_demo_trains_in_fp32_where_the_cpu_would_emulate_bf16(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT))
    from launch import demo

    config = ROOT / "configs" / "digits_tiny.yaml"  # bf16, as the demo's configs are
    monkeypatch.setattr(demo, "cpu_has_bf16_kernels", lambda: False)
    precision = demo.demo_precision(["train.max_steps=5"])
    assert "the demo trains in fp32" in capsys.readouterr().out
    assert load_config(config, demo.with_defaults(precision, ["train.max_steps=5"])).train.precision == "fp32"
    assert demo.demo_precision(["train.precision=bf16"]) == []  # the user's choice stands, unannounced
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(demo, "cpu_has_bf16_kernels", lambda: True)
    assert load_config(config, demo.with_defaults(demo.demo_precision([]), [])).train.precision == "bf16"
    monkeypatch.undo()
    flags = open("/proc/cpuinfo").read()
    if "avx512" not in flags:  # AVX2 only: torch has no bf16 kernels here (this VM), whatever it reports elsewhere
        assert demo.cpu_has_bf16_kernels() is False


def test_a_stop_before_training_waits_for_the_checks_then_ends_without_announcing_a_checkpoint(tmp_path):
    """While the run checks its inputs a stop signal is only recorded (a rank that then finds a
    mistake ends with its own 2); once the checks pass it ends the process at once: nothing is
    trained, and no "will save a checkpoint" line."""
    import subprocess
    import textwrap

    status = tmp_path / "exit_status"
    status.write_text("running\n")
    code = textwrap.dedent(f"""
        import logging, os, signal
        from pathlib import Path
        from pipeline.preemption import StopFlag
        logging.basicConfig(level=logging.INFO)
        flag = StopFlag().install()
        flag.exit_status_path = Path({str(status)!r})
        flag.checking_first(loud=True)
        os.kill(os.getpid(), signal.SIGTERM)
        print("still checking", flag.requested, flush=True)
        flag.exit_before_training()
        print("not reached", flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 75, result.stderr
    assert result.stdout.splitlines() == ["still checking True"]
    assert "received SIGTERM while checking the run" in result.stderr
    assert "received SIGTERM before training started: nothing trained yet, nothing to save; exiting 75" in result.stderr
    assert "will save a checkpoint" not in result.stderr
    assert status.read_text() == "75\n"
