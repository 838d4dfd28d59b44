"""Quantization-aware training with DDTB bounds, exported to real int8 kernels (compress.qat)."""

from __future__ import annotations

import torch
from torch import nn

from compress import int8, qat


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(), nn.Conv2d(8, 3, 3, padding=1)).eval()


def _train(prepared: nn.Module, target: nn.Module, steps: int) -> None:
    opt = torch.optim.Adam(qat.parameter_groups(prepared, 1e-3, 1e-2))
    for _ in range(steps):
        x = torch.rand(8, 3, 16, 16)
        loss = (prepared(x) - target(x).detach()).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_the_exported_int8_network_computes_what_was_trained():
    net = int8.prelu_as_leaky_relu(_net())
    prepared = qat.prepare(net, torch.rand(2, 3, 16, 16))
    qat.calibrate(prepared, [torch.rand(8, 3, 16, 16) for _ in range(4)])
    bounds_before = [(q.lower.item(), q.upper.item()) for q in qat.activation_bounds(prepared)]
    _train(prepared, net, 30)
    assert [(q.lower.item(), q.upper.item()) for q in qat.activation_bounds(prepared)] != bounds_before  # bounds learn
    qat.settle_weight_ranges(prepared)
    real = qat.export(prepared)
    assert int8.is_quantized(real)
    x = torch.rand(4, 3, 16, 16)
    with torch.inference_mode():
        fake, exported = prepared.eval()(x), real(x)
    out_scale = qat.activation_bounds(prepared)[-1].calculate_qparams()[0].item()
    assert float((fake - exported).abs().max()) <= 1.01 * out_scale  # at most one output step apart


def test_a_saved_state_rebuilds_the_same_int8_network():
    net = int8.prelu_as_leaky_relu(_net())
    example = torch.rand(2, 3, 16, 16)
    prepared = qat.prepare(net, example)
    qat.calibrate(prepared, [torch.rand(8, 3, 16, 16) for _ in range(2)])
    _train(prepared, net, 5)
    rebuilt = qat.load(net, example, qat.state(prepared))
    x = torch.rand(3, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(qat.export(prepared)(x), rebuilt(x))


def test_the_range_before_a_nearly_flat_leaky_relu_cuts_the_negative_tail():
    """FSRCNN's case: a long negative tail that a slope of 0.006 nearly erases.  Judged after
    the activation, the grid goes to the positive values; judged before it, it must not."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(50_000, generator=g) * 5, -torch.randn(50_000, generator=g).abs() * 4])
    lo, hi = float(x.min()), float(x.max())  # about -18.6 and 5
    lower_after, upper_after = qat.best_range(x, lo, hi, 0.006, 255)
    lower_plain, _ = qat.best_range(x, lo, hi, None, 255)
    assert lower_after > 0.4 * lo  # the tail is cut
    assert upper_after > 0.9 * hi  # the detail keeps its range
    assert lower_plain < 0.8 * lo  # without the activation the tail carries error and is kept


def test_prelu_becomes_the_leaky_relu_it_equals():
    net = _net()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = net(x)
        after = int8.prelu_as_leaky_relu(net)(x)
    assert isinstance(net[1], nn.LeakyReLU)
    assert torch.allclose(before, after, atol=1e-6)


def test_the_narrow_weight_grid_keeps_each_channels_largest_weight():
    """torch.ao's full int8 grid ([-128, 127], scale max|w| / 127.5) clips every channel's
    largest positive weight by half a step; the narrow grid puts it exactly on code 127."""
    net = int8.prelu_as_leaky_relu(_net())
    with torch.no_grad():
        net[0].weight[:, 0, 1, 1] = 1.0  # a positive largest tap in every channel, like an identity pass-through
    example = torch.rand(2, 3, 16, 16)
    for grid, exact in (("narrow", True), ("full", False)):
        prepared = qat.prepare(net, example, weight_grid=grid)
        qat.calibrate(prepared, [torch.rand(8, 3, 16, 16)])
        weight = qat.export(prepared).get_submodule("0").weight()
        kept = weight.dequantize()[:, 0, 1, 1]
        assert torch.allclose(kept, torch.ones(8), atol=1e-6) == exact, (grid, kept)
        assert int(weight.int_repr().max()) == 127


class _SumThenRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1, bias=False)
        with torch.no_grad():
            self.a.weight.mul_(20)  # a's negative tail reaches far below -max(b)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.a(x) + self.b(x))


def test_an_addend_of_a_relu_sum_gets_no_grid_below_minus_the_other_addend():
    """relu(a + b) is 0 wherever a < -max(b), whatever a is there: the grid of a stops at
    -max(b), which costs the output nothing and buys a finer grid for the rest."""
    torch.manual_seed(1)
    net = _SumThenRelu().eval()
    prepared = qat.prepare(net, torch.rand(2, 3, 8, 8))
    batches = [torch.rand(8, 3, 8, 8) * 2 - 1 for _ in range(4)]
    qat.calibrate(prepared, batches)
    partnered = [q for q in qat.activation_bounds(prepared) if q.relu_sum_partner]
    assert len(partnered) == 2
    for q in partnered:
        [other] = q.relu_sum_partner
        seen_min = float(q.activation_post_process.min_val)
        assert q.lower.item() >= -float(other.activation_post_process.max_val) - 1e-6
        assert q.lower.item() > seen_min or seen_min >= -float(other.activation_post_process.max_val)
    x = torch.rand(8, 3, 8, 8) * 2 - 1
    with torch.inference_mode():
        err = float((prepared.eval()(x) - net(x)).abs().max())
    assert err < 0.05 * float(net(x).detach().max())
