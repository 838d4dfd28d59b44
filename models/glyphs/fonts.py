"""Font discovery, vetting and the family split for the glyph data set.

Fonts come only from the Debian packages in ``PACKAGES`` (their directories, not every
font on the machine), so the set is the same wherever those packages are installed and a
stray font elsewhere cannot change a split.  Every file is vetted: each character of the
class set must render non-empty and unlike the font's .notdef box, characters of different
classes must not render alike, lower case must not be small capitals and glyphs must not
fill their boxes (that rejects other scripts, symbol, caps-only, small-caps and inverted
fonts).  A few families pass those checks and are still wrong for the task (Greek letters
on Latin keys, ruled school-copybook lines); they are in ``EXCLUDED_FAMILIES`` with the
reason.

The split unit is a *design group*, not a file or a raw family name: families whose names
differ only in width, weight, optical size or a Mono/Display suffix are one group, and so
are clones and forks (``LINEAGES``: Nimbus Sans, TeX Gyre Heros and FreeSans; Carlito and
Lato; ...) and families that render alike, so a test design is never seen in training under
another name.  Groups are ranked by a hash of their name and cut 15% test / 15% val / 70%
train (``assign_splits``).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models.glyphs.classes import ALL_CHARS, CLASS_CHARS

DATA_DIR = Path(os.environ.get("ANYTIME_DATA_DIR", Path(__file__).resolve().parents[2] / "data"))
INDEX_VERSION = 3  # bump when vetting or grouping changes: invalidates the cached index
FONT_EXTS = (".ttf", ".otf", ".pfb")
RENDER_PX = 64  # font size of the vetting renders and of the glyph masks
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}


@dataclass(frozen=True)
class FontPackage:
    """A Debian package whose fonts are used, where it puts them and its licence."""

    name: str
    kind: str
    licence: str
    dirs: tuple[str, ...]
    files: tuple[str, ...] = ("*",)  # file name patterns, for directories shared by packages


_F = "/usr/share/fonts/"
_T = "/usr/share/texmf/fonts/opentype/public/"

PACKAGES: tuple[FontPackage, ...] = (
    # serif
    FontPackage("fonts-dejavu-core", "sans/serif/mono", "Bitstream Vera licence", (_F + "truetype/dejavu",),
                tuple(f"DejaVu{n}.ttf" for n in ("Sans", "Sans-Bold", "SansMono", "SansMono-Bold", "Serif",
                                                 "Serif-Bold"))),
    FontPackage("fonts-dejavu-extra", "sans/serif/mono", "Bitstream Vera licence", (_F + "truetype/dejavu",)),
    FontPackage("fonts-liberation2", "sans/serif/mono", "OFL-1.1", (_F + "truetype/liberation2",)),
    FontPackage("fonts-freefont-ttf", "sans/serif/mono", "GPL-3+ with font exception", (_F + "truetype/freefont",)),
    FontPackage("fonts-urw-base35", "serif/sans/mono/script", "AGPL-3 with font exception",
                (_F + "opentype/urw-base35",)),
    FontPackage("fonts-texgyre", "serif/sans/mono/script", "GUST Font License", (_T + "tex-gyre",)),
    FontPackage("fonts-lmodern", "serif/sans/mono", "GUST Font License", (_T + "lm",)),
    FontPackage("fonts-croscore", "sans/serif/mono", "OFL-1.1", (_F + "truetype/croscore",)),
    FontPackage("fonts-crosextra-caladea", "serif", "Apache-2.0", (_F + "truetype/crosextra",), ("Caladea-*",)),
    FontPackage("fonts-crosextra-carlito", "sans", "OFL-1.1", (_F + "truetype/crosextra",), ("Carlito-*",)),
    FontPackage("fonts-ebgaramond", "serif", "OFL-1.1", (_F + "opentype/ebgaramond",)),
    FontPackage("fonts-linuxlibertine", "serif/sans", "GPL-2+ with font exception, OFL-1.1",
                (_F + "opentype/linux-libertine",)),
    FontPackage("fonts-sil-gentiumplus", "serif", "OFL-1.1", (_F + "truetype/gentiumplus",)),
    FontPackage("fonts-sil-charis", "serif", "OFL-1.1", (_F + "truetype/charis",)),
    FontPackage("fonts-cardo", "serif", "OFL-1.1", (_F + "truetype/cardo",)),
    FontPackage("fonts-vollkorn", "serif", "OFL-1.1", (_F + "truetype/vollkorn",)),
    FontPackage("fonts-oldstandard", "serif", "OFL-1.0", (_F + "truetype/fonts-oldstandard",)),
    FontPackage("fonts-goudybookletter", "serif", "public domain", (_F + "opentype/sortsmill",)),
    FontPackage("fonts-yrsa-rasa", "serif", "OFL-1.1", (_F + "truetype/fonts-yrsa-rasa",)),
    FontPackage("fonts-century-catalogue", "serif", "OFL-1.0", (_F + "truetype/fonts-century-catalogue",)),
    FontPackage("fonts-prociono", "serif", "public domain", (_F + "opentype/fonts-prociono",)),
    FontPackage("fonts-paratype", "sans/serif/mono", "ParaType Free Font Licence", (_F + "truetype/paratype",)),
    FontPackage("fonts-linex", "serif/sans/script", "GPL-2+", (_F + "truetype/linex",)),
    FontPackage("fonts-junicode", "serif", "OFL-1.1", (_F + "opentype/junicode",)),
    FontPackage("fonts-arkpandora", "sans/serif", "Bitstream Vera licence", (_F + "truetype/arkpandora",)),
    FontPackage("fonts-noto-mono", "mono", "OFL-1.1", (_F + "truetype/noto",), ("NotoMono-*", "NotoSansMono-*")),
    FontPackage("fonts-noto-core", "sans/serif", "OFL-1.1", (_F + "truetype/noto",)),
    *(FontPackage(f"fonts-adf-{n}", "serif/sans", "GPL-2+ with font exception", (_F + "truetype/adf",),
                  (n.capitalize() + "*",))
      for n in ("accanthis", "baskervald", "berenis", "gillius", "ikarius", "irianis", "libris", "mekanus",
                "oldania", "romande", "switzera", "tribun", "universalis", "verana")),
    # sans
    FontPackage("fonts-cantarell", "sans", "OFL-1.1", (_F + "opentype/cantarell",)),
    FontPackage("fonts-open-sans", "sans", "Apache-2.0", (_F + "truetype/open-sans",)),
    FontPackage("fonts-roboto-unhinted", "sans", "Apache-2.0", (_F + "truetype/roboto",)),
    FontPackage("fonts-lato", "sans", "OFL-1.1", (_F + "truetype/lato",)),
    FontPackage("fonts-inter", "sans", "OFL-1.1", (_F + "opentype/inter",)),
    FontPackage("fonts-cabin", "sans", "OFL-1.1", (_F + "opentype/cabin",)),
    FontPackage("fonts-dosis", "sans", "OFL-1.1", (_F + "opentype/dosis",)),
    FontPackage("fonts-quicksand", "sans", "OFL-1.1", (_F + "truetype/quicksand",)),
    FontPackage("fonts-comfortaa", "sans", "OFL-1.1", (_F + "truetype/comfortaa",)),
    FontPackage("fonts-league-spartan", "sans", "OFL-1.1", (_F + "opentype/league-spartan",)),
    FontPackage("fonts-sil-andika", "sans", "OFL-1.1", (_F + "truetype/andika",)),
    FontPackage("fonts-b612", "sans/mono", "OFL-1.1, EPL-2.0, EDL-1.0", (_F + "opentype/b612",)),
    FontPackage("fonts-jura", "sans", "GPL-3 or OFL-1.1", (_F + "opentype/jura",)),
    FontPackage("fonts-play", "sans", "OFL-1.1", (_F + "truetype/play",)),
    FontPackage("fonts-yanone-kaffeesatz", "sans", "OFL-1.1", (_F + "opentype/yanone-kaffeesatz",)),
    FontPackage("fonts-averia-gwf", "sans/serif", "OFL-1.1", (_F + "truetype/averia-gwf",), ("AveriaGWF-*",)),
    FontPackage("fonts-averia-sans-gwf", "sans", "OFL-1.1", (_F + "truetype/averia-gwf",), ("AveriaSansGWF-*",)),
    FontPackage("fonts-averia-serif-gwf", "serif", "OFL-1.1", (_F + "truetype/averia-gwf",),
                ("AveriaSerifGWF-*",)),
    FontPackage("fonts-tuffy", "sans", "public domain", (_F + "truetype/tuffy",)),
    FontPackage("fonts-go", "sans/mono", "BSD-3-Clause", (_F + "fonts-go",)),
    FontPackage("fonts-millimetre", "sans", "OFL-1.1", (_F + "opentype/millimetre",)),
    FontPackage("fonts-routed-gothic", "sans", "OFL-1.1", (_F + "truetype/routed-gothic",)),
    FontPackage("fonts-okolaks", "sans", "OFL-1.1", (_F + "truetype/okolaks",)),
    FontPackage("fonts-beteckna", "sans", "GPL-3", (_F + "truetype/beteckna",)),
    # monospaced
    FontPackage("fonts-hack", "mono", "MIT and Bitstream Vera licence", (_F + "truetype/hack",)),
    FontPackage("fonts-inconsolata", "mono", "OFL-1.0", (_F + "truetype/inconsolata",)),
    FontPackage("fonts-firacode", "mono", "OFL-1.1", (_F + "truetype/firacode",)),
    FontPackage("fonts-jetbrains-mono", "mono", "Apache-2.0", (_F + "truetype/jetbrains-mono",)),
    FontPackage("fonts-anonymous-pro", "mono", "OFL-1.1", (_F + "truetype/anonymous-pro",)),
    FontPackage("fonts-mononoki", "mono", "OFL-1.1", (_F + "truetype/mononoki",)),
    FontPackage("fonts-monoid", "mono", "MIT or OFL-1.1", (_F + "truetype/monoid",)),
    FontPackage("fonts-courier-prime", "mono", "OFL-1.1", (_F + "opentype/courier-prime",)),
    FontPackage("fonts-agave", "mono", "MIT", (_F + "truetype/agave",)),
    FontPackage("fonts-hermit", "mono", "OFL-1.1", (_F + "truetype/hermit",)),
    FontPackage("fonts-3270", "mono", "BSD-3-Clause or OFL-1.1", (_F + "truetype/3270",)),
    FontPackage("fonts-fantasque-sans", "mono", "OFL-1.1", (_F + "truetype/fantasque-sans/Normal",)),
    FontPackage("fonts-ocr-a", "mono", "public domain", (_F + "truetype/ocr-a",)),
    FontPackage("fonts-ocr-b", "mono", "public domain", (_F + "opentype/ocr-b",)),
    # handwriting and script
    FontPackage("fonts-comic-neue", "handwriting", "OFL-1.1", (_F + "opentype/comic-neue",)),
    FontPackage("fonts-dkg-handwriting", "handwriting", "GPL-3+ (OFL-1.1 source)", (_F + "truetype/fifthhorseman",)),
    FontPackage("fonts-dancingscript", "script", "OFL-1.1", (_F + "opentype/dancingscript",)),
    FontPackage("fonts-kristi", "script", "OFL-1.1", (_F + "truetype/kristi",)),
    FontPackage("fonts-isabella", "script", "LGPL-2+", (_F + "truetype/isabella",)),
    FontPackage("fonts-femkeklaver", "handwriting", "CC-BY-SA-3.0", (_F + "truetype/femkeklaver",)),
    FontPackage("fonts-breip", "handwriting", "OFL-1.0", (_F + "truetype/breip",)),
    FontPackage("fonts-klaudia-berenika", "serif/script", "OFL-1.1", (_F + "truetype/klaudia-berenika",)),
    FontPackage("fonts-lobster", "script", "OFL-1.1", (_F + "opentype/lobster",)),
    FontPackage("fonts-lobstertwo", "script", "OFL-1.1", (_F + "opentype/lobstertwo",)),
    FontPackage("fonts-ecolier-court", "handwriting", "OFL-1.1", (_F + "truetype/ecolier-court",)),
    # display
    FontPackage("fonts-blankenburg", "blackletter", "OFL-1.1", (_F + "truetype/blankenburg",)),
    FontPackage("fonts-dustin", "display", "GPL-2+", (_F + "truetype/dustin",)),
)
INSTALL_HINT = "apt-get install -y " + " ".join(p.name for p in PACKAGES) + "   (or: make data)"

# Families that pass the rendering checks but are wrong for a Latin character task.
EXCLUDED_FAMILIES: dict[str, str] = {
    "Alfa-beta": "Greek letters on Latin keys",
    "Ellhnikh": "Greek letters on Latin keys",
    "Abecedario_guiada": "copybook guide lines drawn with every glyph",
    "Abecedario_pautada": "copybook ruled lines drawn with every glyph",
    "Abecedario_punt-guiada": "dotted copybook glyphs with guide lines",
    "Abecedario_punt-pautada": "dotted copybook glyphs with ruled lines",
    "Abecedario_punteada": "dotted tracing glyphs",
    "It wasn't me": "several letters drawn unlike themselves (Q as M)",
}
# Symbol, math, ornament, small-caps, titling (capitals only) and inverted (white on a
# black box) families by name, so they are not even rendered (Noto's fonts for other
# scripts are rejected by the glyph check instead; the checks in ``vet`` catch the rest).
EXCLUDED_NAME = re.compile(r"Symbol|Dingbat|Math|Music|Emoji|Icons|Keyboard|Initials|PHON|Braille|Halflings"
                           r"|D050000L|Smallcaps|Caps\b|\bSC\b|Titling|ADF Style|Inverted", re.IGNORECASE)
# Words that name a width, weight, optical size or companion of a design, not a design.
_STYLE_WORDS = {
    "mono", "monospace", "condensed", "semi-condensed", "semicondensed", "narrow", "wide", "extended",
    "display", "caption", "text", "book", "thin", "light", "extralight", "medium", "semibold", "demi",
    "bold", "black", "heavy", "italic", "oblique", "titling", "std", "pro", "no2", "no3", "style",
    "half", "code", "minus", "ui", "plus", "unhinted", "regular", "lt", "dunhill", "slanted",
    "unslanted", "quotation", "prop", "cond", "two", "beta", "o", "ps", "tt", "sil", "adf", "gwf",
    "script", "cn",
}
_GLUED = re.compile(r"(?<=[A-Za-z0-9]{3})(Bold|Italic|Oblique|Condensed|Light|Regular|Mono|GS)$")
# Families that are one design under several names (metric clones, re-releases, forks)
# which the visual check misses because their weights differ.
LINEAGES: dict[str, re.Pattern[str]] = {name: re.compile(rx) for name, rx in {
    "Helvetica-like": r"^(Nimbus Sans( Narrow)?|TeX Gyre Heros( Cn)?|FreeSans|Arimo|Liberation Sans( Narrow)?)$",
    "Times-like": r"^(Nimbus Roman|TeX Gyre Termes|FreeSerif|Tymes|Tinos|Liberation Serif)$",
    "Courier-like": r"^(Nimbus Mono PS|TeX Gyre Cursor|FreeMono|Courier Prime.*)$",
    "Palatino-like": r"^(P052|TeX Gyre Pagella)$",
    "Century Schoolbook-like": r"^(C059|TeX Gyre Schola)$",
    "Bookman-like": r"^(URW Bookman|TeX Gyre Bonum)$",
    "Avant Garde-like": r"^(URW Gothic|TeX Gyre Adventor)$",
    "Zapf Chancery-like": r"^(Z003|TeX Gyre Chorus)$",
    "Bitstream Vera Sans": r"^(DejaVu Sans( Mono)?|Hack|Aerial( Mono)?|Veranda|Verana Sans.*|sans)$",
    "Bitstream Vera Serif": r"^(DejaVu Serif|Verana)$",
    "Open Sans / Noto Sans": r"^(Open Sans.*|Noto Sans(?! Mono).*|Noto Traditional Nushu)$",
    "Noto Serif": r"^Noto Serif.*$",
    "Droid Sans Mono": r"^(Noto Mono|Noto Sans Mono)$",
    "Lato": r"^(Lato|Carlito)$",
    "Computer Modern": r"^(Latin Modern|LM ).*$",
    "Liberation Mono": r"^(Cousine|Liberation Mono)$",
}.items()}
CLONE_THRESHOLD = 0.11  # mean relative difference of two families' fitted glyphs
# Pairs of different classes that honest text fonts may draw alike once fitted to a box (a
# sans-serif I and l are both a bar, a geometric 0 is an O); any other pair drawn alike
# marks a caps-only, small-caps or broken font.
ALLOWED_ALIKE = {frozenset(p) for p in ("Il", "1l", "1I", "0O", "0o", "1i", "il", "Ii", "Jj", "Kk", "Pp", "Yy",
                                        "Ll", "Ij", "Jl", "9g", "qg", "6b", "5S", "5s", "nu", "dp", "bq")}
ALIKE_THRESHOLD = 0.03  # relative difference of two characters' fitted masks
# Lower case letters whose shape differs from the capital's in every text font; if they
# are, at the median, this close to their capitals, the font has small caps for lower case.
SMALL_CAPS_LETTERS = "abdeghnqrty"
SMALL_CAPS_THRESHOLD = 0.15  # text fonts: 0.21 (Millimetre Extrablack) and up; small caps 0.11-0.21
MAX_INK = 0.78  # mean ink of the glyph boxes: black weights reach 0.74, inverted (boxed) fonts 0.81
NOTDEF_PROBES = ("\U0010fffd", "\U000f0000", "\ue000")


@dataclass(frozen=True)
class FontFile:
    """One vetted font file."""

    path: str
    family: str  # the font's own family name (Pillow's getname()[0])
    style: str
    package: str


@dataclass(frozen=True)
class DesignGroup:
    """The split unit: one design, possibly several family names and files."""

    name: str
    split: str
    families: tuple[str, ...]
    files: tuple[FontFile, ...]


def stem(family: str) -> str:
    """A family name without its width / weight / optical-size / companion words.

    >>> stem("DejaVu Sans Mono"), stem("LM Roman 10"), stem("Accanthis ADF Std No2"), stem("OCRABold")
    ('DejaVu Sans', 'LM Roman', 'Accanthis', 'OCRA')
    """
    words = []
    for w in family.replace("_", " ").split():
        while _GLUED.search(w):
            w = _GLUED.sub("", w)
        if w.lower() not in _STYLE_WORDS and not w.isdigit():
            words.append(w)
    return " ".join(words) or family


def lineage(family: str) -> str | None:
    for name, rx in LINEAGES.items():
        if rx.match(family):
            return name
    return None


def relative_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| / (|a| + |b|) of fitted masks (..., h, w): 0 for the same drawing, 1 for
    disjoint ones and, unlike a plain pixel difference, not smaller for thin strokes."""
    a = a.reshape(*a.shape[:-2], -1)
    b = b.reshape(*b.shape[:-2], -1)
    return np.abs(a - b).sum(-1) / (a.sum(-1) + b.sum(-1) + 1e-6)


def assign_splits(groups: Iterable[str]) -> dict[str, str]:
    """train / val / test per design group: the groups ranked by a hash of their name, the
    first 15% to test, the next 15% to val, the rest to train.  Exact shares, because a
    hash threshold per group left 9 of 124 groups in val; adding a package moves only the
    groups next to the two cut points."""
    ranked = sorted(set(groups), key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    n_test = round(len(ranked) * SPLIT_FRACTIONS["test"])
    n_val = round(len(ranked) * SPLIT_FRACTIONS["val"])
    return {g: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, g in enumerate(ranked)}


def scan(packages: Sequence[FontPackage] = PACKAGES) -> list[tuple[Path, str]]:
    """(font file, package) for the packages' files, sorted, symlinks resolved, each file
    once (claimed by the first package whose directory and name pattern match it)."""
    owner: dict[Path, str] = {}
    for pkg in packages:
        for d in pkg.dirs:
            root = Path(d)
            if not root.is_dir():
                continue
            for p in sorted(root.rglob("*")):
                if (p.suffix.lower() in FONT_EXTS and p.is_file()
                        and any(fnmatch.fnmatchcase(p.name, pat) for pat in pkg.files)):
                    owner.setdefault(p.resolve(), pkg.name)
    return sorted(owner.items())


@lru_cache(maxsize=64)
def load_font(path: str, px: int = RENDER_PX) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, px)


def glyph_mask(font: ImageFont.FreeTypeFont, ch: str) -> np.ndarray:
    """The character's ink as uint8, cropped to its bounding box (shape (0, 0) if none)."""
    left, top, right, bottom = font.getbbox(ch)
    pad = int(font.size) // 4  # some fonts draw a little outside the box they report
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    if right <= left or bottom <= top:
        return np.zeros((0, 0), np.uint8)
    im = Image.new("L", (w, h), 0)
    ImageDraw.Draw(im).text((pad - left, pad - top), ch, font=font, fill=255)
    box = im.getbbox()
    return np.zeros((0, 0), np.uint8) if box is None else np.asarray(im.crop(box))


def fit(mask: np.ndarray, n: int = 24) -> np.ndarray:
    """A mask fitted (aspect kept, centred) into an n x n float32 square in [0, 1]: how a
    glyph looks once scaled to the canvas, as the samples are."""
    out = np.zeros((n, n), np.float32)
    if mask.size == 0:
        return out
    h, w = mask.shape
    s = n / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.Resampling.BOX), np.float32) / 255.0
    y, x = (n - nh) // 2, (n - nw) // 2
    out[y:y + nh, x:x + nw] = small
    return out


def vet(path: str, chars: str = ALL_CHARS) -> tuple[str | None, np.ndarray | None]:
    """(None, fitted masks of ``chars``) for a usable font, else (the reason, None)."""
    try:
        font = load_font(path)
    except OSError as e:
        return f"unreadable: {e}", None
    notdefs = [glyph_mask(font, p) for p in NOTDEF_PROBES]
    masks, raw = [], []
    for ch in chars:
        m = glyph_mask(font, ch)
        if m.size == 0 or m.max() < 128:
            return f"no ink for {ch!r}", None
        if any(m.shape == nd.shape and np.array_equal(m, nd) for nd in notdefs):
            return f"{ch!r} renders as .notdef", None
        masks.append(fit(m))
        raw.append(m)
    fitted = np.stack(masks)
    same = alike_pairs(fitted, chars)
    if same:
        return "renders alike: " + " ".join(same[:8]), None
    if all(c in chars and c.upper() in chars for c in SMALL_CAPS_LETTERS):
        d = [float(relative_distance(fitted[chars.index(c)], fitted[chars.index(c.upper())]))
             for c in SMALL_CAPS_LETTERS]
        if np.median(d) < SMALL_CAPS_THRESHOLD:
            return f"small caps or capitals for lower case (median distance {np.median(d):.2f})", None
    if np.mean([m.mean() / 255.0 for m in raw]) > MAX_INK:
        return "glyphs fill their boxes (inverted or boxed)", None
    return None, fitted


def alike_pairs(fitted: np.ndarray, chars: str) -> list[str]:
    """Pairs of characters of different classes, not in ALLOWED_ALIKE, drawn alike."""
    label = {ch: i for i, cc in enumerate(CLASS_CHARS) for ch in cc}
    out = []
    for i in range(len(chars) - 1):
        d = relative_distance(fitted[i], fitted[i + 1:])
        for j in np.nonzero(d < ALIKE_THRESHOLD)[0] + i + 1:
            a, b = chars[i], chars[j]
            if label.get(a) != label.get(b) and frozenset((a, b)) not in ALLOWED_ALIKE:
                out.append(a + b)
    return out


def _regularity(style: str) -> int:
    """Lower is plainer: a family's fingerprint comes from its plainest file."""
    s = style.lower()
    return sum(w in s for w in ("bold", "italic", "oblique", "light", "thin", "black", "medium", "semi",
                                "condensed", "extra", "heavy", "demi", "narrow", "hairline"))


def vet_all(files: list[tuple[Path, str]], log: bool = False
            ) -> tuple[list[FontFile], dict[str, str], dict[str, np.ndarray]]:
    """(accepted files, rejected path -> reason, family -> fitted masks of its plainest file)."""
    accepted: list[FontFile] = []
    rejected: dict[str, str] = {}
    prints: dict[str, tuple[int, np.ndarray]] = {}
    seen: set[tuple[str, str]] = set()
    for k, (path, pkg) in enumerate(files):
        if log and k % 200 == 0:
            print(f"vetting fonts: {k}/{len(files)}", file=sys.stderr, flush=True)
        try:
            family, style = load_font(str(path)).getname()
        except OSError as e:
            rejected[str(path)] = f"unreadable: {e}"
            continue
        family, style = family or path.stem, style or ""
        if family in EXCLUDED_FAMILIES:
            reason = EXCLUDED_FAMILIES[family]
        elif EXCLUDED_NAME.search(family) or EXCLUDED_NAME.search(style):
            reason = "excluded by name (symbol, math, ornament, small caps, titling or inverted)"
        elif (family, style) in seen:
            reason = "same family and style as another file"
        else:
            reason, fitted = vet(str(path))
        if reason is not None:
            rejected[str(path)] = reason
            continue
        seen.add((family, style))
        accepted.append(FontFile(str(path), family, style, pkg))
        if family not in prints or _regularity(style) < prints[family][0]:
            prints[family] = (_regularity(style), fitted)
    return accepted, rejected, {f: m for f, (_, m) in prints.items()}


def group_families(prints: dict[str, np.ndarray], clone_threshold: float = CLONE_THRESHOLD) -> dict[str, str]:
    """Family -> design group name.  One group per connected set of families that share a
    name stem (or one stem of two or more words starts the other), a LINEAGES entry or a
    near-identical drawing.  A group is named after its commonest lineage, else its first
    stem."""
    families = sorted(prints)
    parent = {f: f for f in families}

    def find(f: str) -> str:
        while parent[f] != f:
            parent[f] = parent[parent[f]]
            f = parent[f]
        return f

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    stems = {f: stem(f) for f in families}
    keys: dict[str, str] = {}
    for f in families:
        for key in (f"stem:{stems[f]}", f"lineage:{lineage(f)}" if lineage(f) else None):
            if key is not None:
                union(keys.setdefault(key, f), f)
    for a in families:
        for b in families:
            sa, sb = stems[a].split(), stems[b].split()
            if a < b and min(len(sa), len(sb)) >= 2 and (sa == sb[:len(sa)] or sb == sa[:len(sb)]):
                union(a, b)
    if families:
        stack = np.stack([prints[f] for f in families])
        for i in range(len(families) - 1):
            d = relative_distance(stack[i], stack[i + 1:]).mean(-1)
            for j in np.nonzero(d < clone_threshold)[0] + i + 1:
                union(families[i], families[j])
    members: dict[str, list[str]] = {}
    for f in families:
        members.setdefault(find(f), []).append(f)
    out = {}
    for fams in members.values():
        lineages = [lin for lin in map(lineage, fams) if lin is not None]
        name = max(sorted(set(lineages)), key=lineages.count) if lineages else min(stems[f] for f in fams)
        out.update({f: name for f in fams})
    return out


def build_index(files: list[tuple[Path, str]], log: bool = False) -> dict:
    """Vet every file, group the families into designs and split the groups (uncached)."""
    accepted, rejected, prints = vet_all(files, log)
    group_of = group_families(prints)
    split = assign_splits(group_of.values())
    groups = []
    for name in sorted(set(group_of.values())):
        fams = tuple(sorted(f for f, g in group_of.items() if g == name))
        gfiles = tuple(ff for ff in accepted if ff.family in fams)
        groups.append(asdict(DesignGroup(name, split[name], fams, gfiles)))
    return {"version": INDEX_VERSION, "groups": groups, "rejected": rejected}


def _index_key(files: list[tuple[Path, str]]) -> str:
    h = hashlib.sha256(f"v{INDEX_VERSION}|{'/'.join(CLASS_CHARS)}|{RENDER_PX}".encode())
    for p, pkg in files:
        st = p.stat()
        h.update(f"{p}|{pkg}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def font_index(packages: Sequence[FontPackage] = PACKAGES, cache: bool = True, log: bool = False) -> dict:
    """The vetted, grouped and split fonts, cached as JSON under the data directory (the
    key covers the files, their sizes and dates, the class characters and INDEX_VERSION)."""
    files = scan(packages)
    key = _index_key(files)
    path = DATA_DIR / "glyphs" / f"fonts-{key}.json"
    if cache and path.exists():
        return json.loads(path.read_text())
    index = build_index(files, log=log)
    index["key"] = key
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(index, indent=1))
        tmp.replace(path)
    return index


def groups_of(index: dict, split: str | None = None) -> list[DesignGroup]:
    out = []
    for g in index["groups"]:
        if split is None or g["split"] == split:
            files = tuple(FontFile(**f) for f in g["files"])
            out.append(DesignGroup(g["name"], g["split"], tuple(g["families"]), files))
    return out


MIN_GROUPS = 3


def split_groups(split: str, packages: Sequence[FontPackage] = PACKAGES) -> list[DesignGroup]:
    """The design groups of one split; raises, with the install hint, when too few fonts."""
    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"unknown split {split!r}; use train, val or test")
    groups = groups_of(font_index(packages), split)
    if len(groups) < MIN_GROUPS:
        raise FileNotFoundError(f"only {len(groups)} usable font design group(s) in split {split!r}; "
                                f"install the fonts: {INSTALL_HINT}")
    return groups


def summary(index: dict, verbose: bool = True) -> str:
    lines = []
    groups = groups_of(index)
    for split in SPLIT_FRACTIONS:
        gs = [g for g in groups if g.split == split]
        lines.append(f"{split}: {len(gs)} design groups, {sum(len(g.families) for g in gs)} families, "
                     f"{sum(len(g.files) for g in gs)} files")
        if verbose:
            lines += [f"    {g.name}: {', '.join(g.families)} ({len(g.files)} files)" for g in gs]
    reasons: dict[str, int] = {}
    for r in index["rejected"].values():
        r = r.split(":")[0].split(" for ")[0].split(" renders as")[0].replace("'", "")
        reasons[r] = reasons.get(r, 0) + 1
    lines.append(f"rejected {len(index['rejected'])} files: "
                 + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="List the vetted fonts, their design groups and split.")
    ap.add_argument("--rejected", action="store_true", help="also list every rejected file and why")
    ap.add_argument("--no-cache", action="store_true", help="vet again instead of reading the cached index")
    args = ap.parse_args(list(argv) if argv is not None else None)
    index = font_index(cache=not args.no_cache, log=True)
    print(summary(index))
    if any(len(groups_of(index, s)) < MIN_GROUPS for s in SPLIT_FRACTIONS):
        print(f"too few usable fonts for the splits; install them: {INSTALL_HINT}")
    if args.rejected:
        for p, r in sorted(index["rejected"].items()):
            print(f"  {p}: {r}")


if __name__ == "__main__":
    main()
