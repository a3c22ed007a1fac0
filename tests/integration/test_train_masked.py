"""mae and simmim trained as classification is: 2 ranks under torchrun in bf16 at every ZeRO stage
(through the guard of tests/integration/guarded_pretrain.py), exact resume after SIGUSR1, unlabeled shards, the
k-NN probe in the metrics, and train.init_from from a sharded ZeRO-3 run. The runs are shared
(masked_runs.py): each is made once per session."""
from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch

import guarded_pretrain
import masked_runs as runs
from checkpoint_runs import ledger_lines, train_rows
from conftest import metrics
from pipeline.checkpoint import read_marker
from pipeline.config import load_config
from pipeline.checkpoint.export import consolidated_state_dict
from pipeline.init_from import encoder_keys, load_encoder
from pipeline.model import ViTForImageClassification, ViTMAEForPreTraining, ViTModel


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "masked-runs"


def rows(out: Path) -> tuple[list[dict], list[dict]]:
    return metrics(out, "val_loss")


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    tag = out / "checkpoints" / f"step-{runs.STEPS}"
    return consolidated_state_dict(tag, int(read_marker(tag)["zero_stage"]))


@pytest.mark.parametrize(("objective", "stage"), runs.STAGE_RUNS, ids=[f"{o}-zero{s}" for o, s in runs.STAGE_RUNS])
def test_two_ranks_pretrain_at_every_zero_stage(base, digits_shards, objective, stage):
    job = runs.stage_run(base, digits_shards, objective, stage)
    assert job.returncode == 0, job.log[-3000:]
    out = job.out
    assert (out / "exit_status").read_text().strip() == "0"
    # the probe's gathers and every reduce got device tensors; masks drawn on the device from a
    # generator seeded on the host: our step never waits for the device
    assert guarded_pretrain.findings(out) == []
    train, val = rows(out)
    assert [r["step"] for r in train] == list(range(1, runs.STEPS + 1))
    losses = [r["loss"] for r in train]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.02, losses
    assert train[-1]["mfu"] > 0 and train[-1]["data_skipped"] == 0
    assert [r["step"] for r in val] == [runs.EVAL_EVERY, runs.STEPS]
    assert all(math.isfinite(r["val_loss"]) and r["val_samples"] == 179 + ((objective, stage) == runs.UNLABELED)
               for r in val)
    if (objective, stage) == runs.UNLABELED:
        assert all("val_knn_top1" not in r for r in val)  # no labels, no k-NN figure
        assert "the validation shards carry no labels (.cls); no k-NN figure" in job.log
    else:
        assert all(0 < r["val_knn_top1"] <= 1 for r in val)
    marker = read_marker(out / "checkpoints" / f"step-{runs.STEPS}")
    assert marker["task"] == objective
    assert any((out / "tensorboard").iterdir())


def test_unlabeled_shards_are_not_bad_data(base, digits_shards):
    job = runs.stage_run(base, digits_shards, *runs.UNLABELED)
    assert job.returncode == 0, job.log[-3000:]
    manifest = json.loads((runs.unlabeled_shards(base) / "manifest.json").read_text())
    assert manifest["labeled"] is False
    assert "bad sample" not in job.log and "missing label" not in job.log
    train, _ = rows(job.out)
    assert train[-1]["data_skipped"] == 0
    # every step of every rank got a full batch of distinct samples
    for rank in (0, 1):
        lines = ledger_lines(job.out, rank)
        assert [line["step"] for line in lines] == list(range(1, runs.STEPS + 1))
        keys = [k for line in lines for k in line["keys"]]
        assert len(keys) == len(set(keys)) == runs.STEPS * 16


@pytest.mark.parametrize("objective", ["mae", "simmim"])
def test_resume_after_sigusr1_is_bitwise_exact(base, digits_shards, objective):
    """SIGUSR1 to torchrun itself (which torchrun does not forward, and dies of): its ranks take
    their parent's death as a SIGTERM, save at the next step and leave 75 in exit_status."""
    pair = runs.preempted_pair(base, digits_shards, objective)
    assert pair.full.returncode == 0 and pair.second.returncode == 0, pair.second.log[-3000:]
    # `timeout` says 124 when its time ran out; torchrun killed by SIGUSR1 says -SIGUSR1
    assert pair.first.returncode == (124 if pair.how.startswith("timeout") else -signal.SIGUSR1), pair.how
    assert pair.exit_status == "75", pair.first.log[-3000:]
    stopped = pair.stopped_at
    assert 1 <= stopped < runs.STEPS, pair.first.log[-3000:]
    assert pair.first.log.count(f"stopped by SIGTERM at step {stopped}; checkpoint saved, exiting 75") == 2
    assert f"at step {stopped}" in pair.second.log and "resumed from" in pair.second.log
    full, resumed = pair.full.out, pair.second.out
    expected, got = train_rows(full), train_rows(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, runs.STEPS + 1))
    for step in expected:
        for key in ("loss", "grad_norm", "lr", "epoch"):
            assert got[step][key] == expected[step][key], (step, key)
    for rank in (0, 1):
        assert ledger_lines(resumed, rank) == ledger_lines(full, rank)
    weights = final_weights(full), final_weights(resumed)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert rows(full)[1] == rows(resumed)[1]  # validation loss and k-NN figure, at steps 8 and 16


def test_init_from_takes_exactly_the_encoder_of_a_zero3_run(base, digits_shards):
    """The simmim run started from the mae ZeRO-3 run's encoder; a classifier (fine-tuning) takes the
    same encoder, every tensor equal, from the sharded checkpoint."""
    (user, source), = runs.INIT_FROM.items()
    source, user = runs.stage_run(base, digits_shards, *source), runs.stage_run(base, digits_shards, *user)
    assert user.returncode == 0, user.log[-3000:]
    weights = final_weights(source.out)
    assert (f"train.init_from: {len(encoder_keys(weights))} encoder tensors from {source.out}/checkpoints/"
            f"step-{runs.STEPS} (mae, step {runs.STEPS}); newly initialised: decoder") in user.log
    cfg = load_config(source.out / "config.yaml")
    classifier = ViTForImageClassification(cfg.model)
    load_encoder(classifier, source.out)
    state = classifier.state_dict()
    assert set(encoder_keys(weights)) == set(encoder_keys(state))
    assert all(torch.equal(state[k], weights[k]) for k in encoder_keys(weights))
    # the same encoder as a bare ViTModel gives the MAE encoder's features on all tokens
    backbone = ViTModel(cfg.model, add_pooling_layer=False).eval()
    backbone.load_state_dict({k[4:]: v for k, v in encoder_keys(weights).items()})
    mae = ViTMAEForPreTraining(cfg.model).eval()
    mae.load_state_dict(weights)
    images = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(backbone(images).last_hidden_state[:, 0], mae.encoder_features(images)[0])
