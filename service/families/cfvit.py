"""CF-ViT on /classify: coarse-to-fine early exit, the exit threshold eta as the rung.

One batch key per precision runs every request: a forward pass takes (images, a per-row eta), runs the
coarse stage for all rows and the fine stage only for rows whose coarse confidence stays
below their eta.  ``budget`` b picks the largest eta whose expected cost on the validation
curve (coarse + (1 - exit rate) x fine increment) fits b x the all-fine cost.  Work is
counted in all-fine units, so a row that exited counts coarse/full of one.  FLOPs: the
paper's count (multiply-accumulates, as fvcore reports them) doubled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from models.cfvit.model import ALL_FINE
from service.bundled import bundled
from service.endpoints import ClassifyParams
from service.errors import ApiError
from service.executor import Items
from service.family import TIME_BUDGET_TOLERANCE, EngineSetting, FamilySettings, Pinned, Rung
from service.families.classifier import ImageClassifier
from service.registry import register

if TYPE_CHECKING:
    from service.config import Settings

KEYS = {"fp32": "cfvit", "int8": "cfvit-int8", "bf16": "cfvit-bf16"}  # one batch key per precision
SUFFIX = {"fp32": "", "int8": "-int8", "bf16": "-bf16"}  # of a precision's stage names: fine-int8


class CfVitSettings(FamilySettings):
    model_config = SettingsConfigDict(env_prefix="ANYTIME_CFVIT_", extra="ignore")

    checkpoint: Path | None = Field(default_factory=lambda: bundled("cfvit"), description="our safetensors or "
                                    "an official .pth ('' to serve none)")
    class_names: Path | None = Field(None, validation_alias=AliasChoices("ANYTIME_CFVIT_CLASS_NAMES",
                                     "ANYTIME_CLASS_NAMES", "class_names"), description="class names file (one "
                                     "per line) for an official checkpoint")
    int8: bool = Field(True, description="serve the bundle's int8 version (python -m models.cfvit.quantize; "
                       "an official checkpoint gets dynamic int8 linears built at start-up, quality estimated; "
                       "CPU only)")
    bf16: bool = Field(True, description="serve the bundle's bf16 version (python -m models.cfvit.bf16) where the "
                       "device multiplies bf16 natively (AMX / AVX512-BF16, CUDA)")
    engine: EngineSetting = Field(
        "auto", description="what runs the two stages on a CPU: auto times torch and every installed engine (ONNX "
        "Runtime, OpenVINO) on each fp32 stage, and torch.ao and OpenVINO on each int8 stage where the bundle holds "
        "OpenVINO's int8 quality, at start-up, and runs every batch on the one that was faster at its size; torch; or "
        "one engine at every size (onnxruntime: fp32 only); bf16 likewise on torch's autocast or OpenVINO's bf16 "
        "kernels where the bundle holds OpenVINO's bf16 quality")


@dataclass(frozen=True)
class ExitPlan:
    eta: float
    flops: float  # expected, on the validation curve
    flops_full: float
    expected_accuracy: float | None
    expected_exit_rate: float | None = None
    precision: str = "fp32"

    @property
    def key(self) -> str:
        return KEYS[self.precision]

    @property
    def rung(self) -> str:
        return f"eta={self.eta:g}" + SUFFIX[self.precision]


def lower_curve(curves: list[list[dict]]) -> list[dict]:
    """Eta curves of two versions of one network (engines that round differently), as the
    curve of whichever serves a batch: at each eta the lower accuracy and the higher cost."""
    out = []
    for points in zip(*curves, strict=True):
        if len({p["eta"] for p in points}) != 1:
            raise ValueError("eta curves at different thresholds")
        low = min(points, key=lambda p: p["accuracy"])
        high = max(points, key=lambda p: p["expected_flops"])
        out.append({**low, "expected_flops": high["expected_flops"], "exit_rate": high["exit_rate"],
                    "flops_fraction": high.get("flops_fraction", low.get("flops_fraction"))})
    return out


def point_at(curve: list[dict], eta: float) -> dict:
    """The curve point at the largest eta not above ``eta`` ({} below the curve)."""
    points = [p for p in curve if p["eta"] <= eta + 1e-9]
    return points[-1] if points else {}


class CfVitFamily(ImageClassifier):
    """Rungs: the exit threshold eta, in fp32 and, where the bundle has them, on int8 linears
    (``python -m models.cfvit.quantize``; CPU only) and in bf16 (``python -m models.cfvit.bf16``;
    where the device multiplies bf16 natively).  Budgets in time (the default) pick the
    most accurate (eta, precision) on the validation curves whose expected time, as a share
    of a full batch, fits ``budget`` x fp32 all-fine; in FLOPs, the paper's eta rule."""

    family = "cfvit"
    flops_convention = "2 x multiply-accumulates of every layer (CF-ViT's and fvcore's 'FLOPs' are MACs)"
    uses: ClassVar[frozenset[str]] = frozenset({"top_k", "rung", "eta"})
    budget_units = ("time", "flops")

    def __init__(self, model, engine: str = "torch") -> None:
        super().__init__(model)
        self.engine = engine  # the engine setting (``before_timing`` acts on it)
        self.flops_coarse, self.flops_full = 2.0 * model.flops_coarse, 2.0 * model.flops_full
        # each reduced precision the model serves: its manifest (int8.json, bf16.json or an estimate)
        self.manifests = {precision: meta for precision, net, meta in (
            ("int8", getattr(model, "int8_net", None), getattr(model, "int8_meta", None)),
            ("bf16", getattr(model, "bf16_net", None), getattr(model, "bf16_meta", None)))
            if net is not None and meta is not None}
        self.curves = {"fp32": model._budget_curve, **{
            precision: sorted(meta.get("eta_curve_dense") or meta["eta_curve"], key=lambda p: p["eta"])
            for precision, meta in self.manifests.items()}}
        # precision -> stage -> its held-out quality as served (the int8 stages: that of the
        # engines serving them, the lower where two share them; ``before_timing``)
        self.stage_quality = {precision: {r["rung"]: dict(r["quality"]) for r in meta["rungs"]}
                              for precision, meta in self.manifests.items()}
        self.seconds_per_item = None
        self.by_time: list[ExitPlan] = []

    def before_timing(self, max_batch: int) -> None:
        """Choose each stage's engine per batch size (``CfVitModel.choose_engines``), here on
        the scheduler thread, so that the start-up timing measures what is served; where
        OpenVINO serves a reduced precision, its curve and stage quality become OpenVINO's (or,
        where torch's version shares the batch sizes, the lower of the two)."""
        # fewer sizes and rounds than PSS-Net's: three precisions of two stages are measured, about
        # 10 s of start-up on 2 cores (twice that at every power of two and three rounds)
        self.model.choose_engines(self.engine, [n for n in (1, 8, 32, max_batch) if n <= max_batch], rounds=2)
        for precision, meta in self.manifests.items():
            measured = meta.get("engine_quality", {})
            others, own = self.served_by(precision)
            if not others:
                continue
            self.curves[precision] = lower_curve(
                [sorted(measured[e]["eta_curve_dense"], key=lambda p: p["eta"]) for e in others] +
                ([self.curves[precision]] if own else []))
            for stage, quality in self.stage_quality[precision].items():
                for key in ("test_accuracy", "val_accuracy"):
                    quality[key] = min([measured[e][stage][key] for e in others] + ([quality[key]] if own else []))

    def served_by(self, precision: str) -> tuple[set[str], set[str]]:
        """The engines serving some batch size of a reduced precision: (those whose version's
        quality its manifest measured separately, OpenVINO's; the rest: torch's own version)."""
        measured = set(self.manifests[precision].get("engine_quality", {}))
        served = self.model.served_engines(precision)
        return served & measured, served - measured

    def at_eta(self, eta: float, precision: str = "fp32") -> ExitPlan:
        point = point_at(self.curves[precision], eta)
        flops = 2.0 * point["expected_flops"] if point else self.flops_full
        return ExitPlan(eta, flops, self.flops_full, point.get("accuracy"), point.get("exit_rate"), precision)

    def batch_keys(self) -> dict:
        return {KEYS[p]: KEYS[p] for p in self.curves}

    def example(self, key, n: int) -> Items:
        s = self.model.input_size
        return torch.randn(n, 3, s, s), torch.full((n,), ALL_FINE)  # calibrate the all-fine path

    def forward(self, key, batch: Items) -> Items:
        return self.model.forward(batch[0], batch[1], int8=key == KEYS["int8"], bf16=key == KEYS["bf16"])

    def work_units(self, key, batch: Items, out: Items) -> float:
        exited = int(out[1].sum())
        return exited * self.flops_coarse / self.flops_full + (len(out[1]) - exited)

    def calibrated(self, predict, max_batch: int) -> None:
        """Every (eta, precision) on the curves, by expected time; keep those more accurate
        than every faster one."""
        self.seconds_per_item = lambda key: predict([(key, max_batch)]) / max_batch
        plans = [self.at_eta(p["eta"], precision) for precision, curve in self.curves.items() for p in curve]
        best, kept = -1.0, []
        for plan in sorted(plans, key=self.expected_seconds):
            accuracy = plan.expected_accuracy if plan.expected_accuracy is not None else plan.flops
            if accuracy > best or not kept:
                kept.append(plan)
                best = max(best, accuracy)
        self.by_time = kept

    def expected_seconds(self, plan: ExitPlan) -> float:
        return self.seconds_per_item(plan.key) * plan.flops / plan.flops_full

    def check(self, request, params: ClassifyParams) -> None:  # type: ignore[override]
        super().check(request, params)
        stages = [f"{s}{SUFFIX[precision]}" for precision in self.curves for s in ("coarse", "fine")]
        if params.rung not in (None, *stages):
            raise ApiError(422, f"rung={params.rung!r} is not a stage of {self.name}", ", ".join(stages))

    def plan(self, work, budget: float, unit: str = "time") -> ExitPlan:
        if unit == "time" and self.by_time:
            limit = budget * self.expected_seconds(self.top(work)) * (1 + TIME_BUDGET_TOLERANCE)
            fits = [p for p in self.by_time if self.expected_seconds(p) <= limit]
            return fits[-1] if fits else self.by_time[0]
        return self.at_eta(self.model.eta_for_budget(budget))

    def top(self, work) -> ExitPlan:
        return self.at_eta(ALL_FINE)

    def bottom(self, work) -> ExitPlan:
        return self.by_time[0] if self.by_time else self.at_eta(0.0)

    def floor_batches(self) -> list:
        return self.batches(self.bottom(None))

    def batches(self, plan: ExitPlan) -> list:
        return [(plan.key, plan.flops / plan.flops_full)]

    def pin(self, work, params: ClassifyParams) -> Pinned | None:  # type: ignore[override]
        if params.rung is not None:
            stage, _, precision = params.rung.partition("-")
            return Pinned(self.at_eta(0.0 if stage == "coarse" else ALL_FINE, precision or "fp32"),
                          f"rung:{params.rung}")
        return None if params.eta is None else Pinned(self.at_eta(params.eta), f"eta:{params.eta:g}")

    def prepare(self, work: torch.Tensor, plan: ExitPlan) -> list:
        return [(plan.key, (work[None], torch.tensor([plan.eta], dtype=torch.float32)))]

    def finish(self, work, plan: ExitPlan, outputs: list) -> tuple[torch.Tensor, bool, float]:
        logits, exited, confidence = outputs[0]
        return logits[0], bool(exited[0]), float(confidence[0])

    def respond(self, work, decision, result, params, request):
        plan: ExitPlan = decision.plan
        logits, exited, confidence = result
        stage = ("coarse" if exited else "fine") + SUFFIX[plan.precision]
        return self.classified(logits, params, {"name": stage, "exit_stage": stage.split("-")[0], "eta": plan.eta,
                                                "precision": plan.precision, "coarse_confidence": round(confidence, 6),
                                                "expected_exit_rate": plan.expected_exit_rate},
                               self.flops_coarse if exited else self.flops_full, plan)

    def record(self, metrics, work, decision, answer) -> None:
        super().record(metrics, work, decision, answer)
        metrics.exits.labels(self.name, answer.rung).inc()

    def rungs(self) -> list[Rung]:
        out = []
        for precision in self.curves:
            suffix = SUFFIX[precision]
            manifest = self.manifests.get(precision)
            for stage, eta in (("coarse", 0.0), ("fine", ALL_FINE)):
                plan = self.at_eta(eta, precision)
                detail = {"eta": eta, "precision": precision, "key": plan.key}
                if self.seconds_per_item is not None:
                    detail["ms_per_item_full_batch"] = round(1000 * self.expected_seconds(plan), 4)
                runners = self.model.runners.get(precision)
                detail["engine"] = runners.describe()[stage] if runners is not None else \
                    next(iter(self.model.served_engines(precision)))
                if manifest is not None:
                    entry = next(r for r in manifest["rungs"] if r["rung"] == stage)
                    quality = self.stage_quality[precision][stage]
                    measured = manifest.get("engine_quality", {})
                    others, own = self.served_by(precision)
                    # the backend of what serves the stage: another engine's where it serves some sizes
                    backends = [measured[e]["backend"] for e in sorted(others)] + ([entry["backend"]] if own else [])
                    detail.update(method=entry["method"], backend="; ".join(backends), real_speed=entry["real_speed"],
                                  command=entry["command"], **{k: v for k, v in quality.items() if k in (
                                      "test_accuracy", "accuracy_drop_estimate", "estimate")})
                    if measured:  # the same network on another engine, and its quality there
                        detail["engine_quality"] = {e: {**q[stage], "backend": q["backend"]}
                                                    for e, q in measured.items()}
                out.append(Rung(f"{stage}{suffix}", self.flops_coarse if stage == "coarse" else self.flops_full, None,
                                {"accuracy": plan.expected_accuracy}, bool(self.by_time) and not any(
                                    p.precision == precision and abs(p.eta - eta) < 1e-9 for p in self.by_time),
                                detail))
        return out

    def describe(self) -> dict:
        m = self.model
        return {**super().describe(), "source": m.source, "parameters": sum(p.numel() for p in m.net.parameters()),
                "tokens": {"coarse": m.config.num_coarse + 1, "fine": m.config.fine_seq_len},
                "eta_curves": {precision: [{**p, "expected_flops": 2.0 * p["expected_flops"]} for p in curve]
                               for precision, curve in self.curves.items()}}


@register("cfvit")
def load(settings: Settings) -> list[CfVitFamily]:
    s: CfVitSettings = settings.cfvit
    if s.checkpoint is None:
        return []
    from models.cfvit.serving import CfVitModel

    return [CfVitFamily(CfVitModel.from_checkpoint(s.checkpoint, names_file=s.class_names, device=settings.device,
                                                   int8=s.int8, bf16=s.bf16), s.engine)]
