"""One augmented glyph sample, deterministic given its random generator.

A sample is a character cropped out of "text": the glyph, scaled so its longer side fills
30-90% of the canvas (log-uniform: size says nothing about the class, and the small glyphs
are what a half-resolution view cannot read), rotated, sheared and stretched a little, often
thinned or thickened, drawn in a colour over a flat, gradient, noise or
stripe background, with its neighbours in the line (and in the lines above and below)
cut by the canvas edges, distractor strokes behind or in front, and then blurred, noised
or JPEG-compressed.  The geometry is kept mild enough that the classes stay readable
(6/9, n/u, b/d/p/q are different classes: no flips, rotations within +-20 degrees).

Masks are drawn at ``ss`` times the output size and area-averaged down, so edges are
anti-aliased as in a real downscaled crop; the background is made at the output size.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from models.glyphs.fonts import glyph_mask, load_font

SCALE_RANGE = (0.3, 0.9)  # longer side of the glyph box / canvas side, log-uniform
MAX_ROTATION_DEG = 20.0


@lru_cache(maxsize=16384)
def cached_mask(path: str, ch: str) -> np.ndarray:
    """The glyph's ink at the vetting size, cropped (read-only; shared across samples)."""
    m = glyph_mask(load_font(path), ch)
    m.setflags(write=False)
    return m


def _supersample(size: int) -> int:
    return max(2, math.ceil(128 / size))


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.3:  # greys and near-greys are common in print
        v = rng.random()
        return np.clip(np.array([v, v, v]) + rng.normal(0, 0.03, 3), 0, 1).astype(np.float32)
    return rng.random(3).astype(np.float32)


def contrasting_colour(rng: np.random.Generator, bg_luma: float, contrast: float) -> np.ndarray:
    """A colour whose luma differs from ``bg_luma`` by at least ``contrast``."""
    for _ in range(32):
        c = _random_colour(rng)
        if abs(float(_luma(c)) - bg_luma) >= contrast:
            return c
    target = bg_luma - contrast if bg_luma - contrast >= 0 or bg_luma + contrast > 1 else bg_luma + contrast
    return np.full(3, np.clip(target, 0, 1), np.float32)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 in [0, 1]: flat, gradient, noise texture, stripes or paper."""
    c1, c2 = _random_colour(rng), _random_colour(rng)
    kind = rng.choice(5, p=[0.2, 0.25, 0.3, 0.1, 0.15])
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:
        t = np.zeros((size, size), np.float32)
    elif kind == 1:  # linear or radial gradient
        if rng.random() < 0.7:
            a = rng.uniform(0, 2 * np.pi)
            t = (np.cos(a) * (x - 0.5) + np.sin(a) * (y - 0.5)) * rng.uniform(0.8, 2.0) + 0.5
        else:
            cx, cy = rng.uniform(-0.2, 1.2, 2)
            t = np.hypot(x - cx, y - cy) * rng.uniform(0.7, 1.8)
    elif kind == 2:  # smooth value noise with a finer octave
        t = np.zeros((size, size), np.float32)
        for cells, weight in ((int(rng.integers(2, 6)), 1.0), (int(rng.integers(6, 14)), rng.uniform(0.2, 0.7))):
            grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
            t += weight * np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255.0
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == 3:  # stripes or a checker pattern, low contrast
        a, f = rng.uniform(0, np.pi), rng.uniform(2, 9)
        u = np.cos(a) * x + np.sin(a) * y
        t = 0.5 + 0.5 * np.sin(2 * np.pi * f * u + rng.uniform(0, 2 * np.pi))
        if rng.random() < 0.3:
            v = -np.sin(a) * x + np.cos(a) * y
            t = t * (0.5 + 0.5 * np.sin(2 * np.pi * f * v))
        c2 = np.clip(c1 + rng.normal(0, 0.2, 3), 0, 1).astype(np.float32)
    else:  # paper: light, faint grain
        c1 = np.clip(rng.uniform(0.8, 1.0) - rng.uniform(0, 0.08, 3), 0, 1).astype(np.float32)
        c2 = np.clip(c1 - rng.uniform(0.03, 0.12), 0, 1).astype(np.float32)
        t = rng.random((size, size)).astype(np.float32) * 0.5
    t = np.clip(t, 0, 1)[..., None]
    return (c1 * (1 - t) + c2 * t).astype(np.float32)


def _affine(canvas: int, src_hw: tuple[int, int], centre: tuple[float, float], m: np.ndarray) -> tuple:
    """PIL's inverse-affine coefficients that put the centre of a (h, w) source at
    ``centre`` of the canvas after the forward 2x2 map ``m``."""
    inv = np.linalg.inv(m)
    h, w = src_hw
    cx, cy = centre
    ox, oy = w / 2 - inv[0, 0] * cx - inv[0, 1] * cy, h / 2 - inv[1, 0] * cx - inv[1, 1] * cy
    return (inv[0, 0], inv[0, 1], ox, inv[1, 0], inv[1, 1], oy)


def _place(mask: np.ndarray, canvas: int, centre: tuple[float, float], m: np.ndarray) -> Image.Image:
    src = Image.fromarray(np.ascontiguousarray(mask))
    return src.transform((canvas, canvas), Image.Transform.AFFINE, _affine(canvas, mask.shape, centre, m),
                         resample=Image.Resampling.BILINEAR, fillcolor=0)


def _strokes(rng: np.random.Generator, canvas: int, n: int, max_width: float) -> Image.Image:
    """n random lines or curves (a distractor layer), as an L mask at canvas resolution."""
    im = Image.new("L", (canvas, canvas), 0)
    d = ImageDraw.Draw(im)
    for _ in range(n):
        width = max(1, int(rng.uniform(0.015, max_width) * canvas))
        p0, p1, p2 = (rng.uniform(-0.1, 1.1, 2) * canvas for _ in range(3))
        if rng.random() < 0.5:
            d.line([tuple(p0), tuple(p1)], fill=255, width=width)
        else:  # quadratic Bezier as a polyline
            t = np.linspace(0, 1, 16)[:, None]
            pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p2 + t**2 * p1
            d.line([tuple(p) for p in pts], fill=255, width=width, joint="curve")
    return im


def _down(im: Image.Image, size: int) -> np.ndarray:
    return np.asarray(im.resize((size, size), Image.Resampling.BOX), np.float32)[..., None] / 255.0


def render(path: str, ch: str, rng: np.random.Generator, size: int = 32,
           neighbours: str = "") -> np.ndarray:
    """One (size, size, 3) uint8 RGB sample of character ``ch`` of the font at ``path``.

    ``neighbours`` are the characters the surrounding text is drawn from (same font)."""
    ss = _supersample(size)
    canvas = size * ss
    glyph = cached_mask(path, ch)
    h, w = glyph.shape

    # Geometry: fit the longer side, then stretch, shear and rotate a little.
    k = math.exp(rng.uniform(*np.log(SCALE_RANGE))) * canvas / max(h, w)
    stretch = math.exp(rng.uniform(-0.15, 0.15))
    shear = rng.uniform(-0.25, 0.25) if rng.random() < 0.5 else 0.0
    theta = math.radians(float(np.clip(rng.normal(0, 7), -MAX_ROTATION_DEG, MAX_ROTATION_DEG)))
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    m = rot @ np.array([[1, shear], [0, 1]]) @ np.diag([k * stretch, k / stretch])
    box_w, box_h = w * k * stretch, h * k / stretch
    slack_x, slack_y = max(canvas - box_w, 0) / 2, max(canvas - box_h, 0) / 2
    centre = (canvas / 2 + rng.uniform(-0.6, 0.6) * slack_x, canvas / 2 + rng.uniform(-0.6, 0.6) * slack_y)

    # Weight: thinner or bolder than the font draws it.
    mask = Image.fromarray(np.ascontiguousarray(glyph))
    r = rng.random()
    if r < 0.12:
        mask = mask.filter(ImageFilter.MinFilter(3))
    elif r < 0.3:
        mask = mask.filter(ImageFilter.MaxFilter(3 if r < 0.24 else 5))
    target = _place(np.asarray(mask), canvas, centre, m)

    # Text around the glyph: neighbours in the line and in the lines above and below.
    context = Image.new("L", (canvas, canvas), 0)
    if neighbours and rng.random() < 0.6:
        xdir, ydir = rot @ np.array([1.0, 0.0]), rot @ np.array([0.0, 1.0])
        spots = [(side, 0) for side in (-1, 1) if rng.random() < 0.7]
        if rng.random() < 0.3:
            spots += [(int(rng.integers(-1, 2)), int(rng.choice([-1, 1])))]
        for side, line in spots:
            other = cached_mask(path, neighbours[int(rng.integers(len(neighbours)))])
            oh, ow = other.shape
            ow_k = ow * k * stretch
            # A letter gap (or a line) away, but centred on or beyond the canvas edge, so at
            # most half of it shows and the labelled glyph is the only whole one.
            edge_x = canvas - centre[0] if side > 0 else centre[0]
            edge_y = canvas - centre[1] if line > 0 else centre[1]
            dx = side * max((box_w + ow_k) / 2 + rng.uniform(0.08, 0.25) * box_h, edge_x)
            dy = line * max(box_h * rng.uniform(1.1, 1.4), edge_y if side == 0 else 0.0)
            c = (centre[0] + dx * xdir[0] + dy * ydir[0], centre[1] + dx * xdir[1] + dy * ydir[1])
            context.paste(255, mask=_place(other, canvas, c, m))

    bg = background(rng, size)
    bg_luma = float(_luma(bg.reshape(-1, 3)).mean())
    contrast = rng.uniform(0.15, 0.6) if rng.random() < 0.85 else rng.uniform(0.08, 0.15)
    fg = contrasting_colour(rng, bg_luma, contrast)
    img = bg

    if rng.random() < 0.35:  # distractor strokes behind the text
        clutter = _down(_strokes(rng, canvas, int(rng.integers(1, 4)), 0.06), size)
        img = img * (1 - clutter) + contrasting_colour(rng, bg_luma, rng.uniform(0.05, 0.3)) * clutter

    ctx = _down(context, size)
    img = img * (1 - ctx) + fg * ctx
    glyph_a = _down(target, size)
    style = rng.random()
    if style < 0.08:  # outline in another colour
        outline = _down(target.filter(ImageFilter.MaxFilter(2 * int(rng.integers(1, 3)) * (ss // 2) + 1)), size)
        img = img * (1 - outline) + contrasting_colour(rng, float(_luma(fg)), 0.3) * outline
    elif style < 0.16:  # drop shadow
        off = rng.uniform(0.02, 0.06, 2) * canvas * rng.choice([-1, 1], 2)
        shadow = _down(target.transform(target.size, Image.Transform.AFFINE, (1, 0, -off[0], 0, 1, -off[1])), size)
        img = img * (1 - 0.8 * shadow) + fg * 0.3 * 0.8 * shadow
    fill = fg
    if rng.random() < 0.15:  # gradient fill
        y = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        fill = fg * (1 - y) + contrasting_colour(rng, bg_luma, contrast) * y
    img = img * (1 - glyph_a) + fill * glyph_a

    if rng.random() < 0.15:  # thin occluding strokes in front
        occ = _down(_strokes(rng, canvas, int(rng.integers(1, 3)), 0.03), size)
        img = img * (1 - occ) + contrasting_colour(rng, float(_luma(fg)), 0.2) * occ

    out = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9) * size / 32))
    arr = np.asarray(out, np.float32)
    if rng.random() < 0.5:
        arr = arr + rng.normal(0, rng.uniform(2, 12), arr.shape).astype(np.float32)
    out_arr = np.clip(arr + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.25:
        buf = io.BytesIO()
        Image.fromarray(out_arr).save(buf, format="JPEG", quality=int(rng.integers(30, 90)))
        out_arr = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out_arr
