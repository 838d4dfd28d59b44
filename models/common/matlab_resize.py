"""MATLAB-style ``imresize`` (bicubic, a = -0.5, antialiased when shrinking).

SR benchmarks, ARM's included, make their low-resolution inputs with MATLAB's bicubic
kernel; PIL, OpenCV and torch use other kernels or border rules, so their LR images
differ measurably and a model trained on one degradation scores worse on another.
This is an independent float64 implementation of the published algorithm: per output
coordinate, a cubic kernel stretched by 1/scale when shrinking, weights normalised to
sum to one, and symmetric (mirror) extension at the borders.
"""

from __future__ import annotations

import math

import numpy as np


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def _weights(in_len: int, out_len: int, scale: float, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (out_len, taps): output i = sum_t w[i,t] * in[idx[i,t]]."""
    kernel_width = 4.0
    stretch = antialias and scale < 1
    if stretch:
        kernel_width /= scale
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # output pixel centre in input (1-based) coordinates
    left = np.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    dist = u[:, None] - idx
    w = scale * _cubic(scale * dist) if stretch else _cubic(dist)
    w = w / w.sum(axis=1, keepdims=True)
    keep = np.any(w != 0, axis=0)  # drop tap columns that are zero for every output
    w, idx = w[:, keep], idx[:, keep]
    # Symmetric extension, 1-based: 0 -> 1, -1 -> 2, in_len+1 -> in_len, ...
    idx = idx - 1
    period = 2 * in_len
    idx = np.mod(idx, period)
    idx = np.where(idx >= in_len, period - 1 - idx, idx)
    return idx.astype(np.int64), w


def imresize(img: np.ndarray, scale: float, antialias: bool = True) -> np.ndarray:
    """Resize an HxW or HxWxC array by ``scale`` with MATLAB's bicubic; float64 out.

    The output size is ceil(in * scale), as in MATLAB.  No clipping or rounding is done:
    convert with ``np.clip(np.rint(x), 0, 255)`` for uint8 (round half to even)."""
    arr = np.asarray(img, dtype=np.float64)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[:, :, None]
    h, w = arr.shape[:2]
    oh, ow = int(math.ceil(h * scale)), int(math.ceil(w * scale))
    idx, wt = _weights(h, oh, scale, antialias)
    arr = np.einsum("ot,otc->oc", wt, arr[idx].reshape(oh, idx.shape[1], -1)).reshape(oh, w, -1)
    idx, wt = _weights(w, ow, scale, antialias)
    arr = np.einsum("wt,hwtc->hwc", wt, arr[:, idx])
    return arr[:, :, 0] if squeeze else arr


def downscale_x4_uint8(hr: np.ndarray) -> np.ndarray:
    """The ARM/ClassSR LR image: MATLAB bicubic 1/4 of a uint8 HR, rounded half-to-even."""
    return np.clip(np.rint(imresize(hr, 0.25)), 0, 255).astype(np.uint8)
