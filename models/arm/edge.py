"""ARM's per-patch edge score, bit-exact with the official OpenCV pipeline, in numpy.

Official: ``cv2.cvtColor(BGR2GRAY)`` on the uint8 LR patch, ``cv2.Laplacian(CV_16S,
ksize=3)``, ``cv2.convertScaleAbs``, then the mean over the patch.  OpenCV's uint8 gray is
the 15-bit fixed-point ``(9798 R + 19235 G + 3735 B + 16384) >> 15``; its ksize=3
Laplacian is the diagonal kernel [[2,0,2],[0,-8,0],[2,0,2]] with reflect-101 borders.
Other gray formulas move about 0.1-0.3 % of pixels by one level, which can push a patch
across a table bin, so we reproduce the fixed-point form exactly.  No OpenCV at run time.
"""

from __future__ import annotations

import numpy as np


def gray_u8(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's uint8 RGB->gray (fixed point), for arrays of shape (..., 3)."""
    c = rgb.astype(np.int32)
    return ((9798 * c[..., 0] + 19235 * c[..., 1] + 3735 * c[..., 2] + 16384) >> 15).astype(np.int32)


def edge_scores(patches_rgb: np.ndarray) -> np.ndarray:
    """Edge score of each uint8 RGB patch, shape (N, h, w, 3) -> (N,) float64.

    Each patch is scored on its own, with reflect-101 borders at the patch edge, as in the
    official code (scoring a whole image and cropping would give other border values)."""
    if patches_rgb.ndim != 4 or patches_rgb.shape[-1] != 3:
        raise ValueError(f"expected (N, h, w, 3) uint8 patches, got {patches_rgb.shape}")
    return edge_scores_gray(gray_u8(patches_rgb))


def edge_scores_gray(patches_gray: np.ndarray) -> np.ndarray:
    """``edge_scores`` of patches already converted by ``gray_u8``, shape (N, h, w).

    Gray is per pixel, so a caller can convert the whole image once and cut gray patches
    (a third of the data to gather, no conversion of the overlaps twice).  Computed in
    int16, which holds every value (|Laplacian| <= 8 x 255), and summed exactly, so the
    scores are bit-identical to the int32 / float64-mean form."""
    if patches_gray.ndim != 3:
        raise ValueError(f"expected (N, h, w) gray patches, got {patches_gray.shape}")
    g = np.pad(patches_gray.astype(np.int16), ((0, 0), (1, 1), (1, 1)), mode="reflect")
    lap = (g[:, :-2, :-2] + g[:, :-2, 2:] + g[:, 2:, :-2] + g[:, 2:, 2:]) * 2 - g[:, 1:-1, 1:-1] * 8
    np.abs(lap, out=lap)
    np.minimum(lap, 255, out=lap)
    n, h, w = lap.shape
    return lap.reshape(n, h * w).sum(axis=1, dtype=np.int64) / (h * w)
