"""Synthetic referring-expression scenes for the tiny SeqTR demo (docs/DATA_SCENES.md).

No referring-expression data set (RefCOCO & co.) can be downloaded here, so the bundled SeqTR
demo trains on scenes we draw ourselves: a textured background and 4-7 coloured shapes, one
of which (the target) is described by an English expression that refers to it *uniquely*.

Why it is built the way it is:

* **Exact ground truth.** Every object is one polygon (a circle is a 48-gon), rasterised with
  :func:`models.seqtr.raster.polygon_to_mask` - the rasteriser that turns a *predicted*
  polygon into a mask at evaluation (pycocotools semantics: pixels >= 50 % covered) - and the
  image is painted through that mask, so the mask *is* the set of drawn pixels, a perfect
  predicted polygon scores IoU 1, the box is tight on the mask, and ``polygon`` is what
  SeqTR's mask head has to trace.  Objects never overlap: no occlusion bookkeeping.
* **Hard distractors.** Every scene holds the target, a distractor of the same shape (other
  colour), one of the same colour (other shape) and, half of the time, a "twin" of the same
  colour and shape, so neither colour nor shape alone identifies the target and the model has
  to read size, position or a relation.
* **Expressions are checked, not hoped for.** Each expression is rendered from a structured
  :class:`Description` (a noun phrase plus an optional extreme / canvas region / relation to a
  landmark).  :func:`resolve` evaluates the description on the scene with three-valued
  semantics (an object near a boundary - "is it really left of the star?" - is *maybe*); a
  description is kept only when exactly one object is *true* and none is *maybe*, so
  borderline, ambiguous expressions never reach training or test.
* **Held-out phrasings.** Val and test use, for a quarter of their samples (default), templates
  that never occur in training: mostly training words in new orders ("the circle that is red",
  "left of the blue star the red circle"), plus one unseen word, ``which`` (maps to UNK).
  Train uses only the ``T-*`` templates, see :data:`TEMPLATES` and docs/DATA_SCENES.md.
* **Reproducible and held out.** Sample ``i`` of a split is a pure function of
  ``(seed, i, size)``; the three splits have disjoint default seeds.

    python -m models.seqtr.scenes --split test --n 8 --out /tmp/scenes   # PNGs to eyeball
"""

from __future__ import annotations

import argparse
import colorsys
import math
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from models.seqtr.raster import polygon_to_mask

GENERATOR_VERSION = 3  # bump on any change that alters pixels, expressions or split rules
SEEDS = {"train": 11_000, "val": 22_000, "test": 33_000}
HELD_OUT_FRACTION = 0.25  # share of val/test samples phrased with held-out templates (default)

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white")
SIZES = ("small", "large")
# Circumradius as a fraction of the canvas side: small 7.7-10.2 px, large 14.1-18.6 px at 128 px.
# (Version 2 had 5.8-8.3 / 11.5-15.4 px: a 12 px box needs every coordinate within ~2 px for
# IoU 0.5, which a stride-16 tiny model could not reach in a CPU budget; see DATA_SCENES.md.)
RADIUS = {"small": (0.06, 0.08), "large": (0.11, 0.145)}
# Base colour in HSV (hue in degrees); each object jitters hue, saturation and value.
HSV = {"red": (0, 0.85, 0.92), "orange": (28, 0.9, 0.97), "yellow": (55, 0.85, 0.95),
       "green": (125, 0.75, 0.8), "blue": (220, 0.8, 0.97), "purple": (282, 0.62, 0.88),
       "white": (0, 0.0, 0.96)}

DIRECTIONS = ("left", "right", "top", "bottom")
REGIONS = ("top left", "top right", "bottom left", "bottom right", "middle")
RELATIONS = ("left of", "right of", "above", "below", "next to")

# Margins of the three-valued semantics, as fractions of the canvas side.
EXTREME_GAP = 0.06  # "leftmost": the runner-up must be this much further right
REGION_MARGIN = 0.04  # centres this close to a third-line are "maybe" in that region
REL_MIN = 0.04  # "left of": at least this far left
NEXT_TRUE, NEXT_FALSE = 0.12, 0.22  # "next to": edge gap below -> true, above -> false


# ----------------------------------------------------------------------------- data types

@dataclass
class SceneObject:
    """One drawn shape: its attributes, exact geometry and the RGB it was filled with.

    ``box`` is (x1, y1, x2, y2) in pixel-edge coordinates, tight on the drawn pixels
    (x2 = last column + 1); ``polygon`` the vertices passed to the rasteriser; ``centre`` and
    ``radius`` (circumradius) are what the spatial semantics use."""

    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]
    polygon: list[tuple[float, float]]
    centre: tuple[float, float]
    radius: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class NP:
    """A noun phrase: any subset of size, colour and shape ("the small red circle", "the shape")."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None

    def matches(self, o: SceneObject) -> bool:
        return ((self.colour is None or o.colour == self.colour) and (self.shape is None or o.shape == self.shape)
                and (self.size is None or o.size == self.size))

    @property
    def n_attrs(self) -> int:
        return sum(v is not None for v in (self.colour, self.shape, self.size))

    def words(self, with_size: bool = True, with_colour: bool = True) -> list[str]:
        w = [self.size] if with_size and self.size else []
        w += [self.colour] if with_colour and self.colour else []
        return w + [self.shape or "shape"]


@dataclass(frozen=True)
class Description:
    """What an expression means: ``np`` plus at most one of an extreme ("leftmost"), a canvas
    region ("in the top left corner") or a relation to a landmark ("left of the blue star")."""

    kind: str  # attr | extreme | region | relation
    np: NP
    direction: str | None = None
    region: str | None = None
    relation: str | None = None
    landmark: NP | None = None


@dataclass
class Sample:
    """A scene and one expression referring to ``objects[target]``; box/polygon/mask are the target's."""

    image: np.ndarray  # H x W x 3 uint8 RGB
    expression: str
    target: int
    objects: list[SceneObject]
    box: tuple[float, float, float, float]
    polygon: list[tuple[float, float]]
    mask: np.ndarray  # H x W bool
    phrasing: str  # template id, e.g. "T-rel-that" (T-* train phrasings, H-* held out)
    held_out: bool  # phrased with a held-out (val/test only) template
    desc: Description | None = None
    split: str = ""
    index: int = -1


# ----------------------------------------------------------------------------- semantics

TRUE, MAYBE, FALSE = 1.0, 0.5, 0.0


def _extreme(objs: Sequence[SceneObject], cand: list[int], direction: str, size: int) -> dict[int, float]:
    key = {"left": lambda o: o.centre[0], "right": lambda o: -o.centre[0],
           "top": lambda o: o.centre[1], "bottom": lambda o: -o.centre[1]}[direction]
    if not cand:
        return {}
    best = min(key(objs[i]) for i in cand)
    close = [i for i in cand if key(objs[i]) - best < EXTREME_GAP * size]
    if len(close) == 1:
        return {i: TRUE if i in close else FALSE for i in cand}
    return {i: MAYBE if i in close else FALSE for i in cand}


def _region(o: SceneObject, region: str, size: int) -> float:
    """Canvas thirds: "top left" = left third and top third; "middle" = central third both ways."""
    m = REGION_MARGIN * size
    lo, hi = size / 3, 2 * size / 3

    def low(v: float) -> float:  # in the first third?
        return TRUE if v < lo - m else FALSE if v > lo + m else MAYBE

    def high(v: float) -> float:
        return TRUE if v > hi + m else FALSE if v < hi - m else MAYBE

    def mid(v: float) -> float:
        return TRUE if lo + m < v < hi - m else FALSE if v < lo - m or v > hi + m else MAYBE

    x, y = o.centre
    if region == "middle":
        return min(mid(x), mid(y))
    vert, horiz = region.split()
    return min(low(y) if vert == "top" else high(y), low(x) if horiz == "left" else high(x))


def _relation(o: SceneObject, lm: SceneObject, relation: str, size: int) -> float:
    """Is ``o`` in ``relation`` to the landmark ``lm``?  Directional relations want the offset
    mainly along their axis (within 45 degrees: true; beyond ~56 degrees or on the wrong side: false)."""
    dx, dy = o.centre[0] - lm.centre[0], o.centre[1] - lm.centre[1]
    if relation == "next to":
        gap = math.hypot(dx, dy) - o.radius - lm.radius
        return TRUE if gap < NEXT_TRUE * size else FALSE if gap > NEXT_FALSE * size else MAYBE
    along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    if along <= 0 or abs(across) > 1.5 * along:
        return FALSE
    return TRUE if along > REL_MIN * size and abs(across) <= along else MAYBE


def truth(desc: Description, objs: Sequence[SceneObject], size: int) -> list[float]:
    """Three-valued truth of ``desc`` for every object (TRUE / MAYBE / FALSE)."""
    out = [FALSE] * len(objs)
    if desc.kind == "relation":
        lms = [j for j, o in enumerate(objs) if desc.landmark is not None and desc.landmark.matches(o)]
        if len(lms) != 1:  # "the blue star" must itself be unique
            return [MAYBE if desc.np.matches(o) else FALSE for o in objs]
        lm = lms[0]
        for i, o in enumerate(objs):
            if i != lm and desc.np.matches(o):
                out[i] = _relation(o, objs[lm], desc.relation or "", size)
        return out
    cand = [i for i, o in enumerate(objs) if desc.np.matches(o)]
    if desc.kind == "attr":
        for i in cand:
            out[i] = TRUE
    elif desc.kind == "extreme":
        for i, v in _extreme(objs, cand, desc.direction or "", size).items():
            out[i] = v
    elif desc.kind == "region":
        for i in cand:
            out[i] = _region(objs[i], desc.region or "", size)
    else:
        raise ValueError(f"unknown description kind {desc.kind!r}")
    return out


def resolve(desc: Description, objs: Sequence[SceneObject], size: int) -> int | None:
    """The one object ``desc`` refers to, or None when it fits none, several, or any only maybe."""
    t = truth(desc, objs, size)
    true = [i for i, v in enumerate(t) if v == TRUE]
    return true[0] if len(true) == 1 and MAYBE not in t else None


# ----------------------------------------------------------------------------- templates

EXT_ADJ = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}
EXT_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
REGION_PHRASE = {r: (r if r == "middle" else r + " corner") for r in REGIONS}


def _np(d: Description) -> str:
    return " ".join(["the"] + d.np.words())


def _lm(d: Description) -> str:
    assert d.landmark is not None
    return " ".join(["the"] + d.landmark.words())


def _region_words(d: Description) -> str:
    return REGION_PHRASE[d.region or ""]


# id -> (kind, held_out, render); render returns None when the template does not fit the description.
Template = tuple[str, bool, Callable[[Description], "str | None"]]
TEMPLATES: dict[str, Template] = {
    # --- training phrasings (also used in val/test)
    "T-attr-the": ("attr", False, lambda d: _np(d)),
    "T-attr-bare": ("attr", False, lambda d: " ".join(d.np.words())),
    "T-ext-adj": ("extreme", False, lambda d: f"the {EXT_ADJ[d.direction or '']} " + " ".join(d.np.words())),
    "T-ext-on": ("extreme", False, lambda d: f"{_np(d)} {EXT_PHRASE[d.direction or '']}"),
    "T-reg-in": ("region", False, lambda d: f"{_np(d)} in the {_region_words(d)}"),
    "T-rel": ("relation", False, lambda d: f"{_np(d)} {d.relation} {_lm(d)}"),
    "T-rel-that": ("relation", False, lambda d: f"{_np(d)} that is {d.relation} {_lm(d)}"),
    # --- held-out phrasings (val/test only): training words in new orders, plus "which"
    "H-attr-that": ("attr", True, lambda d: (" ".join(["the"] + d.np.words(with_colour=False)) + f" that is {d.np.colour}")
                    if d.np.colour else None),
    "H-attr-which": ("attr", True, lambda d: (" ".join(["the"] + d.np.words(with_size=False)) + f" which is {d.np.size}")
                     if d.np.size else None),
    "H-ext-that": ("extreme", True, lambda d: f"{_np(d)} that is {EXT_PHRASE[d.direction or '']}"),
    "H-ext-which": ("extreme", True, lambda d: f"{_np(d)} which is {EXT_ADJ[d.direction or '']}"),
    "H-reg-that": ("region", True, lambda d: f"{_np(d)} that is in the {_region_words(d)}"),
    "H-reg-front": ("region", True, lambda d: f"in the {_region_words(d)} {_np(d)}"),
    "H-rel-front": ("relation", True, lambda d: f"{d.relation} {_lm(d)} {_np(d)}"),
    "H-rel-to": ("relation", True, lambda d: f"{_np(d)} to the {d.relation.split()[0]} of {_lm(d)}"
                 if d.relation in ("left of", "right of") else None),
    "H-rel-which": ("relation", True, lambda d: f"{_np(d)} which is {d.relation} {_lm(d)}"),
}


def render(desc: Description, template: str) -> str | None:
    kind, _, fn = TEMPLATES[template]
    return fn(desc) if kind == desc.kind else None


def templates_for(kind: str, held_out: bool) -> list[str]:
    return [t for t, (k, h, _) in TEMPLATES.items() if k == kind and h == held_out]


def vocabulary_words() -> list[str]:
    """Every word a TRAIN template can produce, in a fixed order (the text vocabulary of a model
    trained on these scenes; held-out-only words are deliberately absent, so they map to UNK)."""
    words: list[str] = []
    for w in (["the", "shape", "that", "is", "in", "on", "at", "of", "corner", "middle", "to"]
              + list(SIZES) + list(COLOURS) + list(SHAPES) + list(EXT_ADJ.values())
              + [w for p in list(EXT_PHRASE.values()) + list(REGION_PHRASE.values()) + list(RELATIONS)
                 for w in p.split()]):
        if w not in words:
            words.append(w)
    return words


def held_out_unknown_words() -> list[str]:
    """Words that only held-out templates use (they are out of the training vocabulary)."""
    vocab = set(vocabulary_words())
    probe = Description("relation", NP("red", "circle", "small"), relation="left of", landmark=NP("blue", "star"))
    found: list[str] = []
    for tid, (kind, held, fn) in TEMPLATES.items():
        if not held:
            continue
        d = {"attr": Description("attr", NP("red", "circle", "small")),
             "extreme": Description("extreme", NP("red", "circle", "small"), direction="left"),
             "region": Description("region", NP("red", "circle", "small"), region="top left"),
             "relation": probe}[kind]
        for w in (fn(d) or "").split():
            if w not in vocab and w not in found:
                found.append(w)
    return found


# ----------------------------------------------------------------------------- drawing

def shape_polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` with circumradius ``r`` centred at (cx, cy), rotated by ``rot`` radians.
    Squares are axis-aligned and diamonds narrower than tall, so a small rotation cannot turn one
    into the other."""
    if shape == "circle":
        angles, radii, sx = [2 * math.pi * k / 48 for k in range(48)], [1.0] * 48, 1.0
    elif shape == "square":
        angles, radii, sx = [math.pi / 4 + k * math.pi / 2 for k in range(4)], [1.0] * 4, 1.0
    elif shape == "diamond":
        angles, radii, sx = [k * math.pi / 2 for k in range(4)], [1.0] * 4, 0.72
    elif shape == "triangle":
        angles, radii, sx = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)], [1.0] * 3, 1.0
    elif shape == "star":
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii, sx = [1.0 if k % 2 == 0 else 0.45 for k in range(10)], 1.0
    elif shape == "hexagon":
        angles, radii, sx = [k * math.pi / 3 for k in range(6)], [1.0] * 6, 1.0
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(rot), math.sin(rot)
    pts = []
    for a, q in zip(angles, radii):
        x, y = sx * q * r * math.cos(a), q * r * math.sin(a)
        pts.append((round(cx + c * x - s * y, 3), round(cy + s * x + c * y, 3)))
    return pts


def rasterise(polygon: Sequence[tuple[float, float]], h: int, w: int) -> np.ndarray:
    """The pixels of ``polygon``: the scenes are painted through exactly this mask, and it is the
    rasteriser evaluation applies to predicted polygons (pixels >= 50 % covered)."""
    return polygon_to_mask(polygon, h, w)


def raster_key() -> str:
    """A fingerprint of the rasteriser (part of the cache name: a change there changes every mask)."""
    import hashlib
    polys = [shape_polygon(sh, 20.3, 17.8, r, 0.1) for sh in SHAPES for r in (5.7, 13.2)]
    return hashlib.sha1(b"".join(np.packbits(rasterise(p, 40, 40)).tobytes() for p in polys)).hexdigest()[:8]


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight box of a mask in pixel-edge coordinates: (min col, min row, max col + 1, max row + 1)."""
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def object_rgb(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """The colour with per-object jitter, so that "red" is a range of reds, not one RGB triple."""
    h, s, v = HSV[colour]
    if colour == "white":
        s, v = rng.uniform(0.0, 0.08), rng.uniform(0.88, 1.0)
        h = rng.uniform(0, 360)
    else:
        h = (h + rng.uniform(-6, 6)) % 360
        s = float(np.clip(s * rng.uniform(0.85, 1.1), 0, 1))
        v = float(np.clip(v * rng.uniform(0.85, 1.04), 0, 1))
    r, g, b = colorsys.hsv_to_rgb(h / 360, s, v)
    return (int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5))


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Dull, low-saturation colour field: low-frequency colour noise plus a finer texture (float HxWx3).
    Kept darker and greyer than any object colour, so colour names stay unambiguous."""
    h, s, v = rng.uniform(0, 1), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.5)
    base = np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255

    def field(cells: int, amp: float) -> np.ndarray:
        f = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
        f = (np.clip(f, -2.5, 2.5) + 2.5) / 5 * 255
        up = np.asarray(Image.fromarray(f.astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32)
        return (up / 255 - 0.5) * 2 * amp

    lum = field(int(rng.integers(3, 6)), rng.uniform(15, 35)).mean(axis=2, keepdims=True)
    return base + 0.5 * field(int(rng.integers(3, 6)), rng.uniform(10, 30)) + lum \
        + field(int(rng.integers(10, 20)), rng.uniform(4, 12))


# ----------------------------------------------------------------------------- scenes

def _attrs(rng: np.random.Generator, colour: str | None = None, shape: str | None = None,
           size: str | None = None, not_colour: str | None = None, not_shape: str | None = None) -> tuple[str, str, str]:
    def pick(options: Sequence[str], fixed: str | None, banned: str | None) -> str:
        if fixed is not None:
            return fixed
        return str(rng.choice([o for o in options if o != banned]))
    return pick(COLOURS, colour, not_colour), pick(SHAPES, shape, not_shape), pick(SIZES, size, None)


def scene_attributes(rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(colour, shape, size) for the target (first) and its distractors: one with the same shape,
    one with the same colour, half of the time a same-colour-same-shape twin, then random ones,
    4-7 objects in all."""
    n = int(rng.integers(4, 8))
    tc, ts, tz = _attrs(rng)
    objs = [(tc, ts, tz), _attrs(rng, shape=ts, not_colour=tc), _attrs(rng, colour=tc, not_shape=ts)]
    if rng.random() < 0.5:
        objs.append(_attrs(rng, colour=tc, shape=ts, size=tz if rng.random() < 0.5 else None))
    while len(objs) < n:
        r = rng.random()
        objs.append(_attrs(rng, shape=ts if r < 0.25 else None, colour=tc if 0.25 <= r < 0.5 else None))
    return objs


def place(attrs: list[tuple[str, str, str]], size: int, rng: np.random.Generator) -> list[SceneObject] | None:
    """Random non-overlapping placement (circumcircles at least 3 px apart at 128 px); None if stuck."""
    gap = 3.0 * size / 128
    placed: list[tuple[float, float, float]] = []
    out: list[SceneObject] = []
    for colour, shape, sz in attrs:
        lo, hi = RADIUS[sz]
        r = float(rng.uniform(lo, hi) * size)
        for _ in range(200):
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all(math.hypot(cx - x, cy - y) > r + q + gap for x, y, q in placed):
                break
        else:
            return None
        placed.append((float(cx), float(cy), r))
        rot = 0.0 if shape == "circle" else float(rng.uniform(-0.14, 0.14))
        poly = shape_polygon(shape, float(cx), float(cy), r, rot)
        out.append(SceneObject(shape, colour, sz, (0.0, 0.0, 0.0, 0.0), poly, (float(cx), float(cy)), r,
                               object_rgb(colour, rng)))
    return out


def draw(objs: list[SceneObject], size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Paint the scene; fills in each object's tight box; returns the image and the object masks."""
    img = background(size, rng)
    masks = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for o in objs:
        m = rasterise(o.polygon, size, size)
        masks.append(m)
        o.box = mask_box(m)
        # a gentle linear shading across the object, so its pixels are not one flat colour
        a = rng.uniform(0, 2 * math.pi)
        ramp = 1 + rng.uniform(0, 0.12) * ((xx - o.centre[0]) * math.cos(a) + (yy - o.centre[1]) * math.sin(a)) / o.radius
        img[m] = np.asarray(o.rgb, np.float32)[None, :] * ramp[m][:, None]
    img += rng.normal(0, rng.uniform(2, 7), img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), masks


NP_OPTIONS = ((), ("colour",), ("shape",), ("colour", "shape"), ("size", "colour", "shape"),
              ("size", "shape"), ("size", "colour"))
KIND_WEIGHTS = {"attr": 0.2, "extreme": 0.3, "region": 0.15, "relation": 0.35}


def _np_of(o: SceneObject, attrs: Sequence[str]) -> NP:
    return NP(o.colour if "colour" in attrs else None, o.shape if "shape" in attrs else None,
              o.size if "size" in attrs else None)


def _landmark_np(objs: Sequence[SceneObject], j: int, rng: np.random.Generator) -> NP | None:
    """A short unique name for object ``j`` ("the blue star", else "the large blue star")."""
    opts = [_np_of(objs[j], a) for a in (("colour", "shape"), ("colour",), ("shape",), ("size", "colour", "shape"))]
    unique = [p for p in opts if sum(p.matches(o) for o in objs) == 1]
    if not unique:
        return None
    if unique[0].n_attrs == 2 and rng.random() < 0.7:
        return unique[0]
    return unique[int(rng.integers(len(unique)))]


def candidates(objs: Sequence[SceneObject], t: int, kind: str, rng: np.random.Generator) -> list[Description]:
    """All descriptions of ``kind`` for object ``t`` worth checking (not yet checked for uniqueness)."""
    nps = [_np_of(objs[t], a) for a in NP_OPTIONS]
    out: list[Description] = []
    if kind == "attr":
        out = [Description("attr", p) for p in nps if p.n_attrs]
    elif kind == "extreme":  # only when the phrase has >= 2 candidates, so the direction does work
        out = [Description("extreme", p, direction=d) for p in nps for d in DIRECTIONS
               if sum(p.matches(o) for o in objs) >= 2]
    elif kind == "region":
        out = [Description("region", p, region=r) for p in nps for r in REGIONS if p.n_attrs]
    elif kind == "relation":
        for j in range(len(objs)):
            if j == t or (lm := _landmark_np(objs, j, rng)) is None:
                continue
            out += [Description("relation", p, relation=r, landmark=lm) for p in nps for r in RELATIONS]
    return out


def describe(objs: Sequence[SceneObject], t: int, size: int, rng: np.random.Generator,
             held_out: bool) -> tuple[Description, str, str] | None:
    """A description of ``objs[t]`` that resolves to it alone, rendered with a template of the
    requested pool: (description, template id, expression), or None if there is none."""
    kinds = list(KIND_WEIGHTS)
    w = np.array([KIND_WEIGHTS[k] for k in kinds])
    order = [kinds[i] for i in rng.choice(len(kinds), size=len(kinds), replace=False, p=w / w.sum())]
    for kind in order:
        tids = templates_for(kind, held_out)
        ok = [d for d in candidates(objs, t, kind, rng) if resolve(d, objs, size) == t
              and any(render(d, tid) is not None for tid in tids)]
        if not ok:
            continue
        if rng.random() < 0.5:  # half of the time the most economical description: every word needed
            fewest = min(d.np.n_attrs for d in ok)
            ok = [d for d in ok if d.np.n_attrs == fewest]
        d = ok[int(rng.integers(len(ok)))]
        fits = [tid for tid in tids if render(d, tid) is not None]
        tid = fits[int(rng.integers(len(fits)))]
        return d, tid, render(d, tid) or ""
    return None


def make_sample(split: str, index: int, seed: int, size: int = 128, held_out: bool = False) -> Sample:
    """Sample ``index`` of a split: a pure function of (seed, index, size, held_out)."""
    rng = np.random.default_rng([seed, index, size])
    for _ in range(100):
        attrs = scene_attributes(rng)
        objs = place(attrs, size, rng)
        if objs is None:
            continue
        got = describe(objs, 0, size, rng, held_out)
        if got is None:
            continue
        perm = rng.permutation(len(objs))
        objs = [objs[i] for i in perm]
        target = int(np.argmin(perm))  # where the target (object 0) went
        image, masks = draw(objs, size, rng)
        d, tid, expr = got
        o = objs[target]
        return Sample(image, expr, target, objs, o.box, list(o.polygon), masks[target], tid, held_out, d,
                      split, index)
    raise RuntimeError(f"no describable scene for {split} {index} after 100 tries")


def _held_out_flags(split: str, n: int, seed: int, held_out_phrasings: bool | None) -> list[bool]:
    if held_out_phrasings is None:
        if split == "train":
            return [False] * n
        rng = np.random.default_rng([seed, 7_777_777])
        return [bool(v) for v in rng.random(n) < HELD_OUT_FRACTION]
    if held_out_phrasings and split == "train":
        raise ValueError("held-out phrasings never appear in the train split")
    return [bool(held_out_phrasings)] * n


def _chunk(args: tuple[str, int, int, int, int, list[bool]]) -> list[Sample]:
    split, start, seed, size, _, flags = args
    return [make_sample(split, start + k, seed, size, f) for k, f in enumerate(flags)]


def generate(split: str, n: int, seed: int | None = None, size: int = 128,
             held_out_phrasings: bool | None = None, workers: int | None = None) -> list[Sample]:
    """``n`` samples of ``split`` (train / val / test), deterministic.

    ``seed`` defaults to the split's own (:data:`SEEDS`: disjoint scenes per split).
    ``held_out_phrasings``: None = the split's default (train: never; val/test: a random
    :data:`HELD_OUT_FRACTION` of the samples), True = all held-out (not allowed for train),
    False = training phrasings only.  Sample ``i`` does not depend on ``n`` or on ``workers``
    (default: 2 processes from 2,000 samples up, ``ANYTIME_SCENE_WORKERS`` overrides)."""
    if split not in SEEDS:
        raise ValueError(f"split must be one of {sorted(SEEDS)}")
    seed = SEEDS[split] if seed is None else int(seed)
    flags = _held_out_flags(split, n, seed, held_out_phrasings)
    if workers is None:
        workers = int(os.environ.get("ANYTIME_SCENE_WORKERS", "2")) if n >= 2000 else 1
    if workers <= 1:
        return _chunk((split, 0, seed, size, n, flags))
    step = 500
    jobs = [(split, s, seed, size, n, flags[s:s + step]) for s in range(0, n, step)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
        return [s for part in ex.map(_chunk, jobs) for s in part]


MAX_VERTICES = 48  # the circle's polygon; every other shape has fewer


@dataclass
class SceneArrays:
    """A split in compact arrays (what training needs: the target's pixels, text, box and polygon).

    A 40k pool of full :class:`Sample` objects would hold 7 masks' worth of memory per scene;
    here a mask is re-rasterised from its polygon on demand (:meth:`mask`)."""

    images: np.ndarray  # N x H x W x 3 uint8
    expressions: list[str]
    boxes: np.ndarray  # N x 4 float32, target boxes
    polygons: np.ndarray  # N x MAX_VERTICES x 2 float32, NaN-padded
    n_vertices: np.ndarray  # N int16
    phrasing: list[str]
    held_out: np.ndarray  # N bool
    source: dict

    def __len__(self) -> int:
        return len(self.expressions)

    def polygon(self, i: int) -> list[tuple[float, float]]:
        return [(float(x), float(y)) for x, y in self.polygons[i, : int(self.n_vertices[i])]]

    def mask(self, i: int) -> np.ndarray:
        h, w = self.images.shape[1:3]
        return rasterise(self.polygon(i), h, w)


def _to_arrays(samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    n = len(samples)
    polys = np.full((n, MAX_VERTICES, 2), np.nan, np.float32)
    for k, s in enumerate(samples):
        polys[k, : len(s.polygon)] = s.polygon
    return {"images": np.stack([s.image for s in samples]) if n else np.zeros((0, 0, 0, 3), np.uint8),
            "expressions": np.array([s.expression for s in samples], dtype=np.str_),
            "boxes": np.array([s.box for s in samples], np.float32).reshape(n, 4), "polygons": polys,
            "n_vertices": np.array([len(s.polygon) for s in samples], np.int16),
            "phrasing": np.array([s.phrasing for s in samples], dtype=np.str_),
            "held_out": np.array([s.held_out for s in samples], bool)}


def colour_decisive(sample: Sample) -> bool:
    """Does the expression name a colour that is *needed*: without it (in the target's or the
    landmark's phrase) the description no longer picks the target alone?  A training pool of such
    samples (``load_arrays(..., select="colour")``) puts more of the gradient on colour words."""
    d = sample.desc
    if d is None:
        return False
    size = sample.image.shape[0]
    if d.np.colour is not None and resolve(replace(d, np=replace(d.np, colour=None)), sample.objects, size) != sample.target:
        return True
    return (d.landmark is not None and d.landmark.colour is not None
            and resolve(replace(d, landmark=replace(d.landmark, colour=None)), sample.objects, size) != sample.target)


SELECT = {"colour": colour_decisive}


def _chunk_arrays(args: tuple[str, int, int, int, int, list[bool]], select: str | None = None) -> dict[str, np.ndarray]:
    samples = _chunk(args)
    return _to_arrays([x for x in samples if SELECT[select](x)] if select else samples)


def _chunk_colour(args: tuple[str, int, int, int, int, list[bool]]) -> dict[str, np.ndarray]:
    return _chunk_arrays(args, "colour")


def default_cache_dir() -> Path:
    return Path(os.environ.get("ANYTIME_DATA_DIR", "data")) / "seqtr-scenes"


def load_arrays(split: str, n: int, seed: int | None = None, size: int = 128,
                held_out_phrasings: bool | None = None, cache_dir: Path | None = None,
                workers: int | None = None, select: str | None = None) -> SceneArrays:
    """``generate(split, n, ...)`` as :class:`SceneArrays`, cached as ``.npz`` under
    ``data/seqtr-scenes`` (git-ignored; ``ANYTIME_DATA_DIR`` moves ``data/``).  The file name
    carries everything the samples depend on, including :data:`GENERATOR_VERSION`; a cached
    larger ``n`` is sliced (sample ``i`` does not depend on ``n``).

    ``select="colour"`` keeps only the :func:`colour_decisive` ones of the ``n`` generated
    samples (so fewer than ``n`` come back; only an exact ``n`` is reused from the cache)."""
    if split not in SEEDS:
        raise ValueError(f"split must be one of {sorted(SEEDS)}")
    seed = SEEDS[split] if seed is None else int(seed)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    held = {None: "d", True: "y", False: "n"}[held_out_phrasings]
    stem = f"{split}-s{seed}-{size}px-g{GENERATOR_VERSION}-r{raster_key()}-h{held}" + (f"-{select}" if select else "")
    source = {"generator": "models.seqtr.scenes", "generator_version": GENERATOR_VERSION, "split": split,
              "seed": seed, "n": n, "size": size, "held_out_phrasings": held_out_phrasings,
              "raster_key": raster_key(), "select": select,
              "held_out_fraction": HELD_OUT_FRACTION if held_out_phrasings is None and split != "train" else None}
    found = sorted((p for p in cache_dir.glob(stem + "-n*.npz")
                    if (int(p.stem.rsplit("-n", 1)[1]) >= n if not select else p.stem.endswith(f"-n{n}"))),
                   key=lambda p: int(p.stem.rsplit("-n", 1)[1])) if cache_dir.is_dir() else []
    z = dict(np.load(found[0])) if found else {}  # the held-out flags are prefix-stable too
    if not z:
        flags = _held_out_flags(split, n, seed, held_out_phrasings)
        if workers is None:
            workers = int(os.environ.get("ANYTIME_SCENE_WORKERS", "2")) if n >= 2000 else 1
        jobs = [(split, s0, seed, size, n, flags[s0:s0 + 500]) for s0 in range(0, n, 500)]
        fn = {None: _chunk_arrays, "colour": _chunk_colour}[select]
        if workers <= 1:
            parts = [fn(j) for j in jobs]
        else:
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
                parts = list(ex.map(fn, jobs))
        parts = [p for p in parts if len(p["expressions"])]  # a selective chunk may keep nothing
        z = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else _to_arrays([])
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f"{stem}-n{n}.tmp.npz"
        np.savez(tmp, **z)
        tmp.replace(cache_dir / f"{stem}-n{n}.npz")
    return SceneArrays(z["images"][:n], [str(e) for e in z["expressions"][:n]], z["boxes"][:n],
                       z["polygons"][:n], z["n_vertices"][:n], [str(p) for p in z["phrasing"][:n]],
                       z["held_out"][:n], source)


def wrong_description(sample: Sample, rng: np.random.Generator) -> tuple[Description, str, str, int]:
    """A description of a *different* object of the scene that resolves to it alone, phrased
    from the same pool as ``sample`` when possible: (description, template id, expression, index)."""
    size = sample.image.shape[0]
    others = [j for j in range(len(sample.objects)) if j != sample.target]
    for j in rng.permutation(others):
        for held in (sample.held_out, not sample.held_out):
            got = describe(sample.objects, int(j), size, rng, held)
            if got is not None:
                return got[0], got[1], got[2], int(j)
    raise RuntimeError("no other object of this scene can be described uniquely")


def wrong_expression(sample: Sample, rng: np.random.Generator) -> tuple[str, int]:
    """An expression that uniquely refers to a *different* object of the same scene:
    (expression, its object index).  Used to check that a model's answer depends on the
    words, not only on the image."""
    _, _, expr, j = wrong_description(sample, rng)
    return expr, j


# ----------------------------------------------------------------------------- eyeballing

def save_preview(sample: Sample, path: Path, scale: int = 3) -> None:
    """The scene enlarged, the target box in red, the expression written underneath."""
    h, w = sample.image.shape[:2]
    im = Image.fromarray(sample.image).resize((w * scale, h * scale), Image.NEAREST)
    canvas = Image.new("RGB", (w * scale, h * scale + 28), (255, 255, 255))
    canvas.paste(im, (0, 0))
    d = ImageDraw.Draw(canvas)
    x1, y1, x2, y2 = (v * scale for v in sample.box)
    d.rectangle([x1 - 1, y1 - 1, x2, y2], outline=(255, 0, 0), width=2)
    d.text((4, h * scale + 2), sample.expression, fill=(0, 0, 0))
    d.text((4, h * scale + 15), f"{sample.phrasing}{' (held out)' if sample.held_out else ''}", fill=(90, 90, 90))
    canvas.save(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write preview PNGs of synthetic SeqTR scenes.")
    ap.add_argument("--split", default="test", choices=sorted(SEEDS))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--held-out", choices=("default", "yes", "no"), default="default")
    ap.add_argument("--out", type=Path, default=Path("/tmp/scenes"))
    args = ap.parse_args(argv)
    held = {"default": None, "yes": True, "no": False}[args.held_out]
    args.out.mkdir(parents=True, exist_ok=True)
    for s in generate(args.split, args.n, args.seed, args.size, held):
        p = args.out / f"{args.split}-{s.index:05d}.png"
        save_preview(s, p)
        print(f"{p}: {s.expression!r} [{s.phrasing}] target {s.target} of {len(s.objects)}")


if __name__ == "__main__":
    main()
