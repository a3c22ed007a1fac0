"""Imports without Python's cyclic garbage collector running through them.

Importing torch, torchvision and DeepSpeed builds millions of objects (modules, functions,
op registrations), and the collector walks the growing heap again and again while they are
built; afterwards every full collection of the run walks them once more, though none of them
ever becomes garbage. Pausing the collector for the imports and then freezing what they built
(``gc.freeze``: out of every later collection) took a one-rank start-up and 4-step run from
7.1-8.1 s to 5.8-6.6 s of wall time on the 2-core VM (docs/DECISIONS.md, "Start-up cost").
Standard library only: it runs before the imports it speeds up.
"""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No collection inside; what was built inside (and before) is frozen at the end, and the
    collector is back as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
