"""A served model family at run time: its handle on the machine's scheduler, its cost
model, its offered load and its readiness.

Families plug in with three things: ``forward(key, batch)`` (the batched network of one
rung), the rung keys, and ``example(key, n)`` (an input batch to calibrate with).  The
runtime times each rung at a few batch sizes before it reports ready (on the scheduler's
thread, the one that will serve), then keeps the cost model honest from every batch it
runs.  ``arrivals`` and ``mean_cost_s`` give the load this family puts on the shared
compute thread, which the other families' planners take into account.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future

import torch

from service.config import Settings
from service.costmodel import CostModel, TailEstimate
from service.executor import Executor, Forward, Items, Job, Scheduler, take
from service.load import RateMeter
from service.metrics import Metrics

log = logging.getLogger("anytime.runtime")


class FamilyRuntime:
    def __init__(self, name: str, forward: Forward, keys: list[Hashable], example: Callable[[Hashable, int], Items],
                 settings: Settings, metrics: Metrics, key_names: dict[Hashable, str] | None = None,
                 units: Callable[[Hashable, Items, Items], float] | None = None,
                 scheduler: Scheduler | None = None, max_batch: int | None = None) -> None:
        self.name, self.keys, self.example, self.settings, self.metrics = name, keys, example, settings, metrics
        self.key_names = key_names or {k: str(k) for k in keys}
        self.forward = forward
        self.max_batch = max_batch or settings.batch_max_items
        self.cost = CostModel(self.max_batch, settings.ewma_alpha)
        self.executor = Executor(name, forward, self.cost, settings.max_queue, self.max_batch,
                                 settings.batch_max_wait_ms / 1000, on_batch=self._on_batch, units=units,
                                 scheduler=scheduler, probe=example)
        self.ready = threading.Event()
        self.calibration_s = 0.0
        self.arrivals = RateMeter(settings.rate_window_s)
        self.mean_cost_s = 0.0  # EWMA of the predicted seconds of admitted requests
        # From a job's result being ready to the last byte of its response leaving: waking the
        # event loop, building and sending the answer, on a host whose cores the loop shares.
        self.respond = TailEstimate()

    def admitted(self, predicted_s: float) -> None:
        self.mean_cost_s += 0.1 * (predicted_s - self.mean_cost_s) if self.mean_cost_s else predicted_s

    def load(self) -> float:
        """Share of the compute thread this family's offered load takes (rate x mean cost)."""
        return self.arrivals.rate() * self.mean_cost_s

    def _on_batch(self, key: Hashable, items: int, _seconds: float) -> None:
        self.metrics.batch_items.labels(self.name, self.key_names[key]).observe(items)

    def calibration_sizes(self) -> list[int]:
        top = self.max_batch
        return sorted({n for n in (1, 8, 32, top) if n <= top})

    def calibrate(self, extra: Callable[[], None] | None = None, before: Callable[[], None] | None = None) -> None:
        """Run ``before`` (the family's engine choice), time every rung (and the family's
        ``extra`` work), then mark ready."""
        t0 = time.perf_counter()
        reps = self.settings.calibration_repeats
        if before is not None:
            before()
        with torch.inference_mode():
            inputs = {key: self.example(key, self.max_batch) for key in self.keys}
            self.cost.calibrate_rungs({key: lambda n, key=key: self.forward(key, take(inputs[key], 0, n))
                                       for key in self.keys}, self.calibration_sizes(), reps)
            if extra is not None:
                extra()
        self.calibration_s = time.perf_counter() - t0
        for key in self.keys:
            self.metrics.rung_item_seconds.labels(self.name, self.key_names[key]).set(
                self.cost.predict_forward(key, 1))
        log.info("calibrated %s in %.1f s", self.name, self.calibration_s,
                 extra={"model": self.name, "cost": self.cost.snapshot()})
        self.ready.set()

    def start(self, extra: Callable[[], None] | None = None, before: Callable[[], None] | None = None) -> Future:
        """Start the worker and calibrate on it: the same thread (and so the same OpenMP
        thread team) that will serve, while /healthz already answers."""
        self.executor.start()
        fut = self.executor.submit(Job([], 0.0, finish=lambda _outputs: self.calibrate(extra, before)))
        fut.add_done_callback(self._calibrated)
        return fut

    def _calibrated(self, fut: Future) -> None:
        if fut.exception() is not None:
            log.error("calibration of %s failed; the model stays not ready", self.name, exc_info=fut.exception())

    def refresh_gauges(self, draining: bool = False) -> None:
        """``draining``: the server is shutting down (its routes know; the scheduler keeps
        running what came before), so the model reports not ready."""
        m, n = self.metrics, self.name
        m.queue_depth.labels(n).set(self.executor.depth)
        m.predicted_wait.labels(n).set(self.executor.predicted_wait())
        m.slowdown.labels(n).set(self.cost.slowdown)
        m.ready.labels(n).set(1 if self.ready.is_set() and self.executor.accepting and not draining else 0)
        if self.ready.is_set():  # during calibration some rungs have no cost yet
            for key in self.keys:
                m.rung_item_seconds.labels(n, self.key_names[key]).set(self.cost.predict_forward(key, 1))
