"""One scheduler for the whole machine: every family's forward passes run on one thread,
earliest deadline first, and every admission decision sees all the work queued on it.

Why one thread.  All families share the same cores.  With one worker per family each
planner saw only its own queue while the others' batches stole its CPU, so predictions
were wrong exactly under mixed load (measured: /ground 8% in time with all three endpoints
at capacity).  Running batches one at a time on one thread (Clockwork's lesson: execution
whose time can be predicted, every choice in one place) makes the predicted wait of a new
request the sum of predicted work ahead of it, across families.  The thread forms its own
batches, so a request costs two hand-offs (submit, result), as with a worker per family.

Invariants (all under ``_cv``):

* ``_queue`` holds the admitted jobs not yet started; ``_queued_s`` is the sum of their
  predicted seconds and ``_running_s``/``_running_since`` describe the batch on the thread.
* Order: earliest deadline first; a job without a deadline sorts at ``enqueued +
  no_deadline_horizon_s``, so such jobs are FIFO among themselves and never starve.
* Admission (``submit``) keeps every promise already made: a job with a deadline is
  refused (``Infeasible``) when, as predicted, it cannot finish in time at its place in the
  order or would push an admitted job past its deadline.
* A batch is the head job plus queued jobs of the same family, merged while no rung passes
  ``max_batch`` items, every merged job still meets its deadline and no job that the merge
  overtakes is pushed past its own.
* At dispatch a job that can no longer finish by its deadline is not computed: it fails
  with ``Expired`` (the route answers 429 when the deadline has not passed yet, else 504),
  and a job whose future was cancelled (client gone, shed by its route) is skipped.
* Idle probes (``idle_probe_s`` > 0): after that long with nothing queued, the thread times
  one forward pass of one rung, round-robin over every calibrated rung of every family, on
  made-up inputs, sized to be predicted at most ``probe_max_s`` (rungs slower than that for
  one item are not probed), and feeds it to that
  family's cost model like any pass.  A probe counts as running work for admission, so a
  request that arrives meanwhile waits at most about ``probe_max_s`` and is told so.
"""

from __future__ import annotations

import bisect
import itertools
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


def synchronize(out: Items) -> None:
    """Wait for a forward pass's kernels when it ran on CUDA: launches return at once, so
    without this the cost model would learn launch times, not compute times."""
    first = out[0] if isinstance(out, tuple) else out
    if first.is_cuda:
        torch.cuda.synchronize(first.device)


class QueueFull(Exception):
    pass


class Draining(Exception):
    pass


class Infeasible(Exception):
    """Admission refused: as predicted, the job would finish late or make admitted work late."""

    def __init__(self, message: str, wait_s: float) -> None:
        super().__init__(message)
        self.wait_s = wait_s


class Expired(Exception):
    """At dispatch the job could no longer finish by its deadline; it was not computed."""



@dataclass
class Job:
    work: list[tuple[Hashable, Items]]
    predicted_s: float  # compute + finish, as predicted
    deadline: float | None = None  # time.monotonic() by which the result is needed
    finish: Callable[[list[Items]], Any] | None = None  # outputs -> result, on the scheduler thread
    future: Future = field(default_factory=Future)
    family: str = ""
    enqueued: float = 0.0
    started: float = 0.0
    compute_s: float = 0.0  # forward passes of the batch this job ran in
    finish_s: float = 0.0
    done_at: float = 0.0  # time.monotonic() when its result was ready
    order: tuple[float, int] = (0.0, 0)  # (deadline or horizon, arrival sequence)

    @property
    def items(self) -> int:
        return sum(count(x) for _, x in self.work)

    @property
    def queue_s(self) -> float:
        return self.started - self.enqueued


@dataclass
class Family:
    """What the scheduler needs to run one family's batches."""

    name: str
    forward: Forward
    cost: CostModel
    max_batch: int
    max_queue: int
    # Work units a forward pass did, for the cost model: items by default; a family whose
    # cost depends on the outputs (CF-ViT: exited rows cost less) counts its own.
    units: Callable[[Hashable, Items, Items], float] | None = None
    on_batch: Callable[[Hashable, int, float], None] | None = None  # metrics after each pass
    probe: Callable[[Hashable, int], Items] | None = None  # made-up inputs of n items, for idle probes
    queued: int = 0
    accepting: bool = True

    def timed_forward(self, key: Hashable, x: Items, probe: bool = False) -> tuple[Items, float]:
        """One forward pass, finished (``synchronize``), its seconds taught to the cost model:
        what every pass does, a batch's or (``probe``) an idle probe's."""
        t0 = time.perf_counter()
        out = self.forward(key, x)
        synchronize(out)
        seconds = time.perf_counter() - t0
        self.cost.observe_forward(key, self.units(key, x, out) if self.units else count(x), seconds, probe=probe)
        return out, seconds


class Scheduler:
    """The machine's one compute thread and its deadline-ordered queue."""

    # Probe sizes tried, largest first: the first predicted within ``probe_max_s`` is used.
    PROBE_SIZES = (32, 16, 8, 4, 2, 1)

    def __init__(self, torch_threads: int = 0, no_deadline_horizon_s: float = 60.0,
                 max_wait_s: float = 0.0, idle_probe_s: float = 0.0, probe_max_s: float = 0.01) -> None:
        self.torch_threads = torch_threads  # 0: leave torch's default
        self.no_deadline_horizon_s = no_deadline_horizon_s
        self.max_wait_s = max_wait_s  # wait this long for more work when a batch is not full
        self.idle_probe_s, self.probe_max_s = idle_probe_s, probe_max_s  # 0: no idle probes
        self._probes = itertools.count()
        self.probes_run = 0
        self.families: dict[str, Family] = {}
        self._queue: list[Job] = []  # sorted by Job.order
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._queued_s = 0.0
        self._running_s = 0.0
        self._running_since = 0.0
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    # --- set-up -------------------------------------------------------------------------

    def register(self, family: Family) -> Family:
        if family.name in self.families:
            raise ValueError(f"family {family.name!r} is registered twice")
        self.families[family.name] = family
        return family

    def start(self) -> None:
        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()

    # --- submission side (event loop, request threads) ----------------------------------

    def submit(self, job: Job) -> Future:
        fam = self.families[job.family]
        with self._cv:
            if not self._accepting or not fam.accepting:
                raise Draining(f"{fam.name} is shutting down")
            if fam.queued >= fam.max_queue:
                raise QueueFull(f"{fam.name} has {fam.queued} requests queued (limit {fam.max_queue})")
            now = time.monotonic()
            job.enqueued = now
            job.order = (job.deadline if job.deadline is not None else now + self.no_deadline_horizon_s,
                         next(self._seq))
            pos = bisect.bisect(self._queue, job.order, key=lambda j: j.order)
            if job.deadline is not None:
                self._check_fits(job, pos, now)
            self._queue.insert(pos, job)
            self._queued_s += job.predicted_s
            fam.queued += 1
            self._cv.notify()
        return job.future

    def _running_left(self, now: float) -> float:
        return max(0.0, self._running_s - (now - self._running_since)) if self._running_s else 0.0

    def _check_fits(self, job: Job, pos: int, now: float) -> None:
        """Refuse ``job`` at ``pos`` if it would finish late or push an admitted job late."""
        t = now + self._running_left(now)
        for j in self._queue[:pos]:
            t += j.predicted_s
        wait = t - now
        if t + job.predicted_s > job.deadline:
            raise Infeasible(f"{1000 * wait:.0f} ms of work is queued ahead and this request needs "
                             f"{1000 * job.predicted_s:.0f} ms more; its deadline is "
                             f"{1000 * (job.deadline - now):.0f} ms away", wait)
        t += job.predicted_s
        for j in self._queue[pos:]:
            t += j.predicted_s
            if j.deadline is not None and t > j.deadline and t - job.predicted_s <= j.deadline:
                raise Infeasible(f"admitting {1000 * job.predicted_s:.0f} ms of work now would make an admitted "
                                 "request late", wait + job.predicted_s)

    def view(self, deadline: float | None, now: float | None = None) -> tuple[float, float]:
        """``(wait, room)`` for a request with this deadline (monotonic; None: none):
        seconds of predicted work that would run before it, and the most seconds it may add
        without pushing an admitted request past its deadline (inf when nothing is behind)."""
        now = time.monotonic() if now is None else now
        key = deadline if deadline is not None else now + self.no_deadline_horizon_s
        with self._cv:
            t = now + self._running_left(now)
            room = float("inf")
            wait = None
            for j in self._queue:
                if wait is None and j.order[0] > key:
                    wait = t - now
                t += j.predicted_s
                if wait is not None and j.deadline is not None and j.deadline >= t:  # (one already late
                    room = min(room, j.deadline - t)                                   # cannot be helped)
            if wait is None:
                wait = t - now
        return wait, max(room, 0.0)

    def predicted_wait(self) -> float:
        """Seconds of predicted work queued and running, all families."""
        with self._cv:
            return self._running_left(time.monotonic()) + self._queued_s

    def cancel(self, job: Job) -> bool:
        """Take a job that has not started out of the queue (its client is gone, or its
        route shed it); False when it already runs or ran."""
        with self._cv:
            if not job.future.cancel():
                return False
            self._remove(job)
            return True

    def _remove(self, job: Job) -> None:
        i = bisect.bisect_left(self._queue, job.order, key=lambda j: j.order)
        if i < len(self._queue) and self._queue[i] is job:
            del self._queue[i]
            self._queued_s = max(0.0, self._queued_s - job.predicted_s) if self._queue else 0.0
            self.families[job.family].queued -= 1

    def depth(self, family: str | None = None) -> int:
        if family is None:
            return len(self._queue)
        return self.families[family].queued

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self, family: str | None = None) -> None:
        with self._cv:
            if family is None:
                self._accepting = False
            else:
                self.families[family].accepting = False

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Finish what is queued (up to ``timeout``), then stop; True if all finished."""
        self.stop_accepting()
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.ident is not None:  # never started (shut down during warm-up): nothing to join
            self._thread.join(timeout)
        finished = not self._thread.is_alive()
        with self._cv:  # anything the thread did not get to
            for job in self._queue:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(Draining(f"{job.family} stopped before this ran"))
            self._queue.clear()
            self._queued_s = 0.0
        return finished

    # --- the scheduler thread -----------------------------------------------------------

    def _take_batch(self) -> list[Job] | None:
        """The next batch; None once stopping; [] when the thread has been idle for
        ``idle_probe_s`` (time for a probe)."""
        with self._cv:
            waited_for: Job | None = None  # each head waits for a fuller batch once
            while True:
                while not self._queue:
                    if self._stopping:
                        return None
                    if self.idle_probe_s > 0 and self._accepting:
                        if not self._cv.wait(self.idle_probe_s) and not self._queue and not self._stopping:
                            return []
                    else:
                        self._cv.wait()
                head = self._queue[0]
                if head is waited_for or self.max_wait_s <= 0 or len(self._queue) > 1 or \
                        head.items >= self.families[head.family].max_batch:
                    break
                self._cv.wait(self.max_wait_s)  # for more work to batch; the queue may change meanwhile
                waited_for = head  # a new head (this one cancelled) gets its own wait
            fam = self.families[head.family]
            now = time.monotonic()
            batch = [self._queue.pop(0)]
            counts = self._counts(batch[0])
            done = now + batch[0].predicted_s
            i = 0
            while i < len(self._queue):
                j = self._queue[i]
                if j.family != head.family:  # other families' jobs are overtaken, never merged
                    i += 1
                    continue
                merged = dict(counts)
                for k, n in self._counts(j).items():
                    merged[k] = merged.get(k, 0) + n
                ok = all(n <= fam.max_batch for n in merged.values()) and \
                    all(b.deadline is None or done + j.predicted_s <= b.deadline for b in (*batch, j)) and \
                    self._overtaking_ok(i, j.predicted_s, done + j.predicted_s)
                if not ok:
                    break
                self._queue.pop(i)
                batch.append(j)
                counts, done = merged, done + j.predicted_s
            predicted = sum(j.predicted_s for j in batch)
            self._queued_s = max(0.0, self._queued_s - predicted) if self._queue else 0.0
            fam.queued -= len(batch)
            self._running_s, self._running_since = predicted, now
            return batch

    def _overtaking_ok(self, index: int, extra_s: float, start: float) -> bool:
        """Running ``extra_s`` more now must not push a job queued before ``index`` past its deadline."""
        t = start
        for j in self._queue[:index]:
            t += j.predicted_s
            if j.deadline is not None and t > j.deadline and t - extra_s <= j.deadline:
                return False
        return True

    @staticmethod
    def _counts(job: Job) -> dict[Hashable, int]:
        out: dict[Hashable, int] = {}
        for k, x in job.work:
            out[k] = out.get(k, 0) + count(x)
        return out

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                self._probe()
                continue
            now = time.monotonic()
            live = []
            for job in batch:
                job.started = now
                if not job.future.set_running_or_notify_cancel():
                    continue  # its client went away or its route shed it: skip the compute
                if job.deadline is not None and now + job.predicted_s > job.deadline:
                    job.future.set_exception(Expired(
                        f"waited {1000 * (now - job.enqueued):.0f} ms and needs {1000 * job.predicted_s:.0f} ms; "
                        f"{1000 * (job.deadline - now):.0f} ms were left"))
                else:
                    live.append(job)
            try:
                if live:
                    self._run(self.families[live[0].family], live)
            except Exception as exc:  # a failing batch fails its jobs, never the scheduler
                log.exception("batch failed on %s", live[0].family)
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                with self._cv:
                    self._running_s = 0.0

    def _probe(self) -> None:
        """Time one rung's forward pass on made-up inputs into its cost model (the next rung in
        a round-robin over every family's calibrated rungs).

        Why: start-up calibration is a few timed runs, and on a shared host one of them can be
        an outlier; a rung calibrated too slow is never chosen, so no request ever corrects it,
        and the host itself changes over hours.  Probing while idle keeps every rung's
        calibrated line and the host's slowdown current at a cost of at most ``probe_max_s`` every
        ``idle_probe_s`` of idle time.  A rung whose single item is predicted to take longer
        is not probed (it learns from requests only): the bound is what a request arriving
        during a probe may wait, and admission would shed one that no longer fits."""
        rungs = [(fam, key) for fam in self.families.values() if fam.probe is not None and fam.accepting
                 for key in list(fam.cost.rungs) if fam.cost.predict_forward(key, 1) <= self.probe_max_s]
        if not rungs:
            return
        fam, key = rungs[next(self._probes) % len(rungs)]
        n = next((n for n in self.PROBE_SIZES if n <= fam.max_batch and
                  fam.cost.predict_forward(key, n) <= self.probe_max_s), 1)
        with self._cv:
            if self._queue or self._stopping:  # work arrived meanwhile: it goes first
                return
            self._running_s, self._running_since = fam.cost.predict_forward(key, n), time.monotonic()
        try:
            fam.timed_forward(key, fam.probe(key, n), probe=True)
            self.probes_run += 1
        except Exception:  # a probe never stops the scheduler; the family's requests will say more
            log.exception("idle probe of %s failed; no more probes of it", fam.name)
            fam.probe = None  # once, not every idle second
        finally:
            with self._cv:
                self._running_s = 0.0

    @staticmethod
    def _run(fam: Family, jobs: list[Job]) -> None:
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
            for s in range(0, n_items, fam.max_batch):
                chunk = take(inputs, s, s + fam.max_batch)
                out, dt = fam.timed_forward(key, chunk)
                results.append(out)
                if fam.on_batch is not None:
                    fam.on_batch(key, count(chunk), dt)
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
                job.done_at = time.monotonic()
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
            job.done_at = time.monotonic()
            job.future.set_result(result)


class Executor:
    """One family's handle on a scheduler (a private one when none is given: tests, tools)."""

    def __init__(self, name: str, forward: Forward, cost: CostModel, max_queue: int = 64,
                 max_batch: int = 128, max_wait_s: float = 0.0,
                 on_batch: Callable[[Hashable, int, float], None] | None = None,
                 units: Callable[[Hashable, Items, Items], float] | None = None,
                 scheduler: Scheduler | None = None, probe: Callable[[Hashable, int], Items] | None = None) -> None:
        self.name, self.forward, self.cost = name, forward, cost
        self.scheduler = scheduler or Scheduler(max_wait_s=max_wait_s)
        self._own = scheduler is None
        self.family = self.scheduler.register(Family(name, forward, cost, max_batch, max_queue, units, on_batch,
                                                     probe))

    def start(self) -> None:
        self.scheduler.start()

    def submit(self, job: Job) -> Future:
        job.family = self.name
        return self.scheduler.submit(job)

    def cancel(self, job: Job) -> bool:
        return self.scheduler.cancel(job)

    def predicted_wait(self) -> float:
        return self.scheduler.predicted_wait()

    @property
    def depth(self) -> int:
        return self.scheduler.depth(self.name)

    @property
    def accepting(self) -> bool:
        return self.family.accepting and self.scheduler.accepting

    def stop_accepting(self) -> None:
        self.scheduler.stop_accepting(self.name)

    def shutdown(self, timeout: float = 30.0) -> bool:
        """A private scheduler stops; a shared one only stops taking this family's work."""
        if self._own:
            return self.scheduler.shutdown(timeout)
        self.stop_accepting()
        return True
