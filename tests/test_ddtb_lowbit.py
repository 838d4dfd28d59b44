"""The DDTB / PAMS-like low-bit benchmark (bench.ddtb_lowbit): the quantized body conv, which
layers get quantized, the bound initialisation, DDTB's schedule on a tiny network, and the
statistics of the table.  Small networks and synthetic photos: a few seconds in all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.ddtb_lowbit import (LABEL, QuantConv, TrainConfig, build_student, markdown, summarise,
                               train_quantized)
from compress.fakequant import DualBoundQuant, SymmetricBoundQuant
from models.arm.nets import FSRCNN
from models.common.matlab_resize import downscale_x4_uint8
from models.common.synthetic import synthetic_photo


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: with two threads on a shared 2-core machine the training tests
    ran 30x slower (thread hand-offs, not arithmetic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _teacher(nf: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return FSRCNN(nf).eval().requires_grad_(False)


def _photo_batch(n: int = 4, hr: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(LR, HR) float NCHW crops of the synthetic photo, LR by MATLAB bicubic x1/4."""
    img = synthetic_photo(2 * hr, 2 * hr, seed=1)
    crops = [img[y:y + hr, x:x + hr] for y in (0, hr) for x in (0, hr)][:n]
    to = lambda a: torch.from_numpy(np.stack(a).transpose(0, 3, 1, 2).astype(np.float32) / 255)  # noqa: E731
    return to([downscale_x4_uint8(c) for c in crops]), to(crops)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quant_conv_feeds_the_conv_k_bit_inputs_and_weights(bits: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.linspace(-3, 4, 4 * 10 * 10).view(1, 4, 10, 10)

    dual = DualBoundQuant(bits)
    with torch.no_grad():
        dual.alpha_l.fill_(-1.0)
        dual.alpha_u.fill_(2.0)
    wrapper = QuantConv(conv, dual, bits, weight_percentiles=(0.0, 100.0))
    assert dual(x).unique().numel() == 2 ** bits  # asymmetric grid: every one of the 2^k levels in use
    assert wrapper.quantized_weight().unique().numel() == 2 ** bits
    expected = F.conv2d(dual(x), wrapper.quantized_weight(), conv.bias, padding=1)
    assert torch.equal(wrapper(x), expected)
    assert not torch.allclose(wrapper(x), conv(x), atol=1e-3)

    sym = SymmetricBoundQuant(bits, init=2.0)
    assert sym(x).unique().numel() == 2 ** bits - 1  # PAMS-like: symmetric around an exact zero


def test_only_the_six_body_convs_are_quantized_and_everything_trains() -> None:
    teacher = _teacher()
    student, wrappers = build_student(teacher, "ddtb", 2)
    assert len(wrappers) == 6 and sum(isinstance(m, QuantConv) for m in student.modules()) == 6
    assert [w.conv.kernel_size for w in wrappers] == [(1, 1)] + [(3, 3)] * 4 + [(1, 1)]
    assert type(student.head_conv[0]) is nn.Conv2d and type(student.tail_conv) is nn.ConvTranspose2d
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())  # the teacher is a separate, frozen copy
    assert all(isinstance(w.act_quant, DualBoundQuant) and w.act_quant.gate is not None for w in wrappers)
    assert all(isinstance(w.act_quant, SymmetricBoundQuant) for w in build_student(teacher, "pams", 2)[1])
    assert all(w.act_quant.gate is None for w in build_student(teacher, "ddtb-static", 2)[1])

    x, _hr = _photo_batch()
    for w in wrappers:
        w.act_quant.calibrating = True
    with torch.no_grad():
        assert torch.allclose(student(x), teacher(x), atol=1e-6)  # calibration runs the float network


def test_bounds_start_at_the_percentiles_of_the_first_layers_float_input() -> None:
    teacher = _teacher()
    x, _hr = _photo_batch()
    with torch.no_grad():
        head = teacher.head_conv(x)
    for method in ("ddtb", "pams"):
        student, wrappers = build_student(teacher, method, 2)
        for w in wrappers:
            w.init_bounds = True
        with torch.no_grad():
            student.eval()(x)
        q = wrappers[0].act_quant
        if method == "ddtb":
            assert q.alpha_l.item() == pytest.approx(torch.quantile(head.flatten(), 0.01).item(), abs=1e-6)
            assert q.alpha_u.item() == pytest.approx(torch.quantile(head.flatten(), 0.99).item(), abs=1e-6)
        else:
            assert q.alpha.item() == pytest.approx(torch.quantile(head.abs().flatten(), 0.99).item(), abs=1e-6)
        assert all(not w.init_bounds for w in wrappers)  # once only
        assert all(abs(w.act_quant.alpha_u.item() if method == "ddtb" else w.act_quant.alpha.item()) < 10
                   for w in wrappers)  # every layer moved off the +-10 constant


def test_two_bit_ddtb_training_lowers_the_loss_and_gates_the_most_dynamic_layers() -> None:
    teacher = _teacher()
    student, wrappers = build_student(teacher, "ddtb", 2, weight_percentiles=(0.0, 100.0))
    x, hr = _photo_batch()
    calls = {"n": 0}

    def next_batch(_n: int) -> tuple[torch.Tensor, torch.Tensor]:
        calls["n"] += 1
        scale = 1.0 if calls["n"] % 2 else 0.5  # calibration batches of varying range
        return x * scale, hr * scale

    cfg = TrainConfig(steps=40, batch=4, static_frac=0.5, calib_batches=4, log_every=0)
    stats = train_quantized(student, wrappers, teacher, next_batch, cfg)
    assert calls["n"] == 4 + 40
    assert np.mean(stats.losses[-5:]) < 0.7 * stats.losses[0]
    gated = [i for i, w in enumerate(wrappers) if w.act_quant.gate is not None]
    assert gated == stats.dynamic_layers and len(gated) == 2  # round(0.3 * 6)
    top2 = sorted(range(6), key=lambda i: stats.intensities[i], reverse=True)[:2]
    assert sorted(top2) == gated
    assert all(wrappers[i].act_quant.gated for i in gated)
    q = wrappers[gated[0]].act_quant.eval()
    upper, _lower = q.bounds(torch.rand(3, wrappers[gated[0]].conv.in_channels, 8, 8))
    assert upper.shape == (3, 1, 1, 1)  # per-image bounds in the dynamic phase


def test_pams_gets_the_same_batches_and_no_gate_steps() -> None:
    teacher = _teacher()
    student, wrappers = build_student(teacher, "pams", 2, weight_percentiles=(0.0, 100.0))
    x, hr = _photo_batch()
    calls = {"n": 0}

    def next_batch(_n: int) -> tuple[torch.Tensor, torch.Tensor]:
        calls["n"] += 1
        return x, hr

    stats = train_quantized(student, wrappers, teacher, next_batch,
                            TrainConfig(steps=10, batch=4, calib_batches=4, log_every=0))
    assert calls["n"] == 4 + 10 and stats.dynamic_layers == [] and stats.intensities == []
    assert np.mean(stats.losses[-3:]) < stats.losses[0]


def test_summary_pairs_methods_by_seed() -> None:
    runs = [{"method": m, "bits": 2, "seed": s, "psnr_rgb": v} for m, s, v in
            [("ddtb", 0, 25.0), ("ddtb", 1, 26.0), ("ddtb", 2, 27.0),
             ("pams", 0, 24.5), ("pams", 1, 26.5), ("pams", 2, 26.0), ("pams", 3, 30.0)]]
    out = summarise(runs)
    g = out["groups"]["ddtb/2"]
    assert (g["n"], g["mean"], g["std"], g["min"], g["max"]) == (3, 26.0, 1.0, 25.0, 27.0)
    p = out["paired"]["ddtb-pams/2"]
    assert p["n"] == 3 and p["mean"] == pytest.approx(1 / 3) and p["wins"] == 2  # seed 3 has no pair
    assert p["min"] == pytest.approx(-0.5) and p["max"] == pytest.approx(1.0)
    table = markdown(out, {"fp32": 29.0, "bicubic": 28.0}, [2], ["ddtb", "pams"])
    assert LABEL in table and "| 26.000 +- 1.000 | -3.000 | 3 |" in table and "| +0.333 |" in table
