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
    g = np.pad(gray_u8(patches_rgb), ((0, 0), (1, 1), (1, 1)), mode="reflect")
    lap = 2 * (g[:, :-2, :-2] + g[:, :-2, 2:] + g[:, 2:, :-2] + g[:, 2:, 2:]) - 8 * g[:, 1:-1, 1:-1]
    return np.minimum(np.abs(lap), 255).mean(axis=(1, 2), dtype=np.float64)
