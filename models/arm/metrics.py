"""Image quality as the SR literature reports it.

``psnr_rgb``: ARM/ClassSR's number, over all three channels of 8-bit images after a
4 px border crop.  ``psnr_y``: the usual benchmark number, on the MATLAB ``rgb2ycbcr``
luma (BT.601, studio range).  The two differ by several dB; never compare across them.
"""

from __future__ import annotations

import math

import numpy as np


def _crop(img: np.ndarray, crop: int) -> np.ndarray:
    return img[crop:-crop, crop:-crop] if crop else img


def mse_to_db(mse: float) -> float:
    return 80.0 if mse == 0 else 20 * math.log10(255.0 / math.sqrt(mse))


def psnr_rgb(sr: np.ndarray, hr: np.ndarray, crop: int = 4) -> float:
    """Both on the 0..255 scale (uint8 or float), same shape (H, W, 3)."""
    d = _crop(np.asarray(sr, dtype=np.float64), crop) - _crop(np.asarray(hr, dtype=np.float64), crop)
    return mse_to_db(float(np.mean(d * d)))


def luma(img: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr Y on a 0..255 RGB image (result in 16..235)."""
    x = np.asarray(img, dtype=np.float64)
    return 16.0 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255.0


def psnr_y(sr: np.ndarray, hr: np.ndarray, crop: int = 4) -> float:
    d = _crop(luma(sr), crop) - _crop(luma(hr), crop)
    return mse_to_db(float(np.mean(d * d)))


def patch_mse(sr: np.ndarray, hr: np.ndarray, crop: int = 4) -> np.ndarray:
    """Per-patch MSE over all channels, (N, P, P, 3) each, border-cropped (the table's
    per-patch measure)."""
    d = _crop_batch(np.asarray(sr, dtype=np.float64), crop) - _crop_batch(np.asarray(hr, dtype=np.float64), crop)
    return (d * d).mean(axis=(1, 2, 3))


def _crop_batch(x: np.ndarray, crop: int) -> np.ndarray:
    return x[:, crop:-crop, crop:-crop] if crop else x
