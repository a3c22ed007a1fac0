"""Exact resume (2 ranks, ZeRO-2 and ZeRO-3, fp32, bitwise, DeiT's recipe) after a preemption signal,
and at ZeRO-3 after a SIGKILL, a save killed half-way and then a SIGUSR1; and elastic resume: a run stopped mid-epoch goes on with that
epoch on 1 and on 3 ranks, and 2 -> 1 -> 2 ranks inside one epoch, through DeepSpeed's
universal checkpoints, every sample of the interrupted epoch trained once (the ledgers). Real torchrun jobs, shared with the other checkpoint tests (checkpoint_runs)."""
from __future__ import annotations

import json
import re
import shutil
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


def test_zero3_deit_resume_after_sigkill_a_killed_save_and_sigusr1_is_bitwise_exact(base, digits_shards, tmp_path):
    """ZeRO-3 with DeiT's whole recipe: kill -9, a rerun that finds half-written saves, is stopped by
    SIGUSR1, and a last rerun: the same training as the uninterrupted run, bitwise."""
    pair = runs.killed_pair(base, digits_shards, stage=3)
    notes = pair.notes
    stopped = notes["stopped"]  # the rerun after the kill
    assert pair.first.returncode == -9 and pair.second.returncode == 0, pair.second.log[-3000:]
    assert notes["killed_at"] > notes["resumed_from"] == runs.EVERY  # steps after the checkpoint were lost...
    assert f"resumed from {pair.interrupted}/checkpoints/step-{runs.EVERY} at step {runs.EVERY}" in stopped.log
    # ...and redone; the partial directories were never loaded, and are gone or rewritten.
    assert f"replacing incomplete checkpoint {notes['partial_newer'].name}" in stopped.log
    assert f"removing incomplete checkpoint {notes['partial_older'].name}" in stopped.log
    assert notes["exit_status"] == "75", stopped.log[-3000:]
    (stop,) = {int(s) for s in re.findall(r"stopped by SIGUSR1 at step (\d+)", stopped.log)}
    assert 2 * runs.EVERY < stop < runs.STEPS
    assert f"resumed from {pair.interrupted}/checkpoints/step-{stop} at step {stop}" in pair.second.log
    root = pair.interrupted / "checkpoints"
    assert not notes["partial_older"].exists()
    assert all((p / COMPLETE).is_file() for p in root.glob("step-*"))
    assert_same_training(pair.full, pair.interrupted, tmp_path)


def keys_by_epoch(parts: list[tuple[Path, int, int]]) -> dict[int, list[str]]:
    """The keys every rank trained, per epoch, over runs given as (output dir, first step, last step):
    the ledgers say which keys each step took, the metrics rows in which epoch."""
    found: dict[int, list[str]] = {}
    for out, first, last in parts:
        rows = runs.train_rows(out)
        for path in sorted((out / "ledger").glob("rank*.jsonl")):
            for line in map(json.loads, path.read_text().splitlines()):
                if first <= line["step"] <= last:
                    found.setdefault(rows[line["step"]]["epoch"], []).extend(line["keys"])
    return found


def train_samples(shards: Path, count: int | None = None) -> int:
    """Samples in the first ``count`` train shards (all of them by default), from the manifest."""
    train = [s for s in json.loads((shards / "manifest.json").read_text())["shards"] if s["split"] == "train"]
    return sum(s["num_samples"] for s in train[:count])


def assert_exactly_once(epochs: dict[int, list[str]], samples: int, left_out: int, last_global_batch: int) -> None:
    """Epoch 0 (interrupted, resumed elsewhere): every sample once but the logged few left out at
    its end; epoch 1: complete, as any epoch."""
    assert sorted(epochs) == [0, 1]
    assert len(epochs[0]) == len(set(epochs[0])) == samples - left_out and left_out < last_global_batch
    assert len(epochs[1]) == len(set(epochs[1])) == samples - samples % last_global_batch


def test_a_run_stopped_mid_epoch_goes_on_with_that_epoch_on_1_and_on_3_ranks(base, digits_shards):
    """ZeRO-2: stopped by SIGUSR1 on 2 ranks; resumed (universal checkpoint) on 1 rank with twice the
    micro-batch (the same global batch) and on 3 ranks (global batch 32 -> 48), each to the end of
    the following epoch. The ledgers show the interrupted epoch's samples exactly once."""
    source, stop = runs.stopped_run(base, digits_shards, stage=2)
    samples, trained = train_samples(digits_shards, runs.ELASTIC_SHARDS), stop * 32
    assert 3 <= stop < samples // 32  # stopped inside epoch 0
    for nproc, batch in ((1, 32), (3, 16)):
        global_batch = nproc * batch
        rest = (samples - trained) // global_batch
        max_steps = stop + rest + samples // global_batch
        out = base / f"stopped-zero2-on-{nproc}"
        if nproc == 3:  # the 1-rank run's universal form of the same checkpoint serves (made once per checkpoint)
            shutil.copytree(base / "stopped-zero2-on-1" / "checkpoints" / f"step-{stop}_universal",
                            out / "checkpoints" / f"step-{stop}_universal")
        job = runs.run(nproc, out, [*runs.elastic_common(digits_shards, 2), f"data.batch_size={batch}",
                                    f"train.max_steps={max_steps}", f"checkpoint.resume={source}/checkpoints/step-{stop}"])
        assert job.returncode == 0, job.log[-3000:]
        left_out = samples - trained - rest * global_batch
        assert (f"epoch 0 goes on where it stopped: {trained} of its {samples} samples were trained") in job.log
        assert f"re-cut over {nproc} ranks x 1 workers: {rest} steps of {global_batch}, {left_out} left out" in job.log
        if global_batch != 32:
            assert f"the global batch changes from 32 to {global_batch} (2 -> {nproc} ranks" in job.log
        assert ("converted" in job.log) == (nproc == 1)
        rows = runs.train_rows(out)
        assert sorted(rows) == list(range(stop + 1, max_steps + 1))  # the step count goes on
        assert [rows[s]["epoch"] for s in (stop + 1, stop + rest, stop + rest + 1, max_steps)] == [0, 0, 1, 1]
        assert_exactly_once(keys_by_epoch([(source, 1, stop), (out, stop + 1, max_steps)]), samples, left_out,
                            global_batch)


def test_world_size_change_2_1_2_inside_one_epoch(base, digits_shards):
    """ZeRO-3: 2 ranks -> 1 rank (4 steps) -> 2 ranks (4 steps), all inside epoch 0: the second
    resume replays both earlier layouts, and no sample comes twice; DeepSpeed's universal
    checkpoints carry the weights (ZeRO-3 fp32: the optimizer's master is the weights' partition)."""
    stage = 3
    source = runs.uninterrupted(base, digits_shards, stage)  # 2 ranks, ended at step STEPS, mid-epoch 0
    out = base / f"resized-zero{stage}"
    steps, more, samples = runs.STEPS, 4, train_samples(digits_shards)
    one = runs.run(1, out, [*runs.common(digits_shards, stage), f"train.max_steps={steps + more}",
                            f"checkpoint.resume={source}/checkpoints/step-{steps}"])  # resume=PATH of another run
    assert one.returncode == 0, one.log[-3000:]
    assert f"resumed from {source}/checkpoints/step-{steps} at step {steps}" in one.log
    two = runs.run(2, out, [*runs.common(digits_shards, stage), f"train.max_steps={steps + 2 * more}"])
    assert two.returncode == 0, two.log[-3000:]

    # (job, old world size, new, checkpoint resumed, samples of epoch 0 trained before it)
    for job, old, new, tag, before in ((one, 2, 1, steps, steps * 32), (two, 1, 2, steps + more, steps * 32 + more * 16)):
        assert f"on a different world size ({old} -> {new}): converting through DeepSpeed's universal" in job.log
        assert re.search(rf"converted \S*/step-{tag} to DeepSpeed's "
                         rf"universal format in [\d.]+ s: {out}/checkpoints/step-\d+_universal", job.log)
        assert (f"world_size {old} -> {new} since the checkpoint; epoch 0 goes on where it stopped: {before} of its "
                f"{samples} samples were trained") in job.log
        # The EMA is not DeepSpeed's to convert: rebuilt from the old shards onto the new partitions.
        assert f"EMA of the weights rebuilt from step-{tag} ({old} ranks) onto {new} ranks" in job.log
        assert "holds no EMA" not in job.log
    rows = runs.train_rows(out)
    assert sorted(rows) == list(range(steps + 1, steps + 2 * more + 1))  # the step count continues
    assert {rows[s]["epoch"] for s in rows} == {0}
    assert [line["step"] for line in runs.ledger_lines(out, 0)] == list(range(steps + 1, steps + 2 * more + 1))
    assert [line["step"] for line in runs.ledger_lines(out, 1)] == list(range(steps + more + 1, steps + 2 * more + 1))
    epochs = keys_by_epoch([(source, 1, steps), (out, steps + 1, steps + 2 * more)])
    assert sorted(epochs) == [0]
    assert len(epochs[0]) == len(set(epochs[0])) == (steps + more) * 32 + more * 16  # no sample twice
    assert not (source / "checkpoints" / f"step-{steps}_universal").exists()  # nothing written into the source run

    # The 1-rank run's first step, recomputed here from the source's weights and the rest of epoch 0
    # re-cut for 1 rank: the universal checkpoint carried the weights over exactly.
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
    loader.set_state([r["loader"] for r in state["ranks"]])
    batch = next(iter(loader))
    loader.close()
    assert list(batch["key"]) == keys
    from pipeline.data.device_feed import Normalize

    images = Normalize(cfg.data.mean, cfg.data.std, cfg.model.num_channels)(batch["image"])  # as the trainer does
    with torch.no_grad():
        logits = model(images).logits
    return F.cross_entropy(logits.float(), batch["label"], label_smoothing=cfg.train.label_smoothing).item()
