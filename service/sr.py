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
from typing import Annotated, Literal

import numpy as np
import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from PIL import Image

from models.arm.pipeline import Analysis, ArmSR, Plan
from models.common.synthetic import synthetic_photo
from service import imageio
from service.body import ACCEPTED_BODIES, read_image
from service.config import Policy, Settings
from service.errors import ApiError, doc
from service.executor import DeadlinePassed, Draining, Job, QueueFull
from service.media import OFFERED, negotiate
from service.metrics import Metrics
from service.planner import Ask, Decision, Ladder, Planner, Shed
from service.runtime import FamilyRuntime

log = logging.getLogger("anytime.sr")

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


class ArmService:
    """ARM as a served family: its runtime, its ladder per request, its route."""

    def __init__(self, model: ArmSR, settings: Settings, metrics: Metrics, planner: Planner) -> None:
        self.model, self.settings, self.metrics, self.planner = model, settings, metrics, planner
        self.runtime = FamilyRuntime(
            model.name, self.forward, [r.index for r in model.rungs],
            lambda _key, n: torch.rand(n, 3, 32, 32, device=model.device), settings, metrics,
            {r.index: r.name for r in model.rungs})
        self.draining = False
        self.admission = asyncio.Lock()

    def forward(self, rung: int, patches: torch.Tensor) -> torch.Tensor:
        """One batch at one rung; on CUDA it waits for the kernels, so that the times the
        cost model learns from are real."""
        out = self.model.run_patches(rung, patches)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return out

    # --- the ladder of one request --------------------------------------------------------

    @staticmethod
    def work_counts(plan: Plan) -> list[tuple[int, int]]:
        rungs, counts = np.unique(plan.rungs, return_counts=True)
        return list(zip(rungs.tolist(), counts.tolist()))

    def ladder(self, a: Analysis, objective: str) -> Ladder[Plan]:
        m, top = self.model, len(self.model.rungs) - 1
        return Ladder(at_budget=lambda b: m.choose(a, mode="budget", budget=b, objective=objective),
                      seconds=lambda p: self.runtime.cost.predict(self.work_counts(p)),
                      top=lambda: m.choose(a, mode="fixed", rung=top),
                      bottom=lambda: m.choose(a, mode="fixed", rung=0),
                      flops_fraction=lambda p: p.flops_fraction)

    # --- work around the network: stitch + encode, calibrated at start-up -----------------

    def finish(self, plan: Plan, img: imageio.Decoded, groups, outputs, media: str) -> bytes:
        canvas = self.model.assemble(plan, img.rgb, groups, outputs)
        return imageio.encode(canvas, img, media)

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

    def start(self) -> None:
        self.runtime.start(extra=self.calibrate_overhead)

    # --- the route ------------------------------------------------------------------------

    def router(self) -> APIRouter:
        r = APIRouter()

        @r.post(
            "/superresolve",
            response_class=Response,
            summary="Super-resolve an image x4 at the quality the deadline and the load allow",
            responses={200: {"content": {t: {} for t in OFFERED},
                             "description": "the x4 image (or the rung map with explain=true); X-Anytime-* headers "
                                            "say which rungs served it, what it cost and how long it queued"},
                       **doc(400, 401, 406, 413, 415, 422, 429, 503, 504)},
            openapi_extra={"requestBody": {"required": True, "description": ACCEPTED_BODIES, "content": {
                **{t: {"schema": {"type": "string", "format": "binary"}} for t in OFFERED},
                "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                    "image": {"type": "string", "format": "binary"}}}}}}},
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
            left = self.settings.request_timeout_s - (time.monotonic() - t0)
            inflight = self.metrics.inflight.labels(self.model.name)
            inflight.inc()
            try:
                return await asyncio.wait_for(
                    self._handle(request, t0, budget, deadline_ms, min_budget, policy, rung, tiling, objective,
                                 explain), max(left, 0.001))
            except asyncio.TimeoutError:
                raise ApiError(504, f"request timed out after {self.settings.request_timeout_s:g} s "
                                    "(request_timeout_s)") from None
            finally:
                inflight.dec()

        return r

    def _unavailable(self, reason: str, message: str) -> ApiError:
        self.metrics.shed.labels(self.model.name, reason).inc()
        return ApiError(503, message, headers={"Retry-After": "1"})

    async def _handle(self, request: Request, t0: float, budget: str, deadline_ms: float | None,
                      min_budget: float | None, policy: Policy | None, rung: str | None, tiling: str,
                      objective: str, explain: bool) -> Response:
        s, m, rt, name = self.settings, self.model, self.runtime, self.model.name
        rt.arrivals.tick(t0)
        if self.draining or not rt.executor.accepting:
            raise self._unavailable("draining", "the server is shutting down; retry on another replica")
        if not rt.ready.is_set():
            raise self._unavailable("not_ready", "the model is warming up (calibrating its cost model); retry shortly")
        media = negotiate(request.headers.get("accept"))
        if media is None:
            raise ApiError(406, f"none of Accept {request.headers.get('accept')!r} can be produced",
                           ", ".join(OFFERED))
        if policy is not None and not s.allow_policy_override:
            raise ApiError(422, "policy override is disabled on this server (allow_policy_override)")
        parsed = parse_budget(budget)
        fixed_rung = parse_rung(rung, m) if rung is not None else None
        upload = await read_image(request, s.max_body_bytes)
        self._shed_early(t0, deadline_ms, policy)

        def decode_and_analyse() -> tuple[imageio.Decoded, Analysis]:
            img = imageio.decode(upload.data, s.max_input_pixels)
            return img, m.analyse(img.rgb_u8, tiling)

        try:
            img, analysis = await asyncio.to_thread(decode_and_analyse)
        except imageio.ImageError as exc:
            raise ApiError(exc.status, str(exc), "PNG, JPEG or WebP images") from None

        ladder = self.ladder(analysis, objective)
        ask = Ask(budget=parsed if isinstance(parsed, float) else None, deadline_ms=deadline_ms,
                  min_budget=min_budget, policy=policy)
        if fixed_rung is not None:
            ask.fixed = m.choose(analysis, mode="fixed", rung=fixed_rung)
        elif parsed == "best":
            ask.fixed = m.choose(analysis, mode="best")
        out_px = analysis.out_hw[0] * analysis.out_hw[1]

        def plan_and_prepare() -> tuple[Decision, list | None]:
            d = self.planner.decide(ladder, ask, wait_s=rt.executor.predicted_wait(), elapsed_s=time.monotonic() - t0,
                                    overhead_s=rt.cost.predict_overhead(out_px), rate_rps=rt.arrivals.rate())
            return d, (None if explain else m.prepare(d.plan, img.rgb))

        def finish(outputs: list[torch.Tensor]) -> bytes:  # on the worker, after the forward passes
            tf = time.perf_counter()
            payload = self.finish(decision.plan, img, groups, outputs, media)
            rt.cost.observe_overhead(out_px, time.perf_counter() - tf)
            return payload

        # Admission is one critical section: plan against the queue as it is, then join it,
        # before the next request plans; otherwise concurrent requests all plan against the
        # same short queue and together overcommit it.
        async with self.admission:
            try:
                decision, groups = await asyncio.to_thread(plan_and_prepare)
            except Shed as exc:
                self.metrics.shed.labels(name, exc.reason).inc()
                raise ApiError(429, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
            if not explain:
                # Fixed policies are the conventional baseline: they serve late rather than drop.
                deadline_at = t0 + decision.deadline_s if decision.deadline_s is not None and \
                    decision.policy == "adaptive" else None
                job = Job([(g.rung, g.patches) for g in groups],
                          decision.predicted_compute_s + decision.predicted_overhead_s, deadline_at, finish)
                try:
                    future = rt.executor.submit(job)
                except QueueFull as exc:
                    self.metrics.shed.labels(name, "queue_full").inc()
                    raise ApiError(429, str(exc), headers={
                        "Retry-After": str(max(1, round(rt.executor.predicted_wait())))}) from None
                except Draining as exc:
                    raise self._unavailable("draining", str(exc)) from None

        plan: Plan = decision.plan
        label = f"rung:{m.rungs[fixed_rung].name}" if fixed_rung is not None else "best" if parsed == "best" \
            else f"{round(decision.budget, 4):g}"
        if explain:
            payload = await asyncio.to_thread(rung_map, m, plan, img.rgb_u8)
            headers = self.headers(plan, decision, label, None, t0)
            headers["X-Anytime-Rung-Colours"] = ",".join(
                "{}=#{:02x}{:02x}{:02x}".format(r.name, *RUNG_COLOURS[r.index % len(RUNG_COLOURS)]) for r in m.rungs)
            return Response(payload, media_type="image/png", headers=headers)
        try:
            payload = await asyncio.wrap_future(future)
        except Draining as exc:
            raise self._unavailable("draining", str(exc)) from None
        except DeadlinePassed as exc:
            self.metrics.deadline_missed.labels(name).inc()
            raise ApiError(504, f"deadline of {1000 * decision.deadline_s:g} ms missed: {exc}") from None
        headers = self.headers(plan, decision, label, job, t0)
        self.observe(plan, decision, job, t0)
        return Response(payload, media_type=media, headers=headers)

    def _shed_early(self, t0: float, deadline_ms: float | None, policy: Policy | None) -> None:
        """Before any decoding: when the queue alone outlasts the deadline, no plan can
        fit, and saying so at once costs the overloaded server nothing."""
        deadline_ms = deadline_ms if deadline_ms is not None else self.settings.default_deadline_ms
        if deadline_ms is None or (policy or self.settings.policy) != "adaptive":
            return
        deadline_s = deadline_ms / 1000
        wait = self.runtime.executor.predicted_wait()
        if time.monotonic() - t0 + wait > deadline_s - self.planner.margin_s(deadline_s):
            self.metrics.shed.labels(self.model.name, "deadline").inc()
            raise ApiError(429, f"the queue ahead ({1000 * wait:.0f} ms predicted) outlasts the {deadline_ms:g} ms "
                                "deadline", headers={"Retry-After": str(max(1, round(wait)))})

    def dominant_rung(self, plan: Plan) -> str:
        return self.model.rungs[int(np.bincount(plan.rungs).argmax())].name

    def headers(self, plan: Plan, d: Decision, label: str, job: Job | None, t0: float) -> dict[str, str]:
        m = self.model
        counts = plan.rung_counts(len(m.rungs))
        h = {
            "X-Anytime-Model": m.name,
            "X-Anytime-Policy": d.policy,
            "X-Anytime-Decision": d.how,
            "X-Anytime-Rung": self.dominant_rung(plan),
            "X-Anytime-Rung-Mix": ",".join(f"{r.name}={c}" for r, c in zip(m.rungs, counts)),
            "X-Anytime-Flops": f"{plan.flops:.0f}",
            "X-Anytime-Flops-Full": f"{plan.flops_full:.0f}",
            "X-Anytime-Flops-Fraction": f"{plan.flops_fraction:.4f}",
            "X-Anytime-Budget": label,
            "X-Anytime-Predicted-PSNR": f"{plan.predicted_psnr:.3f}",
            "X-Anytime-Tiling": plan.tiling,
            "X-Anytime-Predicted-Ms": f"{1000 * (d.predicted_wait_s + d.predicted_compute_s + d.predicted_overhead_s):.1f}",
            "X-Anytime-Server-Ms": f"{1000 * (time.monotonic() - t0):.1f}",
        }
        if job is not None:
            h["X-Anytime-Queue-Ms"] = f"{1000 * job.queue_s:.1f}"
            h["X-Anytime-Compute-Ms"] = f"{1000 * job.compute_s:.1f}"
            h["X-Anytime-Encode-Ms"] = f"{1000 * job.finish_s:.1f}"
        if d.deadline_s is not None:
            h["X-Anytime-Deadline-Ms"] = f"{1000 * d.deadline_s:g}"
        return h

    def observe(self, plan: Plan, d: Decision, job, t0: float) -> None:
        mt, name = self.metrics, self.model.name
        total = time.monotonic() - t0
        rung = self.dominant_rung(plan)
        mt.request_seconds.labels(name, rung).observe(total)
        mt.queue_seconds.labels(name).observe(job.queue_s)
        mt.compute_seconds.labels(name, rung).observe(job.compute_s)
        mt.budget.labels(name).observe(plan.flops_fraction)
        mt.flops.labels(name).inc(plan.flops)
        mt.predicted_psnr.labels(name).observe(plan.predicted_psnr)
        for r, c in zip(self.model.rungs, plan.rung_counts(len(self.model.rungs))):
            if c:
                mt.patches.labels(name, r.name).inc(c)
        if d.deadline_s is not None:
            (mt.deadline_met if total <= d.deadline_s else mt.deadline_missed).labels(name).inc()
