"""The ARM pipeline: exact x4 output for any size, batching by rung, budget accounting."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import synthetic_photo


@pytest.mark.parametrize("h,w", [(1, 1), (3, 50), (31, 33), (32, 32), (61, 97)])
def test_output_is_exactly_four_times_the_input(bundled_model, h: int, w: int) -> None:
    sr, plan = bundled_model.upscale(synthetic_photo(h, w), budget=0.5)
    assert sr.shape == (4 * h, 4 * w, 3) and sr.dtype == np.uint8
    assert plan.flops <= 0.5 * plan.flops_full * (1 + 1e-12)


def test_patches_sharing_a_rung_run_as_one_batch(bundled_model) -> None:
    img = synthetic_photo(150, 150, seed=5)
    plan = bundled_model.plan(img, budget=0.6)
    calls: list[int] = []
    hooks = [net.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
             for net in bundled_model.subnets]
    try:
        bundled_model.run(plan, img.astype(np.float32) / 255)
    finally:
        for h in hooks:
            h.remove()
    counts = plan.rung_counts(len(bundled_model.rungs))
    assert sorted(calls) == sorted(c for c in counts[1:] if c)  # one forward per used subnet


def test_budget_mode_beats_or_matches_fixed_rungs_at_equal_cost(bundled_model) -> None:
    """Predicted quality at the cost of a fixed width is at least that width's."""
    img = synthetic_photo(120, 160, seed=7)
    for rung in (1, 2):
        fixed = bundled_model.plan(img, mode="fixed", rung=rung)
        adaptive = bundled_model.plan(img, budget=fixed.flops_fraction)
        assert adaptive.flops <= fixed.flops * (1 + 1e-12)
        assert adaptive.pred_mse.sum() <= fixed.pred_mse.sum() + 1e-9


def test_bad_plan_arguments(bundled_model) -> None:
    img = synthetic_photo(40, 40)
    with pytest.raises(ValueError):
        bundled_model.plan(img, budget=1.5)
    with pytest.raises(ValueError):
        bundled_model.plan(img, mode="fixed", rung=9)
    with pytest.raises(ValueError):
        bundled_model.plan(img, mode="eta", eta=-1)


def test_bundled_model_beats_bicubic_on_a_held_out_photo(bundled_model) -> None:
    """scikit-image's astronaut is in the test split: never used for training or the table."""
    skimage = pytest.importorskip("skimage")
    from pathlib import Path

    from models.arm.data import load_rgb, modcrop
    from models.arm.metrics import psnr_rgb
    from models.common.matlab_resize import downscale_x4_uint8

    hr = modcrop(load_rgb(Path(skimage.__file__).parent / "data" / "astronaut.png"))
    lr = downscale_x4_uint8(hr)
    full, _ = bundled_model.upscale(lr, mode="fixed", rung=3)
    bicubic, _ = bundled_model.upscale(lr, mode="fixed", rung=0)
    adaptive, plan = bundled_model.upscale(lr, budget=0.65)
    assert psnr_rgb(full, hr) >= psnr_rgb(bicubic, hr) + 0.5
    assert psnr_rgb(adaptive, hr) >= psnr_rgb(full, hr) - 0.25 and plan.flops_fraction <= 0.65
