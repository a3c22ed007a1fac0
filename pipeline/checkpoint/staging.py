"""The training-visible half of an asynchronous save: DeepSpeed's state copied into host memory.

DeepSpeed's ``save_checkpoint`` hands every file it would write to its checkpoint engine as
``save(state_dict, path)``. ``StagingEngine`` plays that engine for one call: it copies each
tensor into a host buffer kept from the previous save (pinned when the tensor is on the GPU, so
that the copy is a DMA) and records the file, writing nothing. The file layout, the names and
what goes into each file stay DeepSpeed's; a background thread (``background.py``) then writes
the staged files with ``torch.save``.

``preserves_storage_sharing`` is False: DeepSpeed then hands its live tensors (views into flat
buffers) instead of cloning them first, and the copy into the staging buffers is the one copy
(each tensor into a buffer of its own size, which is what DeepSpeed's clone gives torch.save).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine


class HostBuffers:
    """Host copies of a checkpoint's tensors, reused from one save to the next: a tensor is keyed
    by its file's name (the same in every ``step-N``) and its position in that file's state."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self.copied_from_device = False

    @property
    def bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def stage(self, state: Any, file_name: str) -> Any:
        """``state`` with every tensor replaced by its host copy and everything else deep-copied:
        training may change any of it once this returns."""
        counter = [0]
        return self._stage(state, file_name, counter)

    def _stage(self, obj: Any, file_name: str, counter: list[int]) -> Any:
        if isinstance(obj, torch.Tensor):
            key = (file_name, counter[0])
            counter[0] += 1
            return self._copy(obj.detach(), key)
        if isinstance(obj, dict):
            out = copy.copy(obj)  # keeps the class (OrderedDict, defaultdict)
            out.clear()
            for k, v in obj.items():
                out[k] = self._stage(v, file_name, counter)
            return out
        # Plain lists and tuples only: a subclass (torch.Size in DeepSpeed's param_shapes, whose
        # .numel() zero_to_fp32 calls; a namedtuple) holds no tensors and is deep-copied as it is.
        if type(obj) is list:
            return [self._stage(v, file_name, counter) for v in obj]
        if type(obj) is tuple:
            return tuple(self._stage(v, file_name, counter) for v in obj)
        return copy.deepcopy(obj)

    def _copy(self, tensor: torch.Tensor, key: tuple[str, int]) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            on_device = tensor.device.type != "cpu"
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                 pin_memory=on_device and torch.cuda.is_available())
            self._buffers[key] = buffer
        if tensor.device.type != "cpu":
            self.copied_from_device = True
            buffer.copy_(tensor, non_blocking=True)  # from pinned memory: asynchronous; synchronize() ends it
        else:
            buffer.copy_(tensor)
        return buffer

    def synchronize(self) -> None:
        """Wait for the device-to-host copies of the last ``stage`` calls (one wait per save)."""
        if self.copied_from_device and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.copied_from_device = False


class StagingEngine(CheckpointEngine):
    """A DeepSpeed checkpoint engine that stages instead of writing; ``files`` lists what to write."""

    def __init__(self, buffers: HostBuffers) -> None:
        super().__init__(None)
        self.name = "StagingEngine"
        self.buffers = buffers
        self.files: list[tuple[str, Any]] = []

    def create(self, info) -> None:
        pass

    def makedirs(self, path, exist_ok=False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict, path: str) -> None:
        self.files.append((path, self.buffers.stage(state_dict, Path(path).name)))

    def load(self, path: str, map_location=None):  # never used for loading: the engine is swapped back
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info) -> bool:
        return True

    def preserves_storage_sharing(self) -> bool:
        return False


def stage_checkpoint(engine: Any, buffers: HostBuffers, *, root: Path, tag: str,
                     client_state: dict) -> list[tuple[str, Any]]:
    """Run DeepSpeed's ``save_checkpoint`` (every rank, its barriers included) with the staging
    engine in place of its own; returns [(path, staged state)] for this rank to write."""
    staging = StagingEngine(buffers)
    own = engine.checkpoint_engine
    engine.checkpoint_engine = staging
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    finally:
        engine.checkpoint_engine = own
    buffers.synchronize()
    return staging.files


def estimate_staging_bytes(engine: Any, world_size: int) -> int:
    """Host memory this rank's staged checkpoint needs, before the first save: the fp32 master
    weights and two Adam moments of its partition (ZeRO 1-3; all of them at ZeRO-0), and at ZeRO
    0-2 the module's weights (DeepSpeed's model file; rank 0 writes it, every rank stages it)."""
    params = list(engine.module.parameters())
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    stage = engine.zero_optimization_stage()
    optimizer = 12 * numel // (world_size if stage >= 1 else 1)
    module = 0 if stage == 3 else sum(p.numel() * p.element_size() for p in params)
    return optimizer + module


def available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), None where unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
