"""Training and evaluation loaders: webdataset shards -> exact, resumable batches per rank.

The training stream is a pure function of (seed, epoch, world size, workers); see
``partition.py`` for who reads what. Each DataLoader worker runs, per slice of an epoch:

    raw samples of the slice (tar headers, no decode) -> seeded shuffle buffer
    -> drop what a resume already consumed -> decode + augment (bad samples skipped and
    counted) -> repeats if bad samples left the slice short -> exact batches

Workers ship uint8 batches; the trainer normalizes them on its device (``device_feed.py``).
The DataLoader hands worker batches out round-robin and in order, so the loader's state is
just (epoch, batches consumed by this rank) plus, per slot, how many items it consumed (equal to
batches x batch size unless bad samples were skipped). Gathered over the ranks (a checkpoint
holds every rank's), these states say exactly which samples of the epoch were trained, so a
resume on another layout continues the epoch (``elastic.py``). Iterating a TrainLoader is
infinite: epochs follow each other without a pause; ``batch["epoch"]`` says where one begins.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import DataConfig

from .batch_ring import DATALOADER_PREFETCH, BatchRing
from .errors import DataError, StoreUnavailable
from .elastic import Continuation, Phase, RankCut, shuffle_seed
from .partition import Segment, TrainLayout, mix_seed
from .remote import IoOptions
from .repeats import RepeatReader, slot_picks
from .sources import Shard, resolve_shards
from .stages import (DecodeSample, DropConsumed, Refill, SkipBad, SliceReader, TrainBatches, replayed_positions,
                     seeded_shuffle)
from .transforms import check_channels, train_transform
from .worker import init_worker, private_generator, worker_context

log = logging.getLogger(__name__)

MIN_SAMPLES_FOR_BAD_CHECK = 1000  # below this many samples, bad fractions are too noisy to stop on


@dataclass(frozen=True)
class _Decoding:
    """What a worker needs to turn raw samples into batches (picklable)."""

    transform: object
    num_channels: int
    image_size: tuple[int, int]
    labels: str = "required"  # DecodeSample's: "required", "optional" or "none"


def _next(iterator: Iterator[dict]) -> dict:
    """next() that unwraps a DataError (or StoreUnavailable) from a worker into its own one-line message."""
    try:
        return next(iterator)
    except (DataError, StoreUnavailable) as error:
        text, name = str(error).strip(), type(error).__name__
        if text.startswith(f"Caught {name} in DataLoader worker"):
            raise type(error)(text.splitlines()[-1].split(f"{name}: ", 1)[-1]) from None
        raise


class TrainStream(IterableDataset):
    """One rank's infinite training stream, starting at (epoch, batches, consumed per slot).

    ``resumed``: after an elastic resume, what this rank reads of the rest of its first epoch
    (``elastic.RankCut``); every other epoch is read whole, on ``layout``.
    """

    def __init__(self, shards: list[Shard], layout: TrainLayout, rank: int, decoding: _Decoding,
                 shuffle_buffer: int):
        self.urls = [s.source for s in shards]  # a path/URL, or a remote.RemoteShard
        self.layout, self.rank, self.decoding, self.shuffle_buffer = layout, rank, decoding, shuffle_buffer
        self.start_epoch, self.start_batches, self.start_consumed = 0, 0, [0] * layout.num_slots
        self.resumed: RankCut | None = None
        self.ring: BatchRing | None = None

    @property
    def batch_shape(self) -> tuple[int, int, int, int]:
        return (self.layout.batch_size, self.decoding.num_channels, *self.decoding.image_size)

    def starting_at(self, epoch: int, batches: int, consumed: list[int], ring: BatchRing | None = None
                    ) -> TrainStream:
        stream = copy.copy(self)
        stream.start_epoch, stream.start_batches, stream.start_consumed = epoch, batches, list(consumed)
        stream.ring = ring
        return stream

    def steps_in(self, epoch: int) -> int:
        """The rank's batches in ``epoch`` (fewer in an epoch resumed on another layout)."""
        if self.resumed is not None and epoch == self.resumed.epoch:
            return self.resumed.steps
        return self.layout.steps_per_epoch

    def normalized(self, epoch: int, index: int) -> tuple[int, int]:
        """(epoch, batch index) of the rank's ``index``-th batch counted from the start of ``epoch``."""
        while index >= (steps := self.steps_in(epoch)):
            epoch, index = epoch + 1, index - steps
        return epoch, index

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slots = self.layout.num_slots
        # Worker w serves the rank's batches start+w, start+w+K, ... (DataLoader round-robin).
        epoch, index = self.start_epoch, self.start_batches + worker
        while True:
            epoch, index = self.normalized(epoch, index)
            slot = index % slots
            consumed = self.start_consumed[slot] if epoch == self.start_epoch else 0
            for batch in self.slice_batches(epoch, slot, index // slots, consumed, worker):
                yield batch
                index += slots

    def slot_plan(self, epoch: int, slot: int) -> tuple[list[Segment], int, int]:
        """(segments, shuffle seed, batches) of the slot's slice in ``epoch``."""
        if self.resumed is not None and epoch == self.resumed.epoch:
            cut = self.resumed
            return list(cut.segments[slot]), cut.seeds[slot], cut.slot_batches(slot)
        layout = self.layout
        return (layout.slot_segments(epoch, self.rank, slot), shuffle_seed(layout.seed, epoch, self.rank, slot, 0),
                layout.slot_batches(slot))

    def slice_batches(self, epoch: int, slot: int, first_batch: int, consumed: int, worker: int = 0
                      ) -> Iterator[dict]:
        """Batches ``first_batch``.. of the slot's slice in ``epoch``, after ``consumed`` items."""
        layout, where = self.layout, f"rank {self.rank} slot {slot} epoch {epoch}"
        if layout.aug_repeats > 1:  # copies of each sample across ranks (repeats.py); one shuffle for all ranks
            segments, first, picks = slot_picks(layout, epoch, self.rank, slot)
            length, seed, batches = len(picks), mix_seed(layout.seed, epoch, slot, "shuffle-repeats"), \
                layout.slot_batches(slot)
            replayed = replayed_positions(length, consumed, self.shuffle_buffer, seed)
            reader = RepeatReader(self.urls, layout.shard_offsets, segments, first, picks, replayed)
        else:
            segments, seed, batches = self.slot_plan(epoch, slot)
            length = sum(len(s) for s in segments)
            replayed = replayed_positions(length, consumed, self.shuffle_buffer, seed)
            reader = SliceReader(self.urls, layout.shard_offsets, segments, replayed)
        decode = DecodeSample(self.decoding.transform, self.decoding.num_channels, seed=layout.seed, epoch=epoch,
                              labels=self.decoding.labels)
        return iter(wds.DataPipeline(
            # raw samples of the slice, one item per position; consumed ones are header-only placeholders
            reader,
            # seeded shuffle buffer per (seed, epoch, rank, slot); undecoded bytes, so skipping stays cheap
            seeded_shuffle(self.shuffle_buffer, seed),
            # number the items 1..length; drop those a resumed run already consumed (all placeholders)
            DropConsumed(min(consumed, length)),
            # decode + augment (seeded per sample); bad samples are skipped, counted and logged
            wds.map(decode, handler=SkipBad(where)),
            # only pulled when bad samples left the slice short: repeat good samples (logged)
            Refill(reader, decode, length, consumed, where, layout.counts),
            # exactly the slot's remaining batches, collated in the worker (uint8; normalized on the device)
            TrainBatches(layout.batch_size, batches - first_batch, length=length, epoch=epoch,
                         first_index=first_batch * layout.num_slots + slot, stride=layout.num_slots,
                         slot=slot, consumed=consumed, where=where, ring=self.ring, worker=worker,
                         labels=self.decoding.labels != "none", take_bad_counts=decode.take_bad_counts),
        ))


class TrainLoader:
    """Infinite iterator of training batches for one rank, with a small resumable state.

    ``state_dict()`` describes the batches handed out so far; ``set_state()`` (before iterating)
    continues exactly on the same layout, or, given every rank's state, the interrupted epoch's
    unconsumed samples re-cut over a different one.
    A new ``iter()`` continues from the state and stops the workers of the previous one.
    """

    def __init__(self, stream: TrainStream, *, num_workers: int, max_bad_fraction: float):
        self.stream, self.num_workers = stream, num_workers
        self.max_bad_fraction = max_bad_fraction
        self.layout = stream.layout
        self.epoch, self.batches, self.consumed = 0, 0, [0] * self.layout.num_slots
        self.bad, self.seen = 0, 0
        self.bad_shards: dict[str, int] = {}  # shard url -> bad samples, for the refusal's message
        self.skipped_on_resume = 0  # samples of an interrupted epoch not seen after a change of shards or seed
        self.history: tuple[Phase, ...] = ()  # the phases of this epoch read on earlier layouts (elastic.py)
        self.resume_report: dict = {}  # what a resume on another layout found (elastic.py), for logs and tests
        self.reused_buffer_batches = 0  # batches that came through a reused shared buffer (BatchRing)
        self._iterator = None  # the live DataLoader iterator (one per iter(); workers run while it lives)

    @property
    def steps_per_epoch(self) -> int:
        return self.layout.steps_per_epoch

    def state_dict(self) -> dict:
        lay = self.layout
        return {"epoch": self.epoch, "batches": self.batches, "world_size": lay.world_size,
                "num_workers": self.num_workers, "batch_size": lay.batch_size, "num_samples": lay.num_samples,
                "seed": lay.seed, "shuffle_buffer": self.stream.shuffle_buffer, "consumed": list(self.consumed),
                "history": [phase.to_dict() for phase in self.history], "bad": self.bad, "seen": self.seen,
                "bad_shards": dict(self.bad_shards),
                **({"aug_repeats": lay.aug_repeats} if lay.aug_repeats > 1 else {})}

    def _layout_of(self, state: dict) -> dict:
        """The fields of a state that fix the stream's order (0 and 1 workers: the same stream)."""
        return {"world_size": int(state["world_size"]),
                "num_workers": max(1, int(state.get("num_workers", self.num_workers))),
                "batch_size": int(state["batch_size"]), "num_samples": int(state["num_samples"]),
                "seed": int(state["seed"]), "shuffle_buffer": int(state.get("shuffle_buffer", self.stream.shuffle_buffer))}

    def set_state(self, state: dict | list[dict]) -> None:
        """Continue from a checkpoint's loader state (before iterating): this rank's own state, on
        the same layout; or every rank's (the list a checkpoint holds), from any layout. Another
        world size, worker count, batch size or shuffle buffer continues the interrupted epoch
        where it stopped, re-cut over this layout (``elastic.py``); other shards or another seed
        start the next epoch."""
        states = state if isinstance(state, list) else [state]
        ours = self._layout_of(self.state_dict())
        saved = self._layout_of(states[0])
        changed = {k: (saved[k], v) for k, v in ours.items() if saved[k] != v}
        repeats, lay = int(states[0].get("aug_repeats", 1)), self.layout
        if (changed or repeats != lay.aug_repeats) and max(repeats, lay.aug_repeats) > 1:
            changed.update({"aug_repeats": (repeats, lay.aug_repeats)} if repeats != lay.aug_repeats else {})
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            raise DataError(f"data.aug_repeats: the checkpoint's data layout differs ({what}) and repeated "
                            "augmentation cannot continue its cycle on another one; resume with the same world size, "
                            "data.num_workers, data.batch_size and data.aug_repeats")
        if not changed:
            self._continue(states[self.stream.rank] if len(states) == saved["world_size"] else states[0])
        elif {"num_samples", "seed"} & set(changed):
            self._next_epoch(states[0], changed)
        else:
            if len(states) != saved["world_size"]:
                raise ValueError(f"resuming on another layout ({changed}) needs every rank's loader state: "
                                 f"got {len(states)} of {saved['world_size']}")
            self._resume_elsewhere(states, changed)

    def _continue(self, state: dict) -> None:
        """The same layout: exactly where this rank stopped."""
        lay = self.layout
        self._take_counters([state])
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.consumed = list(state.get("consumed") or
                             [lay.slot_batches_before(s, self.batches) * lay.batch_size for s in range(lay.num_slots)])
        self.history = tuple(Phase.from_dict(p) for p in state.get("history", ()))
        # An epoch resumed on another layout before: the same re-cut again.
        self.stream.resumed = (Continuation(lay, self.epoch, self.history).rank_cut(self.stream.rank)
                               if self.history else None)

    def _resume_elsewhere(self, states: list[dict], changed: dict) -> None:
        """Another layout: the interrupted epoch's unconsumed samples, re-cut over this one."""
        lay, first = self.layout, states[0]
        epoch, batches = int(first["epoch"]), int(first["batches"])
        if any((int(s["epoch"]), int(s["batches"])) != (epoch, batches) for s in states):
            raise ValueError("the ranks' loader states disagree on (epoch, batches); the checkpoint is inconsistent")
        saved = self._layout_of(first)
        old = TrainLayout((saved["num_samples"],), saved["batch_size"], saved["world_size"], saved["num_workers"],
                          saved["seed"])
        consumed = tuple(tuple(int(n) for n in (s.get("consumed") or
                                                [old.slot_batches_before(k, batches) * old.batch_size
                                                 for k in range(old.num_slots)])) for s in states)
        history = tuple(Phase.from_dict(p) for p in first.get("history", ()))
        if any(any(c) for c in consumed):
            history += (Phase(saved["world_size"], saved["num_workers"], saved["batch_size"],
                              saved["shuffle_buffer"], consumed),)
        self._take_counters(states)
        self.epoch, self.batches, self.consumed = epoch, 0, [0] * lay.num_slots
        self.history, self.stream.resumed = history, None
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        if not history:
            self.resume_report = {"epoch": epoch, "trained_before": 0}
            log.info("data: %s since the checkpoint; epoch %d starts on the new layout", what, epoch)
            return
        rest = Continuation(lay, epoch, history)
        cut = self.stream.resumed = rest.rank_cut(self.stream.rank)
        left_out = len(rest.left) - cut.steps * lay.global_batch
        self.resume_report = {"epoch": epoch, "trained_before": rest.consumed_before, "left": len(rest.left),
                              "steps": cut.steps, "left_out": left_out}
        if self.stream.rank == 0:
            log.warning("data: %s since the checkpoint; epoch %d goes on where it stopped: %d of its %d samples were "
                        "trained (found by replaying the old layout's shuffle buffers, nothing decoded), the other "
                        "%d are re-cut over %d ranks x %d workers: %d steps of %d, %d left out (fewer than one "
                        "global batch)", what, epoch, rest.consumed_before, lay.num_samples, len(rest.left),
                        lay.world_size, lay.num_slots, cut.steps, lay.global_batch, left_out)
        if cut.steps == 0:
            self.epoch, self.history = epoch + 1, ()

    def _next_epoch(self, state: dict, changed: dict) -> None:
        """Other shards or another seed: the interrupted epoch's order means nothing here."""
        lay = self.layout
        self._take_counters([state])
        epoch, batches = int(state["epoch"]), int(state["batches"])
        self.skipped_on_resume = 0
        if batches > 0 or state.get("history"):
            self.skipped_on_resume = int(state["num_samples"]) - batches * int(state["batch_size"]) * int(
                state["world_size"]) - sum(sum(map(sum, p["consumed"])) for p in state.get("history", ()))
            epoch += 1
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        skipped = (f"skipping {self.skipped_on_resume} samples of the interrupted epoch {epoch - 1}"
                   if self.skipped_on_resume else "no samples skipped")
        log.warning("data: %s since the checkpoint; resuming at the start of epoch %d, %s", what, epoch, skipped)
        self.epoch, self.batches, self.consumed, self.history = epoch, 0, [0] * lay.num_slots, ()

    def _take_counters(self, states: list[dict]) -> None:
        """Bad-sample counters: a rank's own, or the old ranks' totals shared out (the same fraction)."""
        share = len(states) if len(states) > 1 else 1
        self.bad = sum(int(s.get("bad", 0)) for s in states) // share
        self.seen = sum(int(s.get("seen", 0)) for s in states) // share
        self.bad_shards = {}
        for s in states:
            for url, n in s.get("bad_shards", {}).items():
                self.bad_shards[str(url)] = self.bad_shards.get(str(url), 0) + int(n)

    def __iter__(self) -> Iterator[dict]:
        """Batches with private uint8 images (safe to keep); see ``host_batches`` for the trainer's form."""
        return self.host_batches(borrow=False)

    def host_batches(self, *, borrow: bool, hold: int = 0) -> Iterator[dict]:
        """Host batches: ``image`` uint8 (B, C, H, W), ``label`` int64 (unless built without labels),
        ``key``, ``epoch``, ``index``, ``skipped``, and ``state``: this loader's state once the batch
        is trained (what a checkpoint saves; the batches handed out ahead of training are not in it).

        With ``borrow``, ``image`` may be a view of a shared-memory slot that its worker refills:
        copy it, then call ``batch["release"]()`` (DeviceFeed does). ``hold``: how many borrowed
        batches the caller keeps before copying them out, besides the one it copies (``StepLookAhead``);
        the ring keeps that many more buffers, so that the workers still fill reused ones.
        """
        self.close()
        ring = BatchRing.create(self.num_workers, self.stream.batch_shape, held=hold if borrow else 0)
        stream = self.stream.starting_at(self.epoch, self.batches, self.consumed, ring)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, in_order=True,
                            prefetch_factor=DATALOADER_PREFETCH if self.num_workers else None,
                            worker_init_fn=init_worker, generator=private_generator(),
                            multiprocessing_context=worker_context(self.num_workers))
        expected = self.stream.normalized(self.epoch, self.batches)
        iterator = self._iterator = iter(loader)
        try:
            while True:
                rng = torch.get_rng_state() if self.num_workers == 0 else None
                batch = _next(iterator)
                if rng is not None:  # decoding in this process reseeds per sample: give the trainer its RNG back
                    torch.set_rng_state(rng)
                slot, consumed = batch.pop("slot"), batch.pop("consumed")
                if (batch["epoch"], batch["index"]) != expected:
                    raise RuntimeError(f"loader order broke: got batch {batch['index']} of epoch {batch['epoch']}, "
                                       f"expected batch {expected[1]} of epoch {expected[0]}")
                expected = self.stream.normalized(expected[0], expected[1] + 1)
                self._account(batch, slot, consumed)
                batch["state"] = self.state_dict()
                if "label" in batch:
                    batch["label"] = torch.tensor(batch["label"], dtype=torch.long)
                worker, ring_slot = batch.pop("worker"), batch.pop("ring_slot", None)
                if ring_slot is not None:
                    self.reused_buffer_batches += 1
                    if borrow:  # the slot is freed by whoever copies the image out of it
                        batch["image"], batch["release"] = ring.view(worker, ring_slot), partial(ring.release, worker)
                    else:
                        batch["image"] = ring.view(worker, ring_slot).clone()
                        ring.release(worker)
                elif ring is not None:
                    ring.release(worker)  # a fresh batch: nothing to free, but the count moves on
                yield batch
        finally:
            if self._iterator is iterator:
                self.close()

    def close(self) -> None:
        """Stop the worker processes now (call before tearing down the process group)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def _account(self, batch: dict, slot: int, consumed: int) -> None:
        lay = self.layout
        self.consumed[slot] = consumed
        self.epoch, self.batches = batch["epoch"], batch["index"] + 1
        if self.batches == self.stream.steps_in(self.epoch):  # the next epoch is read whole, on this layout
            self.epoch, self.batches, self.consumed, self.history = self.epoch + 1, 0, [0] * lay.num_slots, ()
        self.bad += batch["skipped"]
        self.seen += batch["skipped"] + lay.batch_size
        for url, count in batch.pop("bad_shards", {}).items():  # since this process started
            self.bad_shards[url] = self.bad_shards.get(url, 0) + count
        floor = self.seen if self.batches == 0 else max(self.seen, MIN_SAMPLES_FOR_BAD_CHECK)
        if self.bad > self.max_bad_fraction * floor:
            worst = sorted(self.bad_shards.items(), key=lambda kv: -kv[1])
            shards = ", ".join(f"{url} ({count})" for url, count in worst[:10])
            more = f" and {len(worst) - 10} more shards" if len(worst) > 10 else ""
            raise DataError(f"rank {self.stream.rank}: {self.bad} of {self.seen} samples were bad "
                            f"({self.bad / max(self.seen, 1):.1%}), more than data.max_bad_fraction="
                            f"{self.max_bad_fraction}; bad samples per shard: {shards or 'none recorded'}{more}; "
                            "fix or remove those shards, or raise data.max_bad_fraction")


def _image_hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def label_mode(sample_keys: tuple[str, ...], *, evaluation: bool = False) -> str:
    """What ``DecodeSample`` does with ``.cls`` for a task that needs ``sample_keys`` (Task.sample_keys):
    a task that needs labels gets them (a sample without one is bad data); one that needs none
    (masked-image pretraining) trains on shards with or without labels, and its evaluation reads
    the labels that are there, for the k-NN probe (pipeline/probe.py)."""
    unknown = sorted(set(sample_keys) - {"cls"})
    if unknown:
        raise ValueError(f"the loader can provide the sample key 'cls' only, not {unknown}")
    if "cls" in sample_keys:
        return "required"
    return "optional" if evaluation else "none"


def build_train_loader(cfg: DataConfig, *, image_size: int | tuple[int, int], num_channels: int, seed: int,
                       rank: int, world_size: int, sample_keys: tuple[str, ...] = ("cls",),
                       shards: list[Shard] | None = None) -> TrainLoader:
    """The training loader of ``rank``; shard problems are DataErrors raised here, before training.
    ``sample_keys``: what the task reads besides the image (``("cls",)``: labels; ``()``: none).
    ``shards``: ``data.train_shards`` already resolved (preflight), else resolved here."""
    check_channels(num_channels)
    if shards is None:
        shards = resolve_shards(cfg.train_shards, cfg.manifest, what="data.train_shards",
                                io=IoOptions.from_config(cfg))
    layout = TrainLayout(tuple(s.num_samples for s in shards), cfg.batch_size, world_size,
                         max(1, cfg.num_workers), seed, aug_repeats=cfg.aug_repeats)
    if layout.steps_per_epoch == 0:
        raise DataError(f"data.train_shards hold {layout.num_samples} samples, fewer than one global batch "
                        f"({cfg.batch_size} x {world_size} ranks = {layout.global_batch}); lower data.batch_size")
    hw = _image_hw(image_size)
    decoding = _Decoding(train_transform(hw, augment=cfg.augment, crop_scale=tuple(cfg.crop_scale),
                                         hflip=cfg.hflip, shift_pixels=cfg.shift_pixels,
                                         auto_augment=cfg.auto_augment, mean=tuple(cfg.mean)),
                         num_channels, hw, label_mode(sample_keys))
    if rank == 0:
        log.info("data: %d training samples in %d shards; %d steps per epoch of %d x %d ranks; %d left out per "
                 "epoch", layout.num_samples, len(shards), layout.steps_per_epoch, cfg.batch_size, world_size,
                 layout.remainder)
    stream = TrainStream(shards, layout, rank, decoding, cfg.shuffle_buffer)
    return TrainLoader(stream, num_workers=cfg.num_workers, max_bad_fraction=cfg.max_bad_fraction)
