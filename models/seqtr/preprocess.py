"""SeqTR eval pre-processing (the official eval pipeline): long side -> ``long_side``,
zero-pad bottom/right.

* Pixels stay **RGB float in [0, 255]** (mean 0, std 1: no /255, no ImageNet statistics).
* Resize keeps the aspect ratio, ``s = long_side / max(h, w)``, new size
  ``int(w*s + 0.5) x int(h*s + 0.5)`` (mmcv ``rescale_size``).  The official resize is
  ``cv2.INTER_LINEAR`` (half-pixel centres, no antialiasing, uint8 output), which
  ``torch`` bilinear with ``align_corners=False, antialias=False`` plus rounding matches;
  Pillow's bilinear would antialias on downscaling and see a different image.
* Padding is bottom/right only, to a multiple of ``size_divisor`` (not a centred square
  letterbox), so padded-image coordinates equal resized-image coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class Prepared:
    """One image ready for the network; coordinates refer to its own ``pad_shape``."""

    tensor: torch.Tensor  # [3, Hp, Wp] float RGB 0-255, zero padding
    pad_mask: torch.Tensor  # [Hp, Wp] bool, True on padding
    scale: tuple[float, float]  # (sx, sy) = (w'/w, h'/h)
    img_shape: tuple[int, int]  # (h', w') resized, before padding
    orig_shape: tuple[int, int]  # (h, w)

    @property
    def pad_shape(self) -> tuple[int, int]:
        return int(self.tensor.shape[1]), int(self.tensor.shape[2])


def to_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB from RGB, grey (HxW / HxWx1), RGBA (alpha dropped) or a PIL image."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected HxW, HxWx1, HxWx3 or HxWx4, got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"empty image {a.shape}")
    return np.ascontiguousarray(a)


def rescale_size(h: int, w: int, long_side: int) -> tuple[int, int]:
    """(h', w') with the long side = ``long_side`` (mmcv rounding int(x*s + 0.5)), each at
    least 1 px: a 1 x 100000 image at 640 would otherwise round to 0 rows.  Neither side
    exceeds ``long_side``, so the padded canvas is bounded by the rung whatever the shape."""
    s = long_side / max(h, w)
    return max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))


def prepare(image: np.ndarray | Image.Image, long_side: int = 640, size_divisor: int = 32) -> Prepared:
    """Resize (bilinear, cv2-equivalent) then zero-pad bottom/right to a multiple of ``size_divisor``."""
    a = to_rgb_array(image)
    h, w = a.shape[:2]
    nh, nw = rescale_size(h, w, long_side)
    # torch.tensor copies: ``a`` may be a read-only view of a decoded buffer.
    x = torch.tensor(a, dtype=torch.uint8).permute(2, 0, 1).float()
    if (nh, nw) != (h, w):
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=False)[0]
        x = x.round().clamp_(0, 255)  # cv2 returns uint8
    ph = -(-nh // size_divisor) * size_divisor
    pw = -(-nw // size_divisor) * size_divisor
    out = torch.zeros(3, ph, pw)
    out[:, :nh, :nw] = x
    mask = torch.ones(ph, pw, dtype=torch.bool)
    mask[:nh, :nw] = False
    return Prepared(out, mask, (nw / w, nh / h), (nh, nw), (h, w))


def collate(items: list[Prepared], size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch (img [B,3,H,W], pad_mask [B,H,W]) zero-padded to the batch max (or to ``size``,
    a canvas every item fits: a server's fixed shape per rung), mask True on padding."""
    if not items:
        raise ValueError("empty batch")
    hm = max(p.pad_shape[0] for p in items) if size is None else size[0]
    wm = max(p.pad_shape[1] for p in items) if size is None else size[1]
    img = torch.zeros(len(items), 3, hm, wm)
    mask = torch.ones(len(items), hm, wm, dtype=torch.bool)
    for i, p in enumerate(items):
        h, w = p.pad_shape
        img[i, :, :h, :w] = p.tensor
        mask[i, :h, :w] = p.pad_mask
    return img, mask
