"""Polygon rasterisation, IoU and COCO-style RLE, without OpenCV or pycocotools.

Pixel (row i, col j) belongs to a polygon when at least half of it is covered, with
coordinates continuous and pixel (i, j) spanning [j, j+1) x [i, i+1), as pycocotools does
(a square from (2, 2) to (6, 6) is 16 pixels).  Pillow's ``ImageDraw.polygon`` fills
every pixel touched by the outline (25 pixels for that square), so we draw at 4x
resolution inside the polygon's bounding box and keep pixels with >= 50 % coverage.

Deliberately *not* replicated: pycocotools reads a 4-number polygon as an [x, y, w, h]
box; a 2-point "polygon" here has no area and gives an empty mask.

Masks are brought to original pixels by scaling the polygon (:func:`rescale_polygon`) and
rasterising at the original size, never by resizing the padded mask (the official
``rescale=True`` path resizes the whole padded mask, padding included, and so distorts it
whenever the image was padded, e.g. a 640x427 image padded to 640x448).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

_SS = 5  # supersampling factor per axis (odd: no exact 50 % ties along an axis)


def rescale_polygon(points: Sequence[Sequence[float]], scale: tuple[float, float]) -> list[tuple[float, float]]:
    """Resized-image coordinates -> original pixels: divide by (sx, sy)."""
    sx, sy = scale
    return [(float(x) / sx, float(y) / sy) for x, y in points]


def polygon_to_mask(points: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Bool mask [height, width] of a polygon (pixel coverage >= 50 %); < 3 points -> empty."""
    mask = np.zeros((height, width), dtype=bool)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) < 3 or not np.isfinite(pts).all():
        return mask
    x0 = max(int(np.floor(pts[:, 0].min())), 0)
    y0 = max(int(np.floor(pts[:, 1].min())), 0)
    x1 = min(int(np.ceil(pts[:, 0].max())), width)
    y1 = min(int(np.ceil(pts[:, 1].max())), height)
    if x1 <= x0 or y1 <= y0:
        return mask
    bw, bh = x1 - x0, y1 - y0
    canvas = Image.new("L", (bw * _SS, bh * _SS), 0)
    # Sub-pixel centres sit at integer coordinates for Pillow, hence the -0.5.  Pillow
    # truncates float vertices, so round them to the nearest sub-pixel centre ourselves.
    local = np.floor((pts - [x0, y0]) * _SS - 0.5 + 0.5).astype(np.int64)
    ImageDraw.Draw(canvas).polygon([(int(x), int(y)) for x, y in local], fill=255)
    # Box-average each 5x5 block in C; k of 25 sub-pixels give ~10.2k, so k >= 13 <=> >= 127.
    mask[y0:y1, x0:x1] = np.asarray(canvas.reduce(_SS)) >= 127
    return mask


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks of the same shape (0 when both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes, continuous coordinates."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: column-major run lengths, starting with a (possibly 0) zero run."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    flat = m.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(h), int(w)], "counts": [int(c) for c in counts]}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Inverse of :func:`mask_to_rle`."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {counts.sum()}, expected {h * w}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((h, w), order="F")
