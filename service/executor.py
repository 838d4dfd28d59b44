"""One worker per model family: a bounded FIFO queue, inference on a dedicated thread,
micro-batching of work that shares a rung across concurrent requests.

A job is a request's forward work, a list of (rung key, items tensor), and optionally a
``finish`` step (ARM: stitch and encode) that turns its outputs into the response.  When
the worker frees up it takes the oldest job and merges the jobs queued behind it while
the merged forward passes stay within ``max_batch`` items per rung and every merged job
still finishes before its deadline (merging makes the first job wait for the others).
Items of one rung from all merged jobs run as one batch; outputs go back to each job,
whose ``finish`` then runs on the worker too.

Finishing on the worker is deliberate: on a small CPU host the network and the encoder
compete for the same cores, and a single server with one queue is what makes the
predicted wait (everything ahead of a new job, including the rest of the batch now
running) an honest number for the planner to budget against.  A job whose deadline has
passed when it reaches the worker is dropped, not computed: its client has given up.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from service.costmodel import CostModel

log = logging.getLogger("anytime.executor")

# A batch of items: one tensor, or a tuple of tensors that share the first dimension
# (e.g. images and a per-row exit threshold); outputs take the same form.
Items = torch.Tensor | tuple[torch.Tensor, ...]
Forward = Callable[[Hashable, Items], Items]


def count(x: Items) -> int:
    return len(x[0]) if isinstance(x, tuple) else len(x)


def take(x: Items, start: int, stop: int) -> Items:
    return tuple(t[start:stop] for t in x) if isinstance(x, tuple) else x[start:stop]


def concat(parts: list[Items]) -> Items:
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(col) for col in zip(*parts))
    return torch.cat(parts)


class QueueFull(Exception):
    pass


class Draining(Exception):
    pass


class DeadlinePassed(Exception):
    """The job's deadline passed while it waited; it was not computed."""


@dataclass
class Job:
    work: list[tuple[Hashable, Items]]
    predicted_s: float  # compute + finish, as predicted
    deadline: float | None = None  # time.monotonic() by which the result is needed
    finish: Callable[[list[Items]], Any] | None = None  # outputs -> result, on the worker
    future: Future = field(default_factory=Future)
    enqueued: float = 0.0
    started: float = 0.0
    compute_s: float = 0.0  # forward passes of the batch this job ran in
    finish_s: float = 0.0

    @property
    def items(self) -> int:
        return sum(count(x) for _, x in self.work)

    @property
    def queue_s(self) -> float:
        return self.started - self.enqueued


class Executor:
    """Runs jobs of one family; ``forward(key, batch)`` is the family's batched network."""

    def __init__(self, name: str, forward: Forward, cost: CostModel, max_queue: int = 64,
                 max_batch: int = 128, max_wait_s: float = 0.0,
                 on_batch: Callable[[Hashable, int, float], None] | None = None,
                 units: Callable[[Hashable, Items, Items], float] | None = None) -> None:
        self.name, self.forward, self.cost = name, forward, cost
        # Work units a forward pass did, for the cost model: items by default; a family whose
        # cost depends on the outputs (CF-ViT: exited rows cost less) counts its own.
        self.units = units
        self.max_queue, self.max_batch, self.max_wait_s = max_queue, max_batch, max_wait_s
        self.on_batch = on_batch  # (key, items, seconds) after each forward pass: metrics
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._running_predicted = 0.0  # predicted compute of the batch on the worker
        self._running_since = 0.0
        self._queued_predicted = 0.0
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"worker-{name}", daemon=True)

    # --- submission side (event loop) ---------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> Future:
        with self._cv:
            if not self._accepting:
                raise Draining(f"{self.name} is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{self.name} has {len(self._queue)} requests queued (limit {self.max_queue})")
            job.enqueued = time.monotonic()
            self._queue.append(job)
            self._queued_predicted += job.predicted_s
            self._cv.notify()
        return job.future

    def predicted_wait(self) -> float:
        """Seconds until a job submitted now would start, as predicted."""
        with self._cv:
            running_left = max(0.0, self._running_predicted - (time.monotonic() - self._running_since)) \
                if self._running_predicted else 0.0
            return running_left + self._queued_predicted

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self) -> None:
        with self._cv:
            self._accepting = False

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Finish what is queued (up to ``timeout``), then stop; True if all finished."""
        self.stop_accepting()
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.ident is not None:  # never started (shut down during warm-up): nothing to join
            self._thread.join(timeout)
        left = not self._thread.is_alive()
        with self._cv:  # anything the worker did not get to
            while self._queue:
                fut = self._queue.popleft().future
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(Draining(f"{self.name} stopped before this ran"))
        return left

    # --- worker side --------------------------------------------------------------------

    def _take_batch(self) -> list[Job] | None:
        with self._cv:
            while not self._queue:
                if self._stopping:
                    return None
                self._cv.wait()
            batch = [self._queue.popleft()]
            if self.max_wait_s > 0 and not self._queue and batch[0].items < self.max_batch:
                self._cv.wait(self.max_wait_s)
            counts = self._counts(batch[0])
            while self._queue and self._fits(batch, counts, self._queue[0]):
                job = self._queue.popleft()
                for k, n in self._counts(job).items():
                    counts[k] = counts.get(k, 0) + n
                batch.append(job)
            predicted = sum(j.predicted_s for j in batch)
            self._queued_predicted = max(0.0, self._queued_predicted - predicted) if self._queue else 0.0
            self._running_predicted, self._running_since = predicted, time.monotonic()
            return batch

    @staticmethod
    def _counts(job: Job) -> dict[Hashable, int]:
        out: dict[Hashable, int] = {}
        for k, x in job.work:
            out[k] = out.get(k, 0) + count(x)
        return out

    def _fits(self, batch: list[Job], counts: dict[Hashable, int], nxt: Job) -> bool:
        """Merge ``nxt`` if no rung grows past one full batch and every job of the merged
        batch still meets its deadline as predicted."""
        merged = dict(counts)
        for k, n in self._counts(nxt).items():
            merged[k] = merged.get(k, 0) + n
        if any(n > self.max_batch for n in merged.values()):
            return False
        done = time.monotonic() + sum(j.predicted_s for j in batch) + nxt.predicted_s  # merging saves, never costs
        return all(j.deadline is None or done <= j.deadline for j in (*batch, nxt))

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for job in batch:
                job.started = now
                if not job.future.set_running_or_notify_cancel():
                    continue  # its client went away (timeout, disconnect): skip the compute
                if job.deadline is not None and now >= job.deadline:
                    job.future.set_exception(DeadlinePassed(f"deadline passed after {now - job.enqueued:.3f} s "
                                                            "in the queue"))
                else:
                    live.append(job)
            try:
                self._run(live)
            except Exception as exc:  # a failing batch fails its jobs, never the worker
                log.exception("batch failed on %s", self.name)
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                with self._cv:
                    self._running_predicted = 0.0

    def _run(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        t0 = time.perf_counter()
        keys: list[Hashable] = []
        for job in jobs:
            for k, _ in job.work:
                if k not in keys:
                    keys.append(k)
        outputs: dict[tuple[int, int], Items] = {}
        for key in keys:
            parts = [(ji, wi, x) for ji, job in enumerate(jobs) for wi, (k, x) in enumerate(job.work) if k == key]
            inputs = concat([x for _, _, x in parts])
            n_items = count(inputs)
            results = []
            for s in range(0, n_items, self.max_batch):
                chunk = take(inputs, s, s + self.max_batch)
                tf = time.perf_counter()
                out = self.forward(key, chunk)
                dt = time.perf_counter() - tf
                results.append(out)
                self.cost.observe_forward(key, self.units(key, chunk, out) if self.units else count(chunk), dt)
                if self.on_batch is not None:
                    self.on_batch(key, count(chunk), dt)
            out = concat(results)
            offset = 0
            for ji, wi, x in parts:
                outputs[ji, wi] = take(out, offset, offset + count(x))
                offset += count(x)
        elapsed = time.perf_counter() - t0
        for ji, job in enumerate(jobs):
            job.compute_s = elapsed
            mine = [outputs[ji, wi] for wi in range(len(job.work))]
            if job.finish is None:
                job.future.set_result(mine)
                continue
            tf = time.perf_counter()
            try:
                result = job.finish(mine)
            except Exception as exc:  # one job's bad finish fails that job only
                job.future.set_exception(exc)
                continue
            finally:
                job.finish_s = time.perf_counter() - tf
            job.future.set_result(result)
