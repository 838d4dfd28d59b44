"""POST /superresolve: ARM super-resolution through the planner and the batching executor.

Per request: read and decode the image (limits first), analyse its tiles (edge scores,
the table's predictions), let the planner pick the budget the deadline and the queue
allow (or shed), queue the patches grouped by rung (the executor merges them with other
requests' patches of the same rung), then stitch and encode.  Every response says what
was done in X-Anytime-* headers.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from concurrent.futures import Future
from typing import Annotated, Literal

import numpy as np
import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from PIL import Image

from models.arm.pipeline import Analysis, ArmSR, Plan, rung_work
from models.common.synthetic import synthetic_photo
from service import imageio, limits
from service.body import IMAGE_REQUEST_BODY, read_image
from service.config import Policy
from service.errors import ApiError, doc
from service.executor import Job
from service.media import OFFERED, negotiate
from service.planner import Ask, Decision, Ladder
from service.runtime import FamilyRuntime
from service.serving import FamilyService, Machine, decode_body, known_query_only

log = logging.getLogger("anytime.sr")

# Small requests are planned on the event loop: it takes well under a millisecond, less than
# the hop to the planning thread and back.
INLINE_PLAN_PATCHES = 64  # about 230x230 LR

# Rung colours of explain=true maps (bicubic grey, then blue -> green -> red by width).
RUNG_COLOURS = [(128, 128, 128), (66, 133, 244), (52, 168, 83), (234, 67, 53), (251, 188, 4), (171, 71, 188)]


def parse_budget(raw: str) -> float | str:
    """``auto``, ``best`` or a number in [0, 1]."""
    if raw in ("auto", "best"):
        return raw
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(422, f"budget={raw!r} is not a number", "a number in [0, 1], 'auto' or 'best'") from None
    if not (0.0 <= value <= 1.0):  # NaN fails this too
        raise ApiError(422, f"budget={raw} is outside [0, 1]", "a number in [0, 1], 'auto' or 'best'")
    return value


def parse_rung(raw: str, model: ArmSR) -> int:
    names = [r.name for r in model.rungs]
    if raw in names:
        return names.index(raw)
    if raw.isdigit() and int(raw) < len(names):
        return int(raw)
    raise ApiError(422, f"rung={raw!r} is not a rung of {model.name}",
                   f"one of {', '.join(names)} or an index 0..{len(names) - 1}")


def rung_map(model: ArmSR, plan: Plan, rgb_u8: np.ndarray) -> bytes:
    """PNG at the input size: each pixel coloured by the highest rung among the patches
    covering it, over a grey copy of the input."""
    h, w = rgb_u8.shape[:2]
    lh, lw = plan.lr_hw
    colour = np.zeros((lh, lw, 3), dtype=np.float32)
    for r in np.unique(plan.rungs).tolist():  # ascending: higher rungs paint over lower ones
        for y, x in plan.positions[plan.rungs == r].tolist():
            colour[y:y + 32, x:x + 32] = RUNG_COLOURS[r % len(RUNG_COLOURS)]
    grey = rgb_u8.astype(np.float32).mean(axis=2, keepdims=True)
    out = 0.35 * grey + 0.65 * colour[:h, :w]
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


class ArmService(FamilyService):
    """ARM as a served family: its runtime, its ladder per request, its route."""

    family = "arm"
    endpoint = "/superresolve"

    def __init__(self, model: ArmSR, machine: Machine) -> None:
        self.model = model
        runtime = FamilyRuntime(
            model.name, self.forward, [r.index for r in model.rungs],
            lambda _key, n: torch.rand(n, 3, 32, 32, device=model.device), machine.settings, machine.metrics,
            {r.index: r.name for r in model.rungs}, scheduler=machine.scheduler)
        super().__init__(runtime, machine)

    def forward(self, rung: int, patches: torch.Tensor) -> torch.Tensor:
        """One batch at one rung (the scheduler waits for CUDA kernels before timing it)."""
        return self.model.run_patches(rung, patches)

    # --- the ladder of one request --------------------------------------------------------

    def ladder(self, a: Analysis, objective: str) -> Ladder[Plan]:
        m, top = self.model, len(self.model.rungs) - 1
        return Ladder(at_budget=lambda b: m.choose(a, mode="budget", budget=b, objective=objective),
                      seconds=lambda p: self.plan_seconds(p.rungs),
                      top=lambda: m.choose(a, mode="fixed", rung=top),
                      bottom=lambda: m.choose(a, mode="fixed", rung=0),
                      flops_fraction=lambda p: p.flops_fraction,
                      refine=lambda p: m.faster_within(a, p, self.plan_seconds, self.settings.arm_time_slack_db))

    def plan_seconds(self, rungs: np.ndarray) -> float:
        """Predicted forward seconds of a rung assignment on this host (fixed cost per batch included)."""
        return self.runtime.cost.predict(rung_work(rungs))

    # --- work around the network: stitch + encode, calibrated at start-up -----------------

    def finish(self, plan: Plan, img: imageio.Decoded, groups, outputs, media: str) -> bytes:
        canvas = self.model.assemble(plan, img.rgb, groups, outputs)
        return imageio.encode(canvas, img, media, png_compress_level=self.settings.png_compress_level,
                              quality=self.settings.jpeg_quality)

    def calibrate_overhead(self) -> None:
        """Time stitch + PNG encode at two image sizes; the cost model fits it per output pixel."""
        samples = []
        for side in (64, 192):
            rgb = synthetic_photo(side, side, seed=side)
            img = imageio.Decoded(rgb, rgb.astype(np.float32) / 255, None, False, 8)
            plan = self.model.plan(rgb, mode="budget", budget=self.settings.default_budget)
            groups = self.model.prepare(plan, img.rgb)
            outputs = [self.model.run_patches(g.rung, g.patches) for g in groups]
            times = []
            for _ in range(self.settings.calibration_repeats):
                t0 = time.perf_counter()
                self.finish(plan, img, groups, outputs, "image/png")
                times.append(time.perf_counter() - t0)
            samples.append((16 * side * side, float(np.median(times))))
        self.runtime.cost.calibrate_overhead(samples)

    def start(self) -> Future:
        return self.runtime.start(extra=self.calibrate_overhead)

    def describe(self) -> dict:
        """This model's entry in GET /v1/models."""
        m = self.model
        return {"name": m.name, "family": self.family, "backbone": m.backbone.name, "endpoint": self.endpoint,
                "rungs": [{"index": r.index, "name": r.name, "width": r.width, "flops_per_patch": r.flops_per_patch,
                           "params": r.params} for r in m.rungs],
                "table": m.table.source if m.table is not None else None, "metrics": m.meta.get("metrics")}

    # --- the route ------------------------------------------------------------------------

    def router(self) -> APIRouter:
        r = APIRouter(dependencies=[Depends(known_query_only)])

        @r.post(
            "/superresolve",
            response_class=Response,
            summary="Super-resolve an image x4 at the quality the deadline and the load allow",
            responses={200: {"content": {t: {} for t in OFFERED},
                             "description": "the x4 image (or the rung map with explain=true); X-Anytime-* headers "
                                            "say which rungs served it, what it cost and how long it queued"},
                       **doc(400, 401, 406, 413, 415, 422, 429, 503, 504)},
            openapi_extra=IMAGE_REQUEST_BODY,
        )
        async def superresolve(
            request: Request,
            budget: Annotated[str, Query(description="fraction of full-width FLOPs in [0, 1]; 'auto' lets the "
                                         "planner choose from the deadline and the load (or uses the configured "
                                         "default when there is no deadline); 'best': the table's best rung per "
                                         "patch")] = "auto",
            deadline_ms: Annotated[float | None, Query(gt=0, le=600_000, description="answer within this many ms "
                                                       "of arrival; the planner picks the largest budget that fits "
                                                       "and sheds (429) what cannot fit even at min_budget")] = None,
            min_budget: Annotated[float | None, Query(ge=0, le=1, description="quality floor for budget=auto "
                                                      "with a deadline")] = None,
            policy: Annotated[Policy | None, Query(description="override the server's policy (if allowed): "
                                                   "adaptive, full (top rung, no shedding) or smallest")] = None,
            rung: Annotated[str | None, Query(description="serve every patch at one rung (a name from "
                                                          "/v1/models such as 'w56' or 'bicubic', or an index); "
                                                          "overrides budget")] = None,
            tiling: Annotated[Literal["full", "official"], Query(description="'full' covers every pixel; "
                                                                 "'official' reproduces ARM's tiling")] = "full",
            objective: Annotated[Literal["mse", "psnr_sum"], Query(description="'mse' minimises predicted squared "
                                                                   "error; 'psnr_sum' is the paper's rule")] = "mse",
            explain: Annotated[bool, Query(description="return the per-patch rung map (PNG at the input size, "
                                                       "colours in X-Anytime-Rung-Colours) instead of the image; "
                                                       "plans but runs no network")] = False,
        ) -> Response:
            t0 = request.state.t0
            return await self.guarded(t0, self._handle(request, t0, budget, deadline_ms, min_budget, policy, rung,
                                                       tiling, objective, explain))

        return r

    async def _handle(self, request: Request, t0: float, budget: str, deadline_ms: float | None,
                      min_budget: float | None, policy: Policy | None, rung: str | None, tiling: str,
                      objective: str, explain: bool) -> Response:
        s, m, rt = self.settings, self.model, self.runtime
        self.open_for(request, t0, deadline_ms, policy)
        media = negotiate(request.headers.get("accept"))
        if media is None:
            raise ApiError(406, f"none of Accept {request.headers.get('accept')!r} can be produced",
                           ", ".join(OFFERED))
        parsed = parse_budget(budget)
        fixed_rung = parse_rung(rung, m) if rung is not None else None
        self.shed_early(t0, deadline_ms, policy)
        upload = await read_image(request, s.max_body_bytes)
        self.shed_early(t0, deadline_ms, policy)

        def decode_and_analyse() -> tuple[imageio.Decoded, Analysis]:
            img = imageio.decode(upload.data, s.max_input_pixels, limits.sr_patches(s.max_sr_patches, tiling))
            return img, m.analyse(img.rgb_u8, tiling)

        img, analysis = await decode_body(len(upload.data), decode_and_analyse)

        ask = Ask(budget=parsed if isinstance(parsed, float) else None, deadline_ms=deadline_ms,
                  min_budget=min_budget, policy=policy)
        if fixed_rung is not None:
            ask.fixed = m.choose(analysis, mode="fixed", rung=fixed_rung)
        elif parsed == "best":
            ask.fixed = m.choose(analysis, mode="best")
        out_px = analysis.out_hw[0] * analysis.out_hw[1]
        groups: list = []

        def prepare(d: Decision) -> list:
            groups.extend(m.prepare(d.plan, img.rgb))
            return [(g.rung, g.patches) for g in groups]

        def finish(d: Decision, outputs: list[torch.Tensor]) -> bytes:  # on the worker, after the forwards
            tf = time.perf_counter()
            payload = self.finish(d.plan, img, groups, outputs, media)
            rt.cost.observe_overhead(out_px, time.perf_counter() - tf)
            return payload

        decision, job, future = await self.admit(self.ladder(analysis, objective), ask, t0,
                                                 rt.cost.predict_overhead(out_px), None if explain else prepare,
                                                 finish, inline=len(analysis.positions) <= INLINE_PLAN_PATCHES)
        plan: Plan = decision.plan
        label = f"rung:{m.rungs[fixed_rung].name}" if fixed_rung is not None else "best" if parsed == "best" \
            else f"{round(decision.budget, 4):g}"
        if explain:
            payload = await asyncio.to_thread(rung_map, m, plan, img.rgb_u8)
            headers = self.headers(plan, decision, label, None, t0)
            headers["X-Anytime-Rung-Colours"] = ",".join(
                "{}=#{:02x}{:02x}{:02x}".format(r.name, *RUNG_COLOURS[r.index % len(RUNG_COLOURS)]) for r in m.rungs)
            return Response(payload, media_type="image/png", headers=headers)
        payload = await self.result(request, decision, job, future)
        headers = self.headers(plan, decision, label, job, t0)
        self.observe_sr(plan, decision, job, t0)
        return Response(payload, media_type=media, headers=headers)

    def dominant_rung(self, plan: Plan) -> str:
        return self.model.rungs[int(np.bincount(plan.rungs).argmax())].name

    def headers(self, plan: Plan, d: Decision, label: str, job: Job | None, t0: float) -> dict[str, str]:
        m = self.model
        counts = plan.rung_counts(len(m.rungs))
        return {
            **self.timing_headers(d, job, t0),
            "X-Anytime-Rung": self.dominant_rung(plan),
            "X-Anytime-Rung-Mix": ",".join(f"{r.name}={c}" for r, c in zip(m.rungs, counts)),
            "X-Anytime-Flops": f"{plan.flops:.0f}",
            "X-Anytime-Flops-Full": f"{plan.flops_full:.0f}",
            "X-Anytime-Flops-Fraction": f"{plan.flops_fraction:.4f}",
            "X-Anytime-Budget": label,
            "X-Anytime-Predicted-PSNR": f"{plan.predicted_psnr:.3f}",
            "X-Anytime-Tiling": plan.tiling,
        }

    def observe_sr(self, plan: Plan, d: Decision, job: Job, t0: float) -> None:
        self.observe(d, job, t0, self.dominant_rung(plan), plan.flops, plan.flops_fraction)
        mt, name = self.metrics, self.name
        mt.predicted_psnr.labels(name).observe(plan.predicted_psnr)
        for r, c in zip(self.model.rungs, plan.rung_counts(len(self.model.rungs))):
            if c:
                mt.patches.labels(name, r.name).inc(c)
