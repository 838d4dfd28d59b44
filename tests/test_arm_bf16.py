"""ARM's bf16 rungs: bf16 sections that compute what float32 computes to bf16 rounding, a
table row estimated at start-up from shipped photos (checked here against the added error
measured on the test photos), and the rungs listed and served."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from compress.bf16 import Bf16Section, native_bf16, with_bf16_sections
from models.arm import bf16 as arm_bf16
from models.arm.nets import sub_pixel_shuffle
from service.bundled import BUNDLED_ARM
from service.config import Settings
from tests.conftest import FAST_START, synthetic_photo, wait_ready

needs_bf16 = pytest.mark.skipif(not native_bf16("cpu"), reason="this CPU has no native bf16 (AVX512-BF16 or AMX): "
                                                                 "the server builds no bf16 rung here")


def test_sections_run_in_bf16_and_hand_back_what_they_are_told() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    mixed = with_bf16_sections(net, ["1", "2"], float_out=["2"])
    assert isinstance(mixed[1], Bf16Section) and isinstance(mixed[2], Bf16Section) and not isinstance(mixed[0], Bf16Section)
    assert mixed[2].module.weight.dtype == torch.bfloat16 and net[2].weight.dtype == torch.float32  # a copy
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        ref, out = net(x), mixed(x)
        inner = mixed[1](mixed[0](x))
    assert out.dtype == torch.float32 and inner.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0.02, atol=0.02)  # bf16 keeps 8 significant bits


@pytest.mark.parametrize("clamp", [(0.0, 1.0), None])  # None: the served form, whose clip is in the convolution
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_the_shuffle_widens_bf16_phases_and_clamps_them(clamp, layout) -> None:
    y = (torch.randn(2, 48, 5, 7) * 0.8 + 0.5).to(torch.bfloat16).contiguous(memory_format=layout)
    out = sub_pixel_shuffle(y, 4, 3, clamp)
    ref = sub_pixel_shuffle(y.float(), 4, 3, clamp)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 20, 28)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ref)  # bf16 -> float32 is exact; clamping before or after widening is the same


@pytest.fixture(scope="module")
def model():
    from models.arm.pipeline import ArmSR

    return ArmSR.from_checkpoint(BUNDLED_ARM, int8=False, bf16=True)


@needs_bf16
def test_bf16_rungs_follow_the_fp32_ladder_with_estimated_rows(model) -> None:
    widths = model.backbone.widths
    bf16 = [r for r in model.rungs if r.precision == "bf16"]
    assert [r.name for r in bf16] == [f"w{w}-bf16" for w in widths]
    for r in bf16:
        fp32 = model.rungs[widths.index(r.width) + 1]
        assert r.flops_per_patch == fp32.flops_per_patch  # the same network, the same FLOPs
        # The estimated row: the fp32 row plus the added error, so never predicted better.
        assert np.all(model.table.mse[r.index] >= model.table.mse[fp32.index])
        assert np.any(model.table.mse[r.index] > model.table.mse[fp32.index])
        entry = model.compressed[r.name]
        assert entry["real_speed"] and entry["quality"]["mse_added_estimate"] > 0
        x = torch.rand(3, 3, 32, 32)
        out = model.run_patches(r.index, x)
        ref = model.run_patches(fp32.index, x)
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
        assert out.min() >= 0 and out.max() <= 1
        assert float((out - ref).abs().mean()) < 2 / 255  # well under a grey level on average


@needs_bf16
def test_start_up_estimate_matches_the_error_added_on_the_test_photos(model) -> None:
    """The start-up estimate (output difference on shipped photos outside the test split)
    against the measurement it stands for: the rise of the mean squared error against the HR
    on every test-photo patch.  Within a factor of two: it sets the rung's table row."""
    from models.arm import data
    from models.arm.build_table import patch_errors

    top = model.top
    fp32, rung = model.subnets[top - 1], next(r for r in model.rungs if r.name == f"w{model.backbone.full_width}-bf16")
    _scores, mse = patch_errors([fp32, model.subnets[rung.index - 1]], data.load_split("test"), 32)
    measured = float(mse[:, 1].mean() - mse[:, 0].mean())
    estimate = model.compressed[rung.name]["quality"]["mse_added_estimate"]
    assert measured > 0 and 0.5 <= estimate / measured <= 2.0, (estimate, measured)


def _check_sections(m, want: tuple[str, ...]) -> None:
    wide, base = arm_bf16.section_choices("fsrcnn")
    for r in (r for r in m.rungs if r.precision == "bf16"):
        entry = m.compressed[r.name]
        by_set = entry["quality"]["mse_added_estimate_by_sections"]
        growth = by_set[arm_bf16.section_label(wide)] / by_set[arm_bf16.section_label(base)]
        assert tuple(entry["sections"]) == want, (r.name, growth)
        assert (growth <= arm_bf16.MAX_ADDED_ERROR_GROWTH) == (want == wide), (r.name, growth)
        assert entry["quality"]["mse_added_estimate"] == by_set[arm_bf16.section_label(want)]  # the chosen set's row
        in_bf16 = {name for name, mod in m.subnets[r.index - 1].named_modules() if isinstance(mod, Bf16Section)}
        assert in_bf16 == set(want)  # the rung runs what its manifest says


@needs_bf16
def test_our_mapping_layers_stay_float32_where_bf16_would_multiply_the_added_error(model) -> None:
    """Each width compares the error bf16 adds with and without the optional mapping layers
    (on the calibration patches) and takes them where they at most double it.  Our bundled
    model's do not tolerate bf16: with them the added error is about 3.5x (0.10 dB on the test
    photos instead of 0.02)."""
    wide, base = arm_bf16.section_choices("fsrcnn")
    assert set(base) < set(wide)
    _check_sections(model, base)


@needs_bf16
def test_the_official_checkpoint_runs_its_last_mapping_layers_in_bf16_too(official) -> None:
    """The official checkpoint's mapping layers do (about 1.1x on the calibration patches,
    0.040 dB on the test photos against 0.026): its bf16 rungs take them."""
    from models.arm.pipeline import ArmSR

    wide, _base = arm_bf16.section_choices("fsrcnn")
    _check_sections(ArmSR.from_checkpoint(official / "arm-fsrcnn.pth", bf16=True), wide)


def test_calibration_photos_are_shipped_and_not_test_photos(monkeypatch) -> None:
    from models.arm.data import SKIMAGE_TEST

    assert not set(arm_bf16.CALIBRATION_PHOTOS) & set(SKIMAGE_TEST)
    # A stereo partner or a crop of a test photo would leak it: none is used.
    assert "motorcycle_right.png" not in arm_bf16.CALIBRATION_PHOTOS
    monkeypatch.setitem(__import__("sys").modules, "skimage", None)  # the server installs no scikit-image
    patches = arm_bf16.calibration_patches(64)
    assert patches.shape == (64, 32, 32, 3) and patches.dtype == np.uint8
    assert len(arm_bf16.calibration_patches(10_000)) > 200  # every patch of the seven photos


@needs_bf16
def test_bf16_rungs_are_listed_and_served() -> None:
    settings = Settings(**{**FAST_START, "families": ["arm"]})
    from service.app import create_app

    with TestClient(create_app(settings)) as c:
        wait_ready(c, timeout=120)
        [m] = c.get("/v1/models").json()["models"]
        rungs = {r["name"]: r for r in m["rungs"]}
        bf16 = [r for r in rungs.values() if r["precision"] == "bf16"]
        assert len(bf16) == 3, sorted(rungs)
        for r in bf16:
            assert r["real_speed"] and r["ms_per_patch_full_batch"] > 0 and r["method"].startswith("bf16")
            assert r["mse_added_estimate"] > 0 and r["estimated_on"]  # the start-up estimate ...
            assert 0 < r["drop_db"] < 0.1 and "models.arm.bf16" in r["command"]  # ... and bf16.json's measurement
        buf = io.BytesIO()
        Image.fromarray(synthetic_photo(64, 48)).save(buf, format="PNG")
        r = c.post("/superresolve", content=buf.getvalue(), headers={"content-type": "image/png"},
                   params={"rung": "w56-bf16"})
        assert r.status_code == 200, r.text
        assert r.headers["x-anytime-rung"] == "w56-bf16" and "w56-bf16=" in r.headers["x-anytime-rung-mix"]
        assert Image.open(io.BytesIO(r.content)).size == (4 * 48, 4 * 64)  # synthetic_photo(h, w)
