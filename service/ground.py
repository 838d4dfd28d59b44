"""POST /ground: SeqTR visual grounding (a box, or a mask as a contour polygon) through the
same planner and executor as the other families.

A request is an image plus a referring expression.  Its ladder is the input resolution:
each rung is a long side (the model's own by default; ``seqtr_long_sides`` adds smaller
ones, which cost about (side / full side)^2 of the FLOPs).  Requests at the same rung are
batched: every image is resized so its long side is the rung's, then zero-padded
bottom/right to one square canvas with a padding mask, so the network never attends to the
padding and the coordinates still refer to each image's own padded size (brief B5).

The answer is JSON: the box in original pixels, for masks the polygon and the mask (COCO
RLE or a PNG), the raw coordinate tokens and a score, plus the X-Anytime-* headers.
``explain=true`` returns the image with the box or mask drawn instead.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from models.seqtr.raster import mask_to_rle
from models.seqtr.serving import Grounding, GroundingItem
from models.seqtr.text import clean_string
from service import imageio
from service.body import IMAGE_TYPES, Upload, media_type, read_image, read_limited
from service.classify import parse_budget
from service.config import Policy
from service.errors import ApiError, doc
from service.executor import Items
from service.planner import Ask, Decision, Ladder
from service.runtime import FamilyRuntime
from service.serving import FamilyService, Machine, decode_body, known_query_only

# Images this small are resized onto their rung's canvas on the event loop, while admission
# holds its lock: well under a millisecond, less than the hop to the planning thread and back.
INLINE_PREPARE_PIXELS = 256 * 256

Task = Literal["box", "mask"]
TASK_OF_MODEL = {"det": "box", "segm": "mask"}

ACCEPTED_GROUND_BODIES = ("multipart/form-data with a file field 'image' and a text field 'expression'; JSON "
                          "{\"image\": <base64>, \"expression\": ...}; or a raw image body with ?expression=")

GROUND_REQUEST_BODY = {"requestBody": {"required": True, "description": ACCEPTED_GROUND_BODIES, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image", "expression"], "properties": {
        "image": {"type": "string", "format": "binary"}, "expression": {"type": "string"}}}},
    "application/json": {"schema": {"type": "object", "required": ["image", "expression"], "properties": {
        "image": {"type": "string", "format": "byte", "description": "the image file, base64"},
        "expression": {"type": "string"}}}},
    **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES}}}}


@dataclass
class GroundPlan:
    side: int  # the rung: long side in px
    flops: float
    flops_full: float
    expected_accuracy: float | None = None

    @property
    def flops_fraction(self) -> float:
        return self.flops / self.flops_full if self.flops_full else 0.0

    @property
    def rung(self) -> str:
        return f"side={self.side}"


class SeqTRAdapter:
    """A SeqTR grounder as a runtime family: rungs, batched forward, plans."""

    family = "seqtr"

    def __init__(self, grounder, long_sides: list[int] | None = None) -> None:
        self.grounder = grounder
        self.model = grounder.model
        self.name = grounder.name
        self.task: Task = TASK_OF_MODEL[grounder.task]
        self.divisor = grounder.size_divisor
        sides = sorted(set(long_sides or [grounder.long_side]))
        if any(s < self.divisor for s in sides):
            raise ValueError(f"seqtr_long_sides {sides}: each must be at least {self.divisor} px")
        self.keys = sides
        self.key_names = {s: f"side={s}" for s in sides}
        # FLOPs of a square image at each side (what the canvas costs; a wide image costs less)
        self.flops_by_side = {s: float(grounder.flops(self.canvas(s), self.canvas(s))["total"]) for s in sides}
        self.flops_full = self.flops_by_side[max(sides)]
        measured = (grounder.info.get("metrics") or {}).get("accuracy_by_long_side") or {}
        self.accuracy_by_side = {int(k): v for k, v in measured.items()}

    def canvas(self, side: int) -> int:
        return math.ceil(side / self.divisor) * self.divisor

    # --- runtime hooks ------------------------------------------------------------------

    def example(self, side: int, n: int) -> Items:
        c, t = self.canvas(side), self.grounder.max_token
        img = torch.rand(n, 3, c, c) * 255
        text = torch.randint(3, max(4, len(self.grounder.vocab)), (n, t))
        return img, torch.zeros(n, c, c, dtype=torch.bool), text

    def forward(self, side: int, items: Items) -> Items:
        dev = self.grounder.device  # requests and calibration build their tensors on the CPU
        img, mask, text = (t.to(dev, non_blocking=True) for t in items)
        tokens, scores = self.model.generate(img, mask, text)
        return tokens, scores

    units = None

    # --- planning -----------------------------------------------------------------------

    def plan_for(self, side: int) -> GroundPlan:
        return GroundPlan(side, self.flops_by_side[side], self.flops_full, self.accuracy_by_side.get(side))

    def at_budget(self, b: float) -> GroundPlan:
        fits = [s for s in self.keys if self.flops_by_side[s] <= b * self.flops_full * (1 + 1e-9)]
        return self.plan_for(fits[-1] if fits else self.keys[0])

    def top(self) -> GroundPlan:
        return self.plan_for(self.keys[-1])

    def bottom(self) -> GroundPlan:
        return self.plan_for(self.keys[0])

    # --- one request --------------------------------------------------------------------

    def work(self, plan: GroundPlan, item: GroundingItem) -> list[tuple[Any, Items]]:
        """The request as one row of its rung's square canvas (padding masked)."""
        c = self.canvas(plan.side)
        x = item.prepared.tensor
        h, w = x.shape[1:]
        img = torch.zeros(1, 3, c, c)
        img[0, :, :h, :w] = x
        mask = torch.ones(1, c, c, dtype=torch.bool)
        mask[0, :h, :w] = False
        return [(plan.side, (img, mask, torch.tensor([item.text_ids], dtype=torch.long)))]


class GroundService(FamilyService):
    endpoint = "/ground"

    def __init__(self, adapter: SeqTRAdapter, machine: Machine) -> None:
        self.adapter, self.grounder = adapter, adapter.grounder
        self.family, self.task = adapter.family, adapter.task
        runtime = FamilyRuntime(adapter.name, adapter.forward, adapter.keys, adapter.example, machine.settings,
                                machine.metrics, adapter.key_names, scheduler=machine.scheduler,
                                max_batch=machine.settings.ground_batch_max)
        super().__init__(runtime, machine)

    def ladder(self) -> Ladder[GroundPlan]:
        a, cost = self.adapter, self.runtime.cost
        return Ladder(at_budget=a.at_budget, top=a.top, bottom=a.bottom,
                      seconds=lambda p: cost.predict_forward(p.side, 1), flops_fraction=lambda p: p.flops_fraction)

    def floor_s(self) -> float:
        return self.runtime.cost.predict_forward(self.adapter.keys[0], 1)

    def describe(self) -> dict:
        g = self.grounder
        return {"name": self.name, "endpoint": self.endpoint, "family": self.family, "task": self.task,
                "num_points": g.num_points, "max_token": g.max_token, "vocabulary_size": len(g.vocab),
                "metrics": (g.info.get("metrics") or {}).get("summary"),
                "rungs": [{"name": self.adapter.key_names[s], "long_side": s, "flops": self.adapter.flops_by_side[s],
                           "expected_accuracy": self.adapter.accuracy_by_side.get(s)} for s in self.adapter.keys]}

    def check_expression(self, expression: str) -> int:
        """How many words the model will read; 422 for an empty or over-long expression."""
        if len(expression) > self.settings.max_expression_chars:
            raise ApiError(422, f"expression of {len(expression)} characters exceeds the limit of "
                                f"{self.settings.max_expression_chars} (max_expression_chars)")
        words = clean_string(expression)
        if not words:
            raise ApiError(422, "the expression is empty (no words after removing punctuation)",
                           "a referring expression, e.g. 'the red circle left of the blue square'")
        return min(len(words), self.grounder.max_token)

    async def handle(self, request: Request, t0: float, expression_q: str | None, budget: str,
                     deadline_ms: float | None, min_budget: float | None, policy: Policy | None, side: int | None,
                     mask_format: str, explain: bool) -> Response:
        s, a = self.settings, self.adapter
        self.open_for(request, t0, deadline_ms, policy)
        self.shed_early(t0, deadline_ms, policy)
        upload, expression = await read_ground_request(request, s.max_body_bytes, expression_q)
        explicit = parse_budget(budget)
        pinned = None
        if side is not None:
            if side not in a.keys:
                raise ApiError(422, f"side={side} is not a rung of {self.name}", ", ".join(map(str, a.keys)))
            pinned = a.plan_for(side)
        n_words = self.check_expression(expression)
        self.shed_early(t0, deadline_ms, policy)
        decoded = await decode_body(len(upload.data), lambda: imageio.decode(upload.data, s.max_input_pixels))
        rgb = decoded.rgb_u8
        ask = Ask(budget=explicit, deadline_ms=deadline_ms, min_budget=min_budget, policy=policy, fixed=pinned)
        prepared: dict[int, GroundingItem] = {}

        def prepare(d: Decision) -> list[tuple[Any, Items]]:
            item = prepared[d.plan.side] = self.grounder.prepare(rgb, expression, d.plan.side)
            return a.work(d.plan, item)

        def finish(d: Decision, outputs: list[Items]) -> Grounding:
            tokens, scores = outputs[0]
            return self.grounder.postprocess(prepared[d.plan.side], tokens[0].tolist(), float(scores[0]))

        decision, job, future = await self.admit(self.ladder(), ask, t0, 0.0, prepare, finish,
                                                 inline=rgb.shape[0] * rgb.shape[1] <= INLINE_PREPARE_PIXELS)
        result = await self.result(request, decision, job, future)
        plan: GroundPlan = decision.plan
        label = f"side:{side}" if side is not None else f"{round(decision.budget, 4):g}"
        headers = {**self.timing_headers(decision, job, t0), "X-Anytime-Rung": plan.rung,
                   "X-Anytime-Flops": f"{plan.flops:.0f}", "X-Anytime-Flops-Full": f"{plan.flops_full:.0f}",
                   "X-Anytime-Flops-Fraction": f"{plan.flops_fraction:.4f}", "X-Anytime-Budget": label,
                   "X-Anytime-Task": self.task, "X-Anytime-Score": f"{result.score:.4f}"}
        self.observe(decision, job, t0, plan.rung, plan.flops, plan.flops_fraction)
        if explain:
            png = await asyncio.to_thread(self.draw_png, rgb, result)
            return Response(png, media_type="image/png", headers=headers)
        body = {
            "model": self.name, "family": self.family, "task": self.task, "expression": expression,
            "words_read": n_words, "unknown_words": result.unknown_words,
            "box": [round(v, 2) for v in result.box], "score": round(result.score, 6), "tokens": result.tokens,
            "rung": {"name": plan.rung, "long_side": plan.side}, "flops": plan.flops, "flops_full": plan.flops_full,
            "budget": label, "policy": decision.policy, "decision": decision.how,
            "queue_ms": round(1000 * job.queue_s, 2), "compute_ms": round(1000 * job.compute_s, 2),
        }
        if self.task == "mask":
            body["polygon"] = [[round(x, 2), round(y, 2)] for x, y in (result.polygon or [])]
            body["mask"] = self.mask_body(result.mask, mask_format)
        return JSONResponse(body, headers=headers)

    def mask_body(self, mask: np.ndarray, fmt: str) -> dict | None:
        if fmt == "none":
            return None
        if fmt == "png":
            return {"format": "png", "size": list(mask.shape),
                    "data": base64.b64encode(imageio.png_bytes(mask.astype(np.uint8) * 255)).decode()}
        return {"format": "rle", **mask_to_rle(mask)}

    def draw_png(self, rgb: np.ndarray, result) -> bytes:
        buf = io.BytesIO()
        self.grounder.draw(rgb, result).save(buf, format="PNG")
        return buf.getvalue()


async def read_ground_request(request: Request, limit: int, expression_q: str | None) -> tuple[Upload, str]:
    """The image and the expression, from any of the three accepted bodies."""
    if media_type(request) == "application/json":
        raw = await read_limited(request, limit)
        try:
            body = json.loads(raw)
        except RecursionError:
            raise ApiError(400, "malformed JSON body: nested too deeply", ACCEPTED_GROUND_BODIES) from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
            raise ApiError(400, f"malformed JSON body: {exc}", ACCEPTED_GROUND_BODIES) from None
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise ApiError(422, "the JSON body needs a string field 'image' (base64)", ACCEPTED_GROUND_BODIES)
        try:
            data = base64.b64decode(body["image"], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "field 'image' is not valid base64", ACCEPTED_GROUND_BODIES) from None
        expr = body.get("expression", expression_q)
        if expr is not None and not isinstance(expr, str):
            raise ApiError(422, "field 'expression' must be a string", ACCEPTED_GROUND_BODIES)
        upload = Upload(data, {})
    else:
        try:
            upload = await read_image(request, limit)
        except ApiError as exc:
            if exc.status == 415:
                exc.accepted = ACCEPTED_GROUND_BODIES
            raise
        expr = upload.fields.get("expression", expression_q)
    if expr is None:
        raise ApiError(422, "no expression given", ACCEPTED_GROUND_BODIES)
    try:  # the answer echoes it: text UTF-8 cannot carry (a lone surrogate, from JSON or a UTF-7 form) is refused
        expr.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(422, f"the expression is not valid Unicode text ({exc.reason}: {expr[exc.start]!r} at "
                            f"character {exc.start})", "text that UTF-8 can encode (in JSON, a \\uD800-\\uDBFF "
                            "escape must be followed by a \\uDC00-\\uDFFF one)") from None
    return upload, expr.strip()


def router(services: list[GroundService]) -> APIRouter:
    r = APIRouter(dependencies=[Depends(known_query_only)])
    by_name = {s.name: s for s in services}

    @r.post(
        "/ground",
        summary="Find the object a referring expression describes (a box, or a mask)",
        responses={200: {"description": "JSON: box in original pixels, polygon and mask (task=mask), tokens, score, "
                                        "rung and FLOPs; with explain=true a PNG with the answer drawn. X-Anytime-* "
                                        "headers as for /superresolve",
                         "content": {"application/json": {}, "image/png": {}}},
                   **doc(400, 401, 413, 415, 422, 429, 503, 504)},
        openapi_extra=GROUND_REQUEST_BODY,
    )
    async def ground(
        request: Request,
        task: Annotated[Task, Query(description="box: a bounding box; mask: a contour polygon and its mask")] = "box",
        expression: Annotated[str | None, Query(description="the referring expression (or a form / JSON field)")]
        = None,
        model: Annotated[str | None, Query(description="a grounding model from GET /v1/models (default: the first "
                                                       "one serving the task)")] = None,
        budget: Annotated[str, Query(description="fraction of the model's full FLOPs in [0, 1], or 'auto'")] = "auto",
        deadline_ms: Annotated[float | None, Query(gt=0, le=600_000, description="answer within this many ms")] = None,
        min_budget: Annotated[float | None, Query(ge=0, le=1, description="quality floor with a deadline")] = None,
        policy: Annotated[Policy | None, Query(description="adaptive, full or smallest")] = None,
        side: Annotated[int | None, Query(ge=1, le=8192, description="serve at this rung (input long side, px)")]
        = None,
        mask_format: Annotated[Literal["rle", "png", "none"], Query(description="task=mask: COCO RLE (uncompressed, "
                                                                               "column-major), base64 PNG or none")]
        = "rle",
        explain: Annotated[bool, Query(description="return the image with the answer drawn (PNG)")] = False,
    ) -> Response:
        if model is not None:
            svc = by_name.get(model)
            if svc is None:
                raise ApiError(422, f"model={model!r} is not served here", ", ".join(by_name) or None)
            if svc.task != task:
                raise ApiError(422, f"model {model} answers task={svc.task}, not task={task}")
        else:
            svc = next((s for s in services if s.task == task), None)
            if svc is None:
                served = sorted({s.task for s in services})
                raise ApiError(422 if services else 503, f"no grounding model for task={task} is served here",
                               f"task={', task='.join(served)}" if served else None)
        t0 = request.state.t0
        return await svc.guarded(t0, svc.handle(request, t0, expression, budget, deadline_ms, min_budget, policy,
                                                side, mask_format, explain))

    return r
