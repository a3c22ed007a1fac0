"""Writing webdataset shards from an image folder or scikit-learn's digits, plus ``manifest.json``.

Each sample is ``<key>.<ext>`` (the source image bytes, untouched for JPEG/PNG/...),
``<key>.cls`` (the class index as text) and ``<key>.json`` (label, class name, source). Unlabeled
data (a folder of images without class subfolders, or ``unlabeled=True``: for masked-image
pretraining) has no ``.cls`` and no class in its ``.json``, and its manifest names no classes
(``"labeled": false``). Samples are split per class into train/val with a seeded generator,
shuffled across classes (a shard then holds every class, which the loader's shard-level shuffle
relies on) and cut into shards of ``shard_size``. Several processes write whole shards in
parallel; each shard appears under its final name only once complete, and the manifest (shard
names, sample counts, class names) is written last: a directory with a manifest is a complete
dataset.

A file that cannot be read (a dangling symlink, a loop, an I/O error) is left out and listed
in the manifest's ``dropped`` with the reason; with ``verify``, so is every image that does not
decode to something the loader can use, so that training never meets it.
"""
from __future__ import annotations

import json
import os
import random
import re
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from webdataset.writer import TarWriter

from .sources import IMAGE_EXTENSIONS, MANIFEST

DIGITS = "digits"
UNLABELED = -1  # Item.label of an image without a class


class ShardsError(ValueError):
    """A user's mistake in what to write (missing source, empty class, existing output)."""


@dataclass(frozen=True)
class Item:
    key: str
    label: int
    ext: str
    source: str  # file path, or "digits:<index>"
    pixels: bytes = b""  # digits only: 8x8 uint8 grey values, encoded as PNG by the writer


@dataclass
class ShardJob:
    name: str
    split: str
    items: list[Item] = field(default_factory=list)


def digits_items() -> tuple[list[str], list[Item]]:
    """scikit-learn's 1,797 handwritten 8x8 digits (shipped with the package: no download)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ShardsError("--source digits needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    items = []
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        grey = bytes(int(round(v * 255 / 16)) for v in image.reshape(-1))  # 0..16 -> 0..255
        items.append(Item("", int(label), "png", f"{DIGITS}:{index}", grey))
    return [str(d) for d in range(10)], items


def _images_under(folder: Path, label: int) -> tuple[list[Item], int]:
    """Every image under ``folder`` (any depth, sorted by path) and the number of other files."""
    items, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
            if ext not in IMAGE_EXTENSIONS:
                ignored += 1
                continue
            items.append(Item("", label, ext, os.path.join(dirpath, filename)))
    return items, ignored


def folder_items(root: Path, *, labeled: bool = True) -> tuple[list[str], list[Item]]:
    """ImageNet's layout, ``root/<class>/**/<image>`` (classes sorted by name). Without labels (no
    ``.cls``): every image under ``root`` at any depth, when ``labeled`` is false or when ``root``
    itself holds images or no subfolders (a class layout has only class folders at its top)."""
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    classes = sorted(p.name for p in entries if p.is_dir())
    top_images = any(p.is_file() and p.suffix[1:].lower() in IMAGE_EXTENSIONS for p in entries)
    if not labeled or not classes or top_images:
        items, ignored = _images_under(root, UNLABELED)
        if not items:
            raise ShardsError(f"source '{root}' holds no images ({', '.join(IMAGE_EXTENSIONS)}); expected "
                              "<source>/<class>/<image>, or images anywhere under it for unlabeled data")
        print(f"make_shards: {len(items)} images without labels (no .cls)", file=sys.stderr)
        classes = []
    else:
        items, ignored = [], 0
        for label, name in enumerate(classes):
            found, other = _images_under(root / name, label)
            if not found:
                raise ShardsError(f"class folder '{root / name}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            items.extend(found)
            ignored += other
    if ignored:
        print(f"make_shards: ignored {ignored} files that are not images", file=sys.stderr)
    return classes, items


def split_items(items: list[Item], val_fraction: float, seed: int) -> dict[str, list[Item]]:
    """Per-class seeded split, then a seeded shuffle across classes; keys name split and rank."""
    rng = random.Random(seed)
    by_class: dict[int, list[Item]] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    splits: dict[str, list[Item]] = {"train": [], "val": []}
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        n_val = round(len(members) * val_fraction)
        splits["val"].extend(members[:n_val])
        splits["train"].extend(members[n_val:])
    for name, members in splits.items():
        rng.shuffle(members)
        splits[name] = [Item(f"{name}-{i:07d}", m.label, m.ext, m.source, m.pixels) for i, m in enumerate(members)]
    return splits


def plan(splits: dict[str, list[Item]], shard_size: int) -> list[ShardJob]:
    jobs = []
    for split, members in splits.items():
        for number, start in enumerate(range(0, len(members), shard_size)):
            jobs.append(ShardJob(f"{split}-{number:06d}.tar", split, members[start:start + shard_size]))
    return jobs


def _image_bytes(item: Item) -> bytes:
    if not item.source.startswith(f"{DIGITS}:"):
        return Path(item.source).read_bytes()  # untouched
    import torch
    from torchvision.io import encode_png

    return encode_png(torch.frombuffer(bytearray(item.pixels), dtype=torch.uint8).view(1, 8, 8)).numpy().tobytes()


def _unusable(data: bytes) -> str | None:
    """Why the loader could not use these image bytes, or None (the loader's own decoder)."""
    from .transforms import decode

    try:
        decode(data, 3)
    except Exception as error:
        return f"does not decode ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
    return None


def write_shard(job: ShardJob, out_dir: str, classes: list[str], verify: bool = False
                ) -> tuple[str, int, list[dict]]:
    """Write one shard under a temporary name, then rename it; returns (name, samples, dropped)."""
    final = Path(out_dir) / job.name
    tmp = final.with_name(final.name + ".tmp")
    written, dropped = 0, []
    with open(tmp, "wb") as stream, TarWriter(stream, encoder=False, mtime=0) as writer:
        for item in job.items:
            try:
                data = _image_bytes(item)
            except OSError as error:  # dangling symlink, loop, permission, I/O error
                dropped.append({"source": item.source, "reason": f"cannot be read ({error.strerror or error})"})
                continue
            reason = _unusable(data) if verify else None
            if reason is not None:
                dropped.append({"source": item.source, "reason": reason})
                continue
            sample = {"__key__": item.key, item.ext: data}
            if item.label == UNLABELED:
                meta = {"source": item.source}
            else:
                meta = {"label": item.label, "class": classes[item.label], "source": item.source}
                sample["cls"] = str(item.label).encode()
            writer.write({**sample, "json": json.dumps(meta).encode()})
            written += 1
    os.replace(tmp, final)
    return job.name, written, dropped


def _index(path: Path) -> dict:
    from .tar_reader import sample_offsets

    offsets, size = sample_offsets(str(path))
    return {"bytes": size, "offsets": offsets}


def write_shards(source: str, out: str | Path, *, shard_size: int = 1000, val_fraction: float = 0.1,
                 workers: int = 1, seed: int = 0, overwrite: bool = False, verify: bool = False,
                 unlabeled: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
    """Write train/val shards of ``source`` (a folder or ``digits``) into ``out``; return the manifest.

    ``unlabeled`` writes no labels (no ``.cls``) even where the source has classes.

    ``verify`` decodes every image as the loader will and leaves out those it cannot use. The
    manifest's ``dropped`` lists what was left out, by source path, with the reason.
    ``progress(done, total)`` is called as shards complete (samples done so far, all samples).
    """
    if shard_size < 1:
        raise ShardsError(f"--shard-size must be >= 1, got {shard_size}")
    if not 0 <= val_fraction < 1:
        raise ShardsError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise ShardsError(f"--workers must be >= 1, got {workers}")
    out = Path(out)
    if source == DIGITS:
        classes, items = digits_items()
        if unlabeled:
            classes, items = [], [Item(i.key, UNLABELED, i.ext, i.source, i.pixels) for i in items]
    else:
        root = Path(source)
        if not root.is_dir():
            raise ShardsError(f"source '{source}' is not a directory (or the word '{DIGITS}')")
        classes, items = folder_items(root, labeled=not unlabeled)
    if (out / MANIFEST).exists() and not overwrite:
        raise ShardsError(f"'{out}' already holds a dataset ({MANIFEST}); pass --overwrite or another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way, a read-only disk
        raise ShardsError(f"cannot create the output directory '{out}': {error.strerror or error}") from None
    for stale in [*out.glob("train-*.tar"), *out.glob("val-*.tar"), out / MANIFEST]:
        stale.unlink(missing_ok=True)

    jobs = plan(split_items(items, val_fraction, seed), shard_size)
    counts, dropped, done = {}, {}, 0
    if workers == 1:
        results = (write_shard(job, str(out), classes, verify) for job in jobs)
        for name, n, lost in results:
            counts[name], dropped[name], done = n, lost, done + n + len(lost)
            if progress:
                progress(done, len(items))
    else:
        # spawn: the parent may hold threads (torch); workers import only what they need
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(write_shard, job, str(out), classes, verify) for job in jobs]
            for future in as_completed(futures):
                name, n, lost = future.result()
                counts[name], dropped[name], done = n, lost, done + n + len(lost)
                if progress:
                    progress(done, len(items))
    if not sum(counts.values()):
        first = next(entry for job in jobs for entry in dropped[job.name])
        raise ShardsError(f"none of the {len(items)} images of '{source}' could be used; the first, "
                          f"{first['source']}, {first['reason']}")

    manifest = {
        "version": 1,
        "source": source,
        "seed": seed,
        "val_fraction": val_fraction,
        "shard_size": shard_size,
        "classes": classes,
        "labeled": bool(classes),  # false: no sample has a .cls (masked-image pretraining only)
        "splits": {},
        # bytes and offsets (each sample's first header): remote readers request only what they read
        "shards": [{"name": job.name, "split": job.split, "num_samples": counts[job.name],
                    **_index(out / job.name)} for job in jobs],
        "dropped": [entry for job in jobs for entry in dropped[job.name]],  # in shard order
    }
    for split in ("train", "val"):
        names = [job.name for job in jobs if job.split == split]
        if names:
            manifest["splits"][split] = {
                "num_samples": sum(counts[n] for n in names), "num_shards": len(names),
                "pattern": f"{split}-{{000000..{len(names) - 1:06d}}}.tar"}
    tmp = out / (MANIFEST + ".tmp")
    text = json.dumps(manifest, indent=1)  # readable, with each shard's offsets on one line:
    text = re.sub(r'"offsets": \[[\d,\s]*\]', lambda m: re.sub(r"\s+", "", m.group(0)).replace(":", ": "), text)
    tmp.write_text(text + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def _store_io():
    from .remote import IoOptions

    return IoOptions(aws_env=tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))


def check_destination(url: str, *, overwrite: bool = False) -> None:
    """Refuse an ``s3://`` destination that already holds a dataset (before anything is written)."""
    from .errors import DataError
    from .remote import exists

    try:
        if exists(f"{url.rstrip('/')}/{MANIFEST}", _store_io()) and not overwrite:
            raise ShardsError(f"'{url}' already holds a dataset ({MANIFEST}); pass --overwrite or another --out")
    except DataError as error:
        raise ShardsError(str(error)) from None


def publish(local: Path, url: str) -> None:
    """Upload a dataset written by ``write_shards`` to ``s3://bucket/prefix``: the shards first, the
    manifest last (as on disk, a prefix with a manifest is a complete dataset)."""
    from .errors import DataError
    from .remote import upload_file

    io, base = _store_io(), url.rstrip("/")
    try:
        for name in sorted(p.name for p in local.iterdir() if p.suffix == ".tar"):
            upload_file(str(local / name), f"{base}/{name}", io)
        upload_file(str(local / MANIFEST), f"{base}/{MANIFEST}", io)
    except DataError as error:
        raise ShardsError(str(error)) from None
