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
    """(N, patch, patch, C) patches at the given corners."""
    iy = pos[:, 0, None] + np.arange(patch)[None, :]
    ix = pos[:, 1, None] + np.arange(patch)[None, :]
    return img[iy[:, :, None], ix[:, None, :]]


class Canvas:
    """Accumulates HR patches (placed at ``scale`` x their LR corners) and averages the
    overlaps with equal weights.  Patches are added batch by batch, so a large image never
    holds all its SR patches in memory at once.  Channel-first inside, so each patch is
    added as contiguous planes straight from the network's NCHW output."""

    def __init__(self, out_hw: tuple[int, int], channels: int = 3, scale: int = SCALE) -> None:
        self.sum = np.zeros((channels, *out_hw), dtype=np.float32)
        self.weight = np.zeros(out_hw, dtype=np.float32)
        self.scale = scale

    def add(self, patches: np.ndarray, pos: np.ndarray) -> None:
        """``patches`` (N, C, P, P) float32."""
        p = patches.shape[-1]
        for (y, x), tile in zip((pos * self.scale).tolist(), patches):
            self.sum[:, y:y + p, x:x + p] += tile
            self.weight[y:y + p, x:x + p] += 1

    def result(self) -> np.ndarray:
        """The averaged float32 canvas, (H, W, C); pixels no patch covered stay 0."""
        np.divide(self.sum, np.maximum(self.weight, 1)[None], out=self.sum)
        return self.sum.transpose(1, 2, 0)


def covered_hw(pos: np.ndarray, patch: int = PATCH) -> tuple[int, int]:
    """LR extent covered by the patches (the official code scores only this area)."""
    return int(pos[:, 0].max() + patch), int(pos[:, 1].max() + patch)
