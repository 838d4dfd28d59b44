"""ARM on /superresolve: x4 super-resolution with a rung per 32x32 patch.

Per request: decode the image (its patch count bounded from the header), analyse its tiles
(edge scores, the Edge-to-PSNR table's predictions), let the planner pick the budget the
deadline and the load allow, queue the patches grouped by rung (the scheduler merges them
with other requests' patches of the same rung), then stitch and encode on the scheduler
thread.  FLOPs: ARM's own count (2 x multiply-accumulates of every convolution and
deconvolution, plus one per PReLU slope; bicubic counts nothing), per 32x32 LR patch.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from pydantic_settings import SettingsConfigDict
from starlette.requests import Request

from models.arm import tiling as arm_tiling
from models.arm.dispatch import RungTimes
from models.arm.nets import SCALE
from models.arm.pipeline import Analysis, ArmSR, Plan, rung_work
from models.common.synthetic import synthetic_photo
from service import imageio, limits
from service.body import Upload, read_image
from service.bundled import BUNDLED_ARM
from service.endpoints import SUPERRESOLVE, SuperresolveParams
from service.errors import ApiError
from service.family import Answer, FamilySettings, Pinned, Rung, ServedFamily
from service.media import OFFERED, negotiate
from service.registry import register

if TYPE_CHECKING:
    from service.config import Settings

# Small requests are planned on the event loop: it takes well under a millisecond, less than
# the hop to the planning thread and back.
INLINE_PLAN_PATCHES = 64  # about 230x230 LR

# Rung colours of explain=true maps by rung index: bicubic grey, the fp32 widths blue -> green
# -> red, the next three rungs (int8, or bf16 without int8) the same hues lighter, the three
# after them (bf16 after int8) darker, then spares for longer ladders.
RUNG_COLOURS = [(128, 128, 128), (66, 133, 244), (52, 168, 83), (234, 67, 53),
                (161, 194, 250), (153, 214, 168), (245, 166, 160), (25, 65, 140), (20, 90, 40), (140, 30, 20),
                (251, 188, 4), (171, 71, 188)]


class ArmSettings(FamilySettings):
    model_config = SettingsConfigDict(env_prefix="ANYTIME_ARM_", extra="ignore")

    checkpoint: Path | None = Field(BUNDLED_ARM, description="our .safetensors (manifest beside it) or an "
                                    "official .pth ('' to serve none)")
    table: Path | None = Field(None, description="table JSON overriding the one found beside the checkpoint")
    int8: bool = Field(True, description="serve the int8 rungs models.arm.quantize made for the checkpoint "
                       "(real int8 kernels, CPU only)")
    int8_dir: Path | None = Field(None, description="folder of those int8 rungs (default: the checkpoint's own)")
    bf16: bool = Field(True, description="serve a bf16 rung per width (FSRCNN's expand + upsampler in bf16) where "
                       "the device multiplies bf16 natively (AVX512-BF16/AMX CPUs, GPUs); built at start-up, its "
                       "table row estimated on shipped photos")
    time_slack_db: float = Field(0.05, ge=0.0, le=1.0, description="among plans within this many dB of the best "
                                 "predicted quality at the budget, serve the one predicted fastest (0: always "
                                 "the best predicted quality)")


@dataclass
class SrWork:
    img: imageio.Decoded
    analysis: Analysis
    media: str
    objective: str = "mse"
    groups: list = field(default_factory=list)
    times: RungTimes | None = None  # the rungs' predicted seconds, read once per request


class ArmFamily(ServedFamily[SrWork, Plan]):
    family = "arm"
    endpoint = SUPERRESOLVE
    flops_convention = "2 x multiply-accumulates of every convolution and deconvolution + 1 per PReLU slope, " \
                       "per 32x32 LR patch (ARM's count; bicubic counts 0)"
    uses: ClassVar[frozenset[str]] = frozenset({"rung", "tiling", "objective", "explain"})
    budget_words = ("best",)
    budget_units = ("time", "flops")

    def __init__(self, model: ArmSR, time_slack_db: float = 0.05, png_compress_level: int = 1,
                 jpeg_quality: int = 95) -> None:
        self.model, self.name = model, model.name
        self.time_slack_db, self.png_level, self.jpeg_quality = time_slack_db, png_compress_level, jpeg_quality
        self.top_index = model.top
        self.predict = None  # the cost model's predictor, once the start-up timing is done
        self.max_batch = None

    def calibrated(self, predict, max_batch: int) -> None:
        self.predict, self.max_batch = predict, max_batch

    def times(self) -> RungTimes:
        """Each rung's predicted fixed and per-patch seconds per forward pass, from the live
        cost model (two predictions per rung: one patch and a full pass)."""
        m = self.max_batch
        one = np.array([self.predict([(r.index, 1)]) for r in self.model.rungs])
        full = np.array([self.predict([(r.index, m)]) for r in self.model.rungs])
        per_item = (full - one) / (m - 1) if m > 1 else full
        return RungTimes(np.maximum(one - per_item, 0.0), np.maximum(per_item, 1e-9), m)

    # --- compute -----------------------------------------------------------------------

    def batch_keys(self) -> dict:
        return {r.index: r.name for r in self.model.rungs}

    def example(self, key, n: int) -> torch.Tensor:
        return torch.rand(n, 3, 32, 32, device=self.model.device)

    def forward(self, key, batch: torch.Tensor) -> torch.Tensor:
        return self.model.run_patches(key, batch)

    def calibrate_extra(self, repeats: int) -> list[tuple[float, float]]:
        """Time stitch + PNG encode at two image sizes (the cost model fits it per output pixel)."""
        samples = []
        for side in (64, 192):
            rgb = synthetic_photo(side, side, seed=side)
            img = imageio.Decoded(rgb, rgb.astype(np.float32) / 255, None, False, 8)
            work = SrWork(img, self.model.analyse(rgb), "image/png")
            plan = self.plan(work, 0.65)
            outputs = [self.model.run_patches(key, items) for key, items in self.prepare(work, plan)]
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.finish(work, plan, outputs)
                times.append(time.perf_counter() - t0)
            samples.append((16 * side * side, float(np.median(times))))
        return samples

    # --- one request -------------------------------------------------------------------

    def rung_index(self, raw: str) -> int:
        names = [r.name for r in self.model.rungs]
        if raw in names:
            return names.index(raw)
        if raw.isdigit() and int(raw) < len(names):
            return int(raw)
        raise ApiError(422, f"rung={raw!r} is not a rung of {self.name}",
                       f"one of {', '.join(names)} or an index 0..{len(names) - 1}")

    def check(self, request: Request, params: SuperresolveParams) -> None:  # type: ignore[override]
        if params.rung is not None:
            self.rung_index(params.rung)

    async def read(self, request: Request, params: SuperresolveParams, limit: int) -> Upload:  # type: ignore[override]
        """The image, and the output format the client accepts (in ``fields['media']``; a
        protocol that reads its own body, such as OIP, sets it there itself)."""
        media = negotiate(request.headers.get("accept"))
        if media is None:
            raise ApiError(406, f"none of Accept {request.headers.get('accept')!r} can be produced", ", ".join(OFFERED))
        upload = await read_image(request, limit)
        upload.fields["media"] = media
        return upload

    def floor_of(self, upload: Upload, params: SuperresolveParams,  # type: ignore[override]
                 settings: Settings) -> tuple[list, float] | None:
        """Bicubic on every patch, and the output's stitch and encode: the patch count and
        the output size follow from the header's size (tens of microseconds, no pixels)."""
        try:
            with Image.open(io.BytesIO(upload.data)) as im:
                w, h = im.size
        except Exception:  # not an image PIL can read: decode answers the 4xx
            return None
        patches = arm_tiling.count(h, w, params.tiling)
        if w * h > settings.max_input_pixels or patches > settings.max_sr_patches:
            return None  # decode answers 413, which says what to send instead
        return [(0, patches)], float(SCALE * h * SCALE * w)

    def decode(self, upload: Upload, params: SuperresolveParams, settings: Settings) -> SrWork:  # type: ignore[override]
        img = imageio.decode(upload.data, settings.max_input_pixels,
                             limits.sr_patches(settings.max_sr_patches, params.tiling))
        return SrWork(img, self.model.analyse(img.rgb_u8, params.tiling), upload.fields["media"], params.objective)

    def plan(self, work: SrWork, budget: float, unit: str = "time") -> Plan:
        """In time (the default): the least predicted squared error whose predicted forward
        seconds, fixed cost per pass included, fit ``budget`` x the whole image at full width;
        in FLOPs: the paper's convention (``objective`` applies to FLOPs budgets only)."""
        if unit == "time" and self.predict is not None:
            if work.times is None:  # one reading of the cost model per request, for every budget tried
                work.times = self.times()
            return self.model.choose(work.analysis, mode="seconds", budget=budget, times=work.times)
        return self.model.choose(work.analysis, mode="budget", budget=budget, objective=work.objective)

    def top(self, work: SrWork) -> Plan:
        return self.model.choose(work.analysis, mode="fixed", rung=self.top_index)

    def bottom(self, work: SrWork) -> Plan:
        return self.model.choose(work.analysis, mode="fixed", rung=0)

    def batches(self, plan: Plan) -> list:
        return rung_work(plan.rungs)

    def refine(self, work: SrWork, plan: Plan, seconds) -> Plan:
        return self.model.faster_within(work.analysis, plan, lambda rungs: seconds(replace(plan, rungs=rungs)),
                                        self.time_slack_db)

    def pin(self, work: SrWork, params: SuperresolveParams) -> Pinned | None:  # type: ignore[override]
        if params.rung is not None:
            index = self.rung_index(params.rung)
            return Pinned(self.model.choose(work.analysis, mode="fixed", rung=index),
                          f"rung:{self.model.rungs[index].name}")
        if params.budget == "best":
            return Pinned(self.model.choose(work.analysis, mode="best"), "best")
        return None

    def overhead_units(self, work: SrWork) -> float:
        return float(work.analysis.out_hw[0] * work.analysis.out_hw[1])

    def plans_inline(self, work: SrWork) -> bool:
        return len(work.analysis.positions) <= INLINE_PLAN_PATCHES

    def plan_only(self, params: SuperresolveParams) -> bool:  # type: ignore[override]
        return params.explain

    def prepare(self, work: SrWork, plan: Plan) -> list:
        work.groups = self.model.prepare(plan, work.img.rgb)
        return [(g.rung, g.patches) for g in work.groups]

    def finish(self, work: SrWork, plan: Plan, outputs: list) -> bytes:
        canvas = self.model.assemble(plan, work.img.rgb, work.groups, outputs)
        return imageio.encode(canvas, work.img, work.media, png_compress_level=self.png_level,
                              quality=self.jpeg_quality)

    def respond(self, work: SrWork, decision, result: bytes, params, request) -> Answer:
        h, w = work.analysis.out_hw
        return Answer(result, self.dominant_rung(decision.plan), decision.plan.flops, decision.plan.flops_full,
                      work.media, {**self.plan_headers(decision.plan), "X-Anytime-Output-Size": f"{h}x{w}"})

    def explain(self, work: SrWork, decision) -> Answer:
        plan = decision.plan
        headers = {**self.plan_headers(plan), "X-Anytime-Rung-Colours": ",".join(
            "{}=#{:02x}{:02x}{:02x}".format(r.name, *RUNG_COLOURS[r.index % len(RUNG_COLOURS)])
            for r in self.model.rungs)}
        return Answer(rung_map(plan, work.img.rgb_u8), self.dominant_rung(plan), plan.flops, plan.flops_full,
                      "image/png", headers)

    def dominant_rung(self, plan: Plan) -> str:
        return self.model.rungs[int(np.bincount(plan.rungs).argmax())].name

    def plan_headers(self, plan: Plan) -> dict[str, str]:
        counts = plan.rung_counts(len(self.model.rungs))
        return {"X-Anytime-Rung-Mix": ",".join(f"{r.name}={c}" for r, c in zip(self.model.rungs, counts)),
                "X-Anytime-Predicted-Patch-PSNR": f"{plan.predicted_patch_psnr:.3f}", "X-Anytime-Tiling": plan.tiling}

    def record(self, metrics, work: SrWork, decision, answer: Answer) -> None:
        plan = decision.plan
        metrics.predicted_patch_psnr.labels(self.name).observe(plan.predicted_patch_psnr)
        for r, c in zip(self.model.rungs, plan.rung_counts(len(self.model.rungs))):
            if c:
                metrics.patches.labels(self.name, r.name).inc(c)

    # --- description -------------------------------------------------------------------

    def rungs(self) -> list[Rung]:
        """Every rung with its held-out PSNR (test photos, the whole image at that rung) and,
        once timed, its predicted ms per patch in a full batch.  Dominated: another rung is
        faster per patch and predicted at least as good in every edge bin of the table, so
        the per-patch dispatch never picks it."""
        m = self.model
        measured = (m.meta.get("metrics") or {}).get("results", {})
        per_patch = self.times().per_item if self.predict is not None else None
        table_mse = m.table.mse if m.table is not None and m.table.mse is not None else None
        out = []
        for r in m.rungs:
            entry = m.compressed.get(r.name, {})
            own = entry.get("quality", {})  # with its drop, estimates and what they rest on
            quality = {**own, "psnr_rgb": own.get("psnr_rgb", measured.get(r.name, {}).get("psnr_rgb"))}
            detail: dict = {"index": r.index, "width": r.width, "precision": r.precision}
            if per_patch is not None:
                detail["ms_per_patch_full_batch"] = round(1000 * float(per_patch[r.index]), 4)
            if entry:
                detail.update({k: entry[k] for k in ("method", "backend", "real_speed", "command") if k in entry})
            dominated = per_patch is not None and table_mse is not None and any(
                per_patch[o.index] < per_patch[r.index] and bool(np.all(table_mse[o.index] <= table_mse[r.index]))
                for o in m.rungs if o.index != r.index)
            out.append(Rung(r.name, float(r.flops_per_patch), r.params, quality, dominated, detail))
        return out

    def describe(self) -> dict:
        m = self.model
        return {"backbone": m.backbone.name, "flops_per": "32x32 LR patch",
                "table": m.table.source if m.table is not None else None, "metrics": m.meta.get("metrics")}


def rung_map(plan: Plan, rgb_u8: np.ndarray) -> bytes:
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


@register("arm")
def load(settings: Settings) -> list[ArmFamily]:
    s: ArmSettings = settings.arm
    if s.checkpoint is None:
        return []
    int8 = (s.int8_dir or True) if s.int8 else False
    model = ArmSR.from_checkpoint(s.checkpoint, table=s.table, device=settings.device, int8=int8, bf16=s.bf16)
    return [ArmFamily(model, s.time_slack_db, settings.png_compress_level, settings.jpeg_quality)]
