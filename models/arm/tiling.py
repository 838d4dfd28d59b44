"""Cutting an LR image into 32x32 patches (stride 28) and stitching the x4 outputs.

``official`` reproduces ARM/ClassSR: corners at 0, 28, ... <= H-32, so the right and
bottom remainder (up to 27 LR px) is never super-resolved.  ``full`` adds a last row and
column of patches anchored at H-32 / W-32 so every pixel is covered; overlaps are averaged
with equal weights, as the official stitching does.  Images smaller than a patch are
padded by edge reflection first and the output cropped back to exactly 4x the input.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

PATCH, STEP, SCALE = 32, 28, 4
Tiling = Literal["full", "official"]


def _starts(length: int, patch: int, step: int, mode: Tiling) -> np.ndarray:
    starts = list(range(0, length - patch + 1, step))
    if mode == "full" and starts[-1] != length - patch:
        starts.append(length - patch)
    return np.array(starts, dtype=np.int64)


def positions(h: int, w: int, mode: Tiling = "full", patch: int = PATCH, step: int = STEP) -> np.ndarray:
    """(N, 2) top-left (y, x) corners, row-major, for an image of at least patch x patch."""
    if mode not in ("full", "official"):
        raise ValueError(f"unknown tiling {mode!r}; use 'full' or 'official'")
    if h < patch or w < patch:
        raise ValueError(f"image {h}x{w} is smaller than one {patch}x{patch} patch; pad it first")
    ys, xs = _starts(h, patch, step, mode), _starts(w, patch, step, mode)
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)


def count(h: int, w: int, mode: Tiling = "full", patch: int = PATCH, step: int = STEP) -> int:
    """How many patches an h x w image makes (after ``pad_to_patch``), from its size alone:
    what a request will cost, known from the image header before decoding.  Symmetric in
    h and w."""
    if mode not in ("full", "official"):
        raise ValueError(f"unknown tiling {mode!r}; use 'full' or 'official'")

    def n(length: int) -> int:
        span = max(length, patch) - patch
        return span // step + 1 + (1 if mode == "full" and span % step else 0)

    return n(h) * n(w)


def pad_to_patch(img: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """Reflect-pad (symmetric) an HxWxC image on the bottom/right up to ``patch`` in each
    dimension; images of 1 px are replicated."""
    h, w = img.shape[:2]
    ph, pw = max(0, patch - h), max(0, patch - w)
    if not (ph or pw):
        return img
    while ph or pw:  # symmetric padding can add at most the current size per pass
        sh, sw = min(ph, img.shape[0]), min(pw, img.shape[1])
        img = np.pad(img, ((0, sh), (0, sw), (0, 0)), mode="symmetric")
        ph, pw = ph - sh, pw - sw
    return img


def extract(img: np.ndarray, pos: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """(N, patch, patch, ...) patches at the given corners of an (H, W, ...) image.

    Indexes a sliding-window view on its two leading axes, so numpy copies each patch as
    whole rows (10-40x faster than gathering every pixel by a 3-D fancy index)."""
    windows = np.moveaxis(sliding_window_view(img, (patch, patch), axis=(0, 1)), (-2, -1), (2, 3))
    return windows[pos[:, 0], pos[:, 1]]


class Canvas:
    """Accumulates HR patches (placed at ``scale`` x their LR corners) and averages the
    overlaps with equal weights.  Patches are added batch by batch, so a large image never
    holds all its SR patches in memory at once.

    Pixel-interleaved (H, W, C) inside: the networks' outputs are channels-last, so each
    patch is added as one contiguous block straight from their memory, and ``result`` is
    the C-ordered image an encoder wants, with no transposition on either side.  The
    overlap counts of a full grid of corners (what ``positions`` makes) are a product of a
    row count and a column count, so only the overlap strips are divided; any other set of
    corners falls back to a per-pixel count."""

    def __init__(self, out_hw: tuple[int, int], channels: int = 3, scale: int = SCALE) -> None:
        self.sum = np.zeros((*out_hw, channels), dtype=np.float32)
        self.scale = scale
        self._corners: list[np.ndarray] = []
        self._size = 0

    def add(self, patches: np.ndarray, pos: np.ndarray) -> None:
        """``patches`` (N, C, P, P) float32, in any memory layout (channels-last is fastest)."""
        p = patches.shape[-1]
        if self._size not in (0, p):
            raise ValueError(f"patches of size {p} added to a canvas of {self._size}-pixel patches")
        self._size = p
        corners = np.asarray(pos, dtype=np.int64) * self.scale
        for (y, x), tile in zip(corners.tolist(), patches.transpose(0, 2, 3, 1)):
            self.sum[y:y + p, x:x + p] += tile
        self._corners.append(corners)

    def result(self) -> np.ndarray:
        """The averaged float32 canvas, (H, W, C) and C-contiguous; pixels no patch covered
        stay 0."""
        if not self._corners:
            return self.sum
        corners = np.concatenate(self._corners)
        ys, xs = np.unique(corners[:, 0]), np.unique(corners[:, 1])
        cells = np.unique(np.searchsorted(ys, corners[:, 0]) * len(xs) + np.searchsorted(xs, corners[:, 1]))
        if len(corners) == len(cells) == len(ys) * len(xs):  # every row x column corner exactly once
            self._divide_grid(ys, xs)
        else:
            count = np.zeros(self.sum.shape[:2], dtype=np.float32)
            for y, x in corners.tolist():
                count[y:y + self._size, x:x + self._size] += 1
            np.divide(self.sum, np.maximum(count, 1)[:, :, None], out=self.sum)
        self._corners = []  # divided once
        return self.sum

    def _divide_grid(self, ys: np.ndarray, xs: np.ndarray) -> None:
        """Divide by count(y, x) = rows(y) * cols(x), only where it exceeds 1.
        Divides by the same float32 product as a per-pixel count would, so the result is
        identical.  Works on the (H, W * C) view, a run of rows with one row count at a
        time, with one row of per-value divisors: numpy's inner loops run along whole rows,
        and no divisor array the size of the canvas is allocated."""
        h, w, c = self.sum.shape
        flat = self.sum.reshape(h, w * c)
        counts, cols = _coverage(ys, self._size, h), np.repeat(_coverage(xs, self._size, w), c)
        strips = _runs(cols > 1)
        for band, k in _constant_runs(counts):
            if k > 1:
                flat[band] /= np.maximum(k * cols, np.float32(1))  # (columns no patch covers: count 0, left at 0)
            elif k == 1:
                for strip in strips:
                    flat[band, strip] /= cols[strip]


def _coverage(starts: np.ndarray, size: int, length: int) -> np.ndarray:
    """How many of the intervals [s, s + size) cover each of ``length`` pixels."""
    count = np.zeros(length + 1, dtype=np.float32)
    np.add.at(count, np.minimum(starts, length), 1)
    np.add.at(count, np.minimum(starts + size, length), -1)
    return np.cumsum(count[:-1], dtype=np.float32)


def _constant_runs(values: np.ndarray) -> list[tuple[slice, np.generic]]:
    """Maximal runs of equal values in a 1-D array, as (slice, value)."""
    if not len(values):
        return []
    edges = np.concatenate([[0], np.flatnonzero(np.diff(values)) + 1, [len(values)]]).tolist()
    return [(slice(s, e), values[s]) for s, e in zip(edges[:-1], edges[1:])]


def _runs(mask: np.ndarray) -> list[slice]:
    """Maximal runs of True in a 1-D mask, as slices."""
    return [band for band, value in _constant_runs(mask) if value]


def covered_hw(pos: np.ndarray, patch: int = PATCH) -> tuple[int, int]:
    """LR extent covered by the patches (the official code scores only this area)."""
    return int(pos[:, 0].max() + patch), int(pos[:, 1].max() + patch)
