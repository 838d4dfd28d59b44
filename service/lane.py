"""The one thread that runs the server's torch work: every family's batches and the
request steps that call torch.

Why one: PyTorch's CPU kernels run on OpenMP, and GNU OpenMP gives each thread that
starts a parallel region a team of its own.  Once the teams' threads outnumber the cores
(one family worker thread each, plus the main thread that loaded the models, plus the
request threads), libgomp stops letting idle team threads spin and parks them instead,
so every parallel region of every layer pays a wake-up: on our 2-core VM a 25-patch
ARM-FSRCNN batch took 13.8 ms on a family worker against 10.2 ms on a lone team, and a
3-patch batch 4.2 ms against 1.8 ms.  With one lane there is one team, kept hot.  The
family workers still form batches and keep their own queues; only the torch calls move.
Serialising them costs nothing real: batches of different families would compete for
the same cores anyway.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


class ComputeLane:
    """A single worker thread with ``threads`` torch threads; ``call`` runs on it and waits."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._ident: int | None = None
        self._started = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute", initializer=self._init)
        self._pool.submit(lambda: None).result()  # start the thread now, so torch's thread count is set

    def _init(self) -> None:
        self._ident = threading.get_ident()
        self._own_threads()
        torch.set_grad_enabled(False)  # thread-local: the lane only ever serves

    def _own_threads(self) -> None:
        """Give the lane its thread count.  ATen keeps one process-wide count that each
        thread copies into its own OpenMP setting when it first asks for it, and the other
        threads set it to 1 for themselves; so the lane sets its own and asks at once
        (``get_num_threads`` makes the copy), and re-checks before every task."""
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
            torch.get_num_threads()

    def _task(self, fn: Callable[..., T], args: tuple) -> T:
        self._own_threads()
        return fn(*args)

    def on_lane(self) -> bool:
        return threading.get_ident() == self._ident

    def call(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the lane (inline if already there); exceptions propagate."""
        if self.on_lane():
            return fn(*args)
        return self._pool.submit(self._task, fn, args).result()

    async def run(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the lane without blocking the event loop (for request steps)."""
        return await asyncio.wrap_future(self._pool.submit(self._task, fn, args))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
