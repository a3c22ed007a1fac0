"""Exact resume (2 ranks, ZeRO-2 and ZeRO-3, fp32, bitwise) after a preemption signal and after a
SIGKILL, a save killed half-way, and a change of world size 2 -> 1 -> 2 through DeepSpeed's
universal checkpoints. Real torchrun jobs, shared with the other checkpoint tests (checkpoint_runs)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import checkpoint_runs as runs
from pipeline.checkpoint import COMPLETE
from pipeline.checkpoint.export import export_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "checkpoint-runs"


def assert_same_training(full: Path, resumed: Path, tmp_path: Path) -> None:
    """Per-step losses bitwise, the same samples at every step on every rank, the same final weights."""
    expected, got = runs.train_rows(full), runs.train_rows(resumed)
    assert sorted(got) == sorted(expected) and sorted(expected)[-1] == runs.STEPS
    for step in expected:
        for key in ("loss", "grad_norm", "lr", "epoch"):
            assert got[step][key] == expected[step][key], (step, key, got[step][key], expected[step][key])
    for rank in (0, 1):
        assert runs.ledger_lines(resumed, rank) == runs.ledger_lines(full, rank)  # also: no step twice, none missing
    for ema in (False, True):  # the weights, and their average (EMA) restored from the checkpoint
        weights = [load_file(export_checkpoint(run, tmp_path / f"{run.name}-{ema}", ema=ema) / "model.safetensors")
                   for run in (full, resumed)]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    val = [[r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r][-1]
           for run in (full, resumed)]
    assert val[0] == val[1] and "val_top1_ema" in val[0]


def test_zero2_resume_after_preemption_is_bitwise_exact(base, digits_shards, tmp_path):
    pair = runs.preempted_pair(base, digits_shards, stage=2)
    assert pair.second.returncode == 0, pair.second.log[-3000:]
    stopped = pair.notes["ledger_steps"][0][-1]
    assert 1 < stopped < runs.STEPS, pair.notes
    assert f"resumed from {pair.interrupted}/checkpoints/step-{stopped} at step {stopped}" in pair.second.log
    assert_same_training(pair.full, pair.interrupted, tmp_path)


def test_zero3_resume_after_sigkill_and_a_killed_save_is_bitwise_exact(base, digits_shards, tmp_path):
    pair = runs.killed_pair(base, digits_shards, stage=3)
    assert pair.first.returncode == -9 and pair.second.returncode == 0, pair.second.log[-3000:]
    notes, log = pair.notes, pair.second.log
    assert notes["killed_at"] > notes["resumed_from"] == runs.EVERY  # steps after the checkpoint were lost...
    assert f"resumed from {pair.interrupted}/checkpoints/step-{runs.EVERY} at step {runs.EVERY}" in log
    # ...and redone; the partial directories were never loaded, and are gone or rewritten.
    assert f"replacing incomplete checkpoint {notes['partial_newer'].name}" in log
    assert f"removing incomplete checkpoint {notes['partial_older'].name}" in log
    root = pair.interrupted / "checkpoints"
    assert not notes["partial_older"].exists()
    assert all((p / COMPLETE).is_file() for p in root.glob("step-*"))
    assert_same_training(pair.full, pair.interrupted, tmp_path)


@pytest.mark.parametrize("stage", [2, 3])  # ZeRO-3 fp32: the optimizer's master is the weights' partition
def test_world_size_change_2_1_2_goes_through_universal_checkpoints(base, digits_shards, stage):
    source = runs.uninterrupted(base, digits_shards, stage)  # 2 ranks, ended at step STEPS
    out = base / f"resized-zero{stage}"
    steps, more = runs.STEPS, 4
    one = runs.run(1, out, [*runs.common(digits_shards, stage), f"train.max_steps={steps + more}",
                            f"checkpoint.resume={source}/checkpoints/step-{steps}"])  # resume=PATH of another run
    assert one.returncode == 0, one.log[-3000:]
    assert f"resumed from {source}/checkpoints/step-{steps} at step {steps}" in one.log
    two = runs.run(2, out, [*runs.common(digits_shards, stage), f"train.max_steps={steps + 2 * more}"])
    assert two.returncode == 0, two.log[-3000:]

    manifest = json.loads((digits_shards / "manifest.json").read_text())
    samples = manifest["splits"]["train"]["num_samples"]
    batch = 16  # TINY's data.batch_size
    # (job, old world size, new, steps done in the interrupted epoch, that epoch, checkpoint resumed)
    for job, old, new, done, epoch, tag in ((one, 2, 1, steps, 0, steps), (two, 1, 2, more, 1, steps + more)):
        assert f"on a different world size ({old} -> {new}): converting through DeepSpeed's universal" in job.log
        assert re.search(rf"converted \S*/step-{tag} to DeepSpeed's "
                         rf"universal format in [\d.]+ s: {out}/checkpoints/step-\d+_universal", job.log)
        skipped = samples - done * batch * old  # what the interrupted epoch had left on the old layout
        assert (f"world_size {old} -> {new} since the checkpoint; resuming at the start of epoch {epoch + 1}, "
                f"skipping {skipped} samples of the interrupted epoch {epoch}") in job.log
        # The EMA is not DeepSpeed's to convert: rebuilt from the old shards onto the new partitions.
        assert f"EMA of the weights rebuilt from step-{tag} ({old} ranks) onto {new} ranks" in job.log
        assert "holds no EMA" not in job.log
    rows = runs.train_rows(out)
    assert sorted(rows) == list(range(steps + 1, steps + 2 * more + 1))  # the step count continues
    assert {rows[s]["epoch"] for s in range(steps + 1, steps + more + 1)} == {1}
    assert {rows[s]["epoch"] for s in range(steps + more + 1, steps + 2 * more + 1)} == {2}
    assert [line["step"] for line in runs.ledger_lines(out, 0)] == list(range(steps + 1, steps + 2 * more + 1))
    assert [line["step"] for line in runs.ledger_lines(out, 1)] == list(range(steps + more + 1, steps + 2 * more + 1))
    assert not (source / "checkpoints" / f"step-{steps}_universal").exists()  # nothing written into the source run

    # The 1-rank run's first step, recomputed here from the source's weights and the data stream
    # restarted at epoch 1: the universal checkpoint carried the weights over exactly.
    first_keys = runs.ledger_lines(out, 0)[0]["keys"]
    assert rows[steps + 1]["loss"] == pytest.approx(recompute_first_loss(source, out, first_keys), abs=1e-5)


def recompute_first_loss(source: Path, out: Path, keys: list[str]) -> float:
    from pipeline.config import load_config
    from pipeline.data import build_train_loader
    from pipeline.model import build_model

    cfg = load_config(out / "config.yaml")
    model = build_model(cfg.model)
    export = export_checkpoint(source, out / "source-export", rgb_input=False)  # the 1-channel weights as trained
    model.load_state_dict(load_file(export / "model.safetensors"))
    tag = source / "checkpoints" / f"step-{runs.STEPS}"
    rank0 = tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3: one per rank; ZeRO 0-2: one
    state = torch.load(rank0 if rank0.exists() else tag / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)  # our own file: the loader state of rank 0
    loader = build_train_loader(cfg.data, image_size=cfg.model.image_hw, num_channels=cfg.model.num_channels,
                                seed=cfg.train.seed, rank=0, world_size=1)
    loader.set_state(state["ranks"][0]["loader"])
    batch = next(iter(loader))
    loader.close()
    assert list(batch["key"]) == keys
    from pipeline.data.device_feed import Normalize

    images = Normalize(cfg.data.mean, cfg.data.std, cfg.model.num_channels)(batch["image"])  # as the trainer does
    with torch.no_grad():
        logits = model(images).logits
    return F.cross_entropy(logits.float(), batch["label"], label_smoothing=cfg.train.label_smoothing).item()
