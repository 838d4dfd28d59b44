"""The simulated k-bit quantizers of quantization-aware training (DDTB and its PAMS-like
baseline): grids, bounds, gradients, the gate and the choice of dynamic layers."""

from __future__ import annotations

import torch

from compress.fakequant import (DualBoundQuant, SymmetricBoundQuant, attention_transfer_loss, gate_regulariser,
                                quantize_weight_asym, select_dynamic)


def test_dual_bounds_put_activations_on_a_k_bit_grid_between_the_bounds() -> None:
    q = DualBoundQuant(bits=3)
    with torch.no_grad():
        q.alpha_l.fill_(-1.0)
        q.alpha_u.fill_(3.0)
    x = torch.linspace(-5, 5, 1001)
    y = q(x)
    step = 4.0 / 7
    assert y.unique().numel() <= 2 ** 3
    # the grid is aligned to zero (its zero point is rounded), so the bounds hold to half a step
    assert y.min() >= -1.0 - step / 2 - 1e-6 and y.max() <= 3.0 + step / 2 + 1e-6
    assert torch.allclose(torch.remainder(y / step + 1e-4, 1.0), torch.full_like(y, 1e-4), atol=1e-3)
    inside = (x > -1) & (x < 3)
    assert (y[inside] - x[inside]).abs().max() <= step / 2 + 1e-6


def test_gradients_reach_both_bounds_and_the_input_inside_them() -> None:
    q = DualBoundQuant(bits=2)
    x = torch.tensor([-20.0, -1.0, 0.5, 2.0, 20.0], requires_grad=True)
    q(x).sum().backward()
    assert q.alpha_u.grad is not None and q.alpha_u.grad != 0 and q.alpha_l.grad != 0
    assert x.grad[0] == 0 and x.grad[-1] == 0 and (x.grad[1:4] == 1).all()  # straight through inside


def test_dual_bounds_beat_a_symmetric_bound_on_asymmetric_activations() -> None:
    """SR activations after ReLU are one-sided: a symmetric grid wastes half its levels on
    values that never occur.  Both quantizers initialised at the 99th percentile."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(20000) * 2 + 0.5)
    for bits in (2, 3, 4):
        dual, sym = DualBoundQuant(bits), SymmetricBoundQuant(bits)
        dual.init_from_percentiles(x)
        sym.init_from_percentiles(x)
        with torch.no_grad():
            assert (dual(x) - x).pow(2).mean() < 0.6 * (sym(x) - x).pow(2).mean(), bits


def test_the_gate_scales_the_bounds_per_image_and_learns() -> None:
    torch.manual_seed(0)
    q = DualBoundQuant(bits=2, channels=8)
    q.gated = True
    x = torch.cat([torch.rand(1, 8, 6, 6) * 0.1, torch.rand(1, 8, 6, 6) * 10])
    upper, lower = q.bounds(x)
    assert upper.shape == (2, 1, 1, 1) and not torch.equal(upper[0], upper[1])
    assert ((upper > 0) & (upper < 2 * q.alpha_u)).all()
    q(x).pow(2).sum().backward()
    assert q.gate.conv2.weight.grad.abs().sum() > 0 and q.gate.conv1.weight.grad.abs().sum() > 0
    q.gated = False
    q.train()
    q(x)
    assert gate_regulariser([q]) > 0  # the static phase trains the gate toward beta = 1


def test_dynamic_layers_are_those_whose_range_varies_most() -> None:
    torch.manual_seed(0)
    steady, wild, mid = DualBoundQuant(2), DualBoundQuant(2), DualBoundQuant(2)
    for q in (steady, wild, mid):
        q.calibrating = True
    for i in range(10):
        base = torch.randn(4, 100)
        steady(base)
        wild(base * (1 + 5 * i))
        mid(base * (1 + 0.5 * i))
    assert select_dynamic([steady, wild, mid], 0.3) == [wild]
    assert select_dynamic([steady, wild, mid], 0.67) == [wild, mid]
    assert steady(torch.ones(3)).eq(1).all()  # calibrating passes float through


def test_weights_get_k_levels_within_their_percentiles() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    for bits in (2, 4, 8):
        assert quantize_weight_asym(w, bits).unique().numel() <= 2 ** bits
    err = (quantize_weight_asym(w, 8) - w).abs()
    lo, hi = torch.quantile(w.flatten(), 0.01), torch.quantile(w.flatten(), 0.99)
    inside = (w > lo) & (w < hi)
    assert err[inside].max() <= 0.5 * (hi - lo) / 255 + 1e-6


def test_attention_transfer_is_zero_for_equal_features_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    f = torch.randn(2, 8, 5, 5)
    assert attention_transfer_loss(f, f) == 0
    assert attention_transfer_loss(f * torch.rand(1, 1, 5, 5), f) > 0
