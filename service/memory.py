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

Those thresholds hold in glibc's main arena, but every thread other than the main one gets an
arena of its own, made of 64 MiB heaps that glibc unmaps as soon as one is wholly free,
whatever the thresholds say; and the scheduler thread, which runs every forward pass, is
such a thread.  So a small pass after a large one page-faulted its memory in again: on the
official ARM-FSRCNN a one-patch pass at w56 right after a 128-patch pass of w36 took 3.1-3.4
ms in a thread against 1.4-1.6 ms in the main thread (2.4 ms in a thread with the thresholds
raised), and since start-up timing runs exactly that sequence, every fresh server timed it
at 3.3-4.2 ms and its cost model put a one-patch w56 pass at 2.3-2.6 ms where a served one
takes 1.4 (and w36's 128-patch pass at 71-81 ms).  With one arena for all threads
(``one_malloc_arena``, which ``python -m service`` sets first thing) start-up times 1.55 ms
and 56-58 ms, and the cost model's line gives 1.6-1.8 ms.  The price is one lock around
``malloc`` for all threads; on 2 cores the served requests and the loads of
docs/BENCHMARKS.md 5.1 were unchanged within the spread between servers (1.11 and 5.6).

And keep the garbage collector off what start-up built (``freeze_startup_objects``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # from glibc's malloc.h
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit
_TRIM_THRESHOLD = 1024 * 1024 * 1024


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None where the C library is not glibc (macOS, musl-based images)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def one_malloc_arena() -> bool:
    """Have every thread use glibc's main arena, where ``keep_freed_memory``'s thresholds
    hold (see the module docstring); True if it took effect.  It must run before any thread
    but the main one allocates: glibc reads the limit once, then (importing torch starts a
    thread).  A ``MALLOC_ARENA_MAX`` in the environment is glibc's own setting and wins."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    mallopt = _mallopt()
    return mallopt is not None and mallopt(_M_ARENA_MAX, 1) == 1


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if it took effect.

    A no-op (False) where the C library is not glibc (macOS, musl-based images)."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
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
