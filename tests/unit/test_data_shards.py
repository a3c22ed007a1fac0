"""make_shards: digits and an ImageFolder into webdataset shards + manifest, image bytes untouched."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.io import encode_jpeg, encode_png

from pipeline.config import DataConfig
from pipeline.data import build_eval_loader, build_train_loader
from pipeline.data.shards import write_shards

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launch"))
import make_shards  # noqa: E402


def read_samples(pattern: str) -> list[dict]:
    return list(wds.WebDataset(pattern, shardshuffle=False))


def test_digits_to_shards_and_back(tmp_path):
    manifest = write_shards("digits", tmp_path, shard_size=500, val_fraction=0.1, workers=1, seed=0)
    splits = manifest["splits"]
    assert splits["train"]["num_samples"] + splits["val"]["num_samples"] == 1797
    assert splits["train"]["num_shards"] == 4 and manifest["classes"] == [str(d) for d in range(10)]
    assert [s["num_samples"] for s in manifest["shards"] if s["split"] == "train"] == [500, 500, 500, 118]
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    sample = read_samples(str(tmp_path / "val-000000.tar"))[0]
    assert sorted(sample) == ["__key__", "__local_path__", "__url__", "cls", "json", "png"]
    assert json.loads(sample["json"])["label"] == int(sample["cls"])
    cfg = DataConfig(train_shards=str(tmp_path / splits["train"]["pattern"]), val_shards=str(tmp_path / "val-000000.tar"),
                     batch_size=32, num_workers=0, augment="shift", hflip=False, mean=[0.5], std=[0.5], crop_pct=1.0)
    loader = build_train_loader(cfg, image_size=16, num_channels=3, seed=0, rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["image"].shape == (32, 3, 16, 16)  # grayscale digits -> the model's 3 channels
    assert 0 <= int(batch["label"].min()) and int(batch["label"].max()) <= 9
    evals = list(build_eval_loader(cfg, image_size=16, num_channels=1, rank=0, world_size=1))
    assert sum(int(b["valid"].sum()) for b in evals) == splits["val"]["num_samples"]


def make_image_folder(root: Path) -> dict[str, bytes]:
    files = {}
    g = torch.Generator().manual_seed(0)
    for name in ("cat", "dog", "emu"):
        (root / name / "sub").mkdir(parents=True)
        for i in range(5):
            image = torch.randint(0, 256, (3, 20 + i, 30), dtype=torch.uint8, generator=g)
            if i % 2:
                path, data = root / name / f"img{i}.jpg", encode_jpeg(image, quality=90)
            else:
                path, data = root / name / "sub" / f"img{i}.png", encode_png(image)
            path.write_bytes(data.numpy().tobytes())
            files[str(path)] = path.read_bytes()
    (root / "cat" / "notes.txt").write_text("not an image")
    return files


def test_image_folder_with_two_writers_keeps_bytes(tmp_path):
    files = make_image_folder(tmp_path / "src")
    manifest = write_shards(str(tmp_path / "src"), tmp_path / "out", shard_size=4, val_fraction=0.2, workers=2)
    assert manifest["classes"] == ["cat", "dog", "emu"]
    assert manifest["splits"]["val"]["num_samples"] == 3  # one per class
    samples = read_samples(str(tmp_path / "out" / manifest["splits"]["train"]["pattern"]))
    samples += read_samples(str(tmp_path / "out" / manifest["splits"]["val"]["pattern"]))
    assert len(samples) == 15 == sum(s["num_samples"] for s in manifest["shards"])
    for sample in samples:
        meta = json.loads(sample["json"])
        ext = "jpg" if "jpg" in sample else "png"
        assert sample[ext] == files[meta["source"]]  # untouched
        assert manifest["classes"][int(sample["cls"])] == Path(meta["source"]).relative_to(tmp_path / "src").parts[0]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert make_shards.main(["--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("make_shards: error: source") and "\n" not in err
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    assert make_shards.main(["--source", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert make_shards.main(["--source", "digits", "--out", str(tmp_path / "d"), "--val-fraction", "1.5"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        make_shards.main(["--source", "digits"])  # --out missing: argparse's usage error
    assert exit_info.value.code == 2


def test_verify_lists_what_it_leaves_out_by_source_path(tmp_path, capsys):
    files = make_image_folder(tmp_path / "src")
    cat = tmp_path / "src" / "cat"
    (cat / "garbage.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (cat / "dangling.png").symlink_to(tmp_path / "gone.png")
    (cat / "loop.png").symlink_to(cat / "loop.png")  # unreadable even for root: ELOOP
    deep = Image.fromarray(np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16))
    deep.save(cat / "deep.png")  # 16-bit: kept, the loader converts it
    out = tmp_path / "out"
    assert make_shards.main(["--source", str(tmp_path / "src"), "--out", str(out), "--verify", "--quiet",
                             "--shard-size", "4"]) == 0
    err = capsys.readouterr().err
    assert f"  {cat / 'garbage.jpg'}: does not decode" in err
    assert f"  {cat / 'dangling.png'}: cannot be read (No such file or directory)" in err
    assert f"  {cat / 'loop.png'}: cannot be read (Too many levels of symbolic links)" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(d["source"] for d in manifest["dropped"]) == sorted(str(cat / n) for n in
                                                                     ("dangling.png", "garbage.jpg", "loop.png"))
    assert sum(s["num_samples"] for s in manifest["shards"]) == len(files) + 1  # the 16-bit image is in
    # Without --verify, unreadable files are still left out and listed; what decodes is not checked.
    assert make_shards.main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "plain"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "left out 2 images" in err and "dangling.png" in err and "garbage.jpg" not in err


def test_an_output_path_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    assert make_shards.main(["--source", "digits", "--out", str(tmp_path / "taken"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("make_shards: error: cannot create the output directory") and "\n" not in err
