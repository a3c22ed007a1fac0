"""ZeRO-3 without a second fp32 copy of the weights when the weights already are fp32.

ZeRO-3 keeps each rank's partition of the weights in a flat buffer and gives the optimizer a
"master" partition to update, then copies the master back. When the weights are fp32 (fp32
training, or DeepSpeed's torch_autocast mode) DeepSpeed means to let the optimizer update
the weights' buffer itself: ``DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions`` takes
that branch when the buffer's dtype and device equal the master's. Its device test compares
``tensor.device`` with the accelerator's device *name*, a string, and a ``torch.device``
never equals a string (``torch.zeros(1).device == "cpu"`` is False), so the branch is never
taken: measured on CPU, and on CUDA by reading the code (the name is "cuda:N"). Every fp32
ZeRO-3 rank then holds a second copy of its weights, 4 bytes per parameter over the ranks
(ViT-B/16 on 2 ranks: 165 MiB of 901 per rank, docs/DECISIONS.md, ZeRO-3 memory).

``shared_fp32_master`` makes that one comparison between devices while the partitions are
created; everything after, including the copy back (onto itself) and checkpoints, is
DeepSpeed's own code on the path it wrote for this case.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def shared_fp32_master() -> Iterator[None]:
    """Within this block, ZeRO-3 engines whose weights are fp32 update them in place."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    original = DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions

    def create_fp32_partitions(optimizer) -> None:
        name = optimizer.device
        # With optimizer offload DeepSpeed's device is an enum of its own and the branch above
        # the comparison handles it; leave it be.
        compare_as_device = isinstance(name, str) and not optimizer.offload_optimizer
        if compare_as_device:
            optimizer.device = torch.device(name)
        try:
            original(optimizer)
        finally:
            optimizer.device = name

    DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions = create_fp32_partitions
    try:
        yield
    finally:
        DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions = original


def master_is_shared(optimizer) -> list[bool]:
    """Per ZeRO-3 sub-group: does the optimizer's master partition share the weights' buffer?"""
    pairs = zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat)
    return [master.data_ptr() == weights.data_ptr() for master, weights in pairs]
