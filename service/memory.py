"""Keep freed memory in the process instead of handing it back to the OS after each batch.

glibc serves allocations above its mmap threshold (128 KiB at first, growing to at most
32 MiB) with fresh ``mmap`` pages and unmaps them on free, and trims the top of the heap
when more than 128 KiB is free there.  A forward pass allocates and frees activations of
megabytes (ARM-FSRCNN at 25 patches: about 6 MB per layer), so every request page-faults
its whole working set in again.  On our 2-core VM a batch of 128 patches at full width
took 68 ms instead of 50 ms (``python -m bench.arm_forward --malloc default|keep``, the
tables in docs/BENCHMARKS.md; in other runs the gap was up to 97 vs 51 ms, and small batches
gained little).  Raising both thresholds keeps the pages mapped and reused; the cost is
that the resident size stays at its peak (for the bundled models, a few hundred MB at most).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit
_TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if it took effect.

    A no-op (False) where the C library is not glibc (macOS, musl-based images)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the thresholds; freed memory goes back to the OS after each batch")
    return ok
