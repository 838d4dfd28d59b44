"""Coordinates <-> SeqTR tokens (the official det / segm sequence formats and 'relative' mapping).

Quantisation is relative to each image's own *padded* size (x by pad_w, y by pad_h):
``tok = floor(coord / pad * num_bin)`` clipped to [0, num_bin-1]; dequantisation is the
lower bin edge ``tok * pad / num_bin`` (no +0.5), which checkpoint parity requires.
EOS is token ``num_bin``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def quantise(coords: np.ndarray, pad_size: float, num_bin: int) -> np.ndarray:
    """floor(coord / pad_size * num_bin), clipped to valid bins."""
    tok = np.floor(np.asarray(coords, dtype=np.float64) / pad_size * num_bin)
    return np.clip(tok, 0, num_bin - 1).astype(np.int64)


def dequantise(tokens: np.ndarray, pad_size: float, num_bin: int) -> np.ndarray:
    """Lower bin edge: tok * pad_size / num_bin."""
    return np.asarray(tokens, dtype=np.float64) * pad_size / num_bin


def box_targets(box_xyxy: Sequence[float], pad_w: float, pad_h: float, num_bin: int) -> list[int]:
    """[x1, y1, x2, y2, EOS] for a box in padded-image pixels."""
    x1, y1, x2, y2 = box_xyxy
    xs = quantise(np.array([x1, x2]), pad_w, num_bin)
    ys = quantise(np.array([y1, y2]), pad_h, num_bin)
    return [int(xs[0]), int(ys[0]), int(xs[1]), int(ys[1]), num_bin]


def sample_contour(points: Sequence[Sequence[float]], n: int) -> list[tuple[float, float]]:
    """The official GT sampling: all points if <= n, else every ceil(len/n)-th (may give < n)."""
    pts = [(float(x), float(y)) for x, y in points]
    if len(pts) <= n:
        return pts
    step = math.ceil(len(pts) / n)
    return pts[::step]


def polygon_targets(points: Sequence[Sequence[float]], pad_w: float, pad_h: float, num_bin: int,
                    n: int) -> list[int]:
    """[x1, y1, ..., xN, yN, EOS] (2N+1 tokens); missing points are EOS.  ``points`` has <= n
    vertices (use :func:`sample_contour` first)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) > n:
        raise ValueError(f"{len(pts)} points > N = {n}: sample the contour first")
    toks = np.full(2 * n + 1, num_bin, dtype=np.int64)
    if len(pts):
        toks[0:2 * len(pts):2] = quantise(pts[:, 0], pad_w, num_bin)
        toks[1:2 * len(pts):2] = quantise(pts[:, 1], pad_h, num_bin)
    return toks.tolist()


def tokens_to_box(tokens: Sequence[int], pad_w: float, pad_h: float, num_bin: int) -> tuple[float, float, float, float]:
    """The first 4 tokens as (x1, y1, x2, y2) in padded (= resized) pixels, not reordered."""
    t = np.asarray(tokens[:4], dtype=np.float64)
    if len(t) < 4:
        raise ValueError("a box needs 4 tokens")
    x = dequantise(t[0::2], pad_w, num_bin)
    y = dequantise(t[1::2], pad_h, num_bin)
    return float(x[0]), float(y[0]), float(x[1]), float(y[1])


def tokens_to_polygon(tokens: Sequence[int], pad_w: float, pad_h: float, num_bin: int) -> list[tuple[float, float]]:
    """Cut at the first EOS, drop a trailing odd token, dequantise the (x, y) pairs."""
    t = list(tokens)
    if num_bin in t:
        t = t[: t.index(num_bin)]
    t = t[: len(t) // 2 * 2]
    if not t:
        return []
    a = np.asarray(t, dtype=np.float64).reshape(-1, 2)
    xs, ys = dequantise(a[:, 0], pad_w, num_bin), dequantise(a[:, 1], pad_h, num_bin)
    return [(float(x), float(y)) for x, y in zip(xs, ys)]
