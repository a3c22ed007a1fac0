"""What the ranks must agree on at step boundaries, agreed on the host and one step late.

A stop signal reaches one rank (or some), and bad samples are counted where they were read;
every rank must still stop at the same step and log the same totals. Both are host values, so
they travel through their own gloo group, as CPU tensors, never through the GPU's NCCL queue:
reading an agreed value then costs no host-device synchronisation. The all-reduce posted after
step k is collected after step k+1, so that no rank waits for the slowest one at every step:
all ranks see step k's flags at the same step, k+1, and stop there together.

Besides a stop signal, a rank posts a stop when its data store gave up (``StoreUnavailable``,
found one step ahead by ``data/lookahead.py``): the code is 75 as a preemption's, and the count
of such ranks says why, so that every rank logs the reason it stopped for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Agreed:
    """Over the ranks: the stop's exit code (the highest any rank asked for: 130 for Ctrl-C beats
    75, so that every rank exits as the user's Ctrl-C says; 0 for no stop), and how many bad
    samples all ranks skipped; ``store_failures``: how many ranks' data store gave up (a rank
    posts it at every step from then on, so later posts count at least as many)."""

    stop_code: int = 0
    skipped: int = 0
    store_failures: int = 0

    @property
    def stop(self) -> bool:
        return self.stop_code > 0

    def merge(self, later: Agreed) -> Agreed:
        return Agreed(stop_code=max(self.stop_code, later.stop_code), skipped=self.skipped + later.skipped,
                      store_failures=max(self.store_failures, later.store_failures))


class StepAgreement:
    def __init__(self) -> None:
        # A group of its own: these all-reduces stay on the host (gloo) whatever the training backend.
        self.group = dist.new_group(backend="gloo")
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    def post(self, *, stop_code: int, skipped: int, store_failed: bool = False) -> Agreed:
        """Post this step's flags (``stop_code`` 0 when this rank was not asked to stop; ``store_failed``
        when its data store gave up); returns what was agreed for the previous post (or nothing yet)."""
        agreed = self.collect()
        code = torch.tensor([stop_code], dtype=torch.int64, device="cpu")
        count = torch.tensor([skipped, int(store_failed)], dtype=torch.int64, device="cpu")  # both summed
        self._pending = [(dist.all_reduce(code, op=dist.ReduceOp.MAX, group=self.group, async_op=True), code),
                         (dist.all_reduce(count, group=self.group, async_op=True), count)]
        return agreed

    def collect(self) -> Agreed:
        """Wait for the posted flags (every rank must call this at the same step)."""
        if not self._pending:
            return Agreed()
        for work, _ in self._pending:
            work.wait()
        (_, code), (_, count) = self._pending
        self._pending = []
        skipped, store_failures = (int(n) for n in count.tolist())
        return Agreed(stop_code=int(code.item()), skipped=skipped, store_failures=store_failures)
