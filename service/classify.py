"""POST /classify: PSS-Net (one retained subnet per resource pool) and CF-ViT (coarse-to-fine
with a confidence exit) through the same planner and executor as /superresolve.

Each family is wrapped in a small adapter that gives the runtime its rung keys and the
planner its ladder:

* PSS-Net: a rung per retained subnet; ``budget`` b picks the largest subnet whose FLOPs are
  at most b x the largest's.  Requests at the same subnet are micro-batched.
* CF-ViT: one key whose forward pass takes (images, per-row eta), runs the coarse stage for
  all and the fine stage only for the rows that did not exit; ``budget`` b picks the largest
  eta whose *expected* cost on the validation curve (coarse + (1 - exit rate) x fine
  increment) fits b x the all-fine cost.  Its cost model counts work in all-fine units, so
  an exited row counts coarse/full of a unit.

The answer is JSON: top-k labels and probabilities, the rung used (subnet config, or exit
stage and confidence), FLOPs spent, plus the X-Anytime-* headers every inference carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from service import imageio, limits
from service.body import IMAGE_REQUEST_BODY, read_image
from service.config import Policy
from service.errors import ApiError, doc
from service.executor import Items
from service.planner import Ask, Decision, Ladder
from service.runtime import FamilyRuntime
from service.serving import FamilyService, Machine, decode_body, known_query_only


@dataclass
class ClsPlan:
    """One request's operating point."""

    key: Any  # the executor key
    rung: str  # subnet name, or CF-ViT's "eta=0.70"
    flops: float  # expected FLOPs (CF-ViT: on the validation curve)
    flops_full: float
    expected_accuracy: float | None
    eta: float | None = None
    info: dict = field(default_factory=dict)

    @property
    def flops_fraction(self) -> float:
        return self.flops / self.flops_full if self.flops_full else 0.0


class PssNetAdapter:
    family = "pssnet"

    def __init__(self, model) -> None:
        self.model = model
        every = sorted(model.rungs, key=lambda r: r.flops)
        # The planner climbs the model's ladder (rungs measurably better on val than every
        # cheaper one); dominated rungs stay servable by name (rung=...).
        self.rungs = sorted(model.ladder, key=lambda r: r.flops)
        self.flops_full = float(self.rungs[-1].flops)
        self.keys = [r.index for r in every]
        self.key_names = {r.index: r.name for r in every}
        self._by_name = {r.name: r for r in every}

    def example(self, key: int, n: int) -> torch.Tensor:
        return torch.randn(n, 3, self.model.input_size, self.model.input_size)

    def forward(self, key: int, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward(key, x)

    units = None

    def plan_for(self, rung) -> ClsPlan:
        return ClsPlan(rung.index, rung.name, float(rung.flops), self.flops_full, rung.accuracy,
                       info={"cfg": rung.cfg})

    def at_budget(self, b: float) -> ClsPlan:
        fits = [r for r in self.rungs if r.flops <= b * self.flops_full * (1 + 1e-9)]
        return self.plan_for(fits[-1] if fits else self.rungs[0])

    def top(self) -> ClsPlan:
        return self.plan_for(self.rungs[-1])

    def bottom(self) -> ClsPlan:
        return self.plan_for(self.rungs[0])

    def pinned(self, rung: str | None, eta: float | None) -> ClsPlan | None:
        if eta is not None:
            raise ApiError(422, "eta applies to CF-ViT models only", "rung=<subnet name>")
        if rung is None:
            return None
        if rung not in self._by_name:
            raise ApiError(422, f"rung={rung!r} is not a subnet of {self.model.name}", ", ".join(self._by_name))
        return self.plan_for(self._by_name[rung])

    def work_units(self, plan: ClsPlan) -> list[tuple[Any, float]]:
        return [(plan.key, 1)]

    def work(self, plan: ClsPlan, x: torch.Tensor) -> list[tuple[Any, Items]]:
        return [(plan.key, x[None])]

    def answer(self, plan: ClsPlan, out: Items) -> tuple[torch.Tensor, dict, float]:
        return out[0], {"subnet": plan.rung, "cfg": plan.info["cfg"]}, plan.flops

    def describe(self) -> dict:
        return {"family": self.family, "rungs": [
            {"index": r.index, "name": r.name, "flops": r.flops, "params": r.params, "accuracy": r.accuracy,
             "val_accuracy": r.val_accuracy, "on_ladder": r in self.rungs, "cfg": r.cfg}
            for r in sorted(self.model.rungs, key=lambda r: r.flops)]}


class CfVitAdapter:
    family = "cfvit"
    ALL_FINE = 1.01  # a softmax can saturate to exactly 1.0: eta > 1 forces the fine stage

    def __init__(self, model) -> None:
        self.model = model
        self.flops_full = float(model.flops_full)
        self.keys = ["cfvit"]
        self.key_names = {"cfvit": "cfvit"}

    def example(self, key: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.model.input_size
        return torch.randn(n, 3, s, s), torch.full((n,), self.ALL_FINE)  # calibrate the all-fine path

    def forward(self, key: str, items: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.model.forward(items[0], items[1])

    def units(self, key: str, items: Items, out: Items) -> float:
        exited = out[1]
        n_exit = int(exited.sum())
        return n_exit * self.model.flops_coarse / self.flops_full + (len(exited) - n_exit)

    def plan_for(self, eta: float) -> ClsPlan:
        point = self._point(eta)
        return ClsPlan("cfvit", f"eta={eta:g}", self.model.expected_flops(eta), self.flops_full,
                       point.get("accuracy") if point else None, eta,
                       {"expected_exit_rate": point.get("exit_rate") if point else None})

    def _point(self, eta: float) -> dict | None:
        pts = [p for p in self.model.curve if p["eta"] <= eta + 1e-9]
        return pts[-1] if pts else None

    def at_budget(self, b: float) -> ClsPlan:
        return self.plan_for(self.model.eta_for_budget(b))

    def top(self) -> ClsPlan:
        return self.plan_for(self.ALL_FINE)

    def bottom(self) -> ClsPlan:
        return self.plan_for(0.0)

    def pinned(self, rung: str | None, eta: float | None) -> ClsPlan | None:
        if rung is not None:
            if rung not in ("coarse", "fine"):
                raise ApiError(422, f"rung={rung!r} is not a stage of {self.model.name}", "coarse, fine")
            return self.bottom() if rung == "coarse" else self.top()
        return self.plan_for(eta) if eta is not None else None

    def work_units(self, plan: ClsPlan) -> list[tuple[Any, float]]:
        return [("cfvit", plan.flops_fraction)]

    def work(self, plan: ClsPlan, x: torch.Tensor) -> list[tuple[Any, Items]]:
        return [("cfvit", (x[None], torch.tensor([plan.eta], dtype=torch.float32)))]

    def answer(self, plan: ClsPlan, out: Items) -> tuple[torch.Tensor, dict, float]:
        logits, exited, conf = out
        stage = "coarse" if bool(exited[0]) else "fine"
        spent = self.model.flops_coarse if stage == "coarse" else self.model.flops_full
        return logits[0], {"exit_stage": stage, "coarse_confidence": round(float(conf[0]), 6), "eta": plan.eta,
                           "expected_exit_rate": plan.info["expected_exit_rate"]}, float(spent)

    def describe(self) -> dict:
        m = self.model
        return {"family": self.family, "flops_coarse": m.flops_coarse, "flops_full": m.flops_full,
                "flops_convention": m.flops_convention,
                "rungs": [{"name": "coarse", "eta": 0.0}, {"name": "fine", "eta": self.ALL_FINE}],
                "eta_curve": m.curve}


class ClassifierService(FamilyService):
    """One classification model (either family) as a served family."""

    endpoint = "/classify"

    def __init__(self, adapter, machine: Machine) -> None:
        self.adapter, self.model = adapter, adapter.model
        self.family = adapter.family
        runtime = FamilyRuntime(self.model.name, adapter.forward, adapter.keys, adapter.example, machine.settings,
                                machine.metrics, adapter.key_names, units=adapter.units, scheduler=machine.scheduler)
        super().__init__(runtime, machine)

    def ladder(self) -> Ladder[ClsPlan]:
        a, cost = self.adapter, self.runtime.cost
        return Ladder(at_budget=a.at_budget, top=a.top, bottom=a.bottom,
                      seconds=lambda p: sum(cost.predict_forward(k, u) for k, u in a.work_units(p)),
                      flops_fraction=lambda p: p.flops_fraction)

    def floor_s(self) -> float:
        return self.ladder().seconds(self.adapter.bottom())

    def describe(self) -> dict:
        return {"name": self.model.name, "endpoint": self.endpoint, "classes": len(self.model.classes),
                "input_size": self.model.input_size, "metrics": getattr(self.model, "meta", {}).get("metrics"),
                **self.adapter.describe()}

    async def handle(self, request: Request, t0: float, top_k: int | None, budget: str, deadline_ms: float | None,
                     min_budget: float | None, policy: Policy | None, rung: str | None,
                     eta: float | None) -> JSONResponse:
        s, a = self.settings, self.adapter
        self.open_for(request, t0, deadline_ms, policy)
        pinned = a.pinned(rung, eta)
        explicit = parse_budget(budget)
        if top_k is None:
            top_k = min(5, len(self.model.classes))
        elif top_k > len(self.model.classes):
            raise ApiError(422, f"top_k={top_k} exceeds the {len(self.model.classes)} classes of {self.name}")
        self.shed_early(t0, deadline_ms, policy)
        upload = await read_image(request, s.max_body_bytes)
        self.shed_early(t0, deadline_ms, policy)
        x = await decode_body(len(upload.data), lambda: self.model.preprocess(
            imageio.decode(upload.data, s.max_input_pixels, limits.resize_pixels(s.max_resize_pixels, self.model)).rgb_u8))
        ask = Ask(budget=explicit, deadline_ms=deadline_ms, min_budget=min_budget, policy=policy, fixed=pinned)

        def finish(d: Decision, outputs: list[Items]) -> tuple[torch.Tensor, dict, float]:
            return a.answer(d.plan, outputs[0])

        decision, job, future = await self.admit(self.ladder(), ask, t0, 0.0, lambda d: a.work(d.plan, x), finish,
                                                 inline=True)
        logits, rung_info, spent = await self.result(request, decision, job, future)
        plan: ClsPlan = decision.plan
        probs = torch.softmax(logits.float(), dim=-1)
        p, idx = probs.topk(top_k)
        label = f"rung:{rung}" if rung is not None else f"eta:{eta:g}" if eta is not None else \
            f"{round(decision.budget, 4):g}"
        body = {
            "model": self.name, "family": self.family,
            "predictions": [{"label": self.model.classes[i], "index": i, "probability": round(float(q), 6)}
                            for q, i in zip(p.tolist(), idx.tolist())],
            "rung": {"name": plan.rung, **rung_info}, "flops": spent, "flops_expected": plan.flops,
            "flops_full": plan.flops_full, "budget": label, "expected_accuracy": plan.expected_accuracy,
            "policy": decision.policy, "decision": decision.how,
            "queue_ms": round(1000 * job.queue_s, 2), "compute_ms": round(1000 * job.compute_s, 2),
        }
        headers = {**self.timing_headers(decision, job, t0), "X-Anytime-Rung": plan.rung,
                   "X-Anytime-Flops": f"{spent:.0f}", "X-Anytime-Flops-Full": f"{plan.flops_full:.0f}",
                   "X-Anytime-Flops-Fraction": f"{spent / plan.flops_full:.4f}", "X-Anytime-Budget": label}
        if plan.expected_accuracy is not None:
            headers["X-Anytime-Expected-Accuracy"] = f"{plan.expected_accuracy:.4f}"
        self.observe(decision, job, t0, plan.rung if self.family == "pssnet" else rung_info["exit_stage"],
                     spent, plan.flops_fraction)
        if plan.expected_accuracy is not None:
            self.metrics.expected_accuracy.labels(self.name).observe(plan.expected_accuracy)
        if self.family == "cfvit":
            self.metrics.exits.labels(self.name, rung_info["exit_stage"]).inc()
        return JSONResponse(body, headers=headers)


def parse_budget(raw: str) -> float | None:
    if raw == "auto":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(422, f"budget={raw!r} is not a number", "a number in [0, 1] or 'auto'") from None
    if not (0.0 <= value <= 1.0):
        raise ApiError(422, f"budget={raw} is outside [0, 1]", "a number in [0, 1] or 'auto'")
    return value


def router(services: list[ClassifierService]) -> APIRouter:
    r = APIRouter(dependencies=[Depends(known_query_only)])
    by_name = {s.name: s for s in services}
    default = services[0].name if services else None

    @r.post(
        "/classify",
        summary="Classify an image at the quality the deadline and the load allow",
        responses={200: {"description": "top-k labels and probabilities, the rung used and the FLOPs spent; "
                                        "X-Anytime-* headers as for /superresolve"},
                   **doc(400, 401, 413, 415, 422, 429, 503, 504)},
        openapi_extra=IMAGE_REQUEST_BODY,
    )
    async def classify(
        request: Request,
        model: Annotated[str | None, Query(description="a classification model from GET /v1/models "
                                                       "(default: the first)")] = None,
        top_k: Annotated[int | None, Query(ge=1, le=100, description="how many labels to return (default: 5, or "
                                                                     "all classes when fewer)")] = None,
        budget: Annotated[str, Query(description="fraction of the model's full FLOPs in [0, 1], or 'auto'")] = "auto",
        deadline_ms: Annotated[float | None, Query(gt=0, le=600_000, description="answer within this many ms")] = None,
        min_budget: Annotated[float | None, Query(ge=0, le=1, description="quality floor with a deadline")] = None,
        policy: Annotated[Policy | None, Query(description="adaptive, full or smallest")] = None,
        rung: Annotated[str | None, Query(description="PSS-Net: a subnet name; CF-ViT: 'coarse' or 'fine'")] = None,
        eta: Annotated[float | None, Query(ge=0, le=1.01, description="CF-ViT: exit threshold")] = None,
    ) -> JSONResponse:
        name = model or default
        if name not in by_name:
            raise ApiError(422 if model else 503, f"model={model!r} is not served here" if model else
                           "no classification model is configured", ", ".join(by_name) or None)
        svc = by_name[name]
        t0 = request.state.t0
        return await svc.guarded(t0, svc.handle(request, t0, top_k, budget, deadline_ms, min_budget, policy, rung,
                                                eta))

    return r
