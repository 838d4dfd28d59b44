"""The HTTP app: wiring of models, runtime, planner, metrics and the routes.

    POST /superresolve   ARM x4 super-resolution (service/sr.py)
    POST /classify       PSS-Net and CF-ViT classification (service/classify.py)
    POST /ground         SeqTR visual grounding, boxes and masks (service/ground.py)
    GET  /v1/models      rungs, FLOPs, measured quality and the live cost model
    GET  /v1/policy      the planner's view: policy, load, queue, predicted wait
    GET  /healthz        live (answers during warm-up)
    GET  /readyz         ready: calibrated and not draining (503 otherwise)
    GET  /metrics        Prometheus

Models load when the app is created; the cost model is calibrated on a background
thread when the server starts, and inference answers 503 until it is done.  On shutdown
the app stops taking work (503), lets queued work finish, then stops the workers.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from models.arm.pipeline import ArmSR
from service import errors
from service.config import Settings
from service.load import LoadMonitor, LoadReading, available_cores
from service.memory import keep_freed_memory
from service.metrics import Metrics
from service.middleware import RequestContext
from service.planner import Planner
from service.classify import CfVitAdapter, ClassifierService, PssNetAdapter
from service.classify import router as classify_router
from service.ground import GroundService, SeqTRAdapter
from service.ground import router as ground_router
from service.sr import ArmService

log = logging.getLogger("anytime")

VERSION = "0.2.0"


def load_classifiers(settings: Settings) -> list:
    """The configured /classify models, as runtime adapters."""
    adapters = []
    if settings.pssnet_checkpoint is not None:
        from models.pssnet.serving import PssNetModel

        adapters.append(PssNetAdapter(PssNetModel.from_checkpoint(
            settings.pssnet_checkpoint, class_names=settings.class_names, calibration=settings.pssnet_calibration)))
    if settings.cfvit_checkpoint is not None:
        from models.cfvit.serving import CfVitModel

        adapters.append(CfVitAdapter(CfVitModel.from_checkpoint(settings.cfvit_checkpoint,
                                                                names_file=settings.class_names,
                                                                device=settings.device)))
    return adapters


def load_grounders(settings: Settings) -> list[SeqTRAdapter]:
    """The configured /ground models (one per task), as runtime adapters."""
    if not settings.seqtr_checkpoints:
        return []
    from models.seqtr.serving import SeqTRGrounder

    return [SeqTRAdapter(SeqTRGrounder.from_checkpoint(path, token_to_ix=settings.seqtr_token_to_ix,
                                                       max_token=settings.seqtr_max_token, device=settings.device),
                         settings.seqtr_long_sides) for path in settings.seqtr_checkpoints]


def create_app(settings: Settings | None = None, model: ArmSR | None = None,
               classifiers: list | None = None, grounders: list | None = None) -> FastAPI:
    """``model`` / ``classifiers`` / ``grounders`` (adapters) replace the configured ones (tests)."""
    settings = settings or Settings()
    metrics = Metrics()
    planner = Planner(settings)
    model = model or ArmSR.from_checkpoint(settings.arm_checkpoint, table=settings.arm_table, device=settings.device)
    arm = ArmService(model, settings, metrics, planner)
    classify = [ClassifierService(a, settings, metrics, planner)
                for a in (load_classifiers(settings) if classifiers is None else classifiers)]
    ground = [GroundService(a, settings, metrics, planner)
              for a in (load_grounders(settings) if grounders is None else grounders)]
    services = [arm, *classify, *ground]

    def on_sample(r: LoadReading) -> None:
        metrics.cpu.labels("system").set(r.cpu_system)
        metrics.cpu.labels("process").set(r.cpu_process)
        for g in r.gpus:
            if g.utilization is not None:
                metrics.gpu.labels(str(g.device)).set(g.utilization)
            metrics.gpu_memory.labels(str(g.device)).set(g.memory_used_bytes)

    monitor = LoadMonitor(settings.load_sample_s, on_sample)

    async def start_in_turn() -> None:
        for svc in services:
            try:
                await asyncio.wrap_future(svc.start())
            except Exception:  # logged by the runtime; that model stays not ready
                pass

    def begin_drain() -> None:
        """New work gets 503 from now on; what is queued still runs."""
        for svc in services:
            svc.draining = True
            svc.runtime.executor.stop_accepting()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        torch.set_num_threads(settings.torch_threads or available_cores())
        if settings.keep_freed_memory:
            keep_freed_memory()
        monitor.start()
        warmup = asyncio.create_task(start_in_turn())  # one calibration at a time: each is timed alone
        log.info("serving %s (%s) with %d torch threads, policy %s", model.name, settings.arm_checkpoint,
                 torch.get_num_threads(), settings.policy)
        yield
        warmup.cancel()
        begin_drain()
        for svc in services:
            if not svc.runtime.executor.shutdown(settings.drain_timeout_s):
                log.warning("%s: queued work did not finish within %.0f s", svc.name, settings.drain_timeout_s)
        monitor.stop()

    app = FastAPI(title="Anytime Serve", version=VERSION, lifespan=lifespan,
                  description="Adaptive-compute inference: every request is served at the rung its deadline and "
                              "the live load allow, and every response says which rung served it and what it cost.")
    app.state.settings, app.state.metrics, app.state.services = settings, metrics, services
    app.state.model, app.state.begin_drain, app.state.monitor = model, begin_drain, monitor
    errors.install(app)
    app.include_router(arm.router())
    if classify:
        app.include_router(classify_router(classify))
    if ground:
        app.include_router(ground_router(ground))

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: models calibrated and not draining", responses=errors.doc(503))
    async def readyz() -> JSONResponse:
        waiting = [s.name for s in services if not s.runtime.ready.is_set()]
        if any(s.draining for s in services):
            return errors.error_response(503, "draining", headers={"Retry-After": "1"})
        if waiting:
            return errors.error_response(503, f"warming up: {', '.join(waiting)}", headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready"})

    @app.get("/v1/models", summary="Served models: rungs, FLOPs, quality, live cost model")
    async def models() -> dict:
        return {"models": [{**s.describe(), "ready": s.runtime.ready.is_set(),
                            "cost_model": s.runtime.cost.snapshot() if s.runtime.cost.calibrated else None,
                            "calibration_s": round(s.runtime.calibration_s, 3)} for s in services]}

    @app.get("/v1/policy", summary="The planner's view: policy, defaults, host load, queues")
    async def policy() -> dict:
        r = monitor.latest
        return {
            "policy": settings.policy, "allow_policy_override": settings.allow_policy_override,
            "default_budget": settings.default_budget, "default_deadline_ms": settings.default_deadline_ms,
            "default_min_budget": settings.default_min_budget, "max_budget": settings.max_budget,
            "deadline_margin": settings.deadline_margin, "deadline_margin_ms": settings.deadline_margin_ms,
            "load": {"cpu_system": r.cpu_system, "cpu_process": r.cpu_process, "cores": r.cores,
                     "torch_threads": torch.get_num_threads(), "gpus": [vars(g) for g in r.gpus]},
            "models": {s.name: {"queue_depth": s.runtime.executor.depth, "max_queue": settings.max_queue,
                                      "predicted_wait_ms": round(1000 * s.runtime.executor.predicted_wait(), 2),
                                      "slowdown": round(s.runtime.cost.slowdown, 4), "ready": s.runtime.ready.is_set(),
                                      "draining": s.draining} for s in services},
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint(_request: Request) -> Response:
        for s in services:
            s.runtime.refresh_gauges()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    endpoints = {p for p in (getattr(route, "path", None) for route in app.routes) if p} | \
        {s.endpoint for s in services}
    app.add_middleware(RequestContext, settings=settings, metrics=metrics, endpoints=endpoints)
    return app
