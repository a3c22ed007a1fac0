"""Keep freed memory in the process's heap (glibc), so CPU steps do not re-fault it every time.

Without a caching allocator on the CPU (CUDA has one), every step that allocates and frees the
same large tensors (DeepSpeed's flat gradient buffers, activations, a DataLoader worker's decoded
images and batches) gets fresh pages from the kernel, which zeroes them and takes a page fault
per 4 KB. glibc's defaults cause this: blocks above the mmap threshold get their own mappings,
and a freed heap top above the trim threshold goes back to the kernel. Raising both keeps the
memory for reuse (what it saves: docs/DECISIONS.md, Memory on the CPU).
"""
from __future__ import annotations

import ctypes
import ctypes.util

# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREE_BYTES = 256 << 20  # free memory kept instead of being returned to the kernel
MMAP_FROM_BYTES = 32 << 20   # only blocks this large get their own mapping (glibc's maximum)


def keep_heap() -> bool:
    """Apply the settings above; False where the C library is not glibc (nothing changed)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_FROM_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_BYTES))
