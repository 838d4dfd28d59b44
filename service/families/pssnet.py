"""PSS-Net on /classify: a rung per retained subnet of the supernet.

``budget`` b picks the largest subnet (among those not dominated on validation accuracy)
whose FLOPs are at most b x the largest's; requests at the same subnet share forward
passes.  FLOPs: PSS-Net's count (multiply-accumulates of convolutions and the classifier,
plus the average pool) doubled, so that a multiply-add counts two.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from service.bundled import bundled
from service.endpoints import ClassifyParams
from service.errors import ApiError
from service.family import FamilySettings, Pinned, Rung
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


@dataclass(frozen=True)
class SubnetPlan:
    key: int
    rung: str
    flops: float
    flops_full: float
    expected_accuracy: float | None
    cfg: dict


class PssNetFamily(ImageClassifier):
    family = "pssnet"
    flops_convention = "2 x multiply-accumulates of convolutions and the classifier (no bias) + the average pool"

    def __init__(self, model) -> None:
        super().__init__(model)
        self.ladder = sorted(model.ladder, key=lambda r: r.flops)  # the rungs the planner climbs
        self.flops_full = FLOPS_PER_MFLOP * self.ladder[-1].flops
        self.by_name = {r.name: r for r in model.rungs}

    def subnet(self, rung) -> SubnetPlan:
        return SubnetPlan(rung.index, rung.name, FLOPS_PER_MFLOP * rung.flops, self.flops_full, rung.accuracy,
                          rung.cfg)

    def batch_keys(self) -> dict:
        return {r.index: r.name for r in sorted(self.model.rungs, key=lambda r: r.flops)}

    def example(self, key, n: int) -> torch.Tensor:
        return torch.randn(n, 3, self.model.input_size, self.model.input_size)

    def forward(self, key, batch: torch.Tensor) -> torch.Tensor:
        return self.model.forward(key, batch)

    def check(self, request, params: ClassifyParams) -> None:  # type: ignore[override]
        super().check(request, params)
        if params.rung is not None and params.rung not in self.by_name:
            raise ApiError(422, f"rung={params.rung!r} is not a subnet of {self.name}", ", ".join(self.by_name))

    def plan(self, work, budget: float) -> SubnetPlan:
        fits = [r for r in self.ladder if FLOPS_PER_MFLOP * r.flops <= budget * self.flops_full * (1 + 1e-9)]
        return self.subnet(fits[-1] if fits else self.ladder[0])

    def top(self, work) -> SubnetPlan:
        return self.subnet(self.ladder[-1])

    def bottom(self, work) -> SubnetPlan:
        return self.subnet(self.ladder[0])

    def floor_batches(self) -> list:
        return [(self.ladder[0].index, 1)]

    def batches(self, plan: SubnetPlan) -> list:
        return [(plan.key, 1)]

    def pin(self, work, params: ClassifyParams) -> Pinned | None:  # type: ignore[override]
        return None if params.rung is None else Pinned(self.subnet(self.by_name[params.rung]), f"rung:{params.rung}")

    def prepare(self, work: torch.Tensor, plan: SubnetPlan) -> list:
        return [(plan.key, work[None])]

    def finish(self, work, plan: SubnetPlan, outputs: list) -> torch.Tensor:
        return outputs[0][0]

    def respond(self, work, decision, result: torch.Tensor, params, request):
        plan: SubnetPlan = decision.plan
        return self.classified(result, params, {"name": plan.rung, "subnet": plan.rung, "cfg": plan.cfg},
                               plan.flops, plan)

    def rungs(self) -> list[Rung]:
        return [Rung(r.name, FLOPS_PER_MFLOP * r.flops, r.params,
                     {"accuracy": r.accuracy, "val_accuracy": r.val_accuracy}, r not in self.ladder,
                     {"index": r.index, "cfg": r.cfg}) for r in sorted(self.model.rungs, key=lambda r: r.flops)]


@register("pssnet")
def load(settings: Settings) -> list[PssNetFamily]:
    s: PssNetSettings = settings.pssnet
    if s.checkpoint is None:
        return []
    from models.pssnet.serving import PssNetModel

    model = PssNetModel.from_checkpoint(s.checkpoint, class_names=s.class_names, calibration=s.calibration)
    return [PssNetFamily(model.to(settings.device))]
