"""The EMA of the weights (pipeline/distributed/ema.py) against timm's ModelEmaV3, its reference,
on one rank through the real DeepSpeed engine (ZeRO-0) and the trainer's own TrainStep."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY
from pipeline.config import load_config
from pipeline.distributed.ema import WeightEma, build_ema, decay_at
from pipeline.distributed.engine import build_engine
from pipeline.model import build_model
from pipeline.tasks import ClassificationTask
from pipeline.train_step import TrainStep

import timm.utils.model_ema as timm_ema  # noqa: E402  (the reference; a test dependency)


@pytest.mark.parametrize("warmup", [False, True])
def test_decay_is_timms_at_every_step(warmup):
    reference = timm_ema.ModelEmaV3(torch.nn.Linear(1, 1), decay=0.9999, use_warmup=warmup)
    for step in [0, 1, 2, 3, 10, 100, 10**4, 10**6, 10**8]:
        assert decay_at(step, 0.9999, warmup=warmup) == reference.get_decay(step), step


def test_ema_over_20_steps_is_timms_bitwise_and_skips_a_skipped_step(one_rank_group):
    """Two averages of one run, without and with warmup: the first updated by TrainStep, the
    second after it, each against ModelEmaV3 fed the same weights after every step."""
    cfg = load_config(None, [*TINY, "data.train_shards=unused.tar", "train.precision=fp32", "train.zero_stage=0",
                             "train.ema_decay=0.9", "data.batch_size=4"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    plain = copy.deepcopy(model)
    engine = build_engine(model, cfg, world_size=1)
    emas = {False: build_ema(engine, cfg.train), True: WeightEma(engine, decay=0.9, warmup=True)}
    references = {warmup: timm_ema.ModelEmaV3(plain, decay=0.9, use_warmup=warmup) for warmup in emas}
    step = TrainStep(engine, ClassificationTask(), cfg, torch.device("cpu"), ema=emas[False])
    g = torch.Generator().manual_seed(1)
    for number in range(1, 21):
        images = torch.randn(4, 1, 16, 16, generator=g)
        if number == 5:  # non-finite: fused AdamW skips it on the device, and so does the EMA
            images[0] = float("nan")
        before = [p.detach().clone() for p in engine.module.parameters()]
        step.run([{"image": images, "label": torch.randint(0, 10, (4,), generator=g)}])
        emas[True].update(engine.global_steps)
        if number == 5:
            assert all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
            continue
        plain.load_state_dict(engine.module.state_dict())  # the same weights sequence
        for warmup, reference in references.items():
            reference.update(plain, step=number)
    for warmup, ema in emas.items():
        expected, averaged = references[warmup].module.state_dict(), ema.gathered()
        assert averaged.keys() == expected.keys()
        assert all(torch.equal(averaged[k], expected[k]) for k in expected), warmup
        assert not all(torch.equal(averaged[k], v) for k, v in engine.module.state_dict().items())  # it averaged


def test_eval_under_the_average_then_training_goes_on_bitwise(one_rank_group):
    cfg = load_config(None, [*TINY, "data.train_shards=unused.tar", "train.precision=fp32", "train.zero_stage=0",
                             "train.ema_decay=0.5"])
    torch.manual_seed(0)
    engine = build_engine(build_model(cfg.model), cfg, world_size=1)
    ema = build_ema(engine, cfg.train)
    step = TrainStep(engine, ClassificationTask(), cfg, torch.device("cpu"), ema=ema)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        step.run([{"image": torch.randn(8, 1, 16, 16, generator=g), "label": torch.randint(0, 10, (8,), generator=g)}])
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    averaged = ema.gathered()
    with ema.in_model():
        assert all(torch.equal(v, averaged[k]) for k, v in engine.module.state_dict().items())
    assert all(torch.equal(v, weights[k]) for k, v in engine.module.state_dict().items())
    assert all(torch.equal(v, averaged[k]) for k, v in ema.gathered().items())
