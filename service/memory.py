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

And keep the garbage collector off what start-up built (``freeze_startup_objects``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys
import time

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


def freeze_startup_objects() -> float:
    """Collect once, then move every object alive now into the collector's permanent
    generation (``gc.freeze``), where later collections never walk it; returns the seconds
    the collection took.  (It does not count the frozen objects: ``gc.get_freeze_count``
    walks them all, 20 ms on the event loop for 230,000.)

    Why: loading the models leaves about 400,000 long-lived Python objects (torch's modules,
    torch.ao's quantization graphs, ONNX's exporter), and Python's full collection walks every
    one of them with the GIL held: 280-300 ms on our 2-core VM, during which no request makes
    progress.  Under load one such pause shed or delayed 110-130 requests at once (a /classify
    load at 300 requests a second, 20 ms deadline, docs/RUNTIME.md).  Frozen, a full collection
    of what requests create takes about a millisecond.  The price: cyclic garbage among the
    frozen objects (none is expected: they live as long as the server) is never freed."""
    t0 = time.perf_counter()
    gc.collect()
    seconds = time.perf_counter() - t0
    gc.freeze()
    return seconds
