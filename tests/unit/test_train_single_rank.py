"""Training mechanics on one rank, in this process, through the real DeepSpeed engine (gloo)."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import TINY, shard_overrides
from pipeline.config import load_config
from pipeline.distributed.engine import build_engine
from pipeline.model import build_model
from pipeline.tasks import ClassificationTask
from pipeline.train_step import TrainStep


def make_engine(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model)
    engine = build_engine(model, cfg, world_size=1)
    engine.train_cfg = cfg  # for train_steps: the trainer's own step needs the config
    return engine


def tiny_cfg(*overrides):
    return load_config(None, [*TINY, "data.train_shards=unused.tar", "train.precision=fp32", *overrides])


def fixed_batches(n, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 16, 16, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


def train_steps(engine, batches, micro_per_step):
    """Optimizer steps through the trainer's own TrainStep; the mean loss of each."""
    step = TrainStep(engine, ClassificationTask(), engine.train_cfg, torch.device("cpu"))
    dtype = engine.module.vit.embeddings.cls_token.dtype  # the trainer feeds images in the engine's dtype
    losses = []
    for start in range(0, len(batches), micro_per_step):
        micro = [{"image": images.to(dtype), "label": labels} for images, labels in batches[start:start + micro_per_step]]
        losses.append(step.run(micro).item())
    return losses


@pytest.mark.parametrize("stage", [0, 2])
def test_gradient_accumulation_equals_the_full_batch(one_rank_group, stage):
    # Adam divides by sqrt(v) + eps: at eps 1e-8 a gradient that is ~0 either way (summed in
    # another order) becomes a full +-lr step, so the weights differ by a rounding's sign. An eps
    # above those gradients keeps the comparison about accumulation, not about rounding.
    eps = "optim.eps=1e-4"
    full = make_engine(tiny_cfg(f"train.zero_stage={stage}", "data.batch_size=16", eps))
    half = make_engine(tiny_cfg(f"train.zero_stage={stage}", "data.batch_size=8", "train.grad_accum_steps=2", eps))
    big = fixed_batches(3, 16)
    small = [(x[i:i + 8], y[i:i + 8]) for x, y in big for i in (0, 8)]
    full_losses = train_steps(full, big, 1)
    half_losses = train_steps(half, small, 2)
    assert full_losses == pytest.approx(half_losses, abs=1e-5)
    for a, b in zip(full.module.parameters(), half.module.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_rank_zero0_skips_the_all_reduce_and_trains_the_same(one_rank_group, precision):
    """With one data-parallel rank the gradient all-reduce is an identity: skipped, bit for bit the same."""
    batches = fixed_batches(3, 8)
    skipping = make_engine(tiny_cfg("train.zero_stage=0", f"train.precision={precision}"))
    reducing = make_engine(tiny_cfg("train.zero_stage=0", f"train.precision={precision}"))
    assert skipping.enable_backward_allreduce is False
    reducing.enable_backward_allreduce = True  # DeepSpeed's own behaviour
    assert train_steps(skipping, batches, 1) == train_steps(reducing, batches, 1)
    for a, b in zip(skipping.module.parameters(), reducing.module.parameters()):
        assert torch.equal(a, b)
    assert make_engine(tiny_cfg("train.zero_stage=2")).enable_backward_allreduce  # ZeRO 1-3 keep their reduce


def test_zero3_fp32_weights_are_their_own_master_copy_and_train_the_same(one_rank_group):
    """DeepSpeed's ZeRO-3 means to update fp32 weights in place but compares a device with a string
    and keeps a second fp32 copy (pipeline/distributed/zero3_master.py): ours holds one, same steps."""
    from pipeline.distributed.engine import _initialize, build_deepspeed_config
    from pipeline.distributed.zero3_master import master_is_shared

    cfg = tiny_cfg("train.zero_stage=3")
    shared = make_engine(cfg)
    torch.manual_seed(0)
    copied = _initialize(build_model(cfg.model), cfg, build_deepspeed_config(cfg, 1))
    copied.train_cfg = cfg
    assert master_is_shared(shared.optimizer) and all(master_is_shared(shared.optimizer))
    assert not any(master_is_shared(copied.optimizer)), \
        "DeepSpeed now shares fp32 masters itself: pipeline/distributed/zero3_master.py can go"
    batches = fixed_batches(3, 8)
    assert train_steps(shared, batches, 1) == train_steps(copied, batches, 1)
    for a, b in zip(shared.optimizer.fp16_partitioned_groups_flat, copied.optimizer.fp16_partitioned_groups_flat):
        assert torch.equal(a, b)
    bf16 = make_engine(tiny_cfg("train.zero_stage=3", "train.precision=bf16"))
    assert not any(master_is_shared(bf16.optimizer))  # bf16 weights need their fp32 master


def test_activation_checkpointing_gives_the_same_losses(one_rank_group):
    batches = fixed_batches(4, 8)
    plain = train_steps(make_engine(tiny_cfg("model.activation_checkpointing=none")), batches, 1)
    every = train_steps(make_engine(tiny_cfg("model.activation_checkpointing=all")), batches, 1)
    assert plain == every  # same ops in the same order: recomputation changes nothing


@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_steps_are_never_applied_and_stop_the_run(one_rank_group, tmp_path, digits_shards, stage):
    """A non-finite loss is skipped on the device (ZeRO-0: fused AdamW's found_inf; ZeRO 1-3: DeepSpeed's
    own check), counted at the logging steps, and past train.max_nonfinite_steps stops the run."""
    from pipeline.errors import TrainingError
    from pipeline.trainer import Trainer

    cfg = load_config(None, [*TINY, *shard_overrides(digits_shards), f"train.output_dir={tmp_path}",
                             "train.max_steps=5", f"train.zero_stage={stage}", "train.precision=fp32",
                             "train.max_nonfinite_steps=2", "checkpoint.every_steps=1"])
    trainer = Trainer(cfg, one_rank_group)
    trainer.build()
    with torch.no_grad():
        trainer.engine.module.vit.embeddings.cls_token.fill_(float("nan"))
    before = {name: p.detach().clone() for name, p in trainer.engine.module.named_parameters()}
    with pytest.raises(TrainingError, match=r"non-finite loss in 1 of the 1 steps up to step 3 .*; 3 such steps"):
        trainer.run()
    after = dict(trainer.engine.module.named_parameters())
    changed = [name for name, value in before.items()  # bitwise, NaN included
               if not torch.equal(value.view(torch.int32), after[name].detach().view(torch.int32))]
    assert changed == []  # no update was applied, not even weight decay or AdamW's moments
    # Only steps 1 and 2 were saved (both skipped): nothing after the limit was.
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-1", "step-2"]


# bf16 with the gradient sums in fp32 (README, precision notes): ZeRO-1 becomes DeepSpeed's BF16_Optimizer.
FP32_GRADIENT_SUMS = ("train.precision=bf16", "train.grad_accum_steps=2", "deepspeed.data_types={grad_accum_dtype: fp32}")


@pytest.mark.parametrize("stage, overrides", [(0, ()), (2, ()), (3, ()),
                                              (1, FP32_GRADIENT_SUMS), (2, FP32_GRADIENT_SUMS), (3, FP32_GRADIENT_SUMS)])
def test_a_loaded_checkpoint_leaves_nothing_on_its_files(one_rank_group, tmp_path, stage, overrides):
    """Loads read through a mapping of the files (pipeline/checkpoint/read.py). Afterwards the engine
    holds what was saved, and no tensor still maps a checkpoint file: pruning one frees its disk."""
    from pathlib import Path

    from pipeline import checkpoint

    cfg = tiny_cfg(f"train.zero_stage={stage}", *overrides)
    micro = cfg.train.grad_accum_steps
    saved = make_engine(cfg)
    if overrides:
        assert saved.get_data_types() == (torch.bfloat16, torch.float32)  # bf16 weights, fp32 gradient sums
    train_steps(saved, fixed_batches(2 * micro, 8), micro)
    rng = torch.get_rng_state()
    marker = {"world_size": 1, "zero_stage": stage, "model": cfg.model.__dict__}
    tag_dir = checkpoint.save(saved, output_dir=tmp_path, step=2, client_state={"rng": rng}, marker_info=marker,
                              keep_last=1, rank=0)
    checkpoint.wait_for_prune()
    plan = checkpoint.plan_resume(tag_dir, model_config=cfg.model.__dict__, zero_stage=stage, world_size=1,
                                  shape_fields=ClassificationTask.shape_fields)

    loaded = make_engine(cfg)
    client_state = checkpoint.load(loaded, plan, output_dir=tmp_path)

    assert torch.equal(client_state["rng"], rng)
    maps = Path("/proc/self/maps").read_text()
    assert str(tag_dir) not in maps, [line for line in maps.splitlines() if str(tag_dir) in line]
    batches = fixed_batches(2 * micro, 8, seed=5)  # the same next steps: weights and optimizer state came back
    assert train_steps(loaded, batches, micro) == train_steps(saved, batches, micro)


def test_zero0_grad_norm_is_logged_on_every_row(one_rank_group, tmp_path, digits_shards):
    """ZeRO-0 computes the gradient norm on the device (it clips there); rows read it."""
    from conftest import metrics
    from pipeline.trainer import Trainer

    cfg = load_config(None, [*TINY, *shard_overrides(digits_shards), f"train.output_dir={tmp_path}",
                             "train.max_steps=5", "train.log_every=2", "train.zero_stage=0", "train.precision=fp32",
                             "train.eval_every=0", "train.progress_bar=false"])
    trainer = Trainer(cfg, one_rank_group)
    trainer.build()
    assert trainer.run() == 0
    rows, _ = metrics(tmp_path)
    assert [row["step"] for row in rows] == [2, 4, 5]
    assert all(row["grad_norm"] is not None and row["grad_norm"] > 0 for row in rows)


@pytest.mark.parametrize("stage", [2, 3])  # ZeRO-0: the run below
def test_layer_decay_scales_survive_deepspeed_and_set_the_updates(one_rank_group, stage):
    """DeepSpeed's own schedulers give every group one LR (DeepSpeed #7303); ours must keep each group's
    scale x schedule through the engine, and Adam's first update (|g| / sqrt(g^2) = 1, no weight decay)
    must move each group's weights by exactly its LR."""
    from pipeline.optim import WarmupCosine

    cfg = tiny_cfg(f"train.zero_stage={stage}", "optim.layer_decay=0.5", "optim.lr=1e-3", "optim.warmup_steps=2",
                   "optim.weight_decay=0", "optim.grad_clip=0", "train.max_steps=6")
    engine = make_engine(cfg)
    groups = engine.lr_scheduler.optimizer.param_groups
    depth = cfg.model.num_hidden_layers
    assert len(groups) == 2 * (depth + 2) and engine.lr_scheduler.optimizer is engine.basic_optimizer
    schedule = WarmupCosine(cfg.optim, 6)
    probe = {"vit.encoder.layer.0.intermediate.dense.weight": 0.5 ** depth, "classifier.weight": 1.0}
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters() if n in probe} if stage < 3 else {}
    for step, batch in enumerate(fixed_batches(3, 8)):
        lrs = [g["lr"] for g in groups]
        assert lrs == pytest.approx([1e-3 * g["lr_scale"] * schedule(step) for g in groups], rel=1e-12)
        train_steps(engine, [batch], 1)
        if step == 0 and stage < 3:  # ZeRO-3's module holds no weights between steps
            for name, param in engine.module.named_parameters():
                if name in probe:
                    moved = (param.detach() - before[name]).abs().max().item()
                    assert moved == pytest.approx(1e-3 * probe[name] * schedule(0), rel=1e-3), name
    assert float(engine.get_lr()[0]) == pytest.approx(1e-3 * schedule(3))  # the first group: scale 1, what logs show


def test_epochs_blr_layer_decay_and_drop_path_in_a_run(one_rank_group, tmp_path, digits_shards):
    """train.epochs and optim.blr resolved from the shards' counts, stored in config.yaml, and trained to."""
    import yaml

    from conftest import metrics
    from pipeline.trainer import Trainer

    shards = json.loads((digits_shards / "manifest.json").read_text())["shards"]
    train = [s for s in shards if s["name"].startswith("train")][:2]  # 400 samples: 4 steps of 100
    cfg = load_config(None, [*TINY, f"data.train_shards=[{','.join(str(digits_shards / s['name']) for s in train)}]",
                             f"train.output_dir={tmp_path}", "data.batch_size=100", "train.epochs=1",
                             "optim.warmup_epochs=0.5", "optim.lr=null", "optim.blr=1e-3", "optim.blr_batch=50", "optim.layer_decay=0.75", "model.drop_path_rate=0.1",
                             "train.log_every=1", "train.zero_stage=0", "train.precision=fp32",
                             "train.progress_bar=false"])
    trainer = Trainer(cfg, one_rank_group)
    trainer.build()
    assert trainer.run() == 0
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    per_epoch = sum(s["num_samples"] for s in train) // 100
    assert per_epoch == trainer.train_loader.layout.steps_per_epoch == 4  # the loader's own epoch
    assert saved["train"]["max_steps"] == trainer.cfg.train.max_steps == per_epoch
    assert saved["optim"]["warmup_steps"] == round(per_epoch / 2)
    assert saved["optim"]["lr"] == pytest.approx(1e-3 * 100 / 50)
    rows, _ = metrics(tmp_path)
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, per_epoch + 1))
    assert max(row["lr"] for row in rows if "lr" in row) == pytest.approx(2e-3)  # group 0: scale 1


@pytest.mark.parametrize("stage", [2, 3])
def test_async_saves_fall_back_to_synchronous_where_the_node_cannot_hold_the_staging(one_rank_group, stage,
                                                                                    monkeypatch, caplog):
    """checkpoint.async on a node whose available memory (MemAvailable) is below what staging needs:
    a warning naming both figures, and synchronous saves (no writer). With room: the writer, and
    the figure reported at start. The engine is DeepSpeed's, the decision the trainer's own."""
    import logging

    import torch.distributed as dist

    from pipeline import checkpoint
    from pipeline.checkpoint import background, staging

    engine = make_engine(tiny_cfg(f"train.zero_stage={stage}", "checkpoint.async=true"))
    need = staging.estimate_staging_bytes(engine, 1)
    assert need >= 4 * sum(p.numel() for p in build_model(tiny_cfg().model).parameters())  # fp32 master at least
    group = dist.new_group(backend="gloo")
    with caplog.at_level(logging.INFO, logger="pipeline.checkpoint"):
        just_too_small = int(need / background.STAGING_SHARE) - 1
        monkeypatch.setattr(background, "available_host_bytes", lambda: just_too_small)
        assert checkpoint.plan_background(engine, one_rank_group, group=group) is None
        assert "saving synchronously instead" in caplog.text and "available" in caplog.text
        caplog.clear()
        monkeypatch.setattr(background, "available_host_bytes", lambda: int(need / background.STAGING_SHARE) + 1)
        writer = checkpoint.plan_background(engine, one_rank_group, group=group)
    assert isinstance(writer, background.BackgroundWriter)
    assert "saves are staged in" in caplog.text and "synchronously" not in caplog.text


def test_a_store_that_gives_up_on_a_batch_fetched_ahead_stops_with_a_checkpoint(one_rank_group, tmp_path,
                                                                                digits_shards, caplog):
    """The store gives up on step 4's first batch. It is fetched after step 2, posted with step 2's
    flags and read after step 3 (not a logging step): step 3 trains on the batches held ahead, the
    feed keeps the failure of the batch it fetches ahead, and step 3 is saved with the loader
    state of what was trained; exit 75 and the store's one line."""
    from conftest import ledger
    from pipeline.data.errors import StoreUnavailable
    from pipeline.trainer import Trainer

    accum = 2
    cfg = load_config(None, [*TINY, *shard_overrides(digits_shards), f"train.output_dir={tmp_path}",
                             "train.max_steps=8", "train.log_every=4", f"train.grad_accum_steps={accum}",
                             "train.zero_stage=0", "train.precision=fp32", "checkpoint.every_steps=0",
                             "data.ledger=true"])
    trainer = Trainer(cfg, one_rank_group)
    trainer.build()
    loader, fails_at = trainer.train_loader, 3 * accum  # the batch numbered 6: step 4's first
    real = loader.host_batches

    def host_batches(**kw):
        for number, batch in enumerate(real(**kw)):
            if number == fails_at:
                raise StoreUnavailable("gave up reading shard 's3://b/train-000002.tar' at byte 4096 after 4 failed "
                                       "tries in 0.2 s (data.io_retries=3, data.io_timeout_s=60); last error: boom")
            yield batch

    loader.host_batches = host_batches
    with caplog.at_level("WARNING", logger="pipeline.trainer"):
        assert trainer.run() == 75
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-3"]
    assert (tmp_path / "checkpoints" / "step-3" / "COMPLETE").is_file()
    assert trainer.loader_state["batches"] == 3 * accum  # what was trained, not what was fetched
    assert [line["step"] for line in ledger(tmp_path, 0)] == [1, 2, 3]
    # The trainer's warnings only: records of the build before (the loader's INFO line) are captured too,
    # at whatever level an earlier test left the loggers.
    said = [r.getMessage() for r in caplog.records if r.name == "pipeline.trainer" and r.levelno >= logging.WARNING]
    assert "after step 2: the data store gave up on a batch fetched ahead" in said[0]
    assert said[1] == ("gave up reading shard 's3://b/train-000002.tar' at byte 4096 after 4 failed tries in 0.2 s "
                       "(data.io_retries=3, data.io_timeout_s=60); last error: boom; checkpoint saved at step 3, "
                       "exiting 75")
    assert len(said) == 2
