"""The HTTP API: POST /superresolve, GET /v1/models, GET /healthz.

Inference runs on one worker thread per model (torch already uses every core we give
it; more concurrent forwards would only thrash), off the event loop, so health checks
and request parsing stay responsive while a large image is being processed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Literal

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.arm.pipeline import ArmSR, Plan
from service import imageio
from service.config import Settings

log = logging.getLogger("anytime")


class ApiError(Exception):
    def __init__(self, status: int, message: str, accepted: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.accepted = status, message, accepted


def _error(status: int, message: str, accepted: str | None = None) -> JSONResponse:
    body: dict = {"error": {"status": status, "message": message}}
    if accepted:
        body["error"]["accepted"] = accepted
    return JSONResponse(body, status_code=status)


def parse_budget(raw: str, default: float) -> tuple[str, float]:
    """``auto`` (the configured default), ``best`` (the table's best rung per patch),
    or a number in [0, 1]."""
    if raw in ("auto", "best"):
        return raw, default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(422, f"budget={raw!r} is not a number", "a number in [0, 1], 'auto' or 'best'") from None
    if not (0.0 <= value <= 1.0) or np.isnan(value):
        raise ApiError(422, f"budget={raw} is outside [0, 1]", "a number in [0, 1], 'auto' or 'best'")
    return "explicit", value


def parse_rung(raw: str, model: ArmSR) -> int:
    names = [r.name for r in model.rungs]
    if raw in names:
        return names.index(raw)
    if raw.isdigit() and int(raw) < len(names):
        return int(raw)
    raise ApiError(422, f"rung={raw!r} is not a rung of {model.name}",
                   f"one of {', '.join(names)} or an index 0..{len(names) - 1}")


def response_headers(model: ArmSR, plan: Plan, budget_label: str, compute_ms: float) -> dict[str, str]:
    counts = plan.rung_counts(len(model.rungs))
    return {
        "X-Anytime-Model": model.name,
        "X-Anytime-Rung-Mix": ",".join(f"{r.name}={c}" for r, c in zip(model.rungs, counts)),
        "X-Anytime-Flops": f"{plan.flops:.0f}",
        "X-Anytime-Flops-Full": f"{plan.flops_full:.0f}",
        "X-Anytime-Flops-Fraction": f"{plan.flops_fraction:.4f}",
        "X-Anytime-Budget": budget_label,
        "X-Anytime-Predicted-PSNR": f"{plan.predicted_psnr:.3f}",
        "X-Anytime-Tiling": plan.tiling,
        "X-Anytime-Compute-Ms": f"{compute_ms:.1f}",
    }


def create_app(settings: Settings | None = None, model: ArmSR | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        torch.set_num_threads(settings.torch_threads or max(1, len(_available_cores())))
        app.state.model = model or ArmSR.from_checkpoint(settings.arm_checkpoint, table=settings.arm_table,
                                                         device=settings.device)
        app.state.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="arm")
        log.info("serving %s (%s) with %d torch threads", app.state.model.name, settings.arm_checkpoint,
                 torch.get_num_threads())
        yield
        app.state.executor.shutdown(wait=True)

    app = FastAPI(title="Anytime Serve", version="0.1.0", lifespan=lifespan,
                  description="Adaptive-compute inference: every response says which rung served it and what it cost.")

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.accepted)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return _error(422, "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        m: ArmSR = request.app.state.model
        return {"models": [{
            "name": m.name, "family": "arm", "backbone": m.backbone.name, "endpoint": "/superresolve",
            "rungs": [{"index": r.index, "name": r.name, "width": r.width, "flops_per_patch": r.flops_per_patch,
                       "params": r.params} for r in m.rungs],
            "table": m.table.source if m.table is not None else None,
            "metrics": m.meta.get("metrics"),
        }]}

    @app.post(
        "/superresolve",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "the x4 image; X-Anytime-* headers say "
                                                                         "which rungs served it and what it cost"},
                   400: {"description": "undecodable image"}, 413: {"description": "body or image too large"},
                   415: {"description": "unsupported content type"}, 422: {"description": "bad parameter"}},
        summary="Super-resolve an image x4 under a compute budget",
    )
    async def superresolve(
        request: Request,
        budget: Annotated[str, Query(description="fraction of full-width FLOPs in [0, 1], 'auto' or 'best'")] = "auto",
        tiling: Annotated[Literal["full", "official"], Query(description="'full' covers every pixel; "
                                                             "'official' reproduces ARM's tiling")] = "full",
        objective: Annotated[Literal["mse", "psnr_sum"], Query(description="budget objective: 'mse' minimises "
                                                                "predicted squared error, 'psnr_sum' is the paper's rule")] = "mse",
        rung: Annotated[str | None, Query(description="serve every patch at this rung (name such as 'w56' or "
                                                      "'bicubic', or index); overrides budget")] = None,
    ) -> Response:
        label, value = parse_budget(budget, settings.default_budget)
        m: ArmSR = request.app.state.model
        fixed = parse_rung(rung, m) if rung is not None else None
        ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if ctype not in imageio.FORMATS and ctype not in ("application/octet-stream", ""):
            raise ApiError(415, f"content-type {ctype!r} is not accepted", "image/png, image/jpeg, image/webp")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise ApiError(413, f"body of {declared} bytes exceeds the limit of {settings.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise ApiError(413, f"body exceeds the limit of {settings.max_body_bytes} bytes")
        try:  # decoding and encoding run in the default thread pool, off the event loop
            img = await asyncio.to_thread(imageio.decode, bytes(body), settings.max_input_pixels)
        except imageio.ImageError as exc:
            raise ApiError(exc.status, str(exc)) from None

        def work() -> tuple[Plan, np.ndarray, float]:
            t0 = time.perf_counter()
            if fixed is not None:
                plan = m.plan(img.rgb_u8, mode="fixed", rung=fixed, tiling_mode=tiling)
            elif label == "best":
                plan = m.plan(img.rgb_u8, mode="best", tiling_mode=tiling)
            else:
                plan = m.plan(img.rgb_u8, mode="budget", budget=value, objective=objective, tiling_mode=tiling)
            out = m.run(plan, img.rgb)
            return plan, out, 1000 * (time.perf_counter() - t0)

        plan, out, ms = await asyncio.get_running_loop().run_in_executor(request.app.state.executor, work)
        media = "image/png"
        payload = await asyncio.to_thread(imageio.encode, out, img, media)
        budget_label = f"rung:{m.rungs[fixed].name}" if fixed is not None else \
            "best" if label == "best" else f"{value:g}"
        headers = response_headers(m, plan, budget_label, ms)
        return Response(payload, media_type=media, headers=headers)

    return app


def _available_cores() -> set[int]:
    import os

    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not on Linux
        return set(range(os.cpu_count() or 1))
