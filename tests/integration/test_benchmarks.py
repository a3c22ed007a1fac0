"""Smoke tests of the benchmark suites: each runs at a tiny size through the real command line and
returns well-formed figures (positive times, the ratio keys present). No timing is asserted:
figures on a shared CI machine mean nothing; see docs/PERFORMANCE.md for real ones."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launch"))

import benchmark  # noqa: E402  (launch/benchmark.py)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """Suites run in this process set torch's thread count; give the next test the old one back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def bench(tmp_path: Path, *args: str, subprocess_: bool = False, timeout: float = 120) -> dict:
    """`python launch/benchmark.py <args> --json OUT` (in this process, or as a user types it in a
    new one: the suites that start process groups run there); the JSON it wrote."""
    out = tmp_path / "out.json"
    if subprocess_:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
        done = subprocess.run([sys.executable, str(ROOT / "launch/benchmark.py"), *args, "--json", str(out)],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert benchmark.main([*args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["load_average_1_5_15"] is not None and report["meta"]["date_utc"]
    assert report["meta"]["command"].startswith("python launch/benchmark.py " + args[0])
    return report["result"]


def test_model_suite_ratios(tmp_path):
    result = bench(tmp_path, "model", "--sizes", "tiny", "--batch-size", "2", "--repeats", "1", "--warmup", "0",
                   "--threads", "1", "--precisions", "bf16", "--objectives", "classification", "mae", "simmim",
                   "--clock", "cpu")
    assert set(result["cells"]) == {"tiny bf16", "tiny bf16 mae", "tiny bf16 simmim"}
    cell = result["cells"]["tiny bf16"]
    assert set(cell["contenders"]) == {"ours", "timm", "hf_sdpa", "hf_eager"}
    assert all(c["median_s"] > 0 for c in cell["contenders"].values())
    assert cell["ratio_ours_vs_fastest_peer"] > 0 and "ratio_ours_vs_hf" in cell
    # the same weights went into every peer: same function up to float rounding
    assert max(cell["max_abs_diff_vs_ours_fp32"].values()) < 1e-4
    assert any("ratio" in key for key in result["summary"])
    from pipeline.config import ModelConfig
    from pipeline.model import mae_flops, vit_flops

    tiny = ModelConfig(size="tiny")
    for objective in ("mae", "simmim"):
        cell = result["cells"][f"tiny bf16 {objective}"]
        assert set(cell["contenders"]) == {"ours", "hf_sdpa", "hf_eager", "ours_classification"}
        assert all(c["median_s"] > 0 for c in cell["contenders"].values())
        # HF's pretraining model with our weights and the same masks computes our loss
        assert max(cell["max_abs_loss_diff_vs_ours_fp32"].values()) < 1e-5
        assert cell["cost_vs_classification"] > 0 and cell["ratio_ours_vs_hf"] > 0
    assert result["cells"]["tiny bf16 mae"]["analytic_flops_ratio"] == round(mae_flops(tiny, 2) / vit_flops(tiny, 2), 3)


def test_step_suite_overhead(tmp_path):
    result = bench(tmp_path, "step", "--size", "tiny", "--batch-size", "2", "--stages", "0", "3", "--repeats", "1",
                   "--warmup", "1", "--precisions", "fp32", "--threads", "1", "--objectives", "classification", "mae",
                   "simmim", "--clock", "cpu", "--layer-decay", "0.75", "--overrides", "model.decoder_hidden_size=64",
                   "model.decoder_intermediate_size=256", "--ema-decay", "0.9",
                   subprocess_=True, timeout=240)  # HF's 512-wide decoder: 25x tiny
    stats = result["precisions"]["fp32"]
    steps = ("plain_adamw", "zero0", "zero3")
    decayed = ("zero0_layer_decay", "zero3_layer_decay")  # fine-tuning's objective only
    ema = {"zero0_ema", "zero3_ema"}  # classification's steps again, with an EMA of the weights
    assert set(stats) == {*steps, *decayed, *ema, *(f"{o}_{s}" for o in ("mae", "simmim") for s in steps)}
    assert all(stats[name]["ema_cost_pct"] is not None and stats[name]["first_loss"] == stats["zero0"]["first_loss"]
               for name in ema)
    stats = {name: s for name, s in stats.items() if name not in ema}
    assert all(s["median_s"] > 0 and s["overhead_pct"] is not None for s in stats.values())
    # the trainer's own step, split in its two phases
    assert all(s["fwd_bwd_s"] > 0 and s["optimizer_s"] > 0 for s in stats.values())
    for objective in ("classification", "mae", "simmim"):
        mine = [s for s in stats.values() if s["objective"] == objective]
        # one model, one batch, one init (and the same masks): every step starts from the same loss
        assert len(mine) == (5 if objective == "classification" else 3) and len({s["first_loss"] for s in mine}) == 1
        assert all(s["vs_without_layer_decay"] > 0 for s in mine if s["step"].endswith("_layer_decay"))
        if objective != "classification":
            assert all(s["cost_vs_classification"] > 0 and s["fwd_bwd_cost_vs_classification"] > 0 for s in mine)
    assert len({s["first_loss"] for s in stats.values()}) == 3  # three objectives, three losses
    assert result["summary"]["max_layer_decay_cost_x"] > 0


ZERO3_LINEAR_CHECK = """
import torch, torch.nn.functional as F
from launch.benchmarks import training_steps
torch_linear = F.linear
training_steps.single_process_group()
cfg = training_steps.train_config("tiny", batch_size=2, precision="fp32", zero_stage=3)
images, labels = training_steps.synthetic_batch(cfg)
step, _ = training_steps.engine_step(cfg, training_steps.build_seeded_model(cfg), images, labels)
seen = []
step(lambda: seen.append(F.linear))
print("outside", F.linear is torch_linear, "inside", seen[0] is not torch_linear, seen[0].__name__)
"""


def test_zero3_engine_step_keeps_its_linear_to_itself():
    """DeepSpeed's ZeRO-3 replaces torch.nn.functional.linear process-wide; the other contenders of a
    suite must run torch's (a plain step ran 9% slower beside a ZeRO-3 engine before this)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-c", ZERO3_LINEAR_CHECK], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "outside True inside True zero3_linear_wrap" in done.stdout


def test_roofline_suite(tmp_path):
    # --no-compile: the compiled contender's inductor build is 31 of the suite's 45 s of CPU here with a
    # cold inductor cache, as in CI; train.compile itself trains and is compared in test_train_compile.py.
    # bf16 only: its contenders are fp32's plus one.
    result = bench(tmp_path, "roofline", "--size", "tiny", "--batch-size", "2", "--repeats", "1", "--warmup", "1",
                   "--mm-size", "128", "--mm-repeats", "1", "--precisions", "bf16", "--threads", "1", "--no-compile")
    expected = {"bf16": {"ours_fwd_bwd", "ours_train_step", "timm_fwd_bwd",
                         "ours_bf16_weights_fwd_bwd"}}  # the last: weights held in bf16, as DeepSpeed's bf16 mode does
    for precision, names in expected.items():
        figures = result["precisions"][precision]
        assert figures["matmul_gflop_per_s"] > 0 and figures["gflop_per_step"] > 0
        assert set(figures["contenders"]) == names
        assert all(figures["contenders"][name]["fraction_of_matmul"] > 0 for name in names)


def test_memory_suite(tmp_path):
    # Every setting and stage is its own process (torchrun for ZeRO): one stage keeps this short.
    result = bench(tmp_path, "memory", "--size", "tiny", "--batch-size", "4", "--settings", "none", "all",
                   "--steps", "1", "--zero-size", "tiny", "--stages", "3", "--threads", "1",
                   "--zero-overrides", "train.ema_decay=0.9", timeout=240)
    ckpt = result["checkpointing"]["settings"]
    assert set(ckpt) == {"none", "all"}
    assert all(s["step_s"] > 0 and s["peak_rss_mib"] > 0 and "activation_cut_x" in s for s in ckpt.values())
    stage = result["zero"]["stages"]["zero3"]
    assert stage["measured_mib"] > 0 and stage["step_s"] > 0
    assert stage["predicted_mib"] == pytest.approx(16 * stage["params"] / 2 / 2**20, abs=0.1)  # 16P/N, N=2
    assert 0.5 <= stage["ema_vs_fp32_copy"] <= 0.51  # an EMA of the rank's partition: half the weights, padded
    assert result["summary"]["goal_ema_zero3_le_55pct_of_fp32_copy_met"]


def test_zero_prediction():
    from launch.benchmarks.memory import predicted_state_bytes

    p = 1000
    assert [predicted_state_bytes(p, s, 2) for s in range(4)] == [16 * p, 12 * p, 10 * p, 8 * p]


def test_gpu_suite_without_cuda_exits_zero(tmp_path, monkeypatch):
    # Hide any GPU from the new process: this test is about the no-GPU path, wherever it runs.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    result = bench(tmp_path, "gpu", subprocess_=True)
    assert result["summary"]["gpu_present"] is False


def test_unknown_and_missing_suites_say_so(capsys):
    assert benchmark.main(["nonsense"]) == 2
    assert "unknown suite 'nonsense'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="does not exist in this checkout"):
        benchmark.load_suite("no_such_suite")


def test_options_from_defaults_and_table():
    import argparse

    parser = argparse.ArgumentParser()
    benchmark.add_options_from_defaults(parser, {"size": "B/16", "workers": [0, 1], "seconds": 8.0, "dir": None})
    args = parser.parse_args(["--workers", "2", "3", "--seconds", "1.5", "--dir", "x"])
    assert (args.workers, args.seconds, args.dir, args.size) == ([2, 3], 1.5, "x", None)
    table = benchmark.format_table([{"a": 1, "b": 0.123456}, {"a": 22, "c": None}])
    assert table.splitlines()[0].split() == ["a", "b", "c"] and "0.1235" in table


def test_data_suite(tmp_path):
    result = bench(tmp_path, "data", "--images", "16", "--image-size", "32", "--batch-size", "4", "--workers", "0", "2",
                   "--seconds", "0.3", "--rounds", "2")
    assert result["ceiling_decode_crop"]["images_per_cpu_s"] > 0
    assert result["loader"]["2_workers"]["per_worker_vs_parallel_ceiling"] > 0
    assert result["auto_augment"]["spec"] == "rand-m9-mstd0.5-inc1"
    assert 0 < result["auto_augment"]["with_images_per_cpu_s"] and 0 < result["auto_augment"]["with_vs_without"] < 2
    for workers in ("0_workers", "2_workers"):
        figures = result["loader"][workers]
        assert len(figures["rounds"]) == 2 and figures["images_timed"] > 0
        per_round = [r["per_worker_vs_ceiling"] for r in figures["rounds"]]
        assert min(per_round) > 0 and figures["per_worker_vs_ceiling"] == pytest.approx(sum(per_round) / 2)
        # a worker cannot decode much faster than one tight loop: the workers' CPU time was found
        # (they are the fork server's children, not ours)
        assert max(per_round) < 2
