"""Data for PSS-Net: the demo's glyph images and the transforms (official and demo).

The official recipe trains on ImageNet with RandomResizedCrop(224, scale 0.25..1),
ColorJitter(0.4, 0.4, 0.4), PCA lighting 0.1 and horizontal flips, evaluates on
Resize(256) + CenterCrop(224), and always feeds the network 224 px (the subnet resizes to
its own resolution inside the model).  The demo keeps the same pipeline on the 32 px glyph
images with two changes, both because these are characters: the crop keeps at least 64 %
of the area, 80 % of the side (a quarter of a glyph is often another glyph or none), and
there is no horizontal flip (a mirrored b is a d).  Evaluation is "shorter side to 32, centre crop 32", which is
the identity on the data set's own 32x32 images.

Batches are augmented in torch, vectorised over the batch (crops by ``affine_grid`` and
``grid_sample``), from a seeded generator, so a resumed run sees the same images.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.common.resize import crop_of_resized, crops_first, intermediate_pixels

# ImageNet statistics on [0, 1] (the official pipeline uses them x255 on uint8: the same).
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# The ImageNet PCA lighting constants used by the official augmentation (AlexNet-style).
EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


@dataclass(frozen=True)
class Augment:
    """Training augmentation; ``official()`` is the official recipe's, ``demo()`` the glyph variant."""

    size: int
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: float = 0.4
    lighting: float = 0.1
    hflip: bool = True

    @classmethod
    def official(cls) -> Augment:
        return cls(224)

    @classmethod
    def demo(cls, size: int = 32) -> Augment:
        return cls(size, scale=(0.64, 1.0), hflip=False)

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised float (N, 3, size, size)."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        n = x.shape[0]
        u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u(n)
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u(n)
        r = torch.exp(log_r)
        w = torch.sqrt(area * r).clamp(max=1.0)  # fraction of the width
        h = torch.sqrt(area / r).clamp(max=1.0)
        cx = (u(n) * 2 - 1) * (1 - w)  # the crop stays inside the image
        cy = (u(n) * 2 - 1) * (1 - h)
        sx = torch.where(u(n) < 0.5, -1.0, 1.0) if self.hflip else torch.ones(n)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sx, cx, h, cy
        grid = F.affine_grid(theta, [n, 3, self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.jitter:
            x = self._jitter(x, g)
        if self.lighting:
            alpha = torch.randn(n, 3, generator=g) * self.lighting
            x = x + ((EIGVEC @ (alpha * EIGVAL).T).T).view(n, 3, 1, 1)
        return (x.clamp(0, 1) - MEAN) / STD

    def _jitter(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Brightness, contrast and saturation factors uniform in [1-j, 1+j], in a random
        order per batch (torchvision's ColorJitter permutes them per image)."""
        n, j = x.shape[0], self.jitter
        for op in torch.randperm(3, generator=g).tolist():
            f = (1 - j + 2 * j * torch.rand(n, 1, 1, 1, generator=g))
            gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
            if op == 0:
                x = (x * f).clamp(0, 1)
            elif op == 1:
                x = (gray.mean((2, 3), keepdim=True) + f * (x - gray.mean((2, 3), keepdim=True))).clamp(0, 1)
            else:
                x = (gray + f * (x - gray)).clamp(0, 1)
        return x


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W), no resizing."""
    return (images.permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD


def _resized(w: int, h: int, resize: int) -> tuple[int, int]:
    """(w, h) once the shorter side is ``resize``."""
    if min(w, h) == resize:
        return w, h
    s = resize / min(w, h)
    return max(resize, round(w * s)), max(resize, round(h * s))


def _crop_first(w: int, h: int, resize: int, crop: int) -> bool:
    """Whether ``resize_center_crop`` crops before resizing (models.common.resize)."""
    return crops_first(w, h, *_resized(w, h, resize), resize, crop)


def resize_pixels(w: int, h: int, resize: int, crop: int) -> int:
    """Pixels of the largest intermediate ``resize_center_crop`` makes for a w x h input."""
    return intermediate_pixels(w, h, *_resized(w, h, resize), resize, crop)


def resize_center_crop(rgb: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """Shorter side to ``resize`` (PIL bilinear), centre crop ``crop`` x ``crop``.

    For extreme aspect ratios the cost stays bounded by the input (models.common.resize)."""
    img = Image.fromarray(np.ascontiguousarray(rgb))
    w, h = img.size
    nw, nh = _resized(w, h, resize)
    left, top = (nw - crop) // 2, (nh - crop) // 2
    if _crop_first(w, h, resize, crop):
        return crop_of_resized(img, nw, nh, left, top, crop, Image.BILINEAR)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    return np.asarray(img.crop((left, top, left + crop, top + crop)))


def to_rgb_u8(image: np.ndarray) -> np.ndarray:
    """Grey (H, W) or (H, W, 1) and RGBA inputs as (H, W, 3) uint8."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return a[..., :3]


# ----------------------------------------------------------------------------------------
# Demo data set
# ----------------------------------------------------------------------------------------


@dataclass
class DemoSplit:
    images: np.ndarray  # (N, 32, 32, 3) uint8
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    source: dict | str  # the data set's own provenance record (glyphs: fonts, seed, versions)


SHAPES = ("disc", "square", "triangle", "cross", "ring", "bar", "diamond", "chevron")


def synthetic_split(split: str, n: int = 2000) -> DemoSplit:
    """A clearly labelled stand-in, used by the smoke tests (and a fallback when the glyph
    data set is absent): eight filled shapes at random size, position and colours on a
    random background, 32x32.  The splits differ only by seed."""
    from PIL import ImageDraw

    rng = np.random.default_rng({"train": 0, "val": 1, "test": 2}[split])
    images = np.empty((n, 32, 32, 3), np.uint8)
    labels = rng.integers(0, len(SHAPES), n)
    for i, c in enumerate(labels):
        bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        img = Image.new("RGB", (32, 32), tuple(int(v) for v in bg))
        d = ImageDraw.Draw(img)
        r = float(rng.uniform(6, 13))
        cx, cy = rng.uniform(r, 32 - r, 2)
        box = (cx - r, cy - r, cx + r, cy + r)
        col = tuple(int(v) for v in fg)
        shape = SHAPES[c]
        if shape == "disc":
            d.ellipse(box, fill=col)
        elif shape == "square":
            d.rectangle(box, fill=col)
        elif shape == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
        elif shape == "cross":
            d.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=col)
            d.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=col)
        elif shape == "ring":
            d.ellipse(box, outline=col, width=max(2, int(r / 3)))
        elif shape == "bar":
            d.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=col)
        elif shape == "diamond":
            d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=col)
        else:
            d.line([(cx - r, cy + r / 2), (cx, cy - r / 2), (cx + r, cy + r / 2)], fill=col, width=max(2, int(r / 3)))
        images[i] = np.asarray(img)
    return DemoSplit(images, labels.astype(np.int64), list(SHAPES), "synthetic shapes (stand-in, not the glyph data)")


def load_demo_split(split: str, source: str = "glyphs") -> DemoSplit:
    """The glyph data set of ``models.glyphs`` (split by font family), or ``synthetic``."""
    if source == "synthetic":
        return synthetic_split(split)
    if source != "glyphs":
        raise ValueError(f"unknown demo data {source!r}")
    from models.glyphs.data import load_split

    ds = load_split(split)
    source = ds.source if isinstance(ds.source, dict) else {"source": str(ds.source)}
    return DemoSplit(np.ascontiguousarray(ds.images), np.asarray(ds.labels, dtype=np.int64), list(ds.classes),
                     {k: v for k, v in source.items() if k != "fonts"})  # the font file list is long


def batches(images: np.ndarray, labels: np.ndarray, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic, in order, the last batch possibly short (for evaluation)."""
    for i in range(0, len(images), batch):
        yield torch.from_numpy(images[i:i + batch]), torch.from_numpy(labels[i:i + batch])


def calibration_batches(images: np.ndarray, augment: Augment, n_batches: int, batch: int,
                        seed: int) -> list[torch.Tensor]:
    """``n_batches`` augmented training batches (the official recalibration: 9 batches with the training transform).
    Drawn once and reused for every retained subnet, so all subnets see the same images."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    order = rng.permutation(len(images))
    out = []
    for b in range(n_batches):
        idx = order[(np.arange(batch) + b * batch) % len(images)]
        out.append(augment(torch.from_numpy(images[idx]), g))
    return out


def image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted): an ImageNet train folder, say."""
    exts = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG"}
    return sorted(p for p in Path(folder).rglob("*") if p.suffix in exts or p.suffix.lower() in exts)


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                        rng: np.random.Generator) -> np.ndarray:
    """RandomResizedCrop on a PIL image (ten tries at a random area/aspect, else the
    centre crop at the nearest allowed aspect), resized bilinearly to ``size``."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * r)), round(math.sqrt(area / r))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:
        r = min(max(w / h, ratio[0]), ratio[1])
        cw, ch = (w, round(w / r)) if w / h < r else (round(h * r), h)
        cw, ch = min(cw, w), min(ch, h)
        left, top = (w - cw) // 2, (h - ch) // 2
    return np.asarray(img.crop((left, top, left + cw, top + ch)).resize((size, size), Image.BILINEAR))


def folder_calibration_batches(folder: str | Path, n_batches: int, batch: int, seed: int = 0,
                               augment: Augment | None = None) -> list[torch.Tensor]:
    """Calibration batches from an image folder (an ImageNet train folder, say) with the
    official training transform: RandomResizedCrop per image with PIL, then the batched
    jitter, lighting and flip of ``augment`` (its own crop disabled)."""
    augment = augment or Augment.official()
    rest = Augment(augment.size, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=augment.jitter,
                   lighting=augment.lighting, hflip=augment.hflip)
    files = image_files(folder)
    if not files:
        raise FileNotFoundError(f"no images under {folder}")
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    order = rng.permutation(len(files))
    out = []
    for b in range(n_batches):
        idx = order[(np.arange(batch) + b * batch) % len(files)]
        imgs = np.stack([random_resized_crop(Image.open(files[i]).convert("RGB"), augment.size, augment.scale,
                                             augment.ratio, rng) for i in idx])
        out.append(rest(torch.from_numpy(imgs), g))
    return out
