"""Shared-memory batch buffers that workers fill and the main process reads in place, reused.

A DataLoader worker normally collates each batch into a *fresh* shared-memory block and sends
its file descriptor; the main process maps it, reads it once and drops it. Every page of that
block is a new tmpfs page that the worker faults in, at about a fifth of the cost of decoding
the image (docs/DECISIONS.md, Data workers).

Here the main process allocates, before the workers start, ``depth`` batch buffers per worker
in shared memory (passed by handle to the workers, which the fork server starts). A worker
stacks its batch into its next free buffer and sends only the buffer's number; the trainer
copies it out (into pinned memory on GPUs, see device_feed.py) and marks it released in a
shared counter. After
the first ``depth`` batches no page is faulted again and no descriptor is passed.

A buffer is reused only once the main process has released it; if it has not (never under the
DataLoader's prefetching, which keeps a worker at most ``prefetch_factor`` batches ahead of the
main process's receipts), the worker falls back to an ordinary fresh batch, so it never waits.
"""
from __future__ import annotations

import logging
import math
import os

import torch

log = logging.getLogger(__name__)

DATALOADER_PREFETCH = 2  # torch DataLoader's default prefetch_factor (batches in flight per worker)
DEPTH = DATALOADER_PREFETCH + 2  # + the batch being copied out + one of margin (more for batches held: ``held``)
SHM_DIR = "/dev/shm"
MAX_SHM_SHARE = 0.5  # leave at least half of the free shared memory to everything else


class BatchRing:
    """``depth`` uint8 buffers of one batch shape for each of ``num_workers`` workers."""

    def __init__(self, num_workers: int, batch_shape: tuple[int, ...], depth: int = DEPTH):
        self.depth = depth
        self.buffers = torch.empty((num_workers, depth, *batch_shape), dtype=torch.uint8).share_memory_()
        # released[w]: how many of worker w's batches (ring or not) the main process is done with
        self.released = torch.zeros(num_workers, dtype=torch.int64).share_memory_()
        self._released_here = [0] * num_workers  # the main process's copy (it is the only writer)
        self.sent = [0] * num_workers  # batches each worker has sent (kept in that worker's own copy)

    @staticmethod
    def nbytes(num_workers: int, batch_shape: tuple[int, ...], depth: int = DEPTH) -> int:
        return num_workers * depth * math.prod(batch_shape)

    @staticmethod
    def depth_for(num_workers: int, held: int) -> int:
        """DEPTH, plus room for ``held`` batches that the main process keeps unreleased besides
        the one it copies out (the trainer's look-ahead): the workers take turns, so each holds
        at most ``ceil(held / num_workers)`` of them."""
        return DEPTH + math.ceil(held / max(1, num_workers))

    @classmethod
    def create(cls, num_workers: int, batch_shape: tuple[int, ...], held: int = 0) -> BatchRing | None:
        """A ring, or None (workers send fresh batches) where shared memory is too small for it."""
        if num_workers <= 0:
            return None
        depth = cls.depth_for(num_workers, held)
        need = cls.nbytes(num_workers, batch_shape, depth)
        try:
            stat = os.statvfs(SHM_DIR)
            free = stat.f_bavail * stat.f_frsize
        except OSError:
            free = None  # not Linux-like: the allocation below is the check
        if free is not None and need > MAX_SHM_SHARE * free:
            log.warning("data: %s has %.0f MiB free, too little for %.0f MiB of reusable batch buffers; "
                        "workers send fresh batches instead (slower; raise the container's --shm-size)",
                        SHM_DIR, free / 2**20, need / 2**20)
            return None
        return cls(num_workers, batch_shape, depth)

    # worker side

    def claim(self, worker: int) -> tuple[int, torch.Tensor] | None:
        """(slot, buffer) for this worker's next batch, or None if that buffer is still in use."""
        number = self.sent[worker]
        self.sent[worker] += 1
        # The slot last held batch ``number - depth``; it is free once that batch was released.
        if int(self.released[worker]) < number - self.depth + 1:
            return None
        slot = number % self.depth
        return slot, self.buffers[worker, slot]

    # main-process side

    def view(self, worker: int, slot: int) -> torch.Tensor:
        """The batch in ``slot``, in place: read it, then ``release(worker)``."""
        return self.buffers[worker, slot]

    def release(self, worker: int) -> None:
        """The main process is done with worker ``worker``'s oldest unreleased batch."""
        self._released_here[worker] += 1
        # Issued after the copy out of the slot has returned, i.e. after every read of the batch: x86 never
        # lets a store overtake earlier loads; on weakly ordered CPUs the window is the few loads
        # still in flight, far shorter than the worker's decoding of its next batch.
        self.released[worker] = self._released_here[worker]
