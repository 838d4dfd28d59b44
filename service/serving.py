"""What every served family shares on the request path: readiness and drain checks, the
request timeout, early shedding, admission (plan against the queue, then join it, as one
critical section), waiting for the worker, and the metrics every request records.

A family's route (service/sr.py, service/classify.py) parses its own input, builds the
request's ``Ladder`` and says how to turn a plan into work and outputs into a result;
everything between is here, so deadlines and shedding behave the same for every family.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from service.config import Policy, Settings
from service.errors import ApiError
from service.executor import DeadlinePassed, Draining, Items, Job, QueueFull
from service.metrics import Metrics
from service.planner import Ask, Decision, Ladder, Planner, Shed
from service.runtime import FamilyRuntime

T = TypeVar("T")
Work = list[tuple[Any, Items]]


class FamilyService:
    def __init__(self, runtime: FamilyRuntime, settings: Settings, metrics: Metrics, planner: Planner) -> None:
        self.runtime, self.settings, self.metrics, self.planner = runtime, settings, metrics, planner
        self.name = runtime.name
        self.draining = False
        self.admission = asyncio.Lock()

    # --- before any work --------------------------------------------------------------------

    def unavailable(self, reason: str, message: str) -> ApiError:
        self.metrics.shed.labels(self.name, reason).inc()
        return ApiError(503, message, headers={"Retry-After": "1"})

    def open_for(self, t0: float, policy: Policy | None) -> None:
        """Count the arrival (offered load includes what gets shed), then refuse at once
        while draining or warming up, or when a policy override is not allowed."""
        self.runtime.arrivals.tick(t0)
        if self.draining or not self.runtime.executor.accepting:
            raise self.unavailable("draining", "the server is shutting down; retry on another replica")
        if not self.runtime.ready.is_set():
            raise self.unavailable("not_ready", "the model is warming up (calibrating its cost model); retry shortly")
        if policy is not None and not self.settings.allow_policy_override:
            raise ApiError(422, "policy override is disabled on this server (allow_policy_override)")

    def shed_early(self, t0: float, deadline_ms: float | None, policy: Policy | None) -> None:
        """Before any decoding: when the queue alone outlasts the deadline no plan can fit,
        and saying so at once costs the overloaded server nothing."""
        deadline_ms = deadline_ms if deadline_ms is not None else self.settings.default_deadline_ms
        if deadline_ms is None or (policy or self.settings.policy) != "adaptive":
            return
        deadline_s = deadline_ms / 1000
        wait = self.runtime.executor.predicted_wait()
        if time.monotonic() - t0 + wait > deadline_s - self.planner.margin_s(deadline_s):
            self.metrics.shed.labels(self.name, "deadline").inc()
            raise ApiError(429, f"the queue ahead ({1000 * wait:.0f} ms predicted) outlasts the {deadline_ms:g} ms "
                                "deadline", headers={"Retry-After": str(max(1, round(wait)))})

    async def guarded(self, t0: float, handler: Awaitable[T]) -> T:
        """Run a request's handler under ``request_timeout_s`` (504) and the in-flight gauge."""
        left = self.settings.request_timeout_s - (time.monotonic() - t0)
        inflight = self.metrics.inflight.labels(self.name)
        inflight.inc()
        try:
            return await asyncio.wait_for(handler, max(left, 0.001))
        except asyncio.TimeoutError:
            raise ApiError(504, f"request timed out after {self.settings.request_timeout_s:g} s "
                                "(request_timeout_s)") from None
        finally:
            inflight.dec()

    # --- admission and execution ------------------------------------------------------------

    async def admit(self, ladder: Ladder, ask: Ask, t0: float, overhead_s: float,
                    prepare: Callable[[Decision], Work] | None,
                    finish: Callable[[Decision, list[Items]], Any] | None,
                    inline: bool = False) -> tuple[Decision, Job | None, Future | None]:
        """Plan the request against the queue as it is and join it, before the next request
        plans (otherwise concurrent requests all plan against the same short queue and
        together overcommit it).  ``prepare=None`` plans only (explain / dry run).
        ``inline`` plans on the event loop: for small requests planning takes well under a
        millisecond, less than the hop to a thread and back."""
        rt = self.runtime

        def plan_and_prepare() -> tuple[Decision, Work | None]:
            d = self.planner.decide(ladder, ask, wait_s=rt.executor.predicted_wait(), elapsed_s=time.monotonic() - t0,
                                    overhead_s=overhead_s, rate_rps=rt.arrivals.rate())
            return d, (prepare(d) if prepare is not None else None)

        async with self.admission:
            try:
                decision, work = plan_and_prepare() if inline else await asyncio.to_thread(plan_and_prepare)
            except Shed as exc:
                self.metrics.shed.labels(self.name, exc.reason).inc()
                raise ApiError(429, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
            if work is None:
                return decision, None, None
            # Fixed policies are the conventional baseline: they serve late rather than drop.
            deadline_at = t0 + decision.deadline_s if decision.deadline_s is not None and \
                decision.policy == "adaptive" else None
            job = Job(work, decision.predicted_compute_s + decision.predicted_overhead_s, deadline_at,
                      (lambda outputs: finish(decision, outputs)) if finish is not None else None)
            try:
                future = rt.executor.submit(job)
            except QueueFull as exc:
                self.metrics.shed.labels(self.name, "queue_full").inc()
                raise ApiError(429, str(exc), headers={
                    "Retry-After": str(max(1, round(rt.executor.predicted_wait())))}) from None
            except Draining as exc:
                raise self.unavailable("draining", str(exc)) from None
        return decision, job, future

    async def result(self, decision: Decision, future: Future) -> Any:
        try:
            return await asyncio.wrap_future(future)
        except Draining as exc:
            raise self.unavailable("draining", str(exc)) from None
        except DeadlinePassed as exc:
            self.metrics.deadline_missed.labels(self.name).inc()
            raise ApiError(504, f"deadline of {1000 * decision.deadline_s:g} ms missed: {exc}") from None

    # --- after ------------------------------------------------------------------------------

    def timing_headers(self, d: Decision, job: Job | None, t0: float) -> dict[str, str]:
        h = {"X-Anytime-Model": self.name, "X-Anytime-Policy": d.policy, "X-Anytime-Decision": d.how,
             "X-Anytime-Predicted-Ms": f"{1000 * (d.predicted_wait_s + d.predicted_compute_s + d.predicted_overhead_s):.1f}",
             "X-Anytime-Server-Ms": f"{1000 * (time.monotonic() - t0):.1f}"}
        if d.deadline_s is not None:
            h["X-Anytime-Deadline-Ms"] = f"{1000 * d.deadline_s:g}"
        if job is not None:
            h["X-Anytime-Queue-Ms"] = f"{1000 * job.queue_s:.1f}"
            h["X-Anytime-Compute-Ms"] = f"{1000 * job.compute_s:.1f}"
            h["X-Anytime-Encode-Ms"] = f"{1000 * job.finish_s:.1f}"
        return h

    def observe(self, d: Decision, job: Job, t0: float, rung: str, flops: float, budget: float) -> None:
        """The metrics every served request records."""
        mt, name = self.metrics, self.name
        total = time.monotonic() - t0
        mt.request_seconds.labels(name, rung).observe(total)
        mt.queue_seconds.labels(name).observe(job.queue_s)
        mt.compute_seconds.labels(name, rung).observe(job.compute_s)
        mt.budget.labels(name).observe(budget)
        mt.flops.labels(name).inc(flops)
        if d.deadline_s is not None:
            (mt.deadline_met if total <= d.deadline_s else mt.deadline_missed).labels(name).inc()

    def start(self) -> Future:
        """Start the worker and calibrate; the future completes when the model is ready."""
        return self.runtime.start()
