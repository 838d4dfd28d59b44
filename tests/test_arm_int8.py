"""ARM's int8 rungs: DDTB 8-bit QAT widths on real int8 kernels, beside the fp32 widths."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from models.arm.dispatch import RungTimes
from models.arm.pipeline import ArmSR
from models.arm.table import EdgeTable
from service.app import create_app
from service.bundled import BUNDLED_ARM
from service.config import Settings
from service.families.arm import ArmFamily
from tests.conftest import FAST_START, synthetic_photo, wait_ready

pytest.importorskip("skimage", reason="the held-out test photos come with scikit-image")


@pytest.fixture(scope="module")
def model() -> ArmSR:
    torch.set_num_threads(2)
    return ArmSR.from_checkpoint(BUNDLED_ARM, int8=True)


def test_the_bundled_model_has_an_int8_rung_per_width_after_its_fp32_rungs(model):
    names = [r.name for r in model.rungs]
    assert names == ["bicubic", "w16", "w36", "w56", "w16-int8", "w36-int8", "w56-int8"]
    assert model.top == names.index("w56")
    assert [r.precision for r in model.rungs] == ["fp32"] * 4 + ["int8"] * 3
    assert model.table.rungs == len(names)
    for r in model.rungs[4:]:
        entry = model.compressed[r.name]
        assert entry["real_speed"] is True and entry["method"] == "qat-ddtb-8bit"
        assert entry["command"].startswith("python -m models.arm.quantize")
    assert ArmSR.from_checkpoint(BUNDLED_ARM).rungs[-1].name == "w56"  # opt-in


def test_each_int8_width_loses_at_most_a_quarter_db_and_exactly_what_its_manifest_says(model):
    """The issue's target is 0.25 dB; the bundled rungs lose 0.14 / 0.21 / 0.21 (docs/COMPRESSION.md)."""
    from models.arm import data
    from models.arm.quantize import held_out_psnr

    test = data.load_split("test")
    for r in model.rungs[4:]:
        fp32 = next(o for o in model.rungs if o.name == r.name.removesuffix("-int8"))
        int8_db = held_out_psnr(lambda b, i=r.index: model.run_patches(i, b), test)
        fp32_db = held_out_psnr(lambda b, i=fp32.index: model.run_patches(i, b), test)
        assert fp32_db - int8_db <= 0.25, (r.name, fp32_db, int8_db)
        assert int8_db == pytest.approx(model.compressed[r.name]["quality"]["psnr_rgb"], abs=0.01)


def test_the_int8_rungs_run_on_int8_kernels(model):
    from compress.int8 import is_quantized

    assert all(is_quantized(model.subnets[r.index - 1]) for r in model.rungs if r.precision == "int8")
    assert not any(is_quantized(model.subnets[r.index - 1]) for r in model.rungs[1:] if r.precision == "fp32")


def test_an_int8_row_is_its_fp32_row_scaled_by_the_measured_error_ratio():
    table = EdgeTable(np.array([1.0, 2.0]), np.array([[30.0, 25.0], [34.0, 28.0]]), np.array([0.0, 10.0]),
                      mse=np.array([[65.0, 205.0], [26.0, 103.0]]))
    grown = table.with_scaled_row(1, np.array([2.0, 1.0]))
    assert grown.rungs == 3 and grown.cost[2] == 10.0
    assert grown.mse[2].tolist() == [52.0, 103.0]
    assert grown.psnr[2] == pytest.approx([34.0 - 10 * np.log10(2.0), 28.0])


def test_time_budgets_are_fractions_of_the_fp32_top_rung_and_can_spend_on_int8(model):
    """A time budget is a share of the full-width fp32 time; under a tight one the planner
    buys int8 patches rather than only narrow or bicubic ones."""
    per_patch = np.array([0.0, 0.4, 0.7, 1.0, 0.18, 0.3, 0.42]) * 1e-3  # int8 about 2.3x faster
    times = RungTimes(np.zeros(7), np.maximum(per_patch, 1e-9), 64)
    analysis = model.analyse(synthetic_photo(128, 128, seed=3))
    plan = model.choose(analysis, mode="seconds", budget=0.5, times=times)
    assert plan.info["predicted_s_full"] == pytest.approx(len(analysis.positions) * 1e-3)
    assert plan.info["predicted_s"] <= 0.5 * plan.info["predicted_s_full"] * (1 + 1e-9)
    assert (plan.rungs >= 4).sum() > 0


def test_v1_models_lists_each_int8_rung_with_its_quality_time_and_manifest(model):
    family = ArmFamily(model)
    before = {r.name: r.describe() for r in family.rungs()}
    assert before["w56-int8"]["precision"] == "int8" and before["w56-int8"]["real_speed"] is True
    assert before["w56-int8"]["psnr_rgb"] == model.compressed["w56-int8"]["quality"]["psnr_rgb"]
    assert "ms_per_patch_full_batch" not in before["w56-int8"] and not before["w56-int8"]["dominated"]

    # As timed at start-up: a pass of n patches at rung r costs (1 + n) x its per-patch time.
    per_patch = {0: 0.01, 1: 0.4, 2: 0.7, 3: 1.0, 4: 0.5, 5: 0.3, 6: 0.42}  # ms; w16-int8 slower than w16
    family.calibrated(lambda work: sum((1 + n) * per_patch[key] * 1e-3 for key, n in work), 64)
    after = {r.name: r.describe() for r in family.rungs()}
    assert after["w36-int8"]["ms_per_patch_full_batch"] == pytest.approx(0.3)
    # w16-int8 is slower than w16 (and bicubic, w36-int8 and w56-int8): dominated exactly when
    # one of those is predicted no worse in every bin, and then never chosen.
    faster = [k for k, ms in per_patch.items() if ms < per_patch[4]]
    beaten = any(np.all(model.table.mse[k] <= model.table.mse[4]) for k in faster)
    assert after["w16-int8"]["dominated"] is bool(beaten)
    assert not after["w56"]["dominated"]  # the best rung is never dominated


def test_the_server_lists_serves_and_plans_with_the_int8_rungs(model):
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(96, 96)).save(buf, format="PNG")
    with TestClient(create_app(Settings(**FAST_START), families=[ArmFamily(model)])) as client:
        wait_ready(client)
        listed = {r["name"]: r for r in client.get("/v1/models").json()["models"][0]["rungs"]}
        assert listed["w56-int8"]["precision"] == "int8" and listed["w56-int8"]["real_speed"] is True
        assert listed["w56-int8"]["ms_per_patch_full_batch"] > 0 and listed["w56-int8"]["psnr_rgb"] > 25
        pinned = client.post("/superresolve", content=buf.getvalue(), headers={"content-type": "image/png"},
                             params={"rung": "w56-int8"})
        assert pinned.status_code == 200 and pinned.headers["x-anytime-rung"] == "w56-int8"
        assert pinned.headers["x-anytime-rung-mix"].endswith("w56-int8=16")  # 16 patches of a 96 px image
        full = client.post("/superresolve", content=buf.getvalue(), headers={"content-type": "image/png"},
                           params={"policy": "full"})
        assert full.headers["x-anytime-rung"] == "w56"  # the top rung is the fp32 full width


def test_carry_form_splits_the_pass_through_taps_exactly() -> None:
    """The carry form's split convolutions compute what the originals do; only our
    identity-initialised FSRCNN has the taps (an official checkpoint stays plain)."""
    from models.arm.pipeline import ArmSR
    from models.arm.quantize import CarryConv, carry_taps, float_form

    model = ArmSR.from_checkpoint(BUNDLED_ARM)
    plain = float_form(model.backbone, model.full_state, 36)
    carried = float_form(model.backbone, model.full_state, 36, form="carry")
    x = torch.rand(3, 12, 32, 32)
    for name in ("body_conv.1", "body_conv.2", "body_conv.3", "body_conv.4"):
        split, conv = carried.get_submodule(name), plain.get_submodule(name)
        assert isinstance(split, CarryConv)
        with torch.no_grad():
            torch.testing.assert_close(split(x), conv(x), rtol=0, atol=1e-5)
        assert int(carry_taps(conv).sum()) == 3
    assert isinstance(carried.head_conv[0], CarryConv) and isinstance(carried.head_conv[1], torch.nn.ReLU)
    bare = torch.nn.Conv2d(12, 12, 3, padding=1)  # no dominant identity tap
    assert carry_taps(bare) is None


def test_skip_form_takes_the_image_from_the_input_and_keeps_it_off_the_body() -> None:
    """The skip form's tail adds an int8 convolution of the input to the body's output, and
    the body no longer hands the tail the carried image: the expanding layer's carry
    channels and the tail's reads of them are zero.  Its int8 export runs the add on int8
    kernels and clips in the shuffle, and computes what its fake-quantized network does."""
    from compress import qat
    from models.arm.quantize import SkipFSRCNN, example_input, float_form

    model = ArmSR.from_checkpoint(BUNDLED_ARM)
    net = float_form(model.backbone, model.full_state, 16, clamp=True, form="skip")
    assert isinstance(net, SkipFSRCNN)
    expand = net.body_conv[6][0]
    assert torch.count_nonzero(expand.weight[:3]) == 0 and torch.count_nonzero(expand.bias[:3]) == 0
    assert torch.count_nonzero(net.tail_conv.conv.weight[:, :3]) == 0
    assert torch.count_nonzero(net.tail_conv.skip.weight) > 0

    prepared = qat.prepare(net, example_input())
    qat.calibrate(prepared, [_photo_patches(8, seed) for seed in range(2)])
    prepared.eval()
    qat.settle_weight_ranges(prepared)
    int8 = qat.export(prepared)
    targets = [str(n.target) for n in int8.graph.nodes if n.op == "call_function"]
    assert "quantized.add" in targets
    assert any(n.op == "call_function" and getattr(n.target, "__name__", "") == "sub_pixel_shuffle"
               and n.args[3] == (0.0, 1.0) for n in int8.graph.nodes)
    x = _photo_patches(4, seed=5)
    with torch.inference_mode():
        simulated, real = prepared(x), int8(x)
    assert float(real.min()) >= 0.0 and float(real.max()) <= 1.0
    assert float(((real - simulated) * 255).abs().mean()) < 0.5  # well under one 8-bit level on average


def test_the_int8_widths_write_8_bit_image_levels_and_need_no_clip(model):
    """The served int8 widths requantize their last layer onto the image's 8-bit levels and
    hand that int8 tensor to the shuffle: every output value is k/255 in [0, 1] without a clip
    pass, and the result is what dequantizing first and shuffling in float gives."""
    from models.arm.nets import sub_pixel_shuffle

    x = torch.rand(5, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for r in model.rungs[4:]:
        net = model.subnets[r.index - 1]  # w16's tail is a convolution, w36's and w56's a sum (skip form)
        shuffle = next(n for n in net.graph.nodes if n.target is sub_pixel_shuffle)
        assert shuffle.args[0].target != "dequantize", r.name
        codes = []

        class Capture(torch.fx.Interpreter):
            def call_function(self, target, args, kwargs):
                if target is sub_pixel_shuffle:
                    codes.append(args[0])
                return super().call_function(target, args, kwargs)

        with torch.inference_mode():
            out = Capture(net).run(x)
        assert (codes[0].q_scale(), codes[0].q_zero_point()) == (pytest.approx(1 / 255), 0)
        assert out.shape == (5, 3, 128, 128) and float(out.min()) >= 0 and float(out.max()) <= 1
        torch.testing.assert_close(out, model.run_patches(r.index, x), rtol=0, atol=0)
        assert float((out * 255 - torch.round(out * 255)).abs().max()) < 1e-4, r.name
        torch.testing.assert_close(out, sub_pixel_shuffle(codes[0].dequantize(), 4, 3, (0.0, 1.0)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("zero_point", [0, 37])
def test_shuffling_int8_phases_equals_shuffling_their_dequantized_values(zero_point) -> None:
    """Any quint8 grid, one that reaches past the clip range (and needs the clip) included."""
    from models.arm.nets import sub_pixel_shuffle

    phases = torch.randn(3, 48, 7, 9).contiguous(memory_format=torch.channels_last)
    q = torch.quantize_per_tensor(phases, 0.013, zero_point, torch.quint8)
    for clamp in (None, (0.0, 1.0)):
        expected = sub_pixel_shuffle(q.dequantize(), 4, 3, clamp)
        got = sub_pixel_shuffle(q, 4, 3, clamp)
        assert got.dtype == torch.float32 and got.shape == (3, 3, 28, 36)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_the_flat_leaky_relus_run_inside_the_int8_convolutions(model):
    """Our FSRCNN's head and expanding layers have leaky ReLUs of slope -0.004 and 0.0001: the
    int8 rungs run them as ReLUs fused into their convolutions, leaving the two others
    (0.034, 0.38) as separate quantized passes."""
    from torch.ao.nn.intrinsic.quantized import ConvReLU2d
    from torch.ao.nn.quantized import LeakyReLU

    for r in model.rungs[4:]:
        assert model.compressed[r.name]["calibration"]["flat_relu"] is True, r.name
        kinds = [type(m) for m in model.subnets[r.index - 1].modules()]
        assert kinds.count(ConvReLU2d) == 2 and kinds.count(LeakyReLU) == 2, (r.name, kinds)


def test_moving_trained_int8_tensors_to_the_flat_relu_form_keeps_them_and_the_output() -> None:
    """``state_with_flat_relu`` keeps every weight and every grid the fused network still has
    (the ones after the activations) and drops only the grids of the flat activations' inputs;
    the int8 network it makes is as close to the fp32 width as the leaky one (it skips a
    rounding and loses the activations' tiny negative side)."""
    from compress import qat
    from models.arm.quantize import example_input, float_form, state_with_flat_relu

    model = ArmSR.from_checkpoint(BUNDLED_ARM)
    form = lambda relu: float_form(model.backbone, model.full_state, 16, flat_relu=relu)  # noqa: E731
    trained = qat.prepare(form(False), example_input())
    qat.calibrate(trained, [_photo_patches(8, seed) for seed in range(2)])
    trained.eval()
    fused = qat.prepare(form(True), example_input())
    state = state_with_flat_relu(trained, fused)

    old = trained.state_dict()
    for key, value in state.items():
        if not key.startswith("activation_post_process_"):
            assert torch.equal(value, old[key]), key
    bounds = lambda s: [float(v) for k, v in s.items() if k.endswith(".lower")]  # noqa: E731
    assert len(bounds(old)) - len(bounds(state)) == 2
    assert set(bounds(state)) <= set(bounds(old))

    x = _photo_patches(8, seed=5)
    with torch.inference_mode():
        fp32 = form(False).eval()(x)
        leaky = qat.load(form(False), example_input(), old)(x)
        relu = qat.load(form(True), example_input(), state)(x)
    mse = lambda y: float(((y - fp32) * 255).square().mean())  # noqa: E731
    assert mse(relu) < 1.1 * mse(leaky), (mse(relu), mse(leaky))
    with pytest.raises(ValueError, match="do not match"):
        state_with_flat_relu(trained, qat.prepare(form(False), example_input()))


def test_the_official_checkpoint_has_no_leaky_relu_flat_enough_to_fuse(official) -> None:
    """Its flattest slopes (0.006) carry about 1 dB (docs/COMPRESSION.md): they stay leaky."""
    from models.arm.quantize import flat_leaky_as_relu, float_form

    official_model = ArmSR.from_checkpoint(official / "arm-fsrcnn.pth")
    net = float_form(official_model.backbone, official_model.full_state, 56)
    assert flat_leaky_as_relu(net) == 0


def test_a_network_without_pass_through_taps_keeps_its_plain_form_when_asked_for_the_skip() -> None:
    from models.arm.nets import FSRCNN
    from models.arm.quantize import SkipFSRCNN, float_form

    model = ArmSR.from_checkpoint(BUNDLED_ARM)
    full_state = {k: (torch.randn_like(v) * 0.05 if v.dim() == 4 else v) for k, v in model.full_state.items()}
    net = float_form(model.backbone, full_state, 16, form="skip")  # random weights: no dominant identity tap
    assert isinstance(net, FSRCNN) and not isinstance(net, SkipFSRCNN)


def _photo_patches(n: int, seed: int) -> torch.Tensor:
    """n 32x32 patches of a synthetic photo, float NCHW in [0, 1] (no data set needed)."""
    photo = torch.from_numpy(synthetic_photo(32 * n, 32, seed=seed)).permute(2, 0, 1).float() / 255
    return torch.stack(photo.split(32, dim=1))


def test_the_output_correction_is_fitted_by_least_squares_and_folded_without_changing_a_weight_code() -> None:
    """``fit_output_correction`` recovers a known gain and offset per tail output channel, and
    ``fold_output_correction`` moves the int8 network's output by that map while every int8
    weight code stays what training made it (the per-channel grids scale with the weights)."""
    from safetensors.torch import load_file

    from models.arm.nets import SCALE
    from models.arm.quantize import (QAT_FILE, fit_output_correction, fold_output_correction, int8_width,
                                     output_phases, uses_flat_relu)

    model = ArmSR.from_checkpoint(BUNDLED_ARM, int8=True)
    tensors = load_file(BUNDLED_ARM.parent / QAT_FILE)
    own = {k.removeprefix("w36."): v for k, v in tensors.items() if k.startswith("w36.")}
    relu = uses_flat_relu(model.compressed["w36-int8"])
    rebuild = lambda state: int8_width(model.backbone, model.full_state, 36, state, "skip", "narrow",  # noqa: E731
                                       flat_relu=relu)
    gen = torch.Generator().manual_seed(0)
    gain = 1 + 0.02 * torch.randn(48, generator=gen)
    offset = 0.01 * torch.randn(48, generator=gen)  # about 2.5 output levels
    before, after = rebuild(own), rebuild(fold_output_correction(own, gain, offset))

    convs = lambda net: {n: m for n, m in net.named_modules() if n.startswith("tail_conv.")  # noqa: E731
                         and hasattr(m, "weight") and callable(m.weight)}
    assert set(convs(before)) == {"tail_conv.conv", "tail_conv.skip"}
    for name, conv in convs(before).items():
        assert torch.equal(conv.weight().int_repr(), convs(after)[name].weight().int_repr()), name

    batches = [_photo_patches(8, seed) for seed in range(3)]
    with torch.inference_mode():
        y, z = (output_phases(net(batches[0]), SCALE) for net in (before, after))
    expected = gain[:, None] * y + offset[:, None]
    # The same map, up to the output grids' rounding (about half a level; the map moves 3 levels).
    moved = float(((z - y) * 255).abs().mean())
    residual = float(((z - expected) * 255).abs().mean())
    assert moved > 2.0 and residual < 0.2 * moved, (moved, residual)
    fitted_gain, fitted_offset = fit_output_correction(after, before, batches, SCALE)
    # Recovered to within a quarter of the spread applied (24 patches, both outputs rounded).
    assert torch.allclose(fitted_gain, gain, atol=5e-3) and torch.allclose(fitted_offset, offset, atol=3e-3)
    with pytest.raises(ValueError, match="not positive"):
        fold_output_correction(own, -gain, offset)
