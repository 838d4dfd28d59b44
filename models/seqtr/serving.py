"""Serving SeqTR: image + expression -> box (det) or polygon + mask (segm), in original pixels.

The server calls :meth:`SeqTRGrounder.prepare` (CPU work: decode-side resize/pad and text
encoding) before queueing, then :meth:`SeqTRGrounder.run` on a batch of items of any
sizes (one batched encode + greedy decode).  Post-processing uses each image's *own*
padded size for dequantisation (as the official code: each image's own padded size, not the
batch maximum), divides by its scale factor, orders and clips boxes (the official code does
neither), and rasterises polygons at the original resolution after scaling the vertices,
instead of resizing the padded mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from models.seqtr.checkpoint import load_bundle, load_official
from models.seqtr.model import SeqTR
from models.seqtr.preprocess import Prepared, collate, prepare, to_rgb_array
from models.seqtr.raster import polygon_to_mask, rescale_polygon
from models.seqtr.sequence import tokens_to_box, tokens_to_polygon
from models.seqtr.text import Vocabulary


@dataclass
class Grounding:
    """One answer; every coordinate is in original-image pixels."""

    box: tuple[float, float, float, float]  # x1 <= x2, y1 <= y2, inside the image
    polygon: list[tuple[float, float]] | None  # segm only
    mask: np.ndarray | None  # segm only: bool [h, w] of the original image
    tokens: list[int]
    score: float  # mean max-probability of the emitted tokens
    unknown_words: list[str] = field(default_factory=list)


@dataclass
class GroundingItem:
    """A prepared request: the network input plus what post-processing needs."""

    prepared: Prepared
    text_ids: list[int]
    expression: str
    unknown_words: list[str]


def _clip_box(box: tuple[float, float, float, float], h: int, w: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    x1, x2 = sorted((min(max(x1, 0.0), w), min(max(x2, 0.0), w)))
    y1, y2 = sorted((min(max(y1, 0.0), h), min(max(y2, 0.0), h)))
    return x1, y1, x2, y2


class SeqTRGrounder:
    """A loaded model, its vocabulary and text length, with batched inference."""

    def __init__(self, model: SeqTR, vocab: Vocabulary, max_token: int | None = None, info: dict | None = None):
        if vocab is None:
            raise ValueError("SeqTR serving needs the training dataset's vocabulary (token_to_ix)")
        self.model = model.eval()
        self.vocab = vocab
        self.max_token = max_token or model.cfg.max_token
        self.info = dict(info or {})

    @classmethod
    def from_bundle(cls, directory: str | Path) -> "SeqTRGrounder":
        model, vocab, manifest = load_bundle(directory)
        return cls(model, vocab, model.cfg.max_token, manifest)

    @classmethod
    def from_official(cls, path: str | Path, token_to_ix_path: str | Path, max_token: int = 15,
                      which: str = "state_dict") -> "SeqTRGrounder":
        model, vocab, info = load_official(path, token_to_ix_path, which=which, max_token=max_token)
        return cls(model, vocab, max_token, {"name": f"seqtr-{model.cfg.task}-{Path(path).stem}", **info})

    @classmethod
    def from_checkpoint(cls, path: str | Path, token_to_ix: str | Path | None = None, max_token: int | None = None,
                        device: str = "cpu") -> "SeqTRGrounder":
        """Our bundle (a folder, or its model.safetensors), or an official ``.pth`` (which
        needs the ``token_to_ix.pkl`` of its dataset, and ``max_token`` unless it is 15)."""
        path = Path(path)
        if path.is_dir() or path.suffix == ".safetensors":
            g = cls.from_bundle(path if path.is_dir() else path.parent)
            if max_token is not None:
                g.max_token = max_token
        else:
            if token_to_ix is None:
                raise ValueError(f"{path} is an official SeqTR checkpoint: its vocabulary (the dataset's "
                                 "token_to_ix.pkl) is needed too (seqtr_token_to_ix)")
            g = cls.from_official(path, token_to_ix, max_token or 15)
        return g.to(device)

    @property
    def name(self) -> str:
        return str(self.info.get("name") or f"seqtr-{self.task}")

    # -- properties -------------------------------------------------------------------
    @property
    def task(self) -> str:
        return self.model.cfg.task

    @property
    def num_points(self) -> int | None:
        return self.model.cfg.num_points if self.task == "segm" else None

    @property
    def long_side(self) -> int:
        return self.model.cfg.long_side

    @property
    def size_divisor(self) -> int:
        return self.model.cfg.size_divisor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "SeqTRGrounder":
        self.model.to(device)
        return self

    # -- inference --------------------------------------------------------------------
    def prepare(self, image: np.ndarray | Image.Image, expression: str,
                long_side: int | None = None) -> GroundingItem:
        """Resize/pad the image (long side ``long_side``, default the model's) and encode the
        text; raises EmptyExpression for wordless text."""
        ids = self.vocab.encode(expression, self.max_token)
        return GroundingItem(prepare(image, long_side or self.long_side, self.size_divisor), ids, expression,
                             self.vocab.unknown_words(expression))

    @torch.inference_mode()
    def run(self, items: list[GroundingItem], group_by_shape: bool = False) -> list[Grounding]:
        """One batched encode + greedy decode for all items (any mix of image sizes).

        Mixed sizes are zero-padded to the batch maximum, as the official batched eval does.
        That extra padding is not invisible: BN turns padded zeros into non-zero features
        that border convs see, and ``input_proj``'s GroupNorm takes its statistics over the
        whole map, padding included.  So an answer can depend slightly on which requests
        share its batch.  ``group_by_shape=True`` runs one pass per padded shape instead,
        which gives exactly the batch-1 answer.
        """
        if not items:
            return []
        if group_by_shape:
            groups: dict[tuple[int, int], list[int]] = {}
            for i, it in enumerate(items):
                groups.setdefault(it.prepared.pad_shape, []).append(i)
            out: list[Grounding | None] = [None] * len(items)
            for idx in groups.values():
                for i, g in zip(idx, self.run([items[i] for i in idx])):
                    out[i] = g
            return out  # type: ignore[return-value]
        dev = self.device
        img, mask = collate([it.prepared for it in items])
        text = torch.tensor([it.text_ids for it in items], dtype=torch.long)
        tokens, scores = self.model.generate(img.to(dev), mask.to(dev), text.to(dev))
        tokens, scores = tokens.cpu().tolist(), scores.float().cpu().tolist()
        return [self.postprocess(it, t, s) for it, t, s in zip(items, tokens, scores)]

    def postprocess(self, item: GroundingItem, tokens: list[int], score: float) -> Grounding:
        """Tokens -> coordinates in the item's original pixels (own padded size, own scale)."""
        p = item.prepared
        ph, pw = p.pad_shape
        h, w = p.orig_shape
        nb = self.model.cfg.num_bin
        if self.task == "det":
            x1, y1, x2, y2 = tokens_to_box(tokens, pw, ph, nb)
            sx, sy = p.scale
            box = _clip_box((x1 / sx, y1 / sy, x2 / sx, y2 / sy), h, w)
            return Grounding(box, None, None, tokens, score, item.unknown_words)
        poly = rescale_polygon(tokens_to_polygon(tokens, pw, ph, nb), p.scale)
        poly = [(min(max(x, 0.0), float(w)), min(max(y, 0.0), float(h))) for x, y in poly]
        mask = polygon_to_mask(poly, h, w)
        if poly:
            xs, ys = [q[0] for q in poly], [q[1] for q in poly]
            box = (min(xs), min(ys), max(xs), max(ys))
        else:
            box = (0.0, 0.0, 0.0, 0.0)
        return Grounding(box, poly, mask, tokens, score, item.unknown_words)

    def ground(self, image: np.ndarray | Image.Image, expression: str) -> Grounding:
        """Convenience: prepare + run for one request."""
        return self.run([self.prepare(image, expression)])[0]

    # -- cost and explanation -----------------------------------------------------------
    def padded_shape(self, h: int, w: int) -> tuple[int, int]:
        """The network input size for an original h x w image."""
        from models.seqtr.preprocess import rescale_size
        nh, nw = rescale_size(h, w, self.long_side)
        d = self.size_divisor
        return -(-nh // d) * d, -(-nw // d) * d

    def flops(self, h: int, w: int) -> dict[str, float]:
        """Per-component FLOPs of one request for a *padded* h x w input (see :meth:`padded_shape`)."""
        return self.model.flops(h, w, self.max_token)

    def draw(self, image: np.ndarray | Image.Image, grounding: Grounding) -> Image.Image:
        """The image with the box outline, or a translucent mask overlay plus its outline."""
        base = Image.fromarray(to_rgb_array(image)).convert("RGBA")
        lw = max(2, round(max(base.size) / 200))
        if grounding.mask is not None and grounding.mask.shape == (base.height, base.width):
            overlay = np.zeros((base.height, base.width, 4), dtype=np.uint8)
            overlay[grounding.mask] = (255, 40, 40, 110)
            base = Image.alpha_composite(base, Image.fromarray(overlay, "RGBA"))
        d = ImageDraw.Draw(base)
        if grounding.polygon and len(grounding.polygon) >= 2:
            d.line(list(grounding.polygon) + [grounding.polygon[0]], fill=(255, 255, 0, 255), width=lw)
        else:
            d.rectangle(grounding.box, outline=(255, 40, 40, 255), width=lw)
        return base.convert("RGB")
