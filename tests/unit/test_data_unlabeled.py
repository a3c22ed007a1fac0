"""Unlabeled shards (no .cls at all) for masked-image pretraining: make_shards writes them from a
folder without class subfolders or with --unlabeled, and the stream keeps every guarantee (each
sample once per epoch, exact resume, bad samples counted) without asking for labels."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from torchvision.io import encode_png
from webdataset.writer import TarWriter

from pipeline.data import DataError, build_eval_loader, build_train_loader
from test_data_stream import data_cfg, png, take

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launch"))
import make_shards  # noqa: E402
COUNTS = (9, 4, 13, 6)  # 32 samples


def write_unlabeled(root: Path, counts=COUNTS, labeled_shard: int | None = None, broken: str | None = None) -> str:
    """Shards with keys s<shard>-<pos> and no .cls, except in ``labeled_shard``; ``broken``: a key
    whose image does not decode."""
    root.mkdir(parents=True, exist_ok=True)
    index = 0
    for shard, count in enumerate(counts):
        with TarWriter(str(root / f"train-{shard:06d}.tar"), encoder=False, mtime=0) as writer:
            for pos in range(count):
                key = f"s{shard}-{pos:03d}"
                sample = {"__key__": key, "png": b"not a png" if key == broken else png(index)}
                if shard == labeled_shard:
                    sample["cls"] = str(pos % 3).encode()
                writer.write(sample)
                index += 1
    shards = [{"name": f"train-{i:06d}.tar", "split": "train", "num_samples": c} for i, c in enumerate(counts)]
    (root / "manifest.json").write_text(json.dumps({"version": 1, "classes": [], "labeled": False, "shards": shards}))
    return str(root / f"train-{{000000..{len(counts) - 1:06d}}}.tar")


def loader(pattern: str, **kw):
    cfg = data_cfg(pattern, **{"max_bad_fraction": 0.0, "num_workers": 0, **kw})
    return build_train_loader(cfg, image_size=8, num_channels=1, seed=0, rank=0, world_size=1, sample_keys=())


def test_every_sample_once_per_epoch_no_label_no_bad_count(tmp_path):
    stream = loader(write_unlabeled(tmp_path), num_workers=2)  # the label mode travels to worker processes
    batches = take(stream, 16)  # two epochs of 8 batches of 4
    for epoch in (0, 1):
        keys = [k for b in batches if b["epoch"] == epoch for k in b["key"]]
        assert sorted(keys) == sorted(f"s{s}-{p:03d}" for s, c in enumerate(COUNTS) for p in range(c))
    assert all("label" not in b and b["skipped"] == 0 for b in batches)
    assert stream.state_dict()["bad"] == 0


@pytest.mark.parametrize("stop_at", [3, 11])
def test_resume_is_exact(tmp_path, stop_at):
    pattern = write_unlabeled(tmp_path)
    full = take(loader(pattern), 14)
    first = loader(pattern)
    head = take(first, stop_at)
    resumed = loader(pattern)
    resumed.set_state(json.loads(json.dumps(first.state_dict())))
    for a, b in zip(full, head + take(resumed, 14 - stop_at)):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


def test_bad_images_are_still_counted_and_a_cls_is_ignored(tmp_path):
    stream = loader(write_unlabeled(tmp_path, labeled_shard=1, broken="s2-004"), max_bad_fraction=1.0)
    batches = take(stream, 7)  # 31 good samples: 7 full batches, 3 left out of the epoch
    assert sum(b["skipped"] for b in batches) == 1 and "s2-004" not in [k for b in batches for k in b["key"]]
    assert all("label" not in b for b in batches)


def test_classification_still_refuses_unlabeled_samples(tmp_path):
    cfg = data_cfg(write_unlabeled(tmp_path), max_bad_fraction=0.0, num_workers=0)
    labeled = build_train_loader(cfg, image_size=8, num_channels=1, seed=0, rank=0, world_size=1)  # ("cls",)
    with pytest.raises(DataError, match="not one decodable sample in any shard"):  # each: "missing label ('.cls')"
        take(labeled, 1)


def test_evaluation_reads_the_labels_that_are_there(tmp_path):
    """mae/simmim evaluation: labels where a sample has one, -1 where not, -100 on padding (the probe's input)."""
    cfg = data_cfg(write_unlabeled(tmp_path, counts=(3, 4), labeled_shard=1), num_workers=0)
    cfg.val_shards = cfg.train_shards
    batches = list(build_eval_loader(cfg, image_size=8, num_channels=1, rank=0, world_size=1, sample_keys=()))
    assert torch.cat([b["label"] for b in batches]).tolist() == [-1, -1, -1, 0, 1, 2, 0, -100]


def test_the_probe_bank_is_the_first_samples_in_shard_order(tmp_path):
    cfg = data_cfg(write_unlabeled(tmp_path), num_workers=0, val_shards=None)
    keys = []
    for rank in (0, 1):
        bank = build_eval_loader(cfg, image_size=8, num_channels=1, rank=rank, world_size=2, sample_keys=(),
                                 split="train", max_samples=11)
        keys += [k for b in bank for k, v in zip(b["key"], b["valid"]) if v]
    assert keys == [f"s0-{p:03d}" for p in range(9)] + ["s1-000", "s1-001"]


def test_make_shards_from_a_folder_without_classes(tmp_path):
    source = tmp_path / "photos"
    (source / "2024" / "may").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(10):
        folder = source if i < 4 else source / "2024" / "may"
        image = torch.randint(0, 256, (3, 12, 10), dtype=torch.uint8, generator=g)
        (folder / f"img{i}.png").write_bytes(encode_png(image).numpy().tobytes())
    (source / "notes.txt").write_text("not an image")
    assert make_shards.main(["--source", str(source), "--out", str(tmp_path / "out"), "--val-fraction", "0.2",
                             "--quiet"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["classes"] == [] and manifest["labeled"] is False
    assert manifest["splits"]["train"]["num_samples"] == 8 and manifest["splits"]["val"]["num_samples"] == 2
    samples = list(wds.WebDataset(str(tmp_path / "out" / "train-000000.tar"), shardshuffle=False))
    samples += list(wds.WebDataset(str(tmp_path / "out" / "val-000000.tar"), shardshuffle=False))
    assert all("cls" not in s and "label" not in json.loads(s["json"]) for s in samples)
    sources = sorted(json.loads(s["json"])["source"] for s in samples)
    assert sources == sorted(str(p) for p in source.rglob("*.png"))
    assert all(s["png"] == Path(json.loads(s["json"])["source"]).read_bytes() for s in samples)  # bytes untouched


def test_unlabeled_flag_drops_the_classes(tmp_path):
    assert make_shards.main(["--source", "digits", "--out", str(tmp_path), "--unlabeled", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["classes"] == [] and manifest["labeled"] is False
    assert sum(s["num_samples"] for s in manifest["shards"]) == 1797
    sample = next(iter(wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False)))
    assert "cls" not in sample and sorted(json.loads(sample["json"])) == ["source"]
