"""What the two /classify families share: decoding an image into the model's input (its
resize bounded from the header), and the top-k answer.  Each family's own module says how
its rungs work (PSS-Net: a subnet per rung; CF-ViT: an exit threshold)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from starlette.requests import Request

from service import imageio, limits
from service.body import Upload
from service.endpoints import CLASSIFY, ClassifyParams
from service.errors import ApiError
from service.family import Answer, ServedFamily
from service.planner import Decision

if TYPE_CHECKING:
    from service.config import Settings


class ImageClassifier(ServedFamily[torch.Tensor, "object"]):
    """A classifier over a model with ``classes``, ``input_size``, ``preprocess(rgb_u8)`` and
    ``preprocess_pixels(w, h)``; the work of a request is its preprocessed (3, S, S) tensor."""

    endpoint = CLASSIFY
    uses: ClassVar[frozenset[str]] = frozenset({"top_k", "rung"})

    def __init__(self, model) -> None:
        self.model, self.name = model, model.name

    def check(self, request: Request, params: ClassifyParams) -> None:  # type: ignore[override]
        if params.top_k is not None and params.top_k > len(self.model.classes):
            raise ApiError(422, f"top_k={params.top_k} exceeds the {len(self.model.classes)} classes of {self.name}")

    def decode(self, upload: Upload, params: ClassifyParams, settings: Settings) -> torch.Tensor:  # type: ignore[override]
        check = limits.resize_pixels(settings.max_resize_pixels, self.model)
        return self.model.preprocess(imageio.decode(upload.data, settings.max_input_pixels, check).rgb_u8)

    def top_k(self, logits: torch.Tensor, params: ClassifyParams) -> list[dict]:
        k = params.top_k or min(5, len(self.model.classes))
        p, idx = torch.softmax(logits.float(), dim=-1).topk(k)
        return [{"label": self.model.classes[i], "index": i, "probability": round(float(q), 6)}
                for q, i in zip(p.tolist(), idx.tolist())]

    def classified(self, logits: torch.Tensor, params: ClassifyParams, rung: dict, flops: float,
                   plan) -> Answer:
        """The answer every classifier gives: predictions, the rung, FLOPs spent and expected."""
        headers = {} if plan.expected_accuracy is None else \
            {"X-Anytime-Expected-Accuracy": f"{plan.expected_accuracy:.4f}"}
        return Answer({"predictions": self.top_k(logits, params), "rung": rung, "flops_expected": plan.flops,
                       "expected_accuracy": plan.expected_accuracy}, rung["name"], flops, plan.flops_full,
                      headers=headers)

    def record(self, metrics, work, decision: Decision, answer: Answer) -> None:
        accuracy = answer.body["expected_accuracy"]  # type: ignore[index]
        if accuracy is not None:
            metrics.expected_accuracy.labels(self.name).observe(accuracy)

    def describe(self) -> dict:
        return {"classes": len(self.model.classes), "input_size": self.model.input_size,
                "metrics": (getattr(self.model, "meta", None) or getattr(self.model, "manifest", {})).get("metrics")}
