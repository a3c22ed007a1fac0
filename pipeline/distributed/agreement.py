"""What the ranks must agree on at step boundaries, agreed on the host and one step late.

A stop signal reaches one rank (or some), and bad samples are counted where they were read;
every rank must still stop at the same step and log the same totals. Both are host values, so
they travel through their own gloo group, as CPU tensors, never through the GPU's NCCL queue:
reading an agreed value then costs no host-device synchronisation. The all-reduce posted after
step k is collected after step k+1, so that no rank waits for the slowest one at every step:
all ranks see step k's flags at the same step, k+1, and stop there together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Agreed:
    """Summed over the ranks: any rank asked to stop, and how many bad samples all ranks skipped."""

    stop: bool = False
    skipped: int = 0


class StepAgreement:
    def __init__(self) -> None:
        # A group of its own: these all-reduces stay on the host (gloo) whatever the training backend.
        self.group = dist.new_group(backend="gloo")
        self._pending: tuple[dist.Work, torch.Tensor] | None = None

    def post(self, *, stop: bool, skipped: int) -> Agreed:
        """Post this step's flags; returns what was agreed for the previous post (or nothing yet)."""
        flags = torch.tensor([float(stop), float(skipped)], dtype=torch.float64, device="cpu")
        work = dist.all_reduce(flags, group=self.group, async_op=True)
        agreed = self.collect()
        self._pending = (work, flags)
        return agreed

    def collect(self) -> Agreed:
        """Wait for the posted flags (every rank must call this at the same step)."""
        if self._pending is None:
            return Agreed()
        work, flags = self._pending
        self._pending = None
        work.wait()
        stop, skipped = flags.tolist()
        return Agreed(stop=stop > 0, skipped=int(skipped))
