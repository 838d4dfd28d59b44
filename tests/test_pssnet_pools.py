"""Target grids, the structure-space sampler and the prioritised pools (the official algorithm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.pssnet.nets import MBV1_IMAGENET, MBV2_IMAGENET, SubnetConfig, demo_spec, subnet_flops
from models.pssnet.pools import OFFICIAL_GRIDS, Pools, StructureSampler, TargetGrid, flops_metric, schedule
from models.pssnet.train import param_groups
from models.pssnet.nets import PssSupernet


@pytest.mark.parametrize("grid, first, last, n", [
    (TargetGrid("flops", 110, 570, 10), 560, 120, 45), (TargetGrid("latency_gpu", 70, 240, 10), 230, 80, 16),
    (TargetGrid("latency_cpu", 10_000, 31_000, 1000), 30_000, 11_000, 20), (TargetGrid("flops", 70, 300, 10), 290, 80, 22),
    (TargetGrid("latency_gpu", 100, 270, 10), 260, 110, 16), (TargetGrid("latency_cpu", 12_000, 28_000, 1000), 27_000, 13_000, 15),
])
def test_official_grids(grid: TargetGrid, first: int, last: int, n: int) -> None:
    assert grid.targets[0] == first and grid.targets[-1] == last and len(grid.targets) == n


def test_rounding_to_targets() -> None:
    g = OFFICIAL_GRIDS["mobilenet_v1"]
    assert g.round(568.79) == 570 and g.round(106.78) == 110 and g.round(325.44) == 330 and g.round(304.9) == 300
    odd = TargetGrid("flops", 75, 305, 10)  # start % step = 5: targets on ...5
    assert odd.round(100.0) in (95, 105) and odd.round(101) == 105 and odd.targets[-1] == 85


@pytest.mark.parametrize("spec", [MBV1_IMAGENET, MBV2_IMAGENET])
def test_sampler_hits_every_target(spec) -> None:
    grid = OFFICIAL_GRIDS[spec.model_name]
    s = StructureSampler(spec, grid, flops_metric(spec), n_draws=3000, seed=0)
    rng = np.random.default_rng(0)
    lo, hi = spec.mult_range
    for target in grid.targets[::4]:
        cfg = s.sample(target, rng)
        assert grid.round(subnet_flops(spec, cfg)) == target == cfg.infer_metric_target
        assert cfg.resolution in spec.resolution_choices
        assert all(lo <= m <= hi and round(m, 3) == m for m in cfg.stage_cout_mults)


def test_sampler_conditionals_follow_the_target() -> None:
    """Low targets favour low resolutions, high targets high ones (the conditionals work)."""
    spec = demo_spec("mobilenet_v1", 10)
    grid = TargetGrid("flops", 2, 18, 2)
    s = StructureSampler(spec, grid, flops_metric(spec), n_draws=4000, seed=0)
    rng = np.random.default_rng(1)
    low = np.mean([s.sample(4, rng).resolution for _ in range(30)])
    high = np.mean([s.sample(14, rng).resolution for _ in range(30)])
    assert low < high


def _cfg(i: int) -> SubnetConfig:
    return SubnetConfig("mobilenet_v1", 128 + 8 * i, (0.8,) * 14)


def test_pool_ema_capacity_and_prioritised_sampling() -> None:
    pools = Pools([TargetGrid("flops", 110, 570, 10)], max_size=3)
    for i, score in enumerate([-2.0, -1.0, -3.0]):
        pools.update("flops", 300, _cfg(i), score)
    assert pools.is_full("flops", 300) and not pools.is_full("flops", 310)
    pools.update("flops", 300, _cfg(1), -2.0)  # EMA: 0.9 * -1 + 0.1 * -2
    assert pools.pools["flops"][300][_cfg(1).to_str()] == pytest.approx(-1.1)
    pools.update("flops", 300, _cfg(3), -5.0)  # over capacity: the newcomer is the lowest, evicted
    assert _cfg(3).to_str() not in pools.pools["flops"][300] and len(pools.pools["flops"][300]) == 3
    pools.update("flops", 300, _cfg(4), -0.5)  # evicts the lowest old entry (-3)
    assert _cfg(2).to_str() not in pools.pools["flops"][300]
    assert pools.top("flops", 300)[0][0] == _cfg(4)
    rng = np.random.default_rng(0)
    picks = [pools.sample("flops", 300, 0.05, rng) for _ in range(50)]
    assert sum(p == _cfg(4) for p in picks) >= 45  # a low temperature exploits the best
    picks = [pools.sample("flops", 300, 100.0, rng) for _ in range(300)]
    assert len(set(picks)) == 3  # a high one explores all
    official = pools.to_official()
    assert official["max_size"] == 3 and official["infer_metric_target_list"]["flops"][0] == 560
    again = Pools([TargetGrid("flops", 110, 570, 10)], max_size=3)
    again.load_official(official)
    assert again.pools == pools.pools


def test_choose_target_is_uniform_over_the_grid() -> None:
    pools = Pools([TargetGrid("flops", 2, 18, 2)])
    rng = np.random.default_rng(0)
    seen = [pools.choose_target(rng)[1] for _ in range(700)]
    counts = np.bincount(seen)[[4, 6, 8, 10, 12, 14, 16]]
    assert counts.min() > 70


def test_schedules_decay_from_one_to_a_hundredth() -> None:
    assert schedule(0, 250) == 1.0
    assert schedule(125, 250) == pytest.approx(0.1)
    assert schedule(250, 250) == pytest.approx(0.01)


def test_weight_decay_only_on_dense_conv_and_fc_weights() -> None:
    net = PssSupernet(demo_spec("mobilenet_v2", 10))
    decay, no_decay = param_groups(net, 1e-4)
    named = {id(p): n for n, p in net.named_parameters()}
    decayed = {named[id(p)] for p in decay["params"]}
    assert "classifier.0.weight" in decayed and "features.0.0.weight" in decayed
    assert "features.2.body.0.weight" in decayed and "features.2.body.6.weight" in decayed
    assert "features.2.body.3.weight" not in decayed  # depth-wise
    assert not any(n.endswith("bias") or ".1." in n and not n.endswith("0.weight") for n in decayed if "body.1" in n)
    assert "classifier.0.bias" not in decayed and "features.0.1.weight" not in decayed  # FC bias, BN gamma
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))
    _ = torch  # torch imported for the parameter types
