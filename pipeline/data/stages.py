"""The stages of a worker's pipeline, as named picklable callables (no lambdas: workers may spawn).

A stage takes the iterator of the stage before it and returns a new one (webdataset's
convention), so ``webdataset.DataPipeline(stage1, stage2, ...)`` composes them. The order and
the reasons are in ``loader.py``; this module holds the pieces.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from itertools import islice

import torch
import webdataset as wds
from torch.utils.data import default_collate

from .batch_ring import BatchRing
from .partition import Segment, mix_seed
from .errors import DataError
from .prefetch import Piece, read_pieces
from .tar_reader import read_range
from .sources import IMAGE_EXTENSIONS
from .transforms import decode

log = logging.getLogger(__name__)

PAD_LABEL = -100  # the label of padding in eval batches: cross_entropy ignores it by default
NO_LABEL = -1  # labels="optional": the sample has no .cls
LABEL_MODES = ("required", "optional", "none")


class BadSample(Exception):
    """A sample that cannot be used; skipped and counted, never fatal by itself."""

    def __init__(self, key: str | None, reason: str, url: str | None = None):
        named = url is None or str(key).startswith(url)  # a lost sample's key is "<url>#<position>"
        super().__init__(f"{key}: {reason}" if named else f"{key} of shard {url}: {reason}")
        self.key, self.reason, self.url = key, reason, url


def seeded_shuffle(bufsize: int, seed: int):
    """webdataset's shuffle buffer, full before the first pick, with its own seeded generator."""
    return wds.shuffle(bufsize, initial=bufsize, rng=random.Random(seed))


def replayed_positions(length: int, consumed: int, bufsize: int, seed: int) -> set[int]:
    """Positions of a slice whose samples the first ``consumed`` shuffle outputs were.

    The shuffle's picks depend on the number of items only, never their content, so running it
    over position numbers reproduces the real run's order without reading a byte.
    """
    if consumed <= 0:
        return set()
    if consumed >= length:
        return set(range(length))
    return set(islice(seeded_shuffle(bufsize, seed)(iter(range(length))), consumed))


class SliceReader:
    """Source stage: one raw item per position of a slice (see ``tar_reader.read_range``); the
    next remote piece is opened while one is read (``prefetch.read_pieces``)."""

    def __init__(self, urls: list[str], offsets: tuple[int, ...], segments: list[Segment],
                 replayed: set[int] = frozenset()):
        self.urls, self.offsets, self.segments, self.replayed = urls, offsets, segments, replayed

    def __call__(self) -> Iterator[dict]:
        pieces, wanted = self.pieces()
        for index, position, item in read_pieces(pieces):
            if wanted[index] is None or position in wanted[index]:
                yield item

    def pieces(self) -> tuple[list[Piece], list[set[int] | None]]:
        """What the slice reads, one piece per run of segments, and the positions of each piece
        that belong to the slice (None: all of them)."""
        pieces, wanted, base = [], [], 0  # base: position of the run's first sample inside the slice
        for run in _shard_runs(self.segments):
            shard = run[0].shard
            if len(run) == 1:  # the common case: a segment to itself
                seg = run[0]
                skip = {seg.start + p - base for p in self.replayed if base <= p < base + len(seg)}
                pieces.append(Piece(self.urls[shard], seg.start, seg.stop, skip, self.offsets[shard]))
                wanted.append(None)
                base += len(seg)
                continue
            # Pieces of one shard with gaps between them (the rest of an epoch after an elastic
            # resume): one pass over the shard; the gaps are read as placeholders and dropped.
            keep, skip = set(), set()
            for seg in run:
                for p in range(seg.start, seg.stop):
                    keep.add(p)
                    if base in self.replayed:
                        skip.add(p)
                    base += 1
            first, last = run[0].start, run[-1].stop
            skip.update(p for p in range(first, last) if p not in keep)
            pieces.append(Piece(self.urls[shard], first, last, skip, self.offsets[shard]))
            wanted.append(keep)
        return pieces, wanted


def _shard_runs(segments: list[Segment]) -> Iterator[list[Segment]]:
    """Consecutive segments grouped while they read one shard forwards."""
    run: list[Segment] = []
    for seg in segments:
        if run and (seg.shard != run[-1].shard or seg.start < run[-1].stop):
            yield run
            run = []
        run.append(seg)
    if run:
        yield run


class Refill:
    """Pass the decoded stream through; if pulled beyond its end, borrow good samples that follow.

    Bad samples leave a slice short of its planned batches, and every rank must run the same
    number of steps, so the shortfall is filled (logged) with the samples that follow the slice:
    the rest of its last shard, then the next shards in the order given, around the dataset and
    again for as long as needed (beyond one round these are repeats). Only a full round without
    one good sample ends it, and then ``TrainBatches`` stops the run: no shard has a good sample.

    The borrowed items are numbered ``length + 1, length + 2, ...`` (raw items, good or bad), so
    a resume inside this phase skips ``consumed - length`` of them without decoding. Their
    failures belong to other slices and are not counted here. Clean data never gets here.
    """

    def __init__(self, reader: SliceReader, decode: DecodeSample, length: int, consumed: int, where: str,
                 counts: tuple[int, ...]):
        self.reader, self.decode, self.length, self.where = reader, decode, length, where
        self.skip = max(0, consumed - length)
        self.counts = counts  # samples per shard (the layout's, from the manifest)

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        yield from src
        log.warning("%s: bad samples left the slice short; borrowing the good samples that follow it "
                    "(repeats once around the dataset) for as long as needed", self.where)
        n, rounds = self.length, 0
        while True:
            rounds += 1
            good = 0
            for item in self.borrowed():
                n += 1
                if n <= self.length + self.skip:
                    good += 1  # not decoded again; a round with skipped items is no proof of "none good"
                    continue
                if "__bad__" in item:
                    continue
                item["__refill__"] = rounds
                try:
                    sample = self.decode(item)
                except BadSample:
                    continue
                good += 1
                sample["__n__"], sample["__key__"] = n, item["__key__"]
                yield sample
            if not good:
                return  # not one good sample in a whole round: TrainBatches names the problem
            log.warning("%s: borrowed once around the dataset; repeating from the slice's end", self.where)

    def borrowed(self) -> Iterator[dict]:
        """The raw items after the slice: its last shard's rest, then every shard once, wrapping."""
        urls, offsets, segments = self.reader.urls, self.reader.offsets, self.reader.segments
        if not segments:
            return
        last = segments[-1]
        order = [(last.shard + k) % len(urls) for k in range(len(urls) + 1)]
        for k, shard in enumerate(order):
            start = last.stop if k == 0 else 0
            stop = last.stop if k == len(urls) else self.counts[shard]
            # (not read_pieces: borrowing is for bad data only, and a prefetch here could read past what is used)
            yield from read_range(urls[shard], start, stop, first_id=offsets[shard])


class DropConsumed:
    """Number the items (``__n__``: items consumed up to this one) and drop the first ``consumed``.

    On a resume those are exactly the placeholders of ``replayed_positions``; anything else means
    the replay diverged, which is a bug, not bad data.
    """

    def __init__(self, consumed: int):
        self.consumed = consumed

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for n, item in enumerate(src, 1):
            if n <= self.consumed:
                if not ("__skip__" in item or "__bad__" in item):
                    raise RuntimeError(f"resume replay diverged at item {n} ({item.get('__key__')})")
                continue
            item["__n__"] = n
            yield item


class DecodeSample:
    """Raw sample -> {"image": uint8 (C, H, W), "label": int}; BadSample when it cannot be used.

    ``labels`` says what the task needs of ``.cls``: "required" (classification: a sample without
    one is bad data), "none" (masked-image pretraining: never read, no "label" in the output) or
    "optional" (a probe that uses labels where the shards have them: NO_LABEL where absent).
    With ``seed`` set, the augmentation of each sample is seeded by (seed, epoch, sample id), so
    it does not depend on which worker decodes it nor on where a resume started. Every image is
    checked for type, channels and size before it can reach collate. The bad samples of a
    slice's first pass are counted per shard (``take_bad_counts``).
    """

    def __init__(self, transform, num_channels: int, seed: int | None = None, epoch: int = 0,
                 labels: str = "required"):
        if labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
        self.transform, self.num_channels, self.seed, self.epoch = transform, num_channels, seed, epoch
        self.labels = labels
        size = tuple(getattr(transform, "size", ()))  # (height, width) the transform promises
        self.expected = (num_channels, *size) if size else None  # every image's shape
        self.bad_counts: dict[str, int] = {}

    def take_bad_counts(self) -> dict[str, int]:
        counts, self.bad_counts = self.bad_counts, {}
        return counts

    def __call__(self, sample: dict) -> dict:
        try:
            return self._decode(sample)
        except BadSample as error:
            if "__refill__" not in sample:  # a borrowed sample's failure is its own slice's
                url = error.url or "?"
                self.bad_counts[url] = self.bad_counts.get(url, 0) + 1
            raise

    def _decode(self, sample: dict) -> dict:
        key, url = sample.get("__key__"), sample.get("__url__")
        if "__bad__" in sample:
            raise BadSample(key, sample["__bad__"], url)
        if "__skip__" in sample:
            raise RuntimeError(f"placeholder {key} reached the decoder: resume replay is broken")
        label = self._label(sample, key, url)
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            raise BadSample(key, f"no image (one of {', '.join(IMAGE_EXTENSIONS)})", url)
        if self.seed is not None:
            parts = (self.seed, self.epoch, sample["__sid__"], sample.get("__refill__", 0))
            if "__copy__" in sample:  # data.aug_repeats: each copy of a sample is augmented on its own
                parts += ("copy", sample["__copy__"])
            torch.default_generator.manual_seed(mix_seed(*parts))
        try:
            image = self.transform(decode(sample[ext], self.num_channels))
        except Exception as error:
            raise BadSample(key, f"image does not decode ({type(error).__name__}: {error})", url) from None
        expected = self.expected
        if image.dtype != torch.uint8 or image.ndim != 3 or (expected and tuple(image.shape) != expected):
            raise BadSample(key, f"image came out {image.dtype} {tuple(image.shape)}, expected uint8 "
                                 f"{expected or '(C, H, W)'}", url)
        decoded = {"image": image, "__n__": sample.get("__n__", 0)}
        if label is not None:
            decoded["label"] = label
        return decoded

    def _label(self, sample: dict, key: str | None, url: str | None) -> int | None:
        if self.labels == "none":
            return None
        if "cls" not in sample:
            if self.labels == "optional":
                return NO_LABEL
            raise BadSample(key, "missing label ('.cls')", url)
        try:
            return int(sample["cls"])
        except ValueError:
            raise BadSample(key, f"label {bytes(sample['cls'][:20])!r} is not an integer", url) from None


class SkipBad:
    """webdataset error handler: skip BadSample (log rate-limited), re-raise anything else."""

    def __init__(self, where: str, interval_s: float = 30.0):
        self.where, self.interval_s = where, interval_s
        self.count, self.logged_at, self.unlogged = 0, float("-inf"), 0

    def __call__(self, error: Exception) -> bool:
        if not isinstance(error, BadSample):
            raise error
        self.count += 1
        now = time.monotonic()
        if self.count <= 5 or now - self.logged_at >= self.interval_s:
            more = f" (+{self.unlogged} more not shown)" if self.unlogged else ""
            log.warning("%s: skipping bad sample %s%s; %d skipped here so far", self.where, error, more,
                        self.count)
            self.logged_at, self.unlogged = now, 0
        else:
            self.unlogged += 1
        return True


class TrainBatches:
    """Exactly ``count`` batches of ``batch_size`` good samples, collated (uint8).

    ``skipped`` is the number of bad items of the slice's first pass (numbers up to ``length``)
    consumed since the previous batch; ``consumed`` (the number of the batch's last item) is what
    the loader's state needs to resume.
    """

    def __init__(self, batch_size: int, count: int, *, length: int, epoch: int, first_index: int, stride: int,
                 slot: int, consumed: int, where: str, ring: BatchRing | None = None, worker: int = 0,
                 labels: bool = True, take_bad_counts: Callable[[], dict[str, int]] | None = None):
        self.batch_size, self.count, self.length, self.epoch = batch_size, count, length, epoch
        self.first_index, self.stride, self.slot, self.consumed = first_index, stride, slot, consumed
        self.where, self.ring, self.worker = where, ring, worker
        self.labels = labels  # the samples carry "label" (DecodeSample's labels is not "none")
        # The stages pull lazily: once a batch is complete, the decoder has seen exactly the items
        # up to its last sample, so its per-shard bad counts are this batch's (DecodeSample.take_bad_counts).
        self.take_bad_counts = take_bad_counts or dict

    def collate(self, images: list[torch.Tensor]) -> dict:
        """The batch's images: stacked into a reusable shared buffer when one is free."""
        claim = self.ring.claim(self.worker) if self.ring is not None else None
        if claim is None:
            # default_collate stacks straight into (fresh) shared memory inside a worker
            return {"image": default_collate(images), "worker": self.worker}  # uint8: the loader normalizes
        slot, buffer = claim
        torch.stack(images, out=buffer)
        return {"ring_slot": slot, "worker": self.worker}

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        previous = self.consumed
        for k in range(self.count):
            samples = list(islice(src, self.batch_size))  # pulls exactly one batch, never more
            if len(samples) < self.batch_size:
                raise DataError(f"{self.where}: not one decodable sample in any shard for batch {k} of epoch "
                                f"{self.epoch}; every shard's samples are bad, see the warnings above")
            consumed = samples[-1]["__n__"]
            first_pass = sum(1 for s in samples if s["__n__"] <= self.length)
            skipped = min(consumed, self.length) - min(previous, self.length) - first_pass
            bad_shards = self.take_bad_counts()
            yield {
                **self.collate([s["image"] for s in samples]),
                # plain lists: a small tensor would cost a shared-memory file and a descriptor pass
                **({"label": [s["label"] for s in samples]} if self.labels else {}),  # the loader makes it a tensor
                "key": [s["__key__"] for s in samples],
                "epoch": self.epoch,
                "index": self.first_index + k * self.stride,  # batch number within the epoch
                "skipped": skipped,
                "bad_shards": bad_shards,  # {shard url: bad samples} among the skipped ones
                "slot": self.slot,
                "consumed": consumed,
            }
            previous = consumed


class EvalBatches:
    """``count`` batches of ``batch_size``; the slots after the last good sample are padding."""

    def __init__(self, batch_size: int, count: int, *, total: int, first_index: int, stride: int,
                 image_shape: tuple[int, int, int], labels: bool = True):
        self.batch_size, self.count, self.first_index, self.stride = batch_size, count, first_index, stride
        self.total = total  # items (good or bad) in the slice: the last batch accounts for all of them
        self.image_shape = image_shape
        self.labels = labels  # the samples carry "label" (DecodeSample's labels is not "none")

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        previous = 0
        for k in range(self.count):
            samples = list(islice(src, self.batch_size))
            # The last good sample tells how many items (good or bad) were consumed so far.
            consumed = samples[-1]["__n__"] if samples else previous
            if k == self.count - 1:
                consumed = self.total
            pad = self.batch_size - len(samples)
            images = [s["image"] for s in samples] + [torch.zeros(self.image_shape, dtype=torch.uint8)] * pad
            yield {
                "image": default_collate(images),  # uint8: the loader normalizes
                **({"label": [s["label"] for s in samples] + [PAD_LABEL] * pad} if self.labels else {}),  # lists
                "valid": [True] * len(samples) + [False] * pad,
                "key": [s["__key__"] for s in samples] + [""] * pad,
                "index": self.first_index + k * self.stride,
                "skipped": consumed - previous - len(samples),
            }
            previous = consumed

