"""PSS-Net on /classify: one ladder of a rung per retained subnet of the supernet, per dense
variant the bundle holds (networks made by other methods: CLR-RNF pruning, DCFF compact
training), and per int8 version of either.

Budgets in time pick the most accurate rung whose predicted time fits; in FLOPs, the
largest fp32 rung (among those not dominated on validation accuracy) whose FLOPs are at
most b x the top's. Requests at the same rung share forward passes.  FLOPs: PSS-Net's count (multiply-accumulates of convolutions and the classifier,
plus the average pool) doubled, so that a multiply-add counts two.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from service.bundled import bundled
from service.endpoints import ClassifyParams
from service.errors import ApiError
from service.family import TIME_BUDGET_TOLERANCE, EngineSetting, FamilySettings, Pinned, Rung, batch_sizes
from service.families.classifier import ImageClassifier
from service.registry import register

if TYPE_CHECKING:
    from service.config import Settings

FLOPS_PER_MFLOP = 2e6  # PSS-Net's MFLOPs are millions of multiply-accumulates


class PssNetSettings(FamilySettings):
    model_config = SettingsConfigDict(env_prefix="ANYTIME_PSSNET_", extra="ignore")

    checkpoint: Path | None = Field(default_factory=lambda: bundled("pssnet"), description="our safetensors "
                                    "bundle or an official .pt ('' to serve none)")
    calibration: Path | None = Field(None, description="image folder to recalibrate BatchNorm of an official "
                                     "checkpoint's subnets (it has no usable statistics)")
    class_names: Path | None = Field(None, validation_alias=AliasChoices("ANYTIME_PSSNET_CLASS_NAMES",
                                     "ANYTIME_CLASS_NAMES", "class_names"), description="class names file (one "
                                     "per line) for an official checkpoint")
    int8: bool = Field(True, description="serve the bundle's int8 rungs (python -m models.pssnet.quantize), rebuilt "
                       "at start-up from their stored calibration and observers' state (CPU only)")
    engine: EngineSetting = Field(
        "auto", description="what runs the rungs on a CPU: auto times torch and every installed engine (ONNX "
        "Runtime: pip install 'anytime-serve[onnx]'; OpenVINO: 'anytime-serve[openvino]') on each fp32 ladder rung, "
        "and torch.ao and OpenVINO on each int8 rung whose OpenVINO quality the bundle holds, at start-up, and runs "
        "every batch on the one that was faster at its size (torch alone where neither is installed); torch; or one "
        "engine at every size (onnxruntime: fp32 rungs only). On the 2-core dev host auto serves about 1.8x the "
        "requests of torch (docs/BENCHMARKS.md 2.0a)")


@dataclass(frozen=True)
class SubnetPlan:
    key: str  # the rung's name: the subnet's, with "-int8" for its int8 version
    flops: float
    flops_full: float
    expected_accuracy: float | None  # held-out test top-1
    val_accuracy: float | None  # what the planner compares (test stays held out)
    cfg: dict
    subnet: str
    precision: str  # "fp32" or "int8"
    index: int
    method: str  # "pss-net" (a subnet of the supernet) or the method that made a dense variant

    @property
    def rung(self) -> str:
        return self.key


class PssNetFamily(ImageClassifier):
    """Rungs: every retained subnet in fp32, and the ladder's subnets on real int8 kernels
    where the bundle has them (``python -m models.pssnet.quantize``; CPU only).

    Budgets in time (the default) pick the most accurate rung on validation whose predicted
    time per image, as a share of a full batch on this host, is at most ``budget`` x the top
    fp32 rung's; rungs that are slower and no more accurate than another are dominated and
    never chosen.  Budgets in FLOPs keep the paper's convention: fp32 subnets by FLOPs."""

    family = "pssnet"
    flops_convention = "2 x multiply-accumulates of convolutions and the classifier (no bias) + the average pool"
    budget_units = ("time", "flops")

    def __init__(self, model, engine: str = "torch") -> None:
        super().__init__(model)
        self.engine = engine  # the fp32 rungs' engine setting (``before_timing`` acts on it)
        self.ladder = sorted(model.ladder, key=lambda r: r.flops)  # the fp32 rungs the planner climbs
        self.flops_full = FLOPS_PER_MFLOP * self.ladder[-1].flops
        self.plans: dict[str, SubnetPlan] = {}
        for r in sorted(model.rungs, key=lambda r: r.flops):
            self.plans[r.name] = SubnetPlan(r.name, FLOPS_PER_MFLOP * r.flops, self.flops_full, r.accuracy,
                                            r.val_accuracy, r.cfg, r.name, "fp32", r.index, r.method)
        on_cpu = torch.device(getattr(model, "device", "cpu")).type == "cpu"
        for index, (_module, entry) in (getattr(model, "int8_rungs", {}) if on_cpu else {}).items():
            r = model.rungs[index]
            q = entry.get("quality", {})
            key = f"{r.name}-int8"
            self.plans[key] = SubnetPlan(key, FLOPS_PER_MFLOP * r.flops, self.flops_full, q.get("test_accuracy"),
                                         q.get("val_accuracy"), r.cfg, r.name, "int8", index, r.method)
        self.top_plan = self.plans[self.ladder[-1].name]
        self.seconds_per_item = None  # bound once the start-up timing is done
        self.by_time: list[SubnetPlan] = []  # non-dominated in time, fastest first

    # --- compute ------------------------------------------------------------------------

    def batch_keys(self) -> dict:
        return {k: k for k in self.plans}

    def example(self, key, n: int) -> torch.Tensor:
        return torch.randn(n, 3, self.model.input_size, self.model.input_size)

    def forward(self, key, batch: torch.Tensor) -> torch.Tensor:
        plan = self.plans[key]
        if plan.precision == "int8":
            return self.model.int8_forward(plan.index, batch)
        return self.model.forward(plan.index, batch)

    def before_timing(self, max_batch: int) -> None:
        """Choose the fp32 ladder rungs' engine per batch size (``PssNetModel.choose_engines``),
        here on the scheduler thread, so that the start-up timing measures what is served."""
        self.model.choose_engines(self.engine, batch_sizes(max_batch), rounds=3)
        for key, plan in list(self.plans.items()):  # an int8 rung's quality is that of the engines serving it
            if plan.precision == "int8":
                q = self.model.int8_quality(plan.index)
                self.plans[key] = replace(plan, expected_accuracy=q.get("test_accuracy"),
                                          val_accuracy=q.get("val_accuracy"))

    def calibrated(self, predict, max_batch: int) -> None:
        """Order the candidates (the fp32 ladder and the int8 rungs) by predicted time and
        drop those another candidate beats in time without losing validation accuracy."""
        self.seconds_per_item = seconds_per_item = lambda key: predict([(key, max_batch)]) / max_batch
        candidates = [self.plans[r.name] for r in self.ladder] + [p for p in self.plans.values()
                                                                   if p.precision == "int8"]
        timed = sorted(candidates, key=lambda p: seconds_per_item(p.key))
        best, kept = -1.0, []
        for p in timed:  # fastest first: keep a rung only if it is more accurate than every faster one
            accuracy = next((a for a in (p.val_accuracy, p.expected_accuracy) if a is not None), p.flops)
            if accuracy > best or not kept:
                kept.append(p)
                best = max(best, accuracy)
        self.by_time = kept

    # --- one request --------------------------------------------------------------------

    def check(self, request, params: ClassifyParams) -> None:  # type: ignore[override]
        super().check(request, params)
        if params.rung is not None and params.rung not in self.plans:
            raise ApiError(422, f"rung={params.rung!r} is not a rung of {self.name}", ", ".join(self.plans))

    def plan(self, work, budget: float, unit: str = "time") -> SubnetPlan:
        if unit == "time" and self.by_time:
            limit = budget * self.seconds_per_item(self.top_plan.key) * (1 + TIME_BUDGET_TOLERANCE)
            fits = [p for p in self.by_time if self.seconds_per_item(p.key) <= limit]
            return fits[-1] if fits else self.by_time[0]
        fits = [r for r in self.ladder if FLOPS_PER_MFLOP * r.flops <= budget * self.flops_full * (1 + 1e-9)]
        return self.plans[(fits[-1] if fits else self.ladder[0]).name]

    def top(self, work) -> SubnetPlan:
        return self.top_plan

    def bottom(self, work) -> SubnetPlan:
        return self.by_time[0] if self.by_time else self.plans[self.ladder[0].name]

    def floor_batches(self) -> list:
        return [(self.bottom(None).key, 1)]

    def batches(self, plan: SubnetPlan) -> list:
        return [(plan.key, 1)]

    def pin(self, work, params: ClassifyParams) -> Pinned | None:  # type: ignore[override]
        return None if params.rung is None else Pinned(self.plans[params.rung], f"rung:{params.rung}")

    def prepare(self, work: torch.Tensor, plan: SubnetPlan) -> list:
        return [(plan.key, work[None])]

    def finish(self, work, plan: SubnetPlan, outputs: list) -> torch.Tensor:
        return outputs[0][0]

    def respond(self, work, decision, result: torch.Tensor, params, request):
        plan: SubnetPlan = decision.plan
        return self.classified(result, params, {"name": plan.key, "subnet": plan.subnet, "method": plan.method,
                                                "precision": plan.precision, "cfg": plan.cfg}, plan.flops, plan)

    # --- description ----------------------------------------------------------------------

    def rungs(self) -> list[Rung]:
        on_ladder = {r.name for r in self.ladder}
        chosen = {p.key for p in self.by_time}
        out = []
        for p in self.plans.values():
            r = self.model.rungs[p.index]
            if self.by_time:
                dominated = p.key not in chosen
            else:
                dominated = p.precision == "fp32" and p.subnet not in on_ladder
            detail = {"key": p.key, "subnet": p.subnet, "method": p.method, "precision": p.precision,
                      "index": p.index, "cfg": p.cfg}
            if r.variant is not None:
                detail["variant"] = r.variant
            if self.seconds_per_item is not None:
                detail["ms_per_item_full_batch"] = round(1000 * self.seconds_per_item(p.key), 4)
            if p.precision == "int8":
                choice = self.model.int8_engine_choices.get(p.index)
                detail["engine"] = choice.describe() if choice is not None else "torch.ao"
                entry = self.model.int8_rungs[p.index][1]
                detail.update(method=entry["method"], backend=entry["backend"], real_speed=entry["real_speed"],
                              calibration=entry["calibration"], command=entry["command"])
                if "engine_quality" in entry:  # the same rung quantized for another engine, and its quality there
                    detail["engine_quality"] = entry["engine_quality"]
            else:  # the engine choice of a ladder rung (choose_engines), or torch
                choice = self.model.engine_choices.get(p.index)
                detail["engine"] = choice.describe() if choice is not None else "torch"
            out.append(Rung(p.key, p.flops, r.params, {"accuracy": p.expected_accuracy,
                                                       "val_accuracy": p.val_accuracy}, dominated, detail))
        return out


@register("pssnet")
def load(settings: Settings) -> list[PssNetFamily]:
    s: PssNetSettings = settings.pssnet
    if s.checkpoint is None:
        return []
    from models.pssnet.serving import PssNetModel

    model = PssNetModel.from_checkpoint(s.checkpoint, class_names=s.class_names, calibration=s.calibration,
                                        int8=s.int8 and torch.device(settings.device).type == "cpu")
    return [PssNetFamily(model.to(settings.device), s.engine)]
