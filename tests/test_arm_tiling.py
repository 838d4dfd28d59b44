"""Tiling covers every pixel (ours) or reproduces the official remainder-dropping grid."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.arm import tiling


@settings(max_examples=200, deadline=None)
@given(h=st.integers(32, 400), w=st.integers(32, 400))
def test_full_tiling_covers_every_pixel(h: int, w: int) -> None:
    pos = tiling.positions(h, w, "full")
    cover = np.zeros((h, w), dtype=int)
    for y, x in pos:
        cover[y:y + 32, x:x + 32] += 1
    assert cover.min() >= 1
    assert pos[:, 0].max() + 32 <= h and pos[:, 1].max() + 32 <= w


def test_official_tiling_drops_the_remainder() -> None:
    pos = tiling.positions(128, 128, "official")
    assert sorted(set(pos[:, 0].tolist())) == [0, 28, 56, 84]
    assert tiling.covered_hw(pos) == (116, 116)
    # 1920x1080 LR: 68 x 38 patches in the official grid, covering 1908x1068 (as the official code tiles it).
    assert len(tiling.positions(1080, 1920, "official")) == 68 * 38


def test_stitch_is_the_uniform_average() -> None:
    pos = tiling.positions(60, 60, "full")
    patches = np.stack([np.full((1, 128, 128), float(i), dtype=np.float32) for i in range(len(pos))])
    acc = tiling.Canvas((240, 240), channels=1)
    acc.add(patches, pos)
    canvas = acc.result()
    # Pixel (0, 0) is covered by patch 0 only; a pixel in the overlap of 0 and 1 is their mean.
    assert canvas[0, 0, 0] == 0
    assert canvas[0, 4 * 28 + 2, 0] == pytest.approx(0.5)


@pytest.mark.parametrize("h,w", [(1, 1), (5, 40), (31, 31), (33, 2)])
def test_pad_to_patch(h: int, w: int) -> None:
    img = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
    out = tiling.pad_to_patch(img)
    assert out.shape[:2] == (max(h, 32), max(w, 32))
    np.testing.assert_array_equal(out[:h, :w], img)
