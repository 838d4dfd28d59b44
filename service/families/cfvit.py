"""CF-ViT on /classify: coarse-to-fine early exit, the exit threshold eta as the rung.

One batch key runs every request: a forward pass takes (images, a per-row eta), runs the
coarse stage for all rows and the fine stage only for rows whose coarse confidence stays
below their eta.  ``budget`` b picks the largest eta whose expected cost on the validation
curve (coarse + (1 - exit rate) x fine increment) fits b x the all-fine cost.  Work is
counted in all-fine units, so a row that exited counts coarse/full of one.  FLOPs: the
paper's count (multiply-accumulates, as fvcore reports them) doubled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from service.bundled import bundled
from service.endpoints import ClassifyParams
from service.errors import ApiError
from service.executor import Items
from service.family import FamilySettings, Pinned, Rung
from service.families.classifier import ImageClassifier
from service.registry import register

if TYPE_CHECKING:
    from service.config import Settings

KEY = "cfvit"
ALL_FINE = 1.01  # a softmax can saturate to exactly 1.0: eta > 1 forces the fine stage


class CfVitSettings(FamilySettings):
    model_config = SettingsConfigDict(env_prefix="ANYTIME_CFVIT_", extra="ignore")

    checkpoint: Path | None = Field(default_factory=lambda: bundled("cfvit"), description="our safetensors or "
                                    "an official .pth ('' to serve none)")
    class_names: Path | None = Field(None, validation_alias=AliasChoices("ANYTIME_CFVIT_CLASS_NAMES",
                                     "ANYTIME_CLASS_NAMES", "class_names"), description="class names file (one "
                                     "per line) for an official checkpoint")


@dataclass(frozen=True)
class ExitPlan:
    eta: float
    flops: float  # expected, on the validation curve
    flops_full: float
    expected_accuracy: float | None
    expected_exit_rate: float | None = field(default=None)

    @property
    def rung(self) -> str:
        return f"eta={self.eta:g}"


class CfVitFamily(ImageClassifier):
    family = "cfvit"
    flops_convention = "2 x multiply-accumulates of every layer (CF-ViT's and fvcore's 'FLOPs' are MACs)"
    uses: ClassVar[frozenset[str]] = frozenset({"top_k", "rung", "eta"})

    def __init__(self, model) -> None:
        super().__init__(model)
        self.flops_coarse, self.flops_full = 2.0 * model.flops_coarse, 2.0 * model.flops_full

    def at_eta(self, eta: float) -> ExitPlan:
        points = [p for p in self.model.curve if p["eta"] <= eta + 1e-9]
        point = points[-1] if points else {}
        return ExitPlan(eta, 2.0 * self.model.expected_flops(eta), self.flops_full, point.get("accuracy"),
                        point.get("exit_rate"))

    def batch_keys(self) -> dict:
        return {KEY: KEY}

    def example(self, key, n: int) -> Items:
        s = self.model.input_size
        return torch.randn(n, 3, s, s), torch.full((n,), ALL_FINE)  # calibrate the all-fine path

    def forward(self, key, batch: Items) -> Items:
        return self.model.forward(batch[0], batch[1])

    def work_units(self, key, batch: Items, out: Items) -> float:
        exited = int(out[1].sum())
        return exited * self.flops_coarse / self.flops_full + (len(out[1]) - exited)

    def check(self, request, params: ClassifyParams) -> None:  # type: ignore[override]
        super().check(request, params)
        if params.rung not in (None, "coarse", "fine"):
            raise ApiError(422, f"rung={params.rung!r} is not a stage of {self.name}", "coarse, fine")

    def plan(self, work, budget: float) -> ExitPlan:
        return self.at_eta(self.model.eta_for_budget(budget))

    def top(self, work) -> ExitPlan:
        return self.at_eta(ALL_FINE)

    def bottom(self, work) -> ExitPlan:
        return self.at_eta(0.0)

    def floor_batches(self) -> list:
        return [(KEY, self.flops_coarse / self.flops_full)]

    def batches(self, plan: ExitPlan) -> list:
        return [(KEY, plan.flops / plan.flops_full)]

    def pin(self, work, params: ClassifyParams) -> Pinned | None:  # type: ignore[override]
        if params.rung is not None:
            return Pinned(self.bottom(work) if params.rung == "coarse" else self.top(work), f"rung:{params.rung}")
        return None if params.eta is None else Pinned(self.at_eta(params.eta), f"eta:{params.eta:g}")

    def prepare(self, work: torch.Tensor, plan: ExitPlan) -> list:
        return [(KEY, (work[None], torch.tensor([plan.eta], dtype=torch.float32)))]

    def finish(self, work, plan: ExitPlan, outputs: list) -> tuple[torch.Tensor, bool, float]:
        logits, exited, confidence = outputs[0]
        return logits[0], bool(exited[0]), float(confidence[0])

    def respond(self, work, decision, result, params, request):
        plan: ExitPlan = decision.plan
        logits, exited, confidence = result
        stage = "coarse" if exited else "fine"
        return self.classified(logits, params, {"name": stage, "exit_stage": stage, "eta": plan.eta,
                                                "coarse_confidence": round(confidence, 6),
                                                "expected_exit_rate": plan.expected_exit_rate},
                               self.flops_coarse if exited else self.flops_full, plan)

    def record(self, metrics, work, decision, answer) -> None:
        super().record(metrics, work, decision, answer)
        metrics.exits.labels(self.name, answer.rung).inc()

    def rungs(self) -> list[Rung]:
        coarse, fine = self.at_eta(0.0), self.at_eta(ALL_FINE)
        return [Rung("coarse", self.flops_coarse, None, {"accuracy": coarse.expected_accuracy}, False, {"eta": 0.0}),
                Rung("fine", self.flops_full, None, {"accuracy": fine.expected_accuracy}, False, {"eta": ALL_FINE})]

    def describe(self) -> dict:
        m = self.model
        return {**super().describe(), "source": m.source, "parameters": sum(p.numel() for p in m.net.parameters()),
                "tokens": {"coarse": m.config.num_coarse + 1, "fine": m.config.fine_seq_len},
                "eta_curve": [{**p, "expected_flops": 2.0 * p["expected_flops"]} for p in m.curve]}


@register("cfvit")
def load(settings: Settings) -> list[CfVitFamily]:
    s: CfVitSettings = settings.cfvit
    if s.checkpoint is None:
        return []
    from models.cfvit.serving import CfVitModel

    return [CfVitFamily(CfVitModel.from_checkpoint(s.checkpoint, names_file=s.class_names, device=settings.device))]
