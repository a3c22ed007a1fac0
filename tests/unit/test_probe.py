"""The k-NN probe: DINO's weighted vote on a case computed by hand, and the distributed probe (two
real processes over gloo, uneven parts, padding, unlabeled samples) equal to one process."""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchvision.io import encode_png
from webdataset.writer import TarWriter

from pipeline.config import load_config
from pipeline.data import build_eval_loader
from pipeline.data.device_feed import DeviceFeed, Normalize
from pipeline.probe import KnnProbe, build_probe, knn_predict
from pipeline.tasks import Task

BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [-1.0, 0.0]])  # cosines to (1, 0): 1, 0, 0.7071, -1
BANK_LABELS = torch.tensor([0, 1, 1, 0])


def test_weighted_vote_by_hand():
    """k=3 picks rows 0 (cos 1, class 0), 2 (cos 0.7071, class 1), 1 (cos 0, class 1). T=0.07: class 0
    gets e^(1/0.07) = 1.6e6, class 1 e^(0.7071/0.07) + e^0 = 2.4e4: class 0, though a plain majority
    says 1. T=1: class 0 gets e = 2.718, class 1 e^0.7071 + 1 = 3.028: class 1."""
    query = torch.tensor([[2.0, 0.0]])  # the length does not matter: cosine
    assert knn_predict(query, BANK, BANK_LABELS, k=3, temperature=0.07, num_classes=2).tolist() == [0]
    # a temperature so high that every neighbour weighs the same: the plain majority, class 1
    assert knn_predict(query, BANK, BANK_LABELS, k=3, temperature=1e6, num_classes=2).tolist() == [1]
    assert knn_predict(query, BANK, BANK_LABELS, k=3, temperature=1.0, num_classes=2).tolist() == [1]
    # k beyond the bank takes the whole bank: row 3 (cos -1) adds e^-1, and class 0's e + e^-1 = 3.086
    # beats class 1's 3.028.
    assert knn_predict(query, BANK, BANK_LABELS, k=50, temperature=1.0, num_classes=2).tolist() == [0]
    # k=1: the nearest row's class.
    queries = torch.tensor([[0.0, 5.0], [1.0, 0.9], [-1.0, 0.1]])
    assert knn_predict(queries, BANK, BANK_LABELS, k=1, temperature=0.07, num_classes=2).tolist() == [1, 1, 0]


class PixelTask(Task):
    """A task whose 'encoder features' are the pixels themselves: the probe's figure is then a plain
    function of the data, computable without any model."""

    name, has_features = "pixels", True

    def features(self, model, images):
        flat = images.flatten(1)
        return flat, -flat

    def build_model(self, model_cfg): ...
    def loss(self, model, batch): ...
    def eval_sums(self, model, batch): ...
    def eval_metrics(self, sums): ...
    def flops(self, model_cfg, batch_size): ...


def write_shards(root: Path) -> list[str]:
    """4x4 grey images whose class (0, 1, 2) is in their brightness pattern; val has 7 samples (one
    without a label), train 11 in two shards."""
    g = torch.Generator().manual_seed(0)
    names = []
    for name, count in (("val-000000.tar", 7), ("train-000000.tar", 6), ("train-000001.tar", 5)):
        with TarWriter(str(root / name), encoder=False, mtime=0) as writer:
            for i in range(count):
                label = (i * 7 + count) % 3
                image = torch.randint(0, 200, (1, 4, 4), dtype=torch.uint8, generator=g)
                image[0, label] += 50  # a brighter row per class, in noise
                sample = {"__key__": f"{name[:-4]}-{i}", "png": encode_png(image).numpy().tobytes()}
                if not (name.startswith("val") and i == 3):
                    sample["cls"] = str(label).encode()
                writer.write(sample)
        names.append(str(root / name))
    return names


def config(root: Path, k: int):
    """The probe's config on the shards ``write_shards(root)`` wrote (ranks only read them: a rank
    that rewrote them while the other read them made the other read an empty file)."""
    names = [str(root / name) for name in ("val-000000.tar", "train-000000.tar", "train-000001.tar")]
    return load_config(None, ["model.size=tiny", "model.image_size=4", "model.patch_size=2", "model.num_channels=1",
                              "train.objective=mae", "train.precision=fp32", "data.num_workers=0",
                              "data.batch_size=2", "data.augment=none", "data.crop_pct=1.0", "data.mean=[0.5]",
                              "data.std=[0.5]", f"data.val_shards=[{names[0]}]",
                              f"data.train_shards=[{names[1]},{names[2]}]", f"probe.k={k}", "probe.bank_size=9",
                              "probe.features=mean"])


def _rank(rank: int, root: str, port: int, ks: tuple[int, ...]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for k in ks:  # one pair of processes for every k (each start imports torch: ~6 s of CPU)
            cfg, device = config(Path(root), k), torch.device("cpu")
            probe = build_probe(cfg, PixelTask(), _Env(rank), device=device, normalize=Normalize([0.5], [0.5], 1))
            val = build_eval_loader(cfg.data, image_size=4, num_channels=1, rank=rank, world_size=2, sample_keys=())
            probe.begin()
            for batch in DeviceFeed(iter(val), device=device, dtype=torch.float32, normalize=probe.normalize):
                probe.collect(None, batch)
            result = probe.finish(None)
            Path(root, f"rank{rank}-k{k}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


class _Env:
    def __init__(self, rank: int):
        self.rank, self.world_size = rank, 2


KS = (1, 3)


@pytest.fixture(scope="module")
def two_rank_probe(tmp_path_factory) -> Path:
    """Both ranks' probe figures for every k of KS, on the shards of ``write_shards``."""
    root = tmp_path_factory.mktemp("probe")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_shards(root)
    mp.start_processes(_rank, args=(str(root), port, KS), nprocs=2, start_method="spawn")
    return root


@pytest.mark.parametrize("k", KS)
def test_two_ranks_give_the_one_process_figure(two_rank_probe, k):
    results = [json.loads((two_rank_probe / f"rank{r}-k{k}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1]

    # The same figure from every sample at once: features and labels read in one process.
    cfg, norm = config(two_rank_probe, k), Normalize([0.5], [0.5], 1)

    def everything(split: str, limit: int | None = None):
        loader = build_eval_loader(cfg.data, image_size=4, num_channels=1, rank=0, world_size=1, sample_keys=(),
                                   split=split, max_samples=limit)
        batches = list(loader)
        images = norm(torch.cat([b["image"] for b in batches]))
        labels, valid = torch.cat([b["label"] for b in batches]), torch.cat([b["valid"] for b in batches])
        keep = valid & (labels >= 0)
        return -images.flatten(1)[keep], labels[keep]

    queries, labels = everything("val")
    bank, bank_labels = everything("train", 9)
    assert len(queries) == 6 and len(bank) == 9  # the unlabeled one is left out; the bank is capped
    predicted = knn_predict(queries, bank, bank_labels, k=k, temperature=0.07, num_classes=3)
    assert results[0]["val_knn_top1"] == pytest.approx((predicted == labels).float().mean().item())


def test_the_plot_draws_the_reconstruction_loss_and_the_knn_curve():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))
    import plot

    rows = [{"step": s, "loss": 0.6 - s / 100, "samples_per_s": 300.0} for s in range(1, 9)]
    rows += [{"step": 4, "val_loss": 0.5, "val_samples": 179, "val_knn_top1": 0.41},
             {"step": 8, "val_loss": 0.4, "val_samples": 179, "val_knn_top1": 0.55}]
    figure = plot.draw(rows)
    loss, accuracy, _ = figure.axes
    assert [line.get_label() for line in loss.lines] == ["train loss", "val loss"]
    (knn,) = accuracy.lines  # no top-1/top-5 in a pretraining run
    assert knn.get_label() == "k-NN top-1" and list(knn.get_ydata()) == [0.41, 0.55]
