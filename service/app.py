"""The HTTP app: wiring of models, runtime, planner, metrics and the routes.

    POST /superresolve   ARM x4 super-resolution (service/families/arm.py)
    POST /classify       PSS-Net and CF-ViT classification (service/families/pssnet.py, cfvit.py)
    POST /ground         SeqTR visual grounding, boxes and masks (service/families/seqtr.py)
    GET  /v1/models      rungs, FLOPs, measured quality and the live cost model
    GET  /v1/policy      the planner's view: policy, load, queue, predicted wait
    GET  /               the playground: try every endpoint in a browser (service/playground/)
    GET  /healthz        live (answers during warm-up)
    GET  /readyz         ready: calibrated and not draining (503 otherwise)
    GET  /metrics        Prometheus
    /v2/...              the Open Inference Protocol (KServe v2, Triton) for every model (service/oip.py)

Each inference route is built from the families served there (service/routes.py), every
family behind one contract (service/family.py) and loaded by name from ``Settings.families``
through the registry (service/registry.py).  Models load when the app is created.  Every family's batches run on one scheduler thread
(service/executor.py), earliest deadline first, so that admission sees the whole machine;
each family's cost model is calibrated on that thread when the server starts, one family
after the other, and inference answers 503 until it is done.  On shutdown the app stops
taking work (503), lets queued work finish, then stops the scheduler.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from urllib.parse import parse_qs

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import __version__, errors, oip, registry, routes
from service.apidocs import install_api_docs
from service.playground import install_playground
from service.config import Settings
from service.executor import Scheduler
from service.load import LoadMonitor, LoadReading, LoopLag, available_cores
from service.memory import freeze_startup_objects, keep_freed_memory
from service.metrics import Metrics
from service.middleware import RequestContext
from service.planner import Planner
from service.family import ServedFamily
from service.serving import FamilyService, Machine

log = logging.getLogger("anytime")

VERSION = __version__


def finite_ms(seconds: float) -> float | None:
    return None if seconds == float("inf") else round(1000 * seconds, 3)


def create_app(settings: Settings | None = None, families: list[ServedFamily] | None = None) -> FastAPI:
    """The app serving ``families`` (ready-made models), or else those ``settings.families``
    names, loaded through the registry.  Refuses at start-up two models of one name, two
    descriptions of one route, or a family route that shadows a built-in one."""
    settings = settings or Settings()
    metrics = Metrics()
    torch_threads = settings.torch_threads or max(1, available_cores() - 1)  # a core for HTTP, decode, encode
    machine = Machine(settings, metrics, Planner(settings),
                      Scheduler(torch_threads, settings.request_timeout_s, settings.batch_max_wait_ms / 1000,
                                settings.idle_probe_s, settings.probe_max_ms / 1000))
    families = registry.load(settings) if families is None else families
    names = [f.name for f in families]
    if len(set(names)) < len(names):
        raise ValueError(f"two served models share a name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}): "
                         "model names must be unique")
    services = [FamilyService(f, machine) for f in families]
    groups = routes.by_endpoint(services)

    def on_sample(r: LoadReading) -> None:
        metrics.cpu.labels("system").set(r.cpu_system)
        metrics.cpu.labels("process").set(r.cpu_process)
        for g in r.gpus:
            if g.utilization is not None:
                metrics.gpu.labels(str(g.device)).set(g.utilization)
            metrics.gpu_memory.labels(str(g.device)).set(g.memory_used_bytes)

    monitor = LoadMonitor(settings.load_sample_s, on_sample)
    machine.loop_lag = loop_lag = LoopLag()

    def freeze() -> None:
        if settings.freeze_startup_objects:
            seconds = freeze_startup_objects()
            log.info("froze the objects alive now out of the garbage collector's walk (one collection first: %.0f ms)",
                     1000 * seconds)

    # Set once every model has started and the collection below is over: /readyz waits for it.
    started = threading.Event()

    async def start_in_turn() -> None:
        for svc in services:
            try:
                await asyncio.wrap_future(svc.start())
            except Exception:  # logged by the runtime; that model stays not ready
                pass
        freeze()  # and what the calibrations built (ONNX Runtime sessions, int8 kernels' wrappers)
        # That collection held the loop (0.1-0.7 s): start-up's own pause, not load.  Let the
        # lag probe wake once and record it, then forget it, or the first requests after ready
        # would have it reserved against their deadlines (``LoopLag.recent``) and be shed.
        await asyncio.sleep(2 * loop_lag.interval)
        loop_lag.forget()
        started.set()

    def begin_drain() -> None:
        """Work that arrives from now on gets 503; what arrived before (even if the server has
        not read it yet) and what is queued still runs.  The scheduler stops taking work when
        the app shuts down, after the drain window."""
        now = time.monotonic()
        for svc in services:
            svc.drain_started = min(svc.drain_started, now)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Only the scheduler thread runs torch with torch_threads; the event loop and the
        # request threads (decode, analyse, prepare) use one, so that no second OpenMP team
        # competes with the scheduler's for the cores.
        torch.set_num_threads(1)
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(
            max(4, available_cores() + 2), thread_name_prefix="request", initializer=torch.set_num_threads,
            initargs=(1,)))
        if settings.gil_switch_interval_ms:
            sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
        if settings.keep_freed_memory:
            keep_freed_memory()
        monitor.start()
        loop_lag.start()
        warmup = asyncio.create_task(start_in_turn())  # one calibration at a time: each is timed alone
        log.info("serving %s with %d torch threads on the scheduler, policy %s",
                 ", ".join(s.name for s in services), torch_threads, settings.policy)
        yield
        warmup.cancel()
        begin_drain()
        if not await asyncio.to_thread(machine.scheduler.shutdown, settings.drain_timeout_s):
            log.warning("queued work did not finish within %.0f s", settings.drain_timeout_s)
        monitor.stop()
        loop_lag.stop()
        if settings.freeze_startup_objects:
            gc.unfreeze()  # what this app froze can be collected again once it is dropped (tests run many apps)

    app = FastAPI(title="Anytime Serve", version=VERSION, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Adaptive-compute inference: every request is served at the rung its deadline and "
                              "the live load allow, and every response says which rung served it and what it cost.")
    app.state.settings, app.state.metrics, app.state.services = settings, metrics, services
    app.state.begin_drain, app.state.monitor = begin_drain, monitor
    app.state.machine = machine
    errors.install(app)
    install_api_docs(app)  # /docs and /redoc without a CDN
    install_playground(app)  # / and /playground/: the page, its assets and samples

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: models calibrated and not draining", responses=errors.doc(503))
    async def readyz() -> JSONResponse:
        waiting = [s.name for s in services if not s.runtime.ready.is_set()] or \
            ([] if started.is_set() else ["start-up"])
        if any(s.draining for s in services):
            return errors.error_response(503, "draining", headers={"Retry-After": "1"})
        if waiting:
            return errors.error_response(503, f"warming up: {', '.join(waiting)}", headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready"})

    @app.get("/v1/models", summary="Served models: rungs, FLOPs, quality, live cost model")
    async def models() -> dict:
        return {"models": [s.describe() for s in services]}

    @app.get("/v1/policy", summary="The planner's view: policy, defaults, host load, queues")
    async def policy() -> dict:
        r = monitor.latest
        return {
            "policy": settings.policy, "allow_policy_override": settings.allow_policy_override,
            "default_budget": settings.default_budget, "default_deadline_ms": settings.default_deadline_ms,
            "default_min_budget": settings.default_min_budget, "max_budget": settings.max_budget,
            "deadline_margin": settings.deadline_margin, "deadline_margin_ms": settings.deadline_margin_ms,
            "load": {"cpu_system": r.cpu_system, "cpu_process": r.cpu_process, "cores": r.cores,
                     "torch_threads": torch_threads, "gpus": [vars(g) for g in r.gpus]},
            "scheduler": {"queue_depth": machine.scheduler.depth(),
                          "predicted_wait_ms": round(1000 * machine.scheduler.predicted_wait(), 2)},
            "models": {s.name: {"queue_depth": s.runtime.executor.depth, "max_queue": settings.max_queue,
                                "arrival_rps": round(s.runtime.arrivals.rate(), 2),
                                "mean_admitted_ms": round(1000 * s.runtime.mean_cost_s, 3),
                                "share_ms": finite_ms(machine.share_s(s.runtime)),
                                "slowdown": round(s.runtime.cost.slowdown, 4), "ready": s.runtime.ready.is_set(),
                                "draining": s.draining} for s in services},
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint(_request: Request) -> Response:
        for s in services:
            s.runtime.refresh_gauges(draining=s.draining)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    builtin = {p for p in (getattr(route, "path", None) for route in app.routes) if p}
    shadowed = sorted(set(groups) & builtin)
    if shadowed:
        raise ValueError(f"family routes {', '.join(shadowed)} would shadow the server's own")
    app.include_router(routes.router(services))
    app.include_router(oip.router(services, VERSION, lambda: started.is_set() and all(
        s.runtime.ready.is_set() and not s.draining for s in services)))

    def quick_shed(scope: dict, t0: float) -> errors.ApiError | None:
        """The early shed of the service a POST would reach, before routing: None when it
        fits, when the request is malformed (the route says what is wrong) or when the
        service is not serving (the route answers 503)."""
        if scope["method"] != "POST":
            return None
        group = groups.get(scope["path"])
        if not group:
            return None
        params = routes.parse_query(group[0].endpoint, parse_qs(scope["query_string"].decode("latin-1")))
        if params is None:
            return None
        try:
            svc = routes.select(group, group[0].endpoint, params)
        except errors.ApiError:
            return None
        deadline_ms, policy = params.deadline_ms, params.policy
        if svc is None or svc.draining or not svc.runtime.ready.is_set():
            return None
        try:
            svc.shed_early(t0, deadline_ms, policy)
        except errors.ApiError as exc:
            svc.runtime.arrivals.tick(t0)
            scope["state"]["model"] = svc.name
            effective = deadline_ms if deadline_ms is not None else settings.default_deadline_ms
            scope["state"]["deadline_at"] = t0 + effective / 1000 if effective is not None else None
            return exc
        return None

    served = {s.name for s in services}

    def model_of(scope: dict) -> str | None:
        """The served model a request names (OIP: in its path; native: ?model=, or the
        endpoint's only model); None when it names none or one that is not served (an
        unserved name never becomes a label: labels must stay few)."""
        path = scope["path"]
        if path.startswith("/v2/models/"):
            name = path.split("/")[3]
            return name if name in served else None
        group = groups.get(path)
        if not group:
            return None
        named = parse_qs(scope["query_string"].decode("latin-1")).get("model", [None])[0]
        if named is not None:
            return named if named in {s.name for s in group} else None
        return group[0].name if len(group) == 1 else None

    endpoints = builtin | set(groups)
    app.add_middleware(RequestContext, settings=settings, metrics=metrics, endpoints=endpoints,
                       arrival_lag=loop_lag.recent, quick_shed=quick_shed, model_of=model_of,
                       draining=lambda: any(s.draining for s in services))
    # The models and libraries loaded so far, the bulk: walked once here, before the server
    # listens (a collection on the running loop would hold up /healthz, or the bind itself).
    freeze()
    return app
