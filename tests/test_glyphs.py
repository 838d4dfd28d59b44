"""The glyph data set: classes, font vetting and split, deterministic rendering, the
generator's shapes and the load_split cache.  Fast (a few seconds); the tests that need
the Debian font packages skip with the install hint where they are missing, and the
rendering tests run with any single usable font (DejaVu Sans, or the first font found)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from models.glyphs import fonts as F
from models.glyphs.classes import ALL_CHARS, CLASS_CHARS, CLASSES, MERGED_LOWER

ROOT = Path(__file__).resolve().parents[1]
DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


@pytest.fixture(scope="module")
def one_font() -> str:
    """A usable font file: DejaVu Sans where it exists, else the first that passes vetting."""
    candidates = [DEJAVU] if DEJAVU.exists() else []
    candidates += [p for p, _ in F.scan()][:50]
    for p in candidates:
        if F.vet(str(p))[0] is None:
            return str(p)
    pytest.skip(f"no usable font on this machine; install them: {F.INSTALL_HINT}")


@pytest.fixture(scope="module")
def index() -> dict:
    idx = F.font_index()
    if any(len(F.groups_of(idx, s)) < F.MIN_GROUPS for s in F.SPLIT_FRACTIONS):
        pytest.skip(f"too few font families for the split; install them: {F.INSTALL_HINT}")
    return idx


def test_classes_are_consistent():
    assert len(CLASSES) == len(CLASS_CHARS) == 62 - len(MERGED_LOWER)
    assert CLASSES == [c[0] for c in CLASS_CHARS]
    assert sorted(ALL_CHARS) == sorted("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    for lower in MERGED_LOWER:
        assert lower.upper() + lower in CLASS_CHARS
    # The fine-detail confusions stay separate classes.
    for group in ("0OQ", "1lIi", "5S", "2Z", "8B", "6b", "9gq"):
        assert len({next(i for i, cc in enumerate(CLASS_CHARS) if ch in cc) for ch in group}) == len(group)


def test_makefile_installs_the_packages_in_code():
    text = (ROOT / "Makefile").read_text()
    block = re.search(r"GLYPH_FONTS :=(.*?)\n\n", text, re.S)
    assert block, "Makefile has no GLYPH_FONTS list"
    assert block.group(1).replace("\\", " ").split() == [p.name for p in F.PACKAGES]
    assert "$(GLYPH_FONTS)" in text
    assert all(p.licence for p in F.PACKAGES)


def test_stem_groups_styles_of_one_design():
    assert F.stem("DejaVu Sans Mono") == "DejaVu Sans"
    assert F.stem("LM Roman 10") == "LM Roman"
    assert F.stem("Accanthis ADF Std No2") == "Accanthis"
    assert F.stem("OCRABold") == "OCRA"
    assert F.lineage("TeX Gyre Heros") == F.lineage("Nimbus Sans") == F.lineage("FreeSans")
    assert F.lineage("Roboto") is None


def test_assign_splits_is_deterministic_and_proportional():
    names = [f"group {i}" for i in range(100)]
    a, b = F.assign_splits(names), F.assign_splits(list(reversed(names)))
    assert a == b
    counts = {s: sum(v == s for v in a.values()) for s in F.SPLIT_FRACTIONS}
    assert counts == {"train": 70, "val": 15, "test": 15}


def test_vetting_accepts_a_text_font_and_rejects_boxes(one_font):
    reason, fitted = F.vet(one_font)
    assert reason is None and fitted.shape == (len(ALL_CHARS), 24, 24)
    # A character the font lacks renders as .notdef (or nothing) and is caught.
    reason, _ = F.vet(one_font, chars="A\U0010fffd")
    assert reason is not None


def test_glyph_masks_distinguish_fine_detail(one_font):
    font = F.load_font(one_font)
    fitted = {c: F.fit(F.glyph_mask(font, c)) for c in "0OQ5S8B"}
    for a, b in ("0O", "OQ", "5S", "8B"):
        assert F.relative_distance(fitted[a], fitted[b]) > F.ALIKE_THRESHOLD


def test_render_is_deterministic(one_font):
    from models.glyphs.render import render

    a = render(one_font, "Q", np.random.default_rng(7), 32, ALL_CHARS)
    b = render(one_font, "Q", np.random.default_rng(7), 32, ALL_CHARS)
    c = render(one_font, "Q", np.random.default_rng(8), 32, ALL_CHARS)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.std() > 5  # not blank
    assert render(one_font, "g", np.random.default_rng(1), 48).shape == (48, 48, 3)


def test_generate_shapes_prefix_and_workers(one_font, monkeypatch):
    from models.glyphs.data import generate

    ff = F.FontFile(one_font, "Test", "Regular", "test")
    groups = [F.DesignGroup("g", "train", ("Test",), (ff,))]
    n = len(CLASSES) + 6
    imgs, labels, fams, files = generate(groups, n, 24, seed=3, workers=1)
    assert imgs.shape == (n, 24, 24, 3) and imgs.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < len(CLASSES)
    assert fams == ["Test"] * n and files == [one_font] * n
    # Every block of len(classes) samples holds each class once.
    assert sorted(labels[: len(CLASSES)]) == list(range(len(CLASSES)))
    small = generate(groups, 12, 24, seed=3, workers=1)
    assert np.array_equal(small[0], imgs[:12]) and np.array_equal(small[1], labels[:12])
    from models.glyphs import data as D

    monkeypatch.setattr(D, "CHUNK", 4)  # three chunks over two worker processes
    again = generate(groups, 12, 24, seed=3, workers=2)
    assert np.array_equal(again[0], small[0])


def test_family_split_has_no_overlap(index):
    groups = F.groups_of(index)
    by_split = {s: [g for g in groups if g.split == s] for s in F.SPLIT_FRACTIONS}
    fams = {s: {f for g in gs for f in g.families} for s, gs in by_split.items()}
    files = {s: {ff.path for g in gs for ff in g.files} for s, gs in by_split.items()}
    stems = {s: {F.stem(f) for f in fs} for s, fs in fams.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not fams[a] & fams[b]
        assert not files[a] & files[b]
        assert not stems[a] & stems[b]
    lineages = {s: {F.lineage(f) for f in fs} - {None} for s, fs in fams.items()}
    assert not lineages["train"] & (lineages["val"] | lineages["test"])
    assert all(len(gs) >= F.MIN_GROUPS for gs in by_split.values())


def test_load_split_caches_and_slices(index, tmp_path, monkeypatch):
    from models.glyphs import data as D

    monkeypatch.setattr(F, "DATA_DIR", tmp_path)
    (tmp_path / "glyphs").mkdir()  # the font index is read from the patched dir: put it there
    (tmp_path / "glyphs" / f"fonts-{index['key']}.json").write_text(json.dumps(index))
    ds = D.load_split("test", size=16, n=len(CLASSES))
    assert ds.images.shape == (len(CLASSES), 16, 16, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and ds.classes == CLASSES
    assert len(ds.families) == len(ds) and set(ds.families) <= {f for g in ds.source["groups"].values() for f in g}
    assert np.bincount(ds.labels, minlength=len(CLASSES)).tolist() == [1] * len(CLASSES)
    assert ds.source["generator_version"] == D.GENERATOR_VERSION and ds.source["seed"] == D.SEEDS["test"]
    cached = list((tmp_path / "glyphs").glob("test-16px-*.npz"))
    assert len(cached) == 1
    part = D.load_split("test", size=16, n=10)  # sliced from the cache, not generated
    assert list((tmp_path / "glyphs").glob("test-16px-*.npz")) == cached
    assert np.array_equal(part.images, ds.images[:10])
    with pytest.raises(ValueError):
        D.load_split("training")


def test_missing_fonts_raise_with_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "DATA_DIR", tmp_path)
    nowhere = [F.FontPackage("fonts-none", "sans", "OFL-1.1", (str(tmp_path / "no-such-dir"),))]
    assert F.scan(nowhere) == []
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        F.split_groups("train", packages=nowhere)
