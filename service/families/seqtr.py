"""SeqTR on /ground: visual grounding as a sequence of coordinate tokens, one model per task
(det answers task=box, segm task=mask).

The ladder is the input resolution: each rung is a long side (the model's own by default;
``seqtr.long_sides`` adds smaller ones, which cost about (side / full side)^2 of the
FLOPs).  Requests at the same rung share forward passes: each image is resized so its long
side is the rung's and zero-padded onto one square canvas with a padding mask, so the
network never attends to the padding and coordinates still refer to each image's own
padded size.  FLOPs: 2 x multiply-accumulates of the canvas.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict
from starlette.requests import Request

from models.seqtr.preprocess import collate
from models.seqtr.raster import mask_to_rle
from models.seqtr.text import clean_string
from service import imageio
from service.body import Upload, media_type, read_image, read_limited
from service.bundled import bundled_all
from service.endpoints import ACCEPTED_GROUND_BODIES, GROUND, GroundParams
from service.errors import ApiError
from service.executor import Items
from service.family import Answer, FamilySettings, Pinned, Rung, ServedFamily
from service.registry import register

if TYPE_CHECKING:
    from service.config import Settings

TASK_OF_MODEL = {"det": "box", "segm": "mask"}
# Images this small are resized onto their rung's canvas on the event loop, while admission
# holds its lock: well under a millisecond, less than the hop to the planning thread and back.
INLINE_PREPARE_PIXELS = 256 * 256


class SeqTRSettings(FamilySettings):
    model_config = SettingsConfigDict(env_prefix="ANYTIME_SEQTR_", extra="ignore")

    checkpoints: list[Path] = Field(default_factory=lambda: bundled_all("seqtr"), description="one model per "
                                    "task: our bundle folders or official .pth files (JSON list in the "
                                    "environment; [] to serve none)")
    token_to_ix: Path | None = Field(None, description="token_to_ix.pkl of the dataset an official checkpoint "
                                     "was trained on (its vocabulary)")
    max_token: int | None = Field(None, ge=1, le=128, description="words an official checkpoint reads (15 "
                                  "RefCOCO/RefCOCO+, 20 RefCOCOg/ReferItGame/Flickr30k); ours: the manifest")
    long_sides: list[int] | None = Field(None, description="input-resolution ladder (long side in px, e.g. "
                                         "[384, 512, 640]); none: the model's own size only")
    batch_max: int = Field(8, ge=1, validation_alias=AliasChoices("ANYTIME_SEQTR_BATCH_MAX",
                           "ANYTIME_GROUND_BATCH_MAX", "batch_max", "ground_batch_max"), description="most "
                           "requests in one forward pass (SeqTR images are large: its batches are small)")
    max_expression_chars: int = Field(256, ge=1, validation_alias=AliasChoices(
        "ANYTIME_SEQTR_MAX_EXPRESSION_CHARS", "ANYTIME_MAX_EXPRESSION_CHARS", "max_expression_chars"),
        description="longest referring expression accepted")


@dataclass(frozen=True)
class SidePlan:
    side: int  # the rung: long side in px
    flops: float
    flops_full: float
    expected_accuracy: float | None = None

    @property
    def rung(self) -> str:
        return f"side={self.side}"


@dataclass
class GroundWork:
    rgb: np.ndarray
    expression: str
    words_read: int
    item: object | None = None  # the GroundingItem prepared at the chosen side


class SeqTRFamily(ServedFamily[GroundWork, SidePlan]):
    family = "seqtr"
    endpoint = GROUND
    flops_convention = "2 x multiply-accumulates of convolutions, linears, GRU gates and attention matmuls " \
                       "over the rung's square canvas"
    uses: ClassVar[frozenset[str]] = frozenset({"expression", "side", "mask_format", "explain"})

    def __init__(self, grounder, long_sides: list[int] | None = None, batch_max: int = 8,
                 max_expression_chars: int = 256) -> None:
        self.grounder, self.name = grounder, grounder.name
        self.task = TASK_OF_MODEL[grounder.task]
        self.divisor, self.max_batch, self.max_chars = grounder.size_divisor, batch_max, max_expression_chars
        self.sides = sorted(set(long_sides or [grounder.long_side]))
        if any(s < self.divisor for s in self.sides):
            raise ValueError(f"seqtr long_sides {self.sides}: each must be at least {self.divisor} px")
        # FLOPs of a square image at each side (what the canvas costs)
        self.flops_by_side = {s: float(grounder.flops(self.canvas(s), self.canvas(s))["total"]) for s in self.sides}
        self.flops_full = self.flops_by_side[self.sides[-1]]
        measured = (grounder.info.get("metrics") or {}).get("accuracy_by_long_side") or {}
        self.accuracy_by_side = {int(k): v for k, v in measured.items()}

    def canvas(self, side: int) -> int:
        return math.ceil(side / self.divisor) * self.divisor

    def at_side(self, side: int) -> SidePlan:
        return SidePlan(side, self.flops_by_side[side], self.flops_full, self.accuracy_by_side.get(side))

    # --- compute -----------------------------------------------------------------------

    def batch_keys(self) -> dict:
        return {s: f"side={s}" for s in self.sides}

    def example(self, side, n: int) -> Items:
        c, t = self.canvas(side), self.grounder.max_token
        text = torch.randint(3, max(4, len(self.grounder.vocab)), (n, t))
        return torch.rand(n, 3, c, c) * 255, torch.zeros(n, c, c, dtype=torch.bool), text

    def forward(self, side, batch: Items) -> Items:
        dev = self.grounder.device  # requests and calibration build their tensors on the CPU
        img, mask, text = (t.to(dev, non_blocking=True) for t in batch)
        return self.grounder.model.generate(img, mask, text)

    # --- one request -------------------------------------------------------------------

    def selects(self, params: GroundParams) -> bool:  # type: ignore[override]
        return params.task == self.task

    def selection(self) -> dict:
        return {"task": self.task}

    def check(self, request: Request, params: GroundParams) -> None:  # type: ignore[override]
        if params.side is not None and params.side not in self.sides:
            raise ApiError(422, f"side={params.side} is not a rung of {self.name}", ", ".join(map(str, self.sides)))

    async def read(self, request: Request, params: GroundParams, limit: int) -> Upload:  # type: ignore[override]
        """The image and the expression, from any of the three accepted bodies (the
        expression goes into ``Upload.fields``)."""
        upload, expression = await read_ground_request(request, limit, params.expression)
        upload.fields["expression"] = expression
        return upload

    def decode(self, upload: Upload, params: GroundParams, settings: Settings) -> GroundWork:  # type: ignore[override]
        expression = upload.fields["expression"]
        if len(expression) > self.max_chars:
            raise ApiError(422, f"expression of {len(expression)} characters exceeds the limit of {self.max_chars} "
                                "(seqtr max_expression_chars)")
        words = clean_string(expression)
        if not words:
            raise ApiError(422, "the expression is empty (no words after removing punctuation)",
                           "a referring expression, e.g. 'the red circle left of the blue square'")
        rgb = imageio.decode(upload.data, settings.max_input_pixels).rgb_u8
        return GroundWork(rgb, expression, min(len(words), self.grounder.max_token))

    def plan(self, work, budget: float, unit: str = "flops") -> SidePlan:
        fits = [s for s in self.sides if self.flops_by_side[s] <= budget * self.flops_full * (1 + 1e-9)]
        return self.at_side(fits[-1] if fits else self.sides[0])

    def top(self, work) -> SidePlan:
        return self.at_side(self.sides[-1])

    def bottom(self, work) -> SidePlan:
        return self.at_side(self.sides[0])

    def floor_batches(self) -> list:
        return [(self.sides[0], 1)]

    def batches(self, plan: SidePlan) -> list:
        return [(plan.side, 1)]

    def pin(self, work, params: GroundParams) -> Pinned | None:  # type: ignore[override]
        return None if params.side is None else Pinned(self.at_side(params.side), f"side:{params.side}")

    def plans_inline(self, work: GroundWork) -> bool:
        return work.rgb.shape[0] * work.rgb.shape[1] <= INLINE_PREPARE_PIXELS

    def prepare(self, work: GroundWork, plan: SidePlan) -> list:
        """The request as one row of its rung's square canvas (padding masked)."""
        item = work.item = self.grounder.prepare(work.rgb, work.expression, plan.side)
        c = self.canvas(plan.side)
        img, mask = collate([item.prepared], size=(c, c))
        return [(plan.side, (img, mask, torch.tensor([item.text_ids], dtype=torch.long)))]

    def finish(self, work: GroundWork, plan: SidePlan, outputs: list):
        tokens, scores = outputs[0]
        return self.grounder.postprocess(work.item, tokens[0].tolist(), float(scores[0]))

    def respond_inline(self, work: GroundWork, params: GroundParams) -> bool:  # type: ignore[override]
        return not params.explain  # drawing and encoding the picture

    def respond(self, work: GroundWork, decision, result, params: GroundParams, request) -> Answer:  # type: ignore[override]
        plan: SidePlan = decision.plan
        headers = {"X-Anytime-Task": self.task, "X-Anytime-Score": f"{result.score:.4f}"}
        if params.explain:
            buf = io.BytesIO()
            self.grounder.draw(work.rgb, result).save(buf, format="PNG")
            return Answer(buf.getvalue(), plan.rung, plan.flops, plan.flops_full, "image/png", headers)
        body = {"task": self.task, "expression": work.expression, "words_read": work.words_read,
                "unknown_words": result.unknown_words, "box": [round(v, 2) for v in result.box],
                "score": round(result.score, 6), "tokens": result.tokens,
                "rung": {"name": plan.rung, "long_side": plan.side}, "expected_accuracy": plan.expected_accuracy}
        if self.task == "mask":
            body["polygon"] = [[round(x, 2), round(y, 2)] for x, y in (result.polygon or [])]
            body["mask"] = mask_body(result.mask, params.mask_format)
        return Answer(body, plan.rung, plan.flops, plan.flops_full, headers=headers)

    # --- description -------------------------------------------------------------------

    def rungs(self) -> list[Rung]:
        return [Rung(f"side={s}", self.flops_by_side[s], None, {"accuracy": self.accuracy_by_side.get(s)},
                     False, {"long_side": s}) for s in self.sides]

    def describe(self) -> dict:
        g = self.grounder
        return {"num_points": g.num_points, "max_token": g.max_token, "vocabulary_size": len(g.vocab),
                "metrics": (g.info.get("metrics") or {}).get("summary")}


def mask_body(mask: np.ndarray, fmt: str) -> dict | None:
    if fmt == "none":
        return None
    if fmt == "png":
        return {"format": "png", "size": list(mask.shape),
                "data": base64.b64encode(imageio.png_bytes(mask.astype(np.uint8) * 255)).decode()}
    return {"format": "rle", **mask_to_rle(mask)}


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


@register("seqtr")
def load(settings: Settings) -> list[SeqTRFamily]:
    s: SeqTRSettings = settings.seqtr
    if not s.checkpoints:
        return []
    from models.seqtr.serving import SeqTRGrounder

    return [SeqTRFamily(SeqTRGrounder.from_checkpoint(path, token_to_ix=s.token_to_ix, max_token=s.max_token,
                                                      device=settings.device),
                        s.long_sides, s.batch_max, s.max_expression_chars) for path in s.checkpoints]
