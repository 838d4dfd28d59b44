"""Evaluation pre-processing for CF-ViT (the official ImageNet evaluation transform) and class names.

The official evaluation transform is torchvision's ``Resize(int(S / crop_pct), bicubic)`` on
a PIL image (the short side to that size, the long side ``int(size * long / short)``), then
``CenterCrop(S)`` (offsets ``int(round((h - S) / 2))``), ``ToTensor`` and ``Normalize``.  We
do the same with PIL and numpy, without torchvision.  The coarse input is made inside the
model (:meth:`CfVisionTransformer.coarse_input`) from the normalised tensor this returns.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.common.resize import crop_of_resized, crops_first, intermediate_pixels


def _as_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def _short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) after torchvision's ``Resize(size)``: the short side to ``size``, the long side
    ``int(size * long / short)``."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def resize_short_side(img: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``Resize(size)`` for a PIL image with bicubic interpolation."""
    h, w = img.shape[:2]
    new_h, new_w = _short_side_size(h, w, size)
    if (new_h, new_w) == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.BICUBIC))


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} is smaller than the crop {size}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img[top:top + size, left:left + size]


def _crop_first(h: int, w: int, size: int, crop: int) -> bool:
    """Whether ``resize_center_crop`` crops before resizing (models.common.resize)."""
    nh, nw = _short_side_size(h, w, size)
    return crops_first(w, h, nw, nh, size, crop)


def resize_pixels(w: int, h: int, size: int, crop: int) -> int:
    """Pixels of the largest intermediate ``resize_center_crop`` makes for a w x h input."""
    nh, nw = _short_side_size(h, w, size)
    return intermediate_pixels(w, h, nw, nh, size, crop)


def resize_center_crop(img: np.ndarray, size: int, crop: int) -> np.ndarray:
    """``center_crop(resize_short_side(img, size), crop)``, at a cost bounded by the input
    for extreme aspect ratios (models.common.resize)."""
    h, w = img.shape[:2]
    if not _crop_first(h, w, size, crop):
        return center_crop(resize_short_side(img, size), crop)
    nh, nw = _short_side_size(h, w, size)
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    return crop_of_resized(Image.fromarray(img), nw, nh, left, top, crop, Image.BICUBIC)


def eval_transform(img: np.ndarray, img_size: int, crop_pct: float, mean, std) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> normalised float32 tensor (3, S, S)."""
    img = _as_rgb(img)
    img = resize_center_crop(img, int(img_size / crop_pct), img_size)
    # A copy: the crop may be a read-only view of a decoded buffer, which torch must not wrap.
    x = torch.from_numpy(np.array(img, dtype=np.uint8, order="C")).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def load_class_names(path: str | Path | None, num_classes: int) -> list[str]:
    """Class names from an optional file: one name per line, a JSON list, or a JSON object
    mapping index -> name (or -> [wnid, name], the ``imagenet_class_index.json`` layout).
    Without a file (ImageNet's names are not bundled): ``class_<i>``."""
    if path is None:
        return [f"class_{i}" for i in range(num_classes)]
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            names = []
            for i in range(len(data)):
                v = data[str(i)]
                names.append(v[-1] if isinstance(v, list) else str(v))
        else:
            names = [str(v) for v in data]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != num_classes:
        raise ValueError(f"{path} has {len(names)} class names; the model has {num_classes} classes")
    return names
