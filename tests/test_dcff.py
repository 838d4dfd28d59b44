"""DCFF (compress.dcff): the temperature schedule, the KL importance against its literal
n^3 form, fused layers and their exact export, and the compact MobileNetV1 built on them."""

from __future__ import annotations

import math

import pytest
import torch

from compress import dcff


def test_temperature_runs_from_start_to_end_and_is_near_one_hot_after_epoch_zero():
    assert dcff.temperature(0, 90) == pytest.approx(dcff.T_START)
    assert dcff.temperature(90, 90) == pytest.approx(dcff.T_END, rel=1e-9)
    ts = [dcff.temperature(e, 300) for e in range(0, 301, 10)]
    assert ts == sorted(ts)
    assert dcff.temperature(1, 300) == pytest.approx(4622, rel=1e-3)  # k = 1: the jump the method's code makes


def test_kl_scores_equal_the_literal_pairwise_sum():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(7, 7, generator=g, dtype=torch.float64), dim=1)
    n, eps = 7, 1e-7
    literal = torch.tensor([sum(float((p[i] * torch.log(p[i] / (p[j] + eps))).sum()) / n for j in range(n))
                            for i in range(n)], dtype=torch.float64)
    torch.testing.assert_close(dcff.kl_scores(p), literal)
    p[0, 3] = 0.0  # an underflowed probability: 0 log 0, as in the method
    assert not torch.isfinite(dcff.kl_scores(p)).all()


def test_fused_layer_exports_to_the_same_convolution_and_trains_every_filter_while_soft():
    torch.manual_seed(0)
    layer = dcff.FusedConv2d(5, 4, 9, 3, padding=1)
    assert layer.refuse(1.0)  # soft: finite scores, a new choice
    x = torch.randn(2, 5, 8, 8)
    y = layer(x)
    torch.testing.assert_close(layer.exported()(x), y, atol=1e-5, rtol=0)
    y.square().sum().backward()
    assert (layer.weight.grad.flatten(1).abs().sum(1) > 0).all()  # all 9 filters of the bank learn


def test_at_high_temperature_the_choice_is_kept_and_fusion_becomes_selection():
    torch.manual_seed(1)
    layer = dcff.FusedConv2d(3, 2, 6, 1)
    layer.refuse(1.0)
    kept = layer.kept.clone()
    assert not layer.refuse(dcff.temperature(1, 90))  # underflow: non-finite scores
    assert torch.equal(layer.kept, kept)
    torch.testing.assert_close(layer.export_weight(), layer.weight[kept], atol=1e-6, rtol=0)


def test_dcff_compact_mobilenet_exports_exactly_and_has_the_compact_widths():
    from models.pssnet.compact import compact_widths, dcff_compact, export, plain_compact
    from models.pssnet.dense_train import layer_widths
    from models.pssnet.nets import demo_spec

    spec = demo_spec("mobilenet_v1", 7)
    torch.manual_seed(0)
    net = dcff_compact(spec, 0.5)
    dcff.refuse_all(net, 0, 4)
    net.eval()
    dense = export(net)
    assert layer_widths(dense.widths) == compact_widths(spec, 0.5) == layer_widths(plain_compact(spec, 0.5).widths)
    assert not any(isinstance(m, dcff.FusedConv2d) for m in dense.modules())
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert float((net(x) - dense(x)).abs().max()) <= 1e-5
    assert set(dense.state_dict()) == set(plain_compact(spec, 0.5).state_dict())  # a plain dense network


def test_compact_widths_floor_every_layer():
    from models.pssnet.compact import compact_widths
    from models.pssnet.nets import demo_spec

    spec = demo_spec("mobilenet_v1", 7)
    full = compact_widths(spec, 1.0)
    assert compact_widths(spec, 0.5) == [max(1, math.floor(0.5 * n)) for n in full]
