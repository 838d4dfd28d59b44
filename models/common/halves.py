"""Splitting one request's CPU-bound post-processing in two halves that run at once.

The server computes on one thread (one torch thread, the other core left to the event
loop), and after the network an SR answer still has to be stitched and PNG-encoded: work
that is about a fifth of a full-width request and that no rung makes cheaper.  For a
request served alone the second core is idle meanwhile, so work that splits cleanly (the
two halves of a deflate stream, ``service.imageio``) runs its second half on one helper
thread; deflate releases the GIL, so the halves overlap.  (Stitching in two row bands was
measured too and gained too little to keep: docs/BENCHMARKS.md 1.8.)

Invariant: a caller never waits for another caller's half.  When the helper is already
busy (two requests finishing at once, on a machine whose cores are then all busy anyway),
both halves run on the calling thread, one after the other, exactly as without a helper.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

A = TypeVar("A")
B = TypeVar("B")

_pool: ThreadPoolExecutor | None = None
_free = threading.Semaphore(1)  # held while the helper runs someone's half
_start = threading.Lock()


def _helper() -> ThreadPoolExecutor:
    global _pool
    with _start:
        if _pool is None:
            _pool = ThreadPoolExecutor(1, thread_name_prefix="halves")
        return _pool


def run_both(first: Callable[[], A], second: Callable[[], B]) -> tuple[A, B]:
    """``(first(), second())``, with ``second`` on the helper thread while ``first`` runs
    here when the helper is free; otherwise both here.  An exception in either is raised
    after both have finished (neither half is left running on shared memory)."""
    if not _free.acquire(blocking=False):
        return first(), second()

    def release_after() -> B:
        try:
            return second()
        finally:
            _free.release()

    try:
        future = _helper().submit(release_after)
    except RuntimeError:  # the pool is shut down (interpreter exit): both halves here
        _free.release()
        return first(), second()
    try:
        a = first()
    finally:
        wait([future])  # never return (or raise) while the other half still runs
    return a, future.result()
