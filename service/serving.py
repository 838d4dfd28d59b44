"""What every served family shares on the request path, in one place: readiness and drain
checks, the request timeout, early shedding, admission (plan against the whole machine's
queue, then join it, as one critical section across families), waiting for the result
(with a shed at the last moment the job could still start, and a watch for clients who
hang up), and the metrics every request records.

``FamilyService.handle`` is the one request template; a family (``service/family.py``,
one module per family in ``service/families/``) only decodes its input, offers its plans and
turns outputs into an answer through the contract's hooks.  Everything between is here, so
deadlines and shedding behave the same for every family.

The deadline of a request runs from its arrival (``request.state.t0``) to the moment the
last byte of its response leaves; ``service/middleware.py`` counts met and missed there.
The compute must end ``respond_reserve`` earlier, to leave time to send.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, TypeVar

import torch
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service import imageio
from service.config import Settings
from service.errors import ApiError, ClientGone
from service.executor import Draining, Expired, Infeasible, Items, Job, QueueFull, Scheduler
from service.load import LoopLag
from service.metrics import Metrics
from service.body import Upload
from service.family import Answer, RequestParams, ServedFamily
from service.planner import Ask, Decision, Ladder, Planner, Policy, Shed
from service.runtime import FamilyRuntime

T = TypeVar("T")
Work = list[tuple[Any, Items]]


@dataclass
class Machine:
    """What all families of one server share: settings, metrics, the planner, the one
    scheduler that runs every batch, and the admission lock that makes planning plus
    joining the queue one step across families."""

    settings: Settings
    metrics: Metrics
    planner: Planner
    scheduler: Scheduler
    runtimes: list[FamilyRuntime] = field(default_factory=list)
    loop_lag: LoopLag = field(default_factory=LoopLag)  # started by the app, on the serving loop
    # Planning that is too big for the event loop runs here, on a thread of its own: while it
    # runs it holds the admission lock, so it must never wait behind decodes in a shared pool.
    planning: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        1, thread_name_prefix="planning", initializer=torch.set_num_threads, initargs=(1,)))
    _admission: asyncio.Lock | None = None

    @property
    def admission(self) -> asyncio.Lock:
        if self._admission is None:  # created on the serving loop, not at import
            self._admission = asyncio.Lock()
        return self._admission

    def share_s(self, runtime: FamilyRuntime) -> float:
        """Seconds of compute one request of ``runtime`` may take at the current load: its
        model's arrivals split what the target utilisation leaves after the other models'
        offered load (rate x mean admitted cost) on the same thread; inf when unknown."""
        rate = runtime.arrivals.rate()
        if rate <= 0:
            return math.inf
        others = sum(r.load() for r in self.runtimes if r is not runtime)
        return max(self.settings.target_utilization - others, 0.0) / rate


class FamilyService:
    """One served model on the machine: its family (the contract's hooks), its runtime
    (cost model, queue handle, readiness) and the request template every family runs."""

    def __init__(self, family: ServedFamily, machine: Machine) -> None:
        self.family, self.machine = family, machine
        self.settings, self.metrics, self.planner = machine.settings, machine.metrics, machine.planner
        self.name, self.endpoint = family.name, family.endpoint
        keys = family.batch_keys()
        units = None if type(family).work_units is ServedFamily.work_units else family.work_units
        self.runtime = FamilyRuntime(family.name, family.forward, list(keys), family.example, machine.settings,
                                     machine.metrics, keys, units=units, scheduler=machine.scheduler,
                                     max_batch=family.max_batch)
        self.drain_started = math.inf  # time.monotonic() of SIGTERM: work that arrived before it is served
        machine.runtimes.append(self.runtime)

    @property
    def draining(self) -> bool:
        return self.drain_started != math.inf

    # --- before any work --------------------------------------------------------------------

    def unavailable(self, reason: str, message: str) -> ApiError:
        self.metrics.shed.labels(self.name, reason).inc()
        return ApiError(503, message, headers={"Retry-After": "1"})

    def open_for(self, request: Request, t0: float, deadline_ms: float | None, policy: Policy | None) -> None:
        """Count the arrival (offered load includes what gets shed), tell the access log and
        the deadline counters which model and deadline this is, then refuse at once while
        draining or warming up, or when a policy override is not allowed."""
        self.runtime.arrivals.tick(t0)
        deadline_ms = deadline_ms if deadline_ms is not None else self.settings.default_deadline_ms
        request.state.model = self.name
        request.state.deadline_at = t0 + deadline_ms / 1000 if deadline_ms is not None else None
        if t0 >= self.drain_started or not self.runtime.executor.accepting:
            raise self.unavailable("draining", "the server is shutting down; retry on another replica")
        if not self.runtime.ready.is_set():
            raise self.unavailable("not_ready", "the model is warming up (calibrating its cost model); retry shortly")
        if policy is not None and not self.settings.allow_policy_override:
            raise ApiError(422, "policy override is disabled on this server (allow_policy_override)")

    def floor_s(self, upload: Upload | None = None, params: RequestParams | None = None) -> float | None:
        """Predicted time of the cheapest plan for one request: its compute, known before
        the body is read (``floor_batches``), or once it is read, from what can be read
        without decoding it (``floor_of``: ARM's patch count and output size, overhead
        included); None where neither can say (with a body: one ``decode`` will refuse);
        0 before the cost model is calibrated."""
        if not self.runtime.ready.is_set():
            return 0.0
        cost, batches = self.runtime.cost, self.family.floor_batches()
        if batches is not None:
            return cost.predict(batches)
        floor = self.family.floor_of(upload, params, self.settings) \
            if upload is not None and params is not None else None
        if floor is None:
            return None
        batches, units = floor
        return cost.predict(batches) + (cost.predict_overhead(units) if units else 0.0)

    def seconds(self, plan: Any) -> float:
        """Predicted forward seconds of a plan on this host (fixed cost per batch included)."""
        return self.runtime.cost.predict(self.family.batches(plan))

    def ladder(self, work: Any, unit: str) -> Ladder:
        f = self.family
        return Ladder(at_budget=lambda b: f.plan(work, b, unit), seconds=self.seconds, top=lambda: f.top(work),
                      bottom=lambda: f.bottom(work), flops_fraction=flops_fraction,
                      refine=lambda p: f.refine(work, p, self.seconds))

    def shed_early(self, t0: float, deadline_ms: float | None, policy: Policy | None,
                   upload: Upload | None = None, params: RequestParams | None = None) -> None:
        """Before the body is read or decoded: when the work queued ahead (every family's)
        plus this model's cheapest rung outlasts the deadline no plan can fit, and saying
        so at once costs the overloaded server almost nothing.  What is left of the deadline
        is counted as the planner counts it (margin, and the answer's time to leave), so
        that a request the planner would shed anyway is never read and decoded first.
        Called before reading the body and again before decoding it (with the body, whose
        header may tell the floor, ``floor_of``)."""
        deadline_ms = deadline_ms if deadline_ms is not None else self.settings.default_deadline_ms
        if deadline_ms is None or (policy or self.settings.policy) != "adaptive":
            return
        floor = self.floor_s(upload, params)
        if floor is None and upload is not None:
            # The body is read and its floor cannot be told from it: ``decode`` will refuse it
            # (``floor_of``: malformed, or over a limit), and its 4xx says what to send instead
            # where a 429 would invite the same request again, even once the deadline ran out
            # while the body was read.  (A family that tells no floor at all leaves this shed
            # to the planner.)
            return
        deadline_s = deadline_ms / 1000
        wait, _room = self.machine.scheduler.view(t0 + deadline_s)
        floor = floor or 0.0  # before the body: the queue's wait alone
        # as the planner will count it: the answer's time to leave is spent already
        left = deadline_s - self.planner.margin_s(deadline_s) - (time.monotonic() - t0) - self.respond_s()
        if wait + floor > left:
            self.metrics.shed.labels(self.name, "deadline").inc()
            raise ApiError(429, f"the work queued ahead ({1000 * wait:.0f} ms predicted) and this model's cheapest "
                                f"rung ({1000 * floor:.0f} ms) do not fit the {1000 * max(left, 0):.0f} ms left before "
                                f"the {deadline_ms:g} ms deadline", headers={"Retry-After": retry_after(wait)})

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

    def respond_s(self) -> float:
        """Predicted time from a result being ready to the last byte of its answer leaving:
        the larger of the event loop's recent lag (a ready answer waits that long for the
        loop) and the tail of this model's measured result-to-last-byte times."""
        return max(self.machine.loop_lag.recent(), self.runtime.respond.value())

    def respond_reserve_s(self, deadline_s: float) -> float:
        """Time kept after the compute for sending the response: ``respond_s`` plus half
        the planning margin."""
        return self.planner.margin_s(deadline_s) / 2 + self.respond_s()

    async def admit(self, ladder: Ladder, ask: Ask, t0: float, overhead_s: float,
                    prepare: Callable[[Decision], Work] | None,
                    finish: Callable[[Decision, list[Items]], Any] | None,
                    inline: bool = False) -> tuple[Decision, Job | None, Future | None]:
        """Plan the request against the machine's queue as it is and join it, before the
        next request of any family plans (otherwise concurrent requests all plan against the
        same short queue and together overcommit it).  ``prepare=None`` plans only (explain /
        dry run).  ``inline`` plans on the event loop: for small requests planning takes
        well under a millisecond, less than the hop to a thread and back."""
        rt, sched = self.runtime, self.machine.scheduler
        deadline_ms = ask.deadline_ms if ask.deadline_ms is not None else self.settings.default_deadline_ms
        adaptive = (ask.policy or self.settings.policy) == "adaptive"
        finish_by = t0 + deadline_ms / 1000 - self.respond_reserve_s(deadline_ms / 1000) \
            if deadline_ms is not None and adaptive else None

        def plan_and_prepare() -> tuple[Decision, Work | None]:
            wait, room = sched.view(finish_by)
            # the time its answer will take to leave counts as spent already
            d = self.planner.decide(ladder, ask, wait_s=wait,
                                    elapsed_s=time.monotonic() - t0 + self.respond_s(),
                                    overhead_s=overhead_s, share_s=self.machine.share_s(rt), room_s=room)
            return d, (prepare(d) if prepare is not None else None)

        async with self.machine.admission:
            try:
                decision, work = plan_and_prepare() if inline else \
                    await asyncio.get_running_loop().run_in_executor(self.machine.planning, plan_and_prepare)
            except Shed as exc:
                self.metrics.shed.labels(self.name, exc.reason).inc()
                raise ApiError(429, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
            if work is None:
                return decision, None, None
            # Fixed policies are the conventional baseline: they serve late rather than drop.
            job = Job(work, decision.predicted_compute_s + decision.predicted_overhead_s,
                      finish_by if decision.policy == "adaptive" else None,
                      (lambda outputs: finish(decision, outputs)) if finish is not None else None)
            try:
                future = rt.executor.submit(job)
            except Infeasible as exc:
                self.metrics.shed.labels(self.name, "deadline").inc()
                raise ApiError(429, f"shed: {exc}", headers={"Retry-After": retry_after(exc.wait_s)}) from None
            except QueueFull as exc:
                self.metrics.shed.labels(self.name, "queue_full").inc()
                raise ApiError(429, str(exc), headers={"Retry-After": retry_after(sched.predicted_wait())}) from None
            except Draining as exc:
                raise self.unavailable("draining", str(exc)) from None
        rt.admitted(job.predicted_s)
        return decision, job, future

    async def result(self, request: Request, decision: Decision, job: Job, future: Future) -> Any:
        """The job's result.  Meanwhile two things can end the wait: the client hangs up
        (a job not yet started is taken out of the queue, never computed: 499, counted as
        cancelled), or the last moment at which the job could still start and finish in
        time passes while it waits (it is taken out and shed with 429 before its deadline,
        rather than computed and sent late)."""
        sched = self.machine.scheduler
        waiting = asyncio.ensure_future(asyncio.wrap_future(future))
        gone = asyncio.ensure_future(client_gone(request))
        try:
            timeout = None if job.deadline is None else max(0.0, job.deadline - job.predicted_s - time.monotonic())
            done, _ = await asyncio.wait({waiting, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:  # the latest start passed in the queue
                if sched.cancel(job):
                    self.metrics.shed.labels(self.name, "late_start").inc()
                    left = job.deadline - time.monotonic()
                    raise ApiError(429, f"shed: the work queued ahead did not leave this request time to run "
                                        f"({1000 * job.predicted_s:.0f} ms needed, {1000 * max(left, 0):.0f} ms left)",
                                   headers={"Retry-After": retry_after(sched.predicted_wait())})
                done, _ = await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
            request.state.on_sent = self.runtime.respond.observe  # result ready -> last byte: the middleware
            request.state.result_at = job.done_at
            if gone in done and waiting not in done:
                started = not sched.cancel(job)
                self.metrics.cancelled.labels(self.name, "running" if started else "queued").inc()
                raise ClientGone("the client closed the connection while its request " +
                                 ("ran" if started else "waited; its work was dropped"))
            return waiting.result()
        except Draining as exc:
            raise self.unavailable("draining", str(exc)) from None
        except Expired as exc:
            if time.monotonic() < request.state.deadline_at:
                self.metrics.shed.labels(self.name, "late_start").inc()
                raise ApiError(429, f"shed: {exc}", headers={"Retry-After": "1"}) from None
            raise ApiError(504, f"deadline of {1000 * decision.deadline_s:g} ms missed: {exc}") from None
        finally:
            gone.cancel()
            if not waiting.done():
                waiting.cancel()

    # --- the request template ---------------------------------------------------------------

    async def handle(self, request: Request, params: RequestParams, upload: Upload | None = None,
                     render: Render | None = None) -> Response:
        """Every family's request, the same way: open -> read -> shed early -> decode ->
        admit -> wait -> observe -> respond, under ``request_timeout_s``.  A protocol other
        than the native one (``service/oip.py``) hands in the ``upload`` it already read from
        its own body and a ``render`` that turns the answer into its own response."""
        t0 = request.state.t0
        return await self.guarded(t0, self._handle(request, params, t0, upload, render or native_response))

    async def _handle(self, request: Request, params: RequestParams, t0: float, upload: Upload | None,
                      render: Render) -> Response:
        f, s = self.family, self.settings
        self.open_for(request, t0, params.deadline_ms, params.policy)
        budget = parse_budget(params.budget, f.budget_words)
        unit = params.budget_unit or f.budget_units[0]
        if unit not in f.budget_units:
            raise ApiError(422, f"budget_unit={unit} is not offered by {self.name}",
                           f"budget_unit={' or '.join(f.budget_units)}")
        f.check(request, params)
        self.shed_early(t0, params.deadline_ms, params.policy)
        if upload is None:
            upload = await f.read(request, params, s.max_body_bytes)
        self.shed_early(t0, params.deadline_ms, params.policy, upload, params)
        work = await decode_body(len(upload.data), lambda: f.decode(upload, params, s))
        pinned = f.pin(work, params)
        ask = Ask(budget=budget if isinstance(budget, float) else None, deadline_ms=params.deadline_ms,
                  min_budget=params.min_budget, policy=params.policy,
                  fixed=pinned.plan if pinned is not None else None)
        units = f.overhead_units(work)
        plan_only = f.plan_only(params)

        def finish(d: Decision, outputs: list[Items]) -> Any:  # on the scheduler thread, after the forwards
            tf = time.perf_counter()
            result = f.finish(work, d.plan, outputs)
            if units:
                self.runtime.cost.observe_overhead(units, time.perf_counter() - tf)
            return result

        decision, job, future = await self.admit(
            self.ladder(work, unit), ask, t0, self.runtime.cost.predict_overhead(units) if units else 0.0,
            None if plan_only else (lambda d: f.prepare(work, d.plan)), finish, inline=f.plans_inline(work))
        if plan_only:
            answer = await asyncio.to_thread(f.explain, work, decision)
        else:
            result = await self.result(request, decision, job, future)
            answer = f.respond(work, decision, result, params, request) if f.respond_inline(work, params) else \
                await asyncio.to_thread(f.respond, work, decision, result, params, request)
        label = pinned.label if pinned is not None else f"{round(decision.budget, 4):g}"
        headers = {**self.timing_headers(decision, job, t0), "X-Anytime-Rung": answer.rung,
                   "X-Anytime-Flops": f"{answer.flops:.0f}", "X-Anytime-Flops-Full": f"{answer.flops_full:.0f}",
                   "X-Anytime-Flops-Fraction": f"{answer.flops / answer.flops_full if answer.flops_full else 0:.4f}",
                   "X-Anytime-Budget": label, **answer.headers}
        if job is not None:
            self.observe(decision, job, t0, answer)
            f.record(self.metrics, work, decision, answer)
        served = {"model": self.name, "family": f.family, "flops": answer.flops, "flops_full": answer.flops_full,
                  "flops_convention": f.flops_convention, "budget": label, "policy": decision.policy,
                  "decision": decision.how}
        if job is not None:
            served.update(queue_ms=round(1000 * job.queue_s, 2), compute_ms=round(1000 * job.compute_s, 2))
        return render(answer, served, headers)

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

    def observe(self, d: Decision, job: Job, t0: float, answer: Answer) -> None:
        """The metrics every served request records (deadline met or missed is counted when
        its last byte is sent, in the middleware)."""
        mt, name = self.metrics, self.name
        mt.request_seconds.labels(name, answer.rung).observe(time.monotonic() - t0)
        mt.queue_seconds.labels(name).observe(job.queue_s)
        mt.compute_seconds.labels(name, answer.rung).observe(job.compute_s)
        mt.budget.labels(name).observe(d.budget)
        if d.how == "deadline" and d.budget < self.settings.max_budget - 1e-9:
            mt.degraded.labels(name).inc()
        mt.flops.labels(name).inc(answer.flops)

    def start(self) -> Future:
        """Calibrate on the scheduler's thread; the future completes when the model is ready."""
        f, rt = self.family, self.runtime
        full = rt.max_batch

        def after_timing() -> None:
            if type(f).calibrate_extra is not ServedFamily.calibrate_extra:
                rt.cost.calibrate_overhead(f.calibrate_extra(self.settings.calibration_repeats))
            f.calibrated(rt.cost.predict, full)

        return rt.start(extra=after_timing, before=lambda: f.before_timing(full))

    def describe(self) -> dict:
        """This model's entry in GET /v1/models."""
        f, rt = self.family, self.runtime
        return {"name": self.name, "family": f.family, "endpoint": self.endpoint.path,
                **{k: v for k, v in f.selection().items()}, "flops_convention": f.flops_convention,
                "budget_units": list(f.budget_units),
                "rungs": [r.describe() for r in f.rungs()], **f.describe(),
                "ready": rt.ready.is_set(), "cost_model": rt.cost.snapshot() if rt.cost.calibrated else None,
                "calibration_s": round(rt.calibration_s, 3)}


# (answer, what every answer reports besides the family's own body, the X-Anytime-* headers)
Render = Callable[[Answer, dict, dict], Response]


def native_response(answer: Answer, served: dict, headers: dict[str, str]) -> Response:
    """The native endpoints' response: the family's bytes as they are, or its JSON body with
    what every answer reports (model, FLOPs, budget, policy, timings)."""
    if isinstance(answer.body, bytes):
        return Response(answer.body, media_type=answer.media_type, headers=headers)
    body = {"model": served["model"], "family": served["family"], **answer.body,
            **{k: v for k, v in served.items() if k not in ("model", "family")}}
    return JSONResponse(body, headers=headers)


def flops_fraction(plan: Any) -> float:
    return plan.flops / plan.flops_full if plan.flops_full else 0.0


def parse_budget(raw: str, words: tuple[str, ...] = ()) -> float | str | None:
    """``auto`` (None), a number in [0, 1], or one of the family's own ``words``."""
    if raw == "auto":
        return None
    if raw in words:
        return raw
    accepted = f"a number in [0, 1], {', '.join(repr(w) for w in ('auto', *words))}"
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(422, f"budget={raw!r} is not a number", accepted) from None
    if not (0.0 <= value <= 1.0):  # NaN fails this too
        raise ApiError(422, f"budget={raw} is outside [0, 1]", accepted)
    return value


# Bodies this small are decoded on the event loop: well under a millisecond, less than the hop
# to a request thread and back (and one GIL hand-over fewer for the scheduler thread).
INLINE_DECODE_BYTES = 128 * 1024


async def decode_body(nbytes: int, decode: Callable[[], T]) -> T:
    """Run a route's decoding (and whatever it does with the pixels) on the loop for small
    bodies, on a request thread for large ones; an undecodable image is a clear 4xx."""
    try:
        return decode() if nbytes <= INLINE_DECODE_BYTES else await asyncio.to_thread(decode)
    except imageio.ImageError as exc:
        raise ApiError(exc.status, str(exc), "PNG, JPEG or WebP images") from None


async def known_query_only(request: Request) -> None:
    """A route dependency: a query parameter the route does not take is a 422 naming the
    ones it does (a misspelt ``deadline_ms`` would otherwise be ignored without a word, and
    the request served without the deadline its client meant).  ``async`` so that FastAPI
    runs it on the event loop: a plain function would be sent to the thread pool and back,
    a hop that under load cost every request one turn of a busy loop."""
    route = request.scope.get("route")
    if route is None or not hasattr(route, "dependant"):
        return
    accepted = _accepted_query(route)
    unknown = sorted(set(request.query_params) - accepted)
    if unknown:
        raise ApiError(422, f"unknown query parameter{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
                       f"query parameters of {request.url.path}: {', '.join(sorted(accepted))}")


def _accepted_query(route: Any) -> frozenset[str]:
    """The query parameter names a route takes (the fields of a query-parameter model, or
    single parameters), worked out once and kept on the route."""
    accepted = getattr(route, "anytime_accepted_query", None)
    if accepted is None:
        names: set[str] = set()
        for p in route.dependant.query_params:
            model = p.field_info.annotation
            if isinstance(model, type) and issubclass(model, BaseModel):  # a query-parameter model
                names |= {f.alias or n for n, f in model.model_fields.items()}
            else:
                names.add(p.alias)
        accepted = route.anytime_accepted_query = frozenset(names)
    return accepted


def retry_after(wait_s: float) -> str:
    """Retry-After in whole seconds (at least 1) from a predicted wait."""
    return str(max(1, math.ceil(wait_s)))


async def client_gone(request: Request) -> None:
    """Returns when the client has closed the connection (after the body was read, the
    server's next ASGI message is ``http.disconnect``)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
