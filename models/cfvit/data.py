"""Demo data for the tiny CF-ViT: the glyph set (``models.glyphs``) or, as a clearly
labelled fallback, synthetic shapes (3 shapes x 4 colours, small random
sizes, noisy background), plus tensor conversion and the light training augmentation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

DATASETS = ("glyphs", "shapes")


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8 RGB
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    source: str | dict  # a description for manifests


def load(dataset: str, split: str) -> Split:
    if dataset == "glyphs":
        from models.glyphs.data import load_split

        ds = load_split(split)
        return Split(np.asarray(ds.images), np.asarray(ds.labels, dtype=np.int64), list(ds.classes), ds.source)
    if dataset == "shapes":
        seeds = {"train": (0, 12000), "val": (1, 2000), "test": (2, 2000)}
        seed, n = seeds[split]
        return synthetic_shapes(n, seed)
    raise ValueError(f"unknown dataset {dataset!r} (choose from {DATASETS})")


SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def synthetic_shapes(n: int, seed: int, size: int = 32) -> Split:
    """FALLBACK demo data (not the glyphs): one shape of radius 2-6 px per image, 12 classes."""
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5)[:, None]
    classes = [f"{c} {s}" for s in SHAPES for c in SHAPE_COLOURS]
    labels = rng.integers(0, len(classes), size=n)
    shape, colour = np.divmod(labels, len(SHAPE_COLOURS))
    r = rng.uniform(2, 6, size=n).astype(np.float32)[:, None, None]
    cy, cx = (rng.uniform(0, 1, size=(2, n)).astype(np.float32)[..., None, None] * (size - 2 * r - 2) + r + 1)
    dy, dx = yy - cy, xx - cx
    circle = dy**2 + dx**2 <= r * r
    square = (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    triangle = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    mask = np.where((shape == 0)[:, None, None], circle, np.where((shape == 1)[:, None, None], square, triangle))
    cols = np.array(list(SHAPE_COLOURS.values()), dtype=np.float32)[colour][:, None, None, :]
    bg = 120 + 30 * rng.standard_normal((n, size, size, 3), dtype=np.float32)
    fg = cols + 12 * rng.standard_normal((n, size, size, 3), dtype=np.float32)
    images = np.clip(np.where(mask[..., None], fg, bg), 0, 255).astype(np.uint8)
    return Split(images, labels.astype(np.int64), classes, f"synthetic shapes (fallback), seed {seed}")


def to_tensor(images: np.ndarray, mean, std) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> normalised (N, 3, H, W) float32."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2, jitter: float = 0.1) -> torch.Tensor:
    """Light augmentation of a normalised batch: a random translation of up to ``max_shift``
    pixels (edge-replicated) and a small per-image contrast/brightness change.  No flips:
    mirrored glyphs are other glyphs (b/d, p/q)."""
    n, _, h, w = x.shape
    if max_shift:
        p = max_shift
        padded = F.pad(x, (p, p, p, p), mode="replicate")
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * p)
        x = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
        x = x.gather(3, cols)
    if jitter:
        a = 1 + jitter * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
        b = jitter * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
        x = x * a + b
    return x
