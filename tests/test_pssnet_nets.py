"""PSS-Net supernets: width rule, FLOPs and parameter reference points of the official code,
the official key layout, dense extraction, BN recalibration and folding."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.pssnet.calibrate import bn_stats, load_bn_stats, recalibrate_bn
from models.pssnet.nets import (
    MBV1_IMAGENET, MBV2_IMAGENET, PssSupernet, SubnetConfig, demo_spec, extract_subnet, fold_bn, hooked_flops,
    make_divisible, random_cfg, subnet_flops, subnet_params, subnet_widths, supernet_key_shapes,
)
from tests.pssnet_layout import LAYOUTS

SPECS = {"mobilenet_v1": MBV1_IMAGENET, "mobilenet_v2": MBV2_IMAGENET}


def test_make_divisible_rule() -> None:
    # new = max(8, int(v + 4) // 8 * 8), plus 8 when that is below 0.9 v.
    assert [make_divisible(v) for v in (3, 8, 12, 20, 24, 48.0, 57.6, 83.0, 84.0)] == [8, 8, 16, 24, 24, 48, 56, 80, 88]
    # 11.9: int(15.9) // 8 * 8 = 8, but 8 < 0.9 * 11.9, so 16; likewise 19.9 -> 16 -> 24.
    assert make_divisible(11.9) == 16 and make_divisible(19.9) == 24
    assert make_divisible(1024 * 0.75) == 768 and make_divisible(16 * 0.75) == 16


@pytest.mark.parametrize("name, points", [
    ("mobilenet_v1", [(224, 1.0, 568.79), (128, 0.75, 106.78), (224, 0.75, 325.44), (128, 1.0, 186.42)]),
    ("mobilenet_v2", [(224, 1.0, 300.84), (128, 0.75, 69.15), (224, 0.75, 209.13), (128, 1.0, 99.09)]),
])
def test_flops_reference_points(name: str, points: list) -> None:
    spec = SPECS[name]
    for res, mult, expected in points:
        cfg = SubnetConfig(name, res, (mult,) * spec.num_mults)
        assert round(subnet_flops(spec, cfg), 2) == expected
    assert round(spec.max_cfg().infer_metric, 2) == points[0][2]
    assert round(spec.min_cfg().infer_metric, 2) == points[1][2]


def test_supernet_parameter_counts() -> None:
    assert subnet_params(MBV1_IMAGENET) == 4_231_976
    assert subnet_params(MBV2_IMAGENET) == 3_504_872
    # The max subnet as a dense net has exactly the supernet's parameters.
    assert subnet_params(MBV1_IMAGENET, MBV1_IMAGENET.max_cfg()) == 4_231_976


@pytest.mark.parametrize("name", sorted(SPECS))
def test_state_dict_layout_matches_the_official_checkpoints(name: str) -> None:
    """Our supernet's state-dict keys and shapes are those of the official ``checkpoint_*.pt``
    (written out by hand in tests/pssnet_layout.py)."""
    ours = supernet_key_shapes(SPECS[name])
    assert ours == LAYOUTS[name]()
    assert len(ours) == {"mobilenet_v1": 164, "mobilenet_v2": 314}[name]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hooked_flops_equal_analytic(name: str) -> None:
    """Hooks on the real modules (supernet slices and dense subnets) give the analytic count."""
    torch.manual_seed(0)
    spec = replace(SPECS[name], num_classes=10)  # fewer classes: FC counted the same way, smaller net
    net = PssSupernet(spec).eval()
    rng = np.random.default_rng(0)
    for cfg in [spec.min_cfg(), random_cfg(spec, rng)]:
        x = torch.rand(1, 3, 224, 224)
        expected = subnet_flops(spec, cfg)
        assert hooked_flops(net, x, lambda t: net(t, cfg)) == pytest.approx(expected, abs=1e-9)
        assert hooked_flops(extract_subnet(net, cfg).eval(), x) == pytest.approx(expected, abs=1e-9)


def test_mbv2_tail_multiplier_is_inert() -> None:
    spec = demo_spec("mobilenet_v2", 10)
    a = SubnetConfig(spec.model_name, 32, (0.8,) * 8 + (1.0,))
    b = replace(a, stage_cout_mults=(0.8,) * 8 + (0.5,))
    assert subnet_widths(spec, a) == subnet_widths(spec, b)
    assert subnet_flops(spec, a) == subnet_flops(spec, b)
    assert subnet_widths(spec, a).tail == 1280


def test_mbv2_expand_is_derived_from_actual_input() -> None:
    w = subnet_widths(MBV2_IMAGENET, SubnetConfig("mobilenet_v2", 224, (0.75,) * 9))
    assert w.stem == 24 and w.blocks[0].mid == 24 and w.blocks[0].cout == 16  # 16*0.75 = 12 -> 16
    assert w.blocks[1].cin == 16 and w.blocks[1].mid == 96 and w.blocks[1].cout == 24  # 18 -> int(22)//8*8 = 16 < 16.2 -> 24
    assert [b.residual for b in w.blocks[:4]] == [False, False, True, False]


def test_cfg_round_trip_official_dict_and_string() -> None:
    cfg = SubnetConfig("mobilenet_v1", 160, tuple([0.812] * 14), "flops").with_metric(MBV1_IMAGENET, target=300)
    d = cfg.to_dict()
    assert list(d) == ["model_name", "infer_metric_type", "resolution", "stage_cout_mults", "infer_metric",
                       "infer_metric_target"]
    assert isinstance(d["stage_cout_mults"], list)
    assert SubnetConfig.from_dict(d) == cfg
    assert SubnetConfig.from_str(str(d)) == cfg
    with pytest.raises(ValueError):
        SubnetConfig.from_str("__import__('os').system('true')")


def _randomise_bn(net: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("1.weight", "4.weight", "7.weight")) and t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2"])
def test_dense_subnet_equals_supernet_and_folding_preserves(name: str) -> None:
    torch.manual_seed(0)
    spec = demo_spec(name, 12)
    net = PssSupernet(spec).eval()
    _randomise_bn(net)
    x = torch.randn(4, 3, spec.input_size, spec.input_size)
    rng = np.random.default_rng(1)
    for cfg in [spec.max_cfg(), spec.min_cfg(), random_cfg(spec, rng), random_cfg(spec, rng)]:
        with torch.no_grad():
            ref = net(x, cfg)
            dense = extract_subnet(net, cfg).eval()
            out = dense(x)
            folded = fold_bn(extract_subnet(net, cfg).eval())
            out_folded = folded(x)
        assert out.shape == (4, 12)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_folded, ref, atol=1e-5, rtol=1e-4)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


def test_official_size_dense_equals_supernet() -> None:
    """The same at ImageNet shapes (MBV2: residuals and derived expand widths)."""
    torch.manual_seed(0)
    spec = replace(MBV2_IMAGENET, num_classes=10)
    net = PssSupernet(spec).eval()
    _randomise_bn(net)
    cfg = SubnetConfig(spec.model_name, 136, (0.75, 0.9, 0.8, 0.77, 1.0, 0.85, 0.95, 0.8, 0.9))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(fold_bn(extract_subnet(net, cfg).eval())(x), net(x, cfg), atol=1e-5, rtol=1e-4)


def test_resolution_is_handled_inside_the_model() -> None:
    torch.manual_seed(0)
    spec = demo_spec("mobilenet_v1", 5)
    net = PssSupernet(spec).eval()
    cfg = replace(spec.max_cfg(), resolution=24)
    x = torch.randn(2, 3, 32, 32)
    resized = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=True)
    with torch.no_grad():
        torch.testing.assert_close(net(x, cfg), net(resized, cfg))
        torch.testing.assert_close(extract_subnet(net, cfg).eval()(x), net(resized, cfg), atol=1e-5, rtol=1e-5)


def test_recalibration_gives_each_subnet_its_own_statistics() -> None:
    """Recalibrating a dense subnet equals recalibrating the supernet at that cfg (exact
    cumulative average over the batches), and never depends on which subnet ran last."""
    torch.manual_seed(0)
    spec = demo_spec("mobilenet_v1", 7)
    net = PssSupernet(spec)
    batches = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    a, b = spec.min_cfg(), SubnetConfig(spec.model_name, 36, (0.9,) * 14)

    dense_a = extract_subnet(net, a)
    assert recalibrate_bn(dense_a, batches) == 3
    stats_a = bn_stats(dense_a)

    # Pollute the shared buffers with another subnet, then recalibrate cfg a on the supernet.
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, 32, 32) * 3 + 1, b)
    polluted = extract_subnet(net, a)
    recalibrate_bn(net, batches, a)
    via_supernet = bn_stats(extract_subnet(net, a))
    for k, v in stats_a.items():
        torch.testing.assert_close(via_supernet[k], v, atol=1e-5, rtol=1e-5)

    # The cumulative average is exact: the first BN's mean is the mean over all batches.
    first = dense_a.features[0][0]
    with torch.no_grad():
        per_batch = [first(F.interpolate(x, size=(a.resolution,) * 2, mode="bilinear", align_corners=True)).mean((0, 2, 3))
                     for x in batches]
    torch.testing.assert_close(stats_a["features.0.1.bn.running_mean"], torch.stack(per_batch).mean(0), atol=1e-5, rtol=1e-5)

    # Stored statistics restore a fresh extraction exactly; mismatched ones are refused.
    load_bn_stats(polluted, stats_a)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(polluted.eval()(x), dense_a.eval()(x))
    with pytest.raises(ValueError):
        load_bn_stats(extract_subnet(net, b), stats_a)
    with pytest.raises(ValueError):
        recalibrate_bn(fold_bn(extract_subnet(net, a)), batches)


def test_supernet_gradients_reach_shared_weights_only_in_the_slice() -> None:
    torch.manual_seed(0)
    spec = demo_spec("mobilenet_v1", 4)
    net = PssSupernet(spec).train()
    cfg = spec.min_cfg()
    net(torch.randn(4, 3, 32, 32), cfg).sum().backward()
    w = net.features[0][0].weight
    k = subnet_widths(spec, cfg).stem
    assert w.grad[:k].abs().sum() > 0 and w.grad[k:].abs().sum() == 0
