"""The background half of an asynchronous save: write the staged files, fsync them, agree across
ranks that every rank's files are durable, and only then mark the checkpoint complete.

One thread per save, at most one in flight (``wait`` joins it before the next save starts). The
agreement runs in that thread over a gloo group of its own, created by every rank before
training: no steady-state step waits for it, and the training's collectives never mix with it.
Two all-reduces (MIN): "my files are written and fsynced", then, after rank 0 has written the
``COMPLETE`` marker and the ``latest`` pointer, "the marker is there". A rank killed during the
write never joins the first one, so the marker is never written: the directory stays incomplete,
nobody loads it, and the next prune removes it. A write that fails (a full disk) is kept and
raised on the training thread at the next save, stop or end of training, on every rank alike
(the all-reduces told every rank), as the one line a synchronous save would have given.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from pipeline.checkpoint.staging import HostBuffers, available_host_bytes, estimate_staging_bytes
from pipeline.checkpoint.store import CheckpointError, fsync_tree
from pipeline.storage import writing

log = logging.getLogger(__name__)


class BackgroundWriter:
    def __init__(self, *, rank: int) -> None:
        self.rank = rank
        self.buffers = HostBuffers()  # reused by every save of the run
        # Its own gloo group: used only by the writer thread, so its collectives come in the same
        # order on every rank whatever the training thread does meanwhile.
        self.group = dist.new_group(backend="gloo")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._tag = ""
        self.last_write_s = 0.0  # the last background write, start to commit, on this rank

    @property
    def pending(self) -> bool:
        """A save was handed over and not yet waited for."""
        return self._thread is not None

    @property
    def writing(self) -> bool:
        """The background write of the pending save is still going on (on this rank)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, files: list[tuple[str, Any]], *, tag_dir: Path, commit: Callable[[], None],
              save_without_crc: Callable) -> None:
        """Write ``files`` in the background; ``commit`` (rank 0: marker, pointer, prune) runs once
        every rank's files are durable."""
        assert self._thread is None, "wait() for the previous save first"
        self._error, self._tag = None, tag_dir.name
        self._thread = threading.Thread(target=self._run, args=(files, tag_dir, commit, save_without_crc),
                                        name=f"checkpoint-write-{tag_dir.name}", daemon=True)
        self._thread.start()

    def _run(self, files, tag_dir: Path, commit, save_without_crc) -> None:
        started = time.perf_counter()
        what = f"checkpoint {tag_dir.name}"
        written = 1
        try:
            with writing(what, tag_dir), save_without_crc():
                for path, state in files:
                    torch.save(state, path)
            with writing(what, tag_dir):
                fsync_tree(tag_dir, self.rank)
        except BaseException as error:  # kept for the training thread, which raises it
            self._error, written = error, 0
        try:
            if not self._agree(written):
                if self._error is None:
                    self._error = CheckpointError(
                        f"checkpoint {tag_dir.name} was not completed: another rank could not write its part "
                        "(its line says why); the previous complete checkpoint is kept")
                return
            committed = 1
            if self.rank == 0:
                try:
                    commit()
                except BaseException as error:
                    self._error, committed = error, 0
            if not self._agree(committed) and self._error is None:
                self._error = CheckpointError(f"checkpoint {tag_dir.name}: rank 0 could not write its COMPLETE "
                                              "marker (its line says why); the previous complete checkpoint is kept")
        except BaseException as error:  # a peer gone mid-agreement
            if self._error is None:
                self._error = error
        finally:
            self.last_write_s = time.perf_counter() - started

    def _agree(self, flag: int) -> bool:
        value = torch.tensor([flag], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return bool(value.item())

    def wait(self) -> float:
        """Block until the save in flight (if any) is durable and marked; the seconds waited. Raises
        what the background write raised."""
        if self._thread is None:
            return 0.0
        started = time.perf_counter()
        self._thread.join()
        self._thread = None
        waited = time.perf_counter() - started
        if waited > 0.01:
            log.info("waited %.2f s for the background write of checkpoint %s", waited, self._tag)
        error, self._error = self._error, None
        if error is not None:
            raise error
        return waited

    def close(self) -> None:
        """On the way out of a failed run: let a write in flight end, without raising."""
        try:
            self.wait()
        except BaseException as error:  # the run is failing already for its own reason
            log.warning("background checkpoint write %s: %s", self._tag, error)


# The share of a node's available memory that staging may take: training's own memory grows after
# the first steps, and the page cache of the write needs room too.
STAGING_SHARE = 0.8


def plan_background(engine: Any, env: Any, *, group: Any) -> BackgroundWriter | None:
    """The writer for ``checkpoint.async``, after saying how much host memory its staging takes; or
    None (synchronous saves, with a warning) where a node cannot hold it. Every rank takes the same
    decision (an all-reduce over ``group``, a gloo group): the writer's group is made by all or none."""
    need = estimate_staging_bytes(engine, env.world_size)
    node_need = need * env.local_world_size
    available = available_host_bytes()
    fits = available is None or node_need <= STAGING_SHARE * available
    agreed = torch.tensor([int(fits)], dtype=torch.int64)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
    gb = 1 << 30
    where = "unknown" if available is None else f"{available / gb:.1f} GB"
    if not agreed.item():
        log.warning("checkpoint.async: staging a checkpoint needs %.2f GB of host memory per rank (%.2f GB for "
                    "the %d ranks of %s node; %s available there): saving synchronously instead; free memory "
                    "or use fewer ranks per node to save in the background", need / gb, node_need / gb,
                    env.local_world_size, "this" if not fits else "another", where)
        return None
    log.info("checkpoint.async: saves are staged in %.2f GB of host memory per rank (%.2f GB for this node's %d "
             "ranks; %s available), reused from save to save, and written in the background",
             need / gb, node_need / gb, env.local_world_size, where)
    return BackgroundWriter(rank=env.rank)
