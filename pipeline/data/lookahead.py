"""Host batches fetched one optimizer step ahead, so that a store that gives up stops the run with a checkpoint.

The ranks agree on a stop one step late (``StepAgreement``: the flags posted after step k are
read after step k+1), and a checkpoint needs every rank in the collective. A rank whose store
gives up (``StoreUnavailable``) can therefore stop cleanly only if it still holds every batch up
to the step where the others read its flag. So, after step k and before posting its flags, the
trainer fetches every batch through step k+2: a ``StoreUnavailable`` on the way is kept here,
not raised; the rank posts it, every rank trains step k+1 (whose batches this rank holds), saves
that step and exits 75. The checkpoint's loader state is that of the last trained batch, so the
batches fetched and never trained are read again after the resume.

Only the batches of the first step after a (re)start cannot be covered: nothing is posted before
it. A store that gives up there raises at once; nothing has been trained since the checkpoint
the run started from, which is where the requeued run resumes.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from .errors import StoreUnavailable


class StepLookAhead:
    """Iterator over the first ``steps`` x ``per_step`` batches of ``batches``, never further: the
    ones ``fetch`` took ahead first, then straight from the source."""

    def __init__(self, batches: Iterator[dict], *, per_step: int, steps: int):
        self.source, self.per_step, self.limit = batches, per_step, per_step * steps
        self.held: deque[dict] = deque()
        self.fetched = 0  # batches taken from the source
        self.failure: StoreUnavailable | None = None  # the store gave up; nothing is fetched after it

    @staticmethod
    def most_held(per_step: int) -> int:
        """The most batches held at once (``host_batches``' ``hold``): after step k, those of step
        k+1 but the one the DeviceFeed has already taken, and all of step k+2."""
        return 2 * per_step - 1

    def fetch(self, steps: int) -> StoreUnavailable | None:
        """Take the batches of the first ``steps`` steps from the source (none past the limit);
        a store that gives up on the way is kept and returned, not raised."""
        want = min(steps * self.per_step, self.limit)
        while self.failure is None and self.fetched < want:
            batch = self._take()
            if batch is None:
                break
            self.held.append(batch)
        return self.failure

    def require(self, steps: int) -> None:
        """``fetch``, raising the store's failure: for batches the trainer cannot do without."""
        if self.fetch(steps) is not None and self.fetched < min(steps * self.per_step, self.limit):
            raise self.failure

    def __iter__(self) -> StepLookAhead:
        return self

    def __next__(self) -> dict:
        if self.held:
            return self.held.popleft()
        if self.failure is not None:
            raise self.failure  # a batch the ranks agreed not to train: only a broken protocol asks for it
        batch = self._take() if self.fetched < self.limit else None
        if batch is None:
            if self.failure is not None:
                raise self.failure
            raise StopIteration
        return batch

    def _take(self) -> dict | None:
        """The source's next batch, or None at its end or once the store gave up (kept in ``failure``)."""
        try:
            batch = next(self.source)
        except StopIteration:
            self.limit = self.fetched
            return None
        except StoreUnavailable as error:
            self.failure = error
            return None
        self.fetched += 1
        return batch
