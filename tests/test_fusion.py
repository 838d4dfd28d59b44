"""Convolutions fused with their activation / output clip (models/common/fusion.py): the
same function as the plain layers, used by ARM's float32 and bf16 rungs, and a safe
fallback where the fused kernel is missing or wrong."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from compress.bf16 import native_bf16, with_bf16_sections
from models.arm.nets import SubPixelDeconv, extract_subnet
from models.common import fusion
from models.common.fusion import FusedConv2d, fuse_conv_activations

needs_kernel = pytest.mark.skipif(fusion._kernel() is None, reason="this torch has no oneDNN fused convolution")


def _net() -> nn.Module:
    torch.manual_seed(0)
    prelu = nn.PReLU()
    with torch.no_grad():
        prelu.weight.fill_(0.2)
    return nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), prelu), nn.Conv2d(8, 8, 3, padding=1),
                         nn.LeakyReLU(0.1), nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.PReLU(4)).eval()  # per-channel slopes: no post-op, left alone


def _x() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)


@needs_kernel
def test_each_conv_activation_pair_becomes_one_kernel_computing_the_same():
    net, x = _net(), _x()
    fused = fuse_conv_activations(net, x)
    kinds = [type(m).__name__ for m in fused.modules() if not isinstance(m, nn.Sequential)]
    assert kinds.count("FusedConv2d") == 4 and kinds.count("Identity") == 3
    # a per-channel PReLU has no post-op: it stays, after its convolution on oneDNN's kernel alone
    assert isinstance(fused[6], nn.PReLU) and fused[5].attr == "none"
    assert [m.attr for m in fused.modules() if isinstance(m, FusedConv2d)] == ["leaky_relu", "leaky_relu", "relu",
                                                                              "none"]
    with torch.inference_mode():
        assert torch.allclose(fused(x), net(x), atol=1e-5)
        one = x[:1]  # a batch of one, which torch's own dispatch sends to its im2col path instead
        assert torch.allclose(fused(one), net(one), atol=1e-5)
    assert isinstance(net[0][0], nn.Conv2d)  # the network given is not changed


@needs_kernel
def test_a_convolution_without_activation_runs_on_onednn_even_for_one_item():
    """torch runs a plain float convolution of a batch of one through ``_slow_conv2d_forward``
    (im2col); the fused network's lone convolutions must not."""
    net = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 12, 3, padding=1)).eval()
    x = torch.rand(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    fused = fuse_conv_activations(net, x)
    assert [type(m).__name__ for m in fused] == ["FusedConv2d", "FusedConv2d"]

    def ops(model: nn.Module) -> set[str]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.inference_mode():
            model(x)
        return {e.key for e in prof.key_averages()}

    assert "mkldnn::_convolution_pointwise" in ops(fused) and "aten::_slow_conv2d_forward" not in ops(fused)
    with torch.inference_mode():
        assert torch.allclose(fused(x), net(x), atol=1e-5)


def test_without_the_kernel_or_with_a_wrong_one_the_network_is_kept(monkeypatch, caplog):
    net, x = _net(), _x()
    monkeypatch.setattr(fusion, "_kernel", lambda: None)
    assert fuse_conv_activations(net, x) is net
    monkeypatch.undo()
    if fusion._kernel() is None:
        pytest.skip("this torch has no oneDNN fused convolution")
    plain_forward = FusedConv2d.forward
    monkeypatch.setattr(FusedConv2d, "forward", lambda self, t: plain_forward(self, t) + 0.5)
    with caplog.at_level(logging.WARNING, logger="models.common.fusion"):
        assert fuse_conv_activations(net, x) is net
    assert "differs" in caplog.text


@needs_kernel
def test_arm_rungs_clip_inside_the_last_convolution_and_match_the_plain_subnets(bundled_model):
    """The served FSRCNN widths (fused) against plain serving-form subnets clipped after."""
    x = torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for i, width in enumerate(bundled_model.backbone.widths):
        served = bundled_model.subnets[i]
        tail = served.tail_conv
        assert isinstance(tail, SubPixelDeconv) and tail.clamp is None and tail.clips == (0.0, 1.0)
        fused = [m.attr for m in served.modules() if isinstance(m, FusedConv2d)]
        assert len(fused) == 8 and fused.count("none") == 3  # 4 PReLUs, the clip, 3 mapping convolutions
        plain = extract_subnet(bundled_model.backbone, bundled_model.full_state, width).to(
            memory_format=torch.channels_last)
        with torch.inference_mode():
            want = plain(x).clamp(0, 1)
            got = bundled_model.run_patches(i + 1, x)
        assert (got - want).abs().max().item() < 1e-5


@needs_kernel
@pytest.mark.skipif(not native_bf16("cpu"), reason="no native bf16 on this CPU")
def test_a_bf16_section_of_a_fused_network_computes_what_the_plain_one_does_in_bf16(bundled_model):
    from models.arm.bf16 import BF16_SECTIONS

    sections = BF16_SECTIONS["fsrcnn"]
    x = torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    fused = with_bf16_sections(bundled_model.subnets[2], sections)
    plain = extract_subnet(bundled_model.backbone, bundled_model.full_state, bundled_model.backbone.widths[2]).to(
        memory_format=torch.channels_last)
    plain = with_bf16_sections(plain, sections)
    with torch.inference_mode():
        got, want = fused(x).float(), plain(x).float().clamp(0, 1)
    # bf16 rounding of the same products in another order: a few bf16 steps at most
    assert (got - want).abs().max().item() < 2e-2
    assert (got - want).abs().mean().item() < 1e-3
