"""The plan's prediction of the output image's PSNR (``Plan.predicted_image_psnr``).

Numbers behind the tolerances: ``python -m bench.arm_psnr_prediction`` (docs in its
docstring).  With the bundled table, the pixel weighting itself is right to ~0.1 dB (fed
the patches' measured MSE it lands within 0.14 dB of the measured PSNR on synthetic
photos, 0.38 dB on the test photos), but the table is optimistic: budget 1.0 reads
+5.3..+5.7 dB above the measured PSNR on synthetic photos, +5.6 dB on average (-2.9..+12.2)
on the held-out test photos.  The band test below pins that bias; a recalibrated table
should move it (and then tighten it to about +-1 dB).
"""

from __future__ import annotations

import numpy as np
import pytest

from models.arm import tiling
from models.arm.metrics import psnr_rgb
from models.arm.pipeline import patch_pixel_weights
from models.arm.table import mse_to_psnr
from models.common.matlab_resize import downscale_x4_uint8
from tests.conftest import synthetic_photo


def _brute_weights(pos: np.ndarray, out_hw: tuple[int, int], crop: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Pixel by pixel: 1/k to each of the k patches over a scored pixel; an uncovered scored
    pixel to the patches over the nearest covered pixel (official tiling's bicubic fill)."""
    h, w = out_hw
    if h - 2 * crop <= 0 or w - 2 * crop <= 0:
        crop = 0
    corners = pos * 4
    count = np.zeros((h, w))
    for y, x in corners:
        count[y:y + 128, x:x + 128] += 1
    scored = np.zeros((h, w), dtype=bool)
    scored[crop:h - crop, crop:w - crop] = True
    share = np.where(count > 0, scored / np.maximum(count, 1), 0.0)
    own = np.array([share[y:y + 128, x:x + 128].sum() for y, x in corners])
    fill = np.zeros(len(pos))
    ch, cw = min(h, int(corners[:, 0].max()) + 128), min(w, int(corners[:, 1].max()) + 128)
    for y, x in zip(*np.nonzero(scored & (count == 0))):
        cy, cx = min(y, ch - 1), min(x, cw - 1)
        owners = [i for i, (py, px) in enumerate(corners) if py <= cy < py + 128 and px <= cx < px + 128]
        fill[owners] += 1 / len(owners)
    return own, fill


@pytest.mark.parametrize("h,w", [(1, 1), (3, 50), (32, 32), (61, 97), (75, 112)])
@pytest.mark.parametrize("mode", ["full", "official"])
def test_pixel_weights_match_the_stitching(h: int, w: int, mode: str) -> None:
    pos = tiling.positions(*tiling.pad_to_patch(np.zeros((h, w, 1))).shape[:2], mode)
    own, fill = patch_pixel_weights(pos, (4 * h, 4 * w))
    want_own, want_fill = _brute_weights(pos, (4 * h, 4 * w))
    np.testing.assert_allclose(own, want_own, atol=1e-9)
    np.testing.assert_allclose(fill, want_fill, atol=1e-9)
    crop = 4 if min(h, w) > 2 else 0
    assert own.sum() + fill.sum() == pytest.approx((4 * h - 2 * crop) * (4 * w - 2 * crop))
    if mode == "full":
        assert not fill.any()


def test_one_patch_image_is_its_patch(bundled_model) -> None:
    plan = bundled_model.plan(synthetic_photo(32, 32), budget=0.5)
    assert plan.predicted_image_psnr == pytest.approx(plan.predicted_patch_psnr)
    assert plan.predicted_psnr == plan.predicted_patch_psnr  # the old name keeps its old meaning


@pytest.mark.parametrize("tiling_mode", ["full", "official"])
def test_image_psnr_is_finite_and_obeys_jensen(bundled_model, tiling_mode: str) -> None:
    """10^(-psnr/10) is convex, so the PSNR of the weighted mean MSE can never exceed the
    weighted mean of the patches' PSNRs: neither of those implied by their MSE, nor the
    table's own mean PSNR per bin (a bin's mean MSE is at least its mean PSNR's MSE)."""
    a = bundled_model.analyse(synthetic_photo(75, 130, seed=3), tiling_mode)
    for kw in ({"budget": 0.3}, {"budget": 1.0}, {"mode": "fixed", "rung": 0}):
        plan = bundled_model.choose(a, **kw)
        image = plan.predicted_image_psnr
        assert np.isfinite(image) and 10 < image < 80
        rows = np.arange(len(plan.rungs))
        weights = np.concatenate([plan.pixel_weight, plan.fill_weight])
        mse = np.concatenate([plan.pred_mse, plan.fill_mse])
        table_psnr = np.concatenate([a.pred_psnr[rows, plan.rungs], a.pred_psnr[:, 0]])
        assert image <= np.average(mse_to_psnr(mse), weights=weights) + 1e-9
        assert image <= np.average(table_psnr, weights=weights) + 1e-9
        assert (tiling_mode == "official") == bool(plan.fill_weight.any())


def _measured_and_oracle(model, hr: np.ndarray, budget: float) -> tuple[float, float, float]:
    from bench.arm_psnr_prediction import measure

    r = measure(model, downscale_x4_uint8(hr), hr, {"budget": budget})
    return r["measured"], r["new"], r["oracle"]


@pytest.mark.parametrize("hw,seed", [((192, 256), 1), ((160, 320), 2)])
def test_prediction_against_measurement_at_full_budget(bundled_model, hw: tuple[int, int], seed: int) -> None:
    hr = synthetic_photo(*hw, seed=seed)
    measured, predicted, oracle = _measured_and_oracle(bundled_model, hr, 1.0)
    # The weighting: fed the measured per-patch MSE it gives the measured PSNR (seen: 0.08, 0.13 dB).
    assert abs(oracle - measured) < 0.3
    # The table: optimistic by a known margin (seen: +5.37, +5.55 dB).  Not "close", on purpose.
    assert 4.5 < predicted - measured < 6.5


def test_measure_matches_upscale(bundled_model) -> None:
    """The bench stitches as ``ArmSR.upscale`` does, so its 'measured' is the served image's."""
    hr = synthetic_photo(128, 192, seed=4)
    lr = downscale_x4_uint8(hr)
    sr, _ = bundled_model.upscale(lr, budget=0.65)
    measured, _, _ = _measured_and_oracle(bundled_model, hr, 0.65)
    assert measured == pytest.approx(psnr_rgb(sr, hr), abs=1e-9)


def test_a_plan_without_fill_errors_prices_its_fill_at_its_own_predictions(bundled_model) -> None:
    """``fill_mse`` defaults to the plan's own predicted MSE (what a plan built without the
    table's bicubic column uses)."""
    from dataclasses import replace

    from models.common.synthetic import synthetic_photo

    plan = bundled_model.plan(synthetic_photo(40, 56, seed=2), budget=0.5)
    bare = replace(plan, fill_mse=None)
    assert bare.fill_mse is bare.pred_mse
