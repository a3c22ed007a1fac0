"""Host batches (uint8 images) -> device batches (normalized, in the engine's dtype), one batch ahead.

Workers hand over uint8 batches: a quarter of the bytes of float32, and no float work on the
trainer's host thread. On a CUDA device, while the trainer runs batch k, batch k+1 is already
copied on a side stream through one of two reused pinned uint8 buffers and normalized and cast
there (timm's ``PrefetchLoader`` does the same). No step waits for the host: the copy is
asynchronous, the main stream waits for the side stream on the device only, and the host waits
only before refilling a pinned buffer, for a copy it queued two batches earlier.

On a CPU device the same code runs synchronously (there is no copy engine to overlap with), so
CPU tests exercise exactly the order and the one-batch-ahead accounting of GPU runs.

Exactly once: the batch one ahead has left the loader, so the loader's own state already counts
it. Each host batch therefore carries ``state``, the loader's state once that batch is trained;
the trainer saves the state of the last batch it trained, and a prefetched batch that was never
trained is delivered again after a resume.

An error fetching the batch one ahead belongs to that batch, not to the one handed out: it is
raised when that batch is asked for. The trainer may never ask (``lookahead.py``: a store that
gave up after the last batch the ranks agreed to train).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

# Host tensors a batch may carry besides the image; they are moved to the device as they are.
DEVICE_KEYS = ("label", "valid")


class Normalize:
    """uint8 (B, C, H, W) -> ``(x / 255 - mean) / std`` in ``dtype``, on the images' device."""

    def __init__(self, mean: list[float], std: list[float], num_channels: int):
        if len(mean) == 1:
            mean, std = mean * num_channels, std * num_channels
        if len(mean) != num_channels or len(std) != num_channels:
            raise ValueError(f"data.mean/data.std have {len(mean)} values but the model has "
                             f"{num_channels} channels; give {num_channels} values (or 1)")
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(-1, 1, 1)
        self.shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(-1, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """scale and shift on ``device``, copied there once (before any step, outside the hot path)."""
        if device not in self._on_device:
            self._on_device[device] = (self.scale.to(device), self.shift.to(device))
        return self._on_device[device]

    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale, shift = self.constants(images.device)
        # uint8 -> float32 first: a mixed uint8 x float multiply measured 6x slower on CPU
        out = images.to(torch.float32).mul_(scale).sub_(shift)
        return out if dtype == torch.float32 else out.to(dtype)


class DeviceFeed:
    """Iterator of device batches over an iterator of host batches, one batch ahead.

    A host batch has ``image`` (uint8, CPU), optionally ``release`` (called once the image has been
    copied: it frees a shared-memory slot the image is a view of), tensors named in DEVICE_KEYS, and
    any other fields (keys, epoch, loader state), which pass through unchanged.
    """

    def __init__(self, batches: Iterator[dict], *, device: torch.device, dtype: torch.dtype, normalize: Normalize):
        self.source, self.device, self.dtype, self.normalize = batches, device, dtype, normalize
        self.cuda = device.type == "cuda"
        if self.cuda:
            normalize.constants(device)
            self.stream = torch.cuda.Stream(device)
            self.pinned: list[torch.Tensor | None] = [None, None]  # reused uint8 staging buffers
            self.copied: list[torch.cuda.Event | None] = [None, None]  # their last copy's completion
            self.turn = 0
        self._ahead: dict | None = None
        self._error: Exception | None = None  # fetching the batch ahead failed: raised when it is asked for

    def __iter__(self) -> DeviceFeed:
        return self

    def __next__(self) -> dict:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._ahead is None:
            self._ahead = self._prepare(next(self.source))  # the first batch: nothing is ahead yet
        current = self._ahead
        self._ahead = None
        if self.cuda:
            # The main stream waits (on the device) for the side stream's copy and normalization.
            main = torch.cuda.current_stream(self.device)
            main.wait_event(current.pop("_ready"))
            for value in current.values():
                if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                    value.record_stream(main)  # allocated on the side stream, used on the main one
        self._ahead = self._fetch_ahead()  # its copy starts before the caller queues this batch's step
        return current

    def _fetch_ahead(self) -> dict | None:
        """The next batch, prepared; None at the source's end or when fetching it failed (kept)."""
        try:
            host = next(self.source)
        except StopIteration:
            return None
        except Exception as error:  # noqa: BLE001 - the next batch's error, raised if it is asked for
            self._error = error
            return None
        return self._prepare(host)

    def _prepare(self, host: dict) -> dict:
        release = host.pop("release", None)
        images = host.pop("image")
        if not self.cuda:
            # normalizing writes a new tensor: the worker may refill the slot once it is made
            batch = {**host, "image": self.normalize(images, self.dtype)}
            if release is not None:
                release()
            return batch
        staging = self._staging(images)
        staging.copy_(images)
        if release is not None:
            release()  # the worker may refill its slot now: the bytes are in pinned memory
        tensors = {k: host[k].pin_memory() for k in DEVICE_KEYS if k in host}  # a few bytes: cached pinned blocks
        with torch.cuda.stream(self.stream):
            on_device = staging.to(self.device, non_blocking=True)
            self.copied[self.turn] = torch.cuda.Event()
            self.copied[self.turn].record(self.stream)
            batch = {**host, "image": self.normalize(on_device, self.dtype)}
            batch.update({k: t.to(self.device, non_blocking=True) for k, t in tensors.items()})
            ready = torch.cuda.Event()
            ready.record(self.stream)
        batch["_ready"] = ready
        self.turn = 1 - self.turn
        return batch

    def _staging(self, images: torch.Tensor) -> torch.Tensor:
        """This turn's pinned buffer, once the copy out of it two batches ago has finished."""
        buffer, copied = self.pinned[self.turn], self.copied[self.turn]
        if copied is not None:
            copied.synchronize()  # waits for that copy only, queued long before: not for the step
        if buffer is None or buffer.shape != images.shape:
            buffer = self.pinned[self.turn] = torch.empty(images.shape, dtype=torch.uint8, pin_memory=True)
        return buffer
