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
    from models.pssnet.compact import compact_widths, dcff_compact, plain_compact
    from models.pssnet.dense_train import layer_widths
    from models.pssnet.nets import demo_spec

    spec = demo_spec("mobilenet_v1", 7)
    torch.manual_seed(0)
    net = dcff_compact(spec, 0.5)
    dcff.refuse_all(net, 0, 4)
    net.eval()
    dense = dcff.exported_copy(net)
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


def test_cifar_resnet56_has_the_papers_size():
    """125.49 M multiply-accumulates and 0.85 M parameters on 10 classes: the ResNet-56 the
    pruning papers (DCFF's table included) start from; half inner width halves the MACs."""
    from compress.artifact import macs
    from models.pssnet.cifar_resnet import CifarResNet, compact_inner

    full = CifarResNet(56, 10)
    assert macs(full) == 125_485_696 and sum(p.numel() for p in full.parameters()) == 853_018
    half = CifarResNet(56, 10, compact_inner(56, 0.5))
    assert macs(half) / macs(full) == pytest.approx(0.50, abs=0.01)
    assert full(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(55)
    with pytest.raises(ValueError, match="inner widths"):
        CifarResNet(20, 10, [17] * 9)  # wider than stage 1's 16


def test_dcff_compact_resnet_exports_exactly_and_round_trips(tmp_path):
    from models.pssnet import cifar_resnet
    from models.pssnet.compact import compact_resnet

    torch.manual_seed(0)
    net = compact_resnet(20, 7, 0.5, fused=True)
    fused = [m for m in net.modules() if isinstance(m, dcff.FusedConv2d)]
    assert len(fused) == 9 and {(m.compact_out, m.out_channels) for m in fused} == {(8, 16), (16, 32), (32, 64)}
    dcff.refuse_all(net, 0, 4)
    net.train()
    net(torch.randn(8, 3, 32, 32))  # BN statistics move off their initial values
    dense = dcff.exported_copy(net)
    assert not any(isinstance(m, dcff.FusedConv2d) for m in dense.modules())
    assert set(dense.state_dict()) == set(compact_resnet(20, 7, 0.5, fused=False).state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert float((net.eval()(x) - dense(x)).abs().max()) <= 1e-5
    manifest = cifar_resnet.save(tmp_path, dense, {"method": "dcff"})
    loaded, read = cifar_resnet.load(tmp_path)
    assert read == manifest and manifest["inner_widths"] == [8] * 3 + [16] * 3 + [32] * 3
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), dense(x), rtol=0, atol=0)


def test_zero_last_bn_starts_every_block_as_its_shortcut():
    from models.pssnet.compact import compact_resnet

    torch.manual_seed(0)
    net = compact_resnet(20, 5, 0.5, fused=True, zero_last_bn=True).eval()
    x = torch.relu(torch.randn(2, 16, 32, 32))
    for block in net.blocks:
        with torch.inference_mode():
            y = block(x)
        torch.testing.assert_close(y, torch.relu(block.shortcut(x)), rtol=0, atol=0)
        x = y
    plain = compact_resnet(20, 5, 0.5, fused=False)
    assert all(float(b.bn2.weight.detach().abs().sum()) > 0 for b in plain.blocks)  # not without asking
