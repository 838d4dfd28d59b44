"""The fast request path computes what the straightforward one did: stitching, the
matrix form of bicubic, the in-shuffle clamp and channels-last patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.arm import tiling
from models.arm.pipeline import bicubic_upscale
from tests.conftest import synthetic_photo


def _reference_stitch(patches: np.ndarray, pos: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """The plain per-patch sum and per-pixel count, (H, W, C)."""
    c, p = patches.shape[1], patches.shape[-1]
    acc, count = np.zeros((c, *out_hw), np.float32), np.zeros(out_hw, np.float32)
    for (y, x), tile in zip((pos * 4).tolist(), patches):
        acc[:, y:y + p, x:x + p] += tile
        count[y:y + p, x:x + p] += 1
    return (acc / np.maximum(count, 1)[None]).transpose(1, 2, 0)


@pytest.mark.parametrize("h,w,mode", [(32, 32, "full"), (60, 97, "full"), (150, 61, "full"), (128, 128, "official"),
                                      (61, 97, "official")])
def test_canvas_equals_the_per_pixel_average_bit_for_bit(h: int, w: int, mode: str) -> None:
    pos = tiling.positions(h, w, mode)
    rng = np.random.default_rng(h * w)
    patches = rng.random((len(pos), 3, 128, 128), dtype=np.float32)
    order = rng.permutation(len(pos))  # batches arrive in any order, in any memory layout
    acc = tiling.Canvas((4 * h, 4 * w))
    half = len(order) // 2
    acc.add(patches[order[:half]], pos[order[:half]])
    channels_last = np.ascontiguousarray(patches[order[half:]].transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    acc.add(channels_last, pos[order[half:]])
    got = acc.result()
    assert got.flags.c_contiguous
    ref = _reference_stitch(patches[order], pos[order], (4 * h, 4 * w))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-7)  # summation order differs only between batches
    one_batch = tiling.Canvas((4 * h, 4 * w))
    one_batch.add(patches, pos)
    np.testing.assert_array_equal(one_batch.result(), _reference_stitch(patches, pos, (4 * h, 4 * w)))


def test_canvas_with_corners_that_are_not_a_grid_falls_back_to_counting() -> None:
    pos = tiling.positions(90, 90)[[0, 1, 4, 8]]  # not every row x column pair
    patches = np.random.default_rng(2).random((len(pos), 1, 128, 128), dtype=np.float32)
    acc = tiling.Canvas((360, 360), channels=1)
    acc.add(patches, pos)
    np.testing.assert_array_equal(acc.result(), _reference_stitch(patches, pos, (360, 360)))


@pytest.mark.parametrize("shape", [(7, 3, 32, 32), (2, 3, 5, 11), (1, 1, 1, 1), (3, 2, 33, 2)])
def test_bicubic_matrix_form_equals_interpolate(shape: tuple[int, ...]) -> None:
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(3)) * 1.2 - 0.1
    ref = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)
    for layout in (torch.contiguous_format, torch.channels_last):
        out = bicubic_upscale(x.contiguous(memory_format=layout))
        assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_run_patches_is_clamped_channels_last_and_equal_to_the_module(bundled_model) -> None:
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    for rung in range(len(bundled_model.rungs)):
        out = bundled_model.run_patches(rung, x)
        assert out.shape == (6, 3, 128, 128) and out.is_contiguous(memory_format=torch.channels_last)
        assert out.min() >= 0 and out.max() <= 1
        if rung:
            tail = bundled_model.subnets[rung - 1].tail_conv
            saved, tail.clamp = tail.clamp, None  # the module's own function, clamped afterwards
            try:
                with torch.inference_mode():
                    ref = bundled_model.subnets[rung - 1](x).clamp(0, 1)
            finally:
                tail.clamp = saved
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
        else:
            ref = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_prepared_patches_are_channels_last_and_in_plan_order(bundled_model) -> None:
    img = synthetic_photo(70, 90, seed=9)
    plan = bundled_model.plan(img, budget=0.5)
    lr = img.astype(np.float32) / 255
    groups = bundled_model.prepare(plan, lr)
    assert sorted(np.concatenate([g.index for g in groups]).tolist()) == list(range(len(plan.rungs)))
    for g in groups:
        assert g.patches.is_contiguous(memory_format=torch.channels_last)
        expect = tiling.extract(lr, plan.positions[g.index]).transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(g.patches.numpy(), expect)
        assert (plan.rungs[g.index] == g.rung).all()


def test_tiling_extract_cuts_the_same_patches_as_slicing() -> None:
    rng = np.random.default_rng(5)
    for shape, patch, step in [((61, 97, 3), 32, 1), ((45, 33), 32, 1), ((160, 200, 3), 128, 4)]:
        img = rng.random(shape).astype(np.float32)
        pos = tiling.positions(shape[0] // step, shape[1] // step) * step
        expect = np.stack([img[y:y + patch, x:x + patch] for y, x in pos.tolist()])
        got = tiling.extract(img, pos, patch)
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, expect)


def test_gray_first_edge_scores_equal_the_rgb_patch_scores(bundled_model) -> None:
    from models.arm.edge import edge_scores, edge_scores_gray, gray_u8

    img = synthetic_photo(75, 130, seed=11)
    pos = tiling.positions(75, 130)
    expect = edge_scores(tiling.extract(img, pos))
    np.testing.assert_array_equal(edge_scores_gray(tiling.extract(gray_u8(img), pos)), expect)
    np.testing.assert_array_equal(bundled_model.analyse(img).scores, expect)
    extremes = np.zeros((2, 32, 32, 3), np.uint8)
    extremes[0, ::2, ::2] = 255  # the largest Laplacian magnitudes, saturated at 255
    extremes[1, 1::2] = 255
    np.testing.assert_array_equal(edge_scores(extremes), [
        np.minimum(np.abs(lap), 255).mean() for lap in _laplacian_int64(gray_u8(extremes))])


def _laplacian_int64(g: np.ndarray) -> np.ndarray:
    g = np.pad(g.astype(np.int64), ((0, 0), (1, 1), (1, 1)), mode="reflect")
    return 2 * (g[:, :-2, :-2] + g[:, :-2, 2:] + g[:, 2:, :-2] + g[:, 2:, 2:]) - 8 * g[:, 1:-1, 1:-1]
