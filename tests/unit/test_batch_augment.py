"""Mixup/cutmix and random erasing on the device, held to timm's Mixup and RandomErasing.

Our draws follow timm's call for call on generators of the same kind, so with the same seed the
lambdas, pairs and boxes are timm's: images and targets must come out equal, not just close.
"""
from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from timm.data import Mixup as TimmMixup
from timm.data.random_erasing import RandomErasing as TimmErasing
from timm.loss import SoftTargetCrossEntropy

from pipeline.config import Config, ConfigError, DataConfig, TrainConfig
from pipeline.model.losses import soft_target_loss
from pipeline.tasks import ClassificationTask
from pipeline.tasks.batch_augment import Mixup, RandomErase

CLASSES = 10


def _batch(seed: int, n: int = 8, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("mixup, cutmix, prob", [(0.8, 1.0, 1.0), (0.8, 0.0, 0.6), (0.0, 1.0, 0.6)])
def test_mixup_matches_timm_images_and_targets(mode, mixup, cutmix, prob):
    kinds = set()
    for seed in range(12):
        images, labels = _batch(seed)
        np.random.seed(seed)
        reference = TimmMixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=0.5, mode=mode,
                              label_smoothing=0.1, num_classes=CLASSES)
        want_images, want_targets = reference(images.clone(), labels)
        ours = Mixup(mixup=mixup, cutmix=cutmix, prob=prob, switch_prob=0.5, mode=mode, label_smoothing=0.1,
                     num_classes=CLASSES)
        got_images, got_targets = ours(images, labels, np.random.RandomState(seed))
        torch.testing.assert_close(got_images, want_images, rtol=0, atol=0)
        torch.testing.assert_close(got_targets, want_targets.float(), rtol=0, atol=0)
        assert torch.allclose(got_targets.sum(-1), torch.ones(len(labels)))
        changed = (got_images != images).flatten(1).any(-1)
        kinds.add(bool(changed.any()))
    assert any(kinds)  # some batches were mixed (and with prob < 1 the draws also left some alone)


def test_mixup_leaves_its_input_alone():
    images, labels = _batch(0)
    copy = images.clone()
    Mixup(mixup=0.8, cutmix=1.0, prob=1.0, switch_prob=0.5, mode="elem", label_smoothing=0.1,
          num_classes=CLASSES)(images, labels, np.random.RandomState(0))
    assert torch.equal(images, copy)  # the batch may be a reused buffer: mixing makes a new tensor


@pytest.mark.parametrize("count", [1, 3])
def test_const_erasing_matches_timm(count):
    for seed in range(6):
        images, _ = _batch(seed, n=16, size=24)
        random.seed(seed)
        want = TimmErasing(probability=0.5, mode="const", max_count=count, device="cpu")(images.clone())
        got = RandomErase(prob=0.5, mode="const", count=count)(images, random.Random(seed), None)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["pixel", "rand"])
def test_noise_erasing_has_timms_boxes_and_normal_fill(mode):
    images, _ = _batch(1, n=64, size=32)
    images = images.abs() + 10  # far from any N(0, 1) draw: an erased pixel is recognisable
    random.seed(3)
    want = TimmErasing(probability=0.5, mode=mode, device="cpu")(images.clone())
    got = RandomErase(prob=0.5, mode=mode, count=1)(images, random.Random(3), torch.Generator().manual_seed(0))
    assert torch.equal(got < 9, want < 9)  # the same boxes
    fill = got[got < 9]
    if mode == "pixel":  # normal noise per pixel
        assert fill.numel() > 1000 and abs(fill.mean().item()) < 0.1 and abs(fill.std().item() - 1) < 0.1
    else:  # one normal colour per box and channel
        for image in got:
            for plane in image:
                assert plane[plane < 9].unique().numel() <= 1
        assert fill.unique().numel() > 10


def test_erasing_statistics():
    """p, area and aspect of the boxes over many samples: timm's ranges (0.02-1/3 of the image, 0.3-3.3)."""
    p, height, width = 0.25, 64, 64
    boxes = RandomErase(prob=p, mode="const", count=1).draw(random.Random(0), 4000, height, width)[0]
    erased = boxes[:, 1] > boxes[:, 0]
    assert abs(erased.mean() - p) < 0.03
    h, w = (boxes[erased, 1] - boxes[erased, 0]), (boxes[erased, 3] - boxes[erased, 2])
    area = h * w / (height * width)
    assert area.min() >= 0.015 and area.max() <= 0.36 and 0.12 < area.mean() < 0.2  # U(0.02, 1/3) rounded
    aspect = np.log(h / w)
    assert aspect.min() >= math.log(0.3) - 0.15 and aspect.max() <= math.log(1 / 0.3) + 0.15
    assert abs(aspect.mean()) < 0.05  # log-uniform, symmetric


def test_soft_target_loss_matches_timm():
    logits, labels = torch.randn(8, CLASSES), torch.randint(0, CLASSES, (8,))
    targets = torch.softmax(torch.randn(8, CLASSES), -1)
    torch.testing.assert_close(soft_target_loss(logits, targets), SoftTargetCrossEntropy()(logits, targets))
    one_hot = torch.nn.functional.one_hot(labels, CLASSES).float()
    torch.testing.assert_close(soft_target_loss(logits, one_hot), torch.nn.functional.cross_entropy(logits, labels))


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 16 * 16, CLASSES)

    def forward(self, images):
        return SimpleNamespace(logits=self.fc(images.flatten(1)))


def test_task_mixes_per_batch_position_and_off_is_plain_cross_entropy():
    images, labels = _batch(0)
    model = _Linear()
    plain = ClassificationTask(label_smoothing=0.1, data=DataConfig(), num_labels=CLASSES)
    assert plain.augment is None
    batch = {"image": images, "label": labels, "epoch": 0, "index": 5}
    want = torch.nn.functional.cross_entropy(model(images).logits, labels, label_smoothing=0.1)
    assert torch.equal(plain.loss(model, batch), want)
    data = DataConfig(mixup=0.8, cutmix=1.0, reprob=0.25)
    mixing = ClassificationTask(label_smoothing=0.1, data=data, num_labels=CLASSES, seed=1)
    first = mixing.loss(model, batch)
    assert torch.equal(first, ClassificationTask(label_smoothing=0.1, data=data, num_labels=CLASSES,
                                                 seed=1).loss(model, batch))  # a resumed run mixes the same
    others = {mixing.loss(model, {**batch, "index": i}).item() for i in range(6, 12)}
    assert first.item() not in others and len(others) > 1


def test_odd_batch_and_unknown_modes_are_refused():
    with pytest.raises(ConfigError, match="data.batch_size=7 is odd"):
        DataConfig(batch_size=7, mixup=0.8)
    DataConfig(batch_size=7, reprob=0.25)  # erasing has no pairs
    with pytest.raises(ConfigError, match="data.mixup_mode 'rows' is unknown"):
        DataConfig(mixup=0.8, mixup_mode="rows")
    with pytest.raises(ConfigError, match="data.remode 'blue' is unknown"):
        DataConfig(reprob=0.2, remode="blue")
    with pytest.raises(ConfigError, match="data.auto_augment 'augmix-m5' is not a RandAugment spec"):
        DataConfig(auto_augment="augmix-m5")
    with pytest.raises(ConfigError, match="apply to labelled classification only"):
        Config(data=DataConfig(mixup=0.8), train=TrainConfig(objective="mae"))
