"""Resource targets, the structure-space sampler and the prioritised subnet pools, as in the official code.

* ``TargetGrid``: a constraint type with targets ``start+step .. stop-step``; a metric value
  maps to its target by ``round((m - start % step) / step) * step + start % step``.
* ``StructureSampler``: from many uniform random subnets, per-target conditional
  categorical distributions P(resolution | t) and P(mult_i | t) (each multiplier
  independent); sampling for target t draws from them and rejects until the rounded metric
  is t.
* ``Pools``: one dict per (type, target) mapping the cfg string to its score (-CE, EMA 0.9),
  capped at ``max_size`` by evicting the lowest score, sampled by ``softmax(score / T)``.
  ``to_official`` / ``from_official`` use the official checkpoint's ``arch_pools`` layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.pssnet.nets import SubnetConfig, SupernetSpec, random_cfg, subnet_flops

MetricFn = Callable[[SubnetConfig], float]


@dataclass(frozen=True)
class TargetGrid:
    metric_type: str
    start: int
    stop: int
    step: int

    @property
    def targets(self) -> list[int]:
        """Descending, as ``infer_metric_target_list`` stores them."""
        return list(range(self.stop - self.step, self.start, -self.step))

    def round(self, metric: float) -> int:
        off = self.start % self.step
        return int(round((metric - off) / self.step)) * self.step + off


# The official FLOPs grids (those of the official mbv1-f / mbv2-f training scripts), and the
# demo's.  The demo's lower end is set as the official one is (the min net rounds to
# ``start``); its upper end stops where uniform random subnets still arrive: near the max net
# they almost never do (of 100,000 draws one reached MBV1's 18 MFLOPs, which would leave that
# pool a single cfg).
OFFICIAL_GRIDS = {"mobilenet_v1": TargetGrid("flops", 110, 570, 10), "mobilenet_v2": TargetGrid("flops", 70, 300, 10)}
DEMO_GRIDS = {"mobilenet_v1": TargetGrid("flops", 2, 18, 2), "mobilenet_v2": TargetGrid("flops", 2, 12, 1)}


def flops_metric(spec: SupernetSpec) -> MetricFn:
    return lambda cfg: subnet_flops(spec, cfg)


class StructureSampler:
    """Per-target conditional categoricals built from ``n_draws`` uniform random subnets."""

    def __init__(self, spec: SupernetSpec, grid: TargetGrid, metric: MetricFn, n_draws: int = 100_000,
                 seed: int = 0) -> None:
        self.spec, self.grid, self.metric = spec, grid, metric
        rng = np.random.default_rng(seed)
        self.res_values = np.array(spec.resolution_choices)
        lo, hi = spec.mult_range
        self.mult_values = np.round(np.arange(round(lo * 1000), round(hi * 1000) + 1) / 1000, 3)
        targets = grid.targets
        index = {t: i for i, t in enumerate(targets)}
        self.res_counts = np.zeros((len(targets), len(self.res_values)))
        self.mult_counts = np.zeros((len(targets), spec.num_mults, len(self.mult_values)))
        res_pos = {int(r): i for i, r in enumerate(self.res_values)}
        for _ in range(n_draws):
            cfg = random_cfg(spec, rng, grid.metric_type)
            t = grid.round(metric(cfg))
            if t not in index:
                continue
            i = index[t]
            self.res_counts[i, res_pos[cfg.resolution]] += 1
            for j, m in enumerate(cfg.stage_cout_mults):
                self.mult_counts[i, j, round(m * 1000) - round(lo * 1000)] += 1
        self.targets = targets
        self.index = index
        self.support = self.res_counts.sum(1)

    def _row(self, target: int) -> int:
        """The target's own distribution, or the nearest target's if no draw hit it."""
        i = self.index[target]
        if self.support[i] > 0:
            return i
        filled = np.flatnonzero(self.support > 0)
        if filled.size == 0:
            raise RuntimeError("no random subnet fell inside the target grid")
        return int(filled[np.argmin(np.abs(filled - i))])

    def sample(self, target: int, rng: np.random.Generator, max_tries: int = 2000) -> SubnetConfig:
        """Sample from P(. | target) and reject until the rounded metric equals ``target``.

        A target that (almost) no uniform draw reached, typically the top of the grid, has
        no usable conditional; after ``max_tries`` rejections the last draw is shifted
        instead (``_shift_to``).  This fallback is ours: the official sampler only rejects."""
        i = self._row(target)
        p_res = self.res_counts[i] / self.res_counts[i].sum()
        p_mult = self.mult_counts[i] / self.mult_counts[i].sum(1, keepdims=True)
        cfg = None
        for _ in range(max_tries):
            res = int(self.res_values[rng.choice(len(self.res_values), p=p_res)])
            mults = tuple(float(self.mult_values[rng.choice(len(self.mult_values), p=p)]) for p in p_mult)
            cfg = SubnetConfig(self.spec.model_name, res, mults, infer_metric_type=self.grid.metric_type)
            m = self.metric(cfg)
            if self.grid.round(m) == target:
                return cfg.with_metric(self.spec, metric=m, target=target)
        assert cfg is not None
        shifted = self._shift_to(cfg, target, rng)
        if shifted is None:
            raise RuntimeError(f"no subnet for target {target}")
        return shifted

    def _shift_to(self, cfg: SubnetConfig, target: int, rng: np.random.Generator) -> SubnetConfig | None:
        """Move every multiplier by a common offset (clipped to the range), at each
        resolution from the draw's outward, and bisect the offset until the rounded metric
        is ``target``: the metric is non-decreasing in the offset."""
        lo, hi = self.spec.mult_range
        base = np.array(cfg.stage_cout_mults)
        res_order = sorted(self.res_values.tolist(), key=lambda r: (abs(r - cfg.resolution), rng.random()))

        def at(res: int, delta: float) -> SubnetConfig:
            mults = tuple(float(v) for v in np.round(np.clip(base + delta, lo, hi), 3))
            return SubnetConfig(self.spec.model_name, res, mults, infer_metric_type=self.grid.metric_type)

        for res in res_order:
            a, b = -(hi - lo), hi - lo
            if not (self.grid.round(self.metric(at(res, a))) <= target <= self.grid.round(self.metric(at(res, b)))):
                continue
            for _ in range(40):
                mid = (a + b) / 2
                c = at(res, mid)
                t = self.grid.round(self.metric(c))
                if t == target:
                    return c.with_metric(self.spec, target=target)
                a, b = (mid, b) if t < target else (a, mid)
        return None


class Pools:
    """Prioritised pools: ``pools[type][target]`` maps cfg string -> score."""

    def __init__(self, grids: list[TargetGrid], max_size: int = 50, ema: float = 0.9) -> None:
        self.grids = {g.metric_type: g for g in grids}
        self.max_size, self.ema = max_size, ema
        self.pools: dict[str, dict[int, dict[str, float]]] = {
            g.metric_type: {t: {} for t in g.targets} for g in grids}

    def choose_target(self, rng: np.random.Generator) -> tuple[str, int]:
        """A constraint type weighted by its number of pools, then a target uniformly."""
        types = list(self.grids)
        sizes = np.array([len(self.grids[t].targets) for t in types], dtype=np.float64)
        kind = types[int(rng.choice(len(types), p=sizes / sizes.sum()))]
        targets = self.grids[kind].targets
        return kind, targets[int(rng.integers(len(targets)))]

    def is_full(self, kind: str, target: int) -> bool:
        return len(self.pools[kind][target]) >= self.max_size

    def sample(self, kind: str, target: int, temperature: float, rng: np.random.Generator) -> SubnetConfig:
        """A pool member drawn with probability softmax(score / T)."""
        pool = self.pools[kind][target]
        keys = list(pool)
        s = np.array([pool[k] for k in keys], dtype=np.float64) / temperature
        p = np.exp(s - s.max())
        return SubnetConfig.from_str(keys[int(rng.choice(len(keys), p=p / p.sum()))])

    def update(self, kind: str, target: int, cfg: SubnetConfig, score: float) -> None:
        """Insert or EMA-update a score; evict the lowest when over capacity."""
        pool = self.pools[kind][target]
        key = cfg.to_str()
        pool[key] = self.ema * pool[key] + (1 - self.ema) * score if key in pool else float(score)
        if len(pool) > self.max_size:
            del pool[min(pool, key=pool.__getitem__)]

    def top(self, kind: str, target: int, k: int = 1) -> list[tuple[SubnetConfig, float]]:
        pool = self.pools[kind][target]
        best = sorted(pool.items(), key=lambda kv: -kv[1])[:k]
        return [(SubnetConfig.from_str(s), v) for s, v in best]

    def to_official(self) -> dict:
        return {"max_size": self.max_size,
                "infer_metric_target_list": {k: g.targets for k, g in self.grids.items()},
                "pools": {k: {t: dict(p) for t, p in v.items()} for k, v in self.pools.items()}}

    def load_official(self, d: dict) -> None:
        for kind, by_target in d["pools"].items():
            for t, pool in by_target.items():
                self.pools[kind][int(t)] = {str(s): float(v) for s, v in pool.items()}


def top1_per_pool(arch_pools: dict) -> list[tuple[str, int, SubnetConfig, float]]:
    """(type, target, cfg, score) of each non-empty pool's best entry, from an official-layout
    ``arch_pools`` dict (cfg strings parsed with ``ast.literal_eval``)."""
    out = []
    for kind, by_target in arch_pools["pools"].items():
        for t, pool in by_target.items():
            if not pool:
                continue
            key, score = max(pool.items(), key=lambda kv: float(kv[1]))
            out.append((str(kind), int(t), SubnetConfig.from_str(key), float(score)))
    return out


def schedule(epoch: int, epochs: int, start: float = 1.0, end: float = 0.01) -> float:
    """``start * (end / start) ** (e / E)``: p_e and T_e both decay from 1 to 0.01 (official schedule)."""
    return start * math.pow(end / start, epoch / epochs)
