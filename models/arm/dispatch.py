"""Choosing one rung per patch: the paper's rules and a budgeted squared-error optimiser.

Everything here works on predicted quality only (from the edge table), so a plan costs
microseconds and is fixed before any network runs.

* ``eta_rule``: the official decision ``argmax_j (eta * psnr_j - cost_j)`` in float64.
* ``eta_for_budget``: the paper's rule with the largest eta whose FLOPs fit a budget
  (FLOPs are non-decreasing in eta, so a bisection finds it).
* ``min_error_under_budget``: minimise the predicted *total squared error* of the image
  (which is what image PSNR measures) subject to total FLOPs <= budget.  This is a
  multiple-choice knapsack; we solve it greedily on each patch's lower convex hull of
  (cost, error): take upgrades in order of error saved per FLOP, skip any that no longer
  fits.  The fractional (LP) relaxation bounds the optimum, so the result reports its
  own worst-case gap; with hundreds of patches it is a tiny fraction of a dB.
* ``fastest_within``: among the plans that fit the same FLOPs budget and whose predicted
  error is within ``slack_db`` of that optimum, the one with the fewest predicted
  *seconds*.  FLOPs count a rung's batch as free to start, but on a CPU every forward
  pass has a fixed cost (about 1.2 ms for an FSRCNN subnet on 2 cores, an eighth of a
  25-patch full-width pass), and the optimum often sends two or three patches each to
  rungs of their own.  It bars the sparsest rungs one at a time and re-solves: at most
  R - 1 more solves (0.15 ms each for 25 patches, 1.1 ms for 1,000).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def eta_rule(pred_psnr: np.ndarray, cost: np.ndarray, eta: float) -> np.ndarray:
    """Official trade-off rule (eta in FLOPs per dB); ties go to the lower rung."""
    return np.argmax(eta * pred_psnr - cost[None, :], axis=1)


def best_rule(pred_psnr: np.ndarray) -> np.ndarray:
    return np.argmax(pred_psnr, axis=1)


def eta_for_budget(pred_psnr: np.ndarray, cost: np.ndarray, budget: float,
                   iterations: int = 80) -> tuple[np.ndarray, float]:
    """Paper's rule at the largest eta whose mean cost is <= budget x full cost.

    Returns (rungs, eta).  If even eta -> 0 exceeds the budget (impossible: rung 0 is free)
    everything goes to rung 0."""
    limit = budget * cost[-1] * len(pred_psnr) * (1 + 1e-12)
    lo, hi = 0.0, cost[-1] * 1e6  # eta = 0 picks the free rung everywhere
    if cost[eta_rule(pred_psnr, cost, hi)].sum() <= limit:
        return eta_rule(pred_psnr, cost, hi), hi
    for _ in range(iterations):
        mid = np.sqrt(lo * hi) if lo > 0 else hi * 1e-9
        if cost[eta_rule(pred_psnr, cost, mid)].sum() <= limit:
            lo = mid
        else:
            hi = mid
    return eta_rule(pred_psnr, cost, lo), lo


@dataclass
class BudgetSolution:
    rungs: np.ndarray  # (N,) chosen rung per patch
    total_error: float  # predicted sum over patches of per-pixel MSE
    lp_bound: float  # no assignment within budget has a lower predicted total error

    @property
    def gap_db(self) -> float:
        """Worst-case predicted-PSNR loss against the exact optimum."""
        return float(10 * np.log10(self.total_error / self.lp_bound)) if self.lp_bound > 0 else 0.0


def _hull_upgrades(err: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per patch, the steps along its lower convex hull of (cost, error) from rung 0.

    Returns flat arrays (patch, to_rung, extra_cost, saved_error, order_in_patch)."""
    n, r = err.shape
    cur = np.zeros(n, dtype=np.int64)
    patches, tos, dcs, gains, steps = [], [], [], [], []
    for step in range(r - 1):
        dc = cost[None, :] - cost[cur][:, None]  # (n, r)
        gain = err[np.arange(n), cur][:, None] - err
        valid = (dc > 0) & (gain > 0)
        slope = np.where(valid, gain / np.where(dc > 0, dc, 1), -np.inf)
        best = np.argmax(slope, axis=1)
        ok = np.isfinite(slope[np.arange(n), best])
        if not ok.any():
            break
        ids = np.nonzero(ok)[0]
        patches.append(ids)
        tos.append(best[ids])
        dcs.append(dc[ids, best[ids]])
        gains.append(gain[ids, best[ids]])
        steps.append(np.full(len(ids), step))
        cur[ids] = best[ids]
    if not patches:
        empty = np.zeros(0)
        return empty.astype(np.int64), empty.astype(np.int64), empty, empty, empty.astype(np.int64)
    return tuple(np.concatenate(a) for a in (patches, tos, dcs, gains, steps))


@dataclass
class Upgrades:
    """A budgeted assignment prepared once for many budgets: every patch's steps along its
    lower convex hull of (cost, error), most error saved per unit of cost first."""

    n: int
    base: float  # total error with every patch at rung 0
    patch: np.ndarray
    to: np.ndarray
    dc: np.ndarray
    gain: np.ndarray


def prepare_upgrades(pred_err: np.ndarray, cost: np.ndarray) -> Upgrades:
    patch, to, dc, gain, step = _hull_upgrades(pred_err, cost)
    # Along one patch's hull the efficiency falls, so a stable sort by efficiency keeps each
    # patch's steps in order; ties are broken by step then patch for determinism.
    order = np.lexsort((patch, step, -gain / dc))
    return Upgrades(len(pred_err), float(pred_err[:, 0].sum()), patch[order], to[order], dc[order], gain[order])


def fill(up: Upgrades, left: float) -> BudgetSolution:
    """Take the prepared upgrades in order while they fit ``left`` (cost beyond rung 0)."""
    rungs = np.zeros(up.n, dtype=np.int64)
    total, bound, blocked, bounded = up.base, None, np.zeros(up.n, dtype=bool), False
    for p, t, c, g in zip(up.patch.tolist(), up.to.tolist(), up.dc.tolist(), up.gain.tolist()):
        if blocked[p]:
            continue
        if c <= left:
            left -= c
            total -= g
            rungs[p] = t
            continue
        if not bounded:  # first upgrade that does not fit: the LP takes a fraction of it
            bound, bounded = total - g * left / c, True
        blocked[p] = True  # later steps of this patch depend on this one
    if bound is None:
        bound = total
    return BudgetSolution(rungs, float(total), float(min(bound, total)))


def min_error_under_budget(pred_err: np.ndarray, cost: np.ndarray, budget: float) -> BudgetSolution:
    """Rung per patch minimising predicted total squared error with total cost <=
    budget x N x cost_full (budget in [0, 1]); ``pred_err`` is (N, R) per-pixel MSE."""
    n = len(pred_err)
    # Every patch costs at least rung 0 (free in FLOPs, not in seconds).
    return fill(prepare_upgrades(pred_err, cost), budget * cost[-1] * n * (1 + 1e-12) - cost[0] * n)


def fastest_within(pred_err: np.ndarray, cost: np.ndarray, budget: float,
                   seconds: Callable[[np.ndarray], float], slack_db: float) -> np.ndarray:
    """Rungs (N,) within ``budget`` whose predicted total error is at most ``slack_db`` above
    ``min_error_under_budget``'s, with fewer predicted ``seconds(rungs)`` where found.

    Starting from the optimum, it bars the rung that serves the fewest patches and solves
    again, keeping the result if it stays within the slack and is predicted faster, then
    tries the next: at most R - 1 more solves.  ``slack_db`` should stay well below the
    table's own error (the oracle row of ``bench.sr_tradeoff``): the plans it trades
    between are then equal as far as the table can tell, and only their time differs."""
    n, r = pred_err.shape
    idx = np.arange(n)
    best = min_error_under_budget(pred_err, cost, budget).rungs
    limit = float(pred_err[idx, best].sum()) * 10 ** (slack_db / 10) * (1 + 1e-12)
    chosen, chosen_s = best, seconds(best)
    barred = np.zeros(r, dtype=bool)
    big = float(pred_err.max()) * 1e6 + 1.0  # an upgrade to a barred rung never saves error
    counts = np.bincount(best, minlength=r)
    for rung in sorted((k for k in range(1, r) if counts[k]), key=lambda k: counts[k]):
        trial = barred.copy()
        trial[rung] = True
        rungs = min_error_under_budget(np.where(trial[None, :], big, pred_err), cost, budget).rungs
        if float(pred_err[idx, rungs].sum()) <= limit and (t := seconds(rungs)) < chosen_s:
            chosen, chosen_s, barred = rungs, t, trial
    return chosen


@dataclass(frozen=True)
class RungTimes:
    """Predicted seconds of the forward passes at each rung on the serving host: a pass of
    n <= ``max_batch`` patches at rung r costs ``fixed[r] + n * per_item[r]``; more patches
    take more passes."""

    fixed: np.ndarray  # (R,)
    per_item: np.ndarray  # (R,)
    max_batch: int

    def seconds(self, rungs: np.ndarray) -> float:
        counts = np.bincount(rungs, minlength=len(self.fixed))
        passes = np.ceil(counts / self.max_batch)
        return float((passes * self.fixed + counts * self.per_item).sum())


class SecondsDispatch:
    """Rungs (N,) minimising predicted total squared error with predicted forward seconds
    ``times.seconds(rungs) <= limit_s``: the budget in time, batch-size aware, for one image
    and any number of limits (a planner tries several).

    Time is not additive per patch: every rung used costs a fixed amount per forward pass.
    So for each set S of rungs that may be used (2^R - 1 of them; 15 for ARM's four rungs) the
    fixed costs of S come off the limit and the rest is a knapsack in per-patch seconds over
    S's rungs alone (cheapest first), prepared once per set and filled per limit; the best
    assignment that really fits wins.  When none fits, every patch goes to the fastest rung.

    With precisions the ladder grows (seven rungs: 127 sets, 25 ms for a planner's nine
    budgets), so three cuts keep it to milliseconds: a rung another rung beats for this image
    (no slower per patch or per pass, and no worse on any patch) is left out; sets are tried in
    the order of the least error they could reach, and the search stops at the first that
    cannot beat the best plan found (both exact); and a set holds at most ``max_rungs`` rungs
    (each one more costs a pass; four rungs were the whole ladder before precisions).  With
    more useful rungs than that, the sets are the single rungs and the pairs
    (``joint_set_rungs``), each pair solved in closed form, plus one knapsack over all of
    them.  Without the pairs, a rung that fell just short of the limit had no fallback but
    a cheaper rung everywhere: the joint knapsack, which counts one pass per rung it uses,
    rarely fits, while "the same rung, two patches to bicubic" does (measured on the
    official ARM-FSRCNN with bf16 rungs, budget 0.65 in time: a 16-patch photo went from
    w36-bf16 everywhere to w16 everywhere, 0.5 dB, when w36-bf16's predicted time rose 1.5 %)."""

    def __init__(self, pred_err: np.ndarray, times: RungTimes, max_rungs: int = 4, joint_set_rungs: int = 2) -> None:
        self.pred_err, self.times = pred_err, times
        n, r = pred_err.shape
        per_item, fixed = times.per_item, times.fixed
        # beats[j, k]: rung j is no slower (per patch and per pass) and no worse on any patch
        # than k, and strictly better somewhere (or, if equal, listed first).
        no_worse = (pred_err[:, :, None] <= pred_err[:, None, :]).all(axis=0)
        better = (pred_err[:, :, None] < pred_err[:, None, :]).any(axis=0)
        beats = (no_worse & (per_item[:, None] <= per_item[None, :]) & (fixed[:, None] <= fixed[None, :])
                 & ((per_item[:, None] < per_item[None, :]) | better | np.triu(np.ones((r, r), dtype=bool), 1)))
        np.fill_diagonal(beats, False)
        useful = [k for k in range(r) if not beats[:, k].any()]
        self.sets: list[tuple[list[int], np.ndarray, float]] = []
        self.joint: list[int] | None = None
        if len(useful) > max_rungs:
            # Too many sets to search: single rungs and pairs, plus one knapsack over all
            # useful rungs whose fixed costs are settled by iterating (``_solve_joint``).
            self.joint = sorted(useful, key=lambda k: times.per_item[k])
            max_rungs = joint_set_rungs
        passes = max(1.0, np.ceil(n / times.max_batch))
        by_speed = sorted(useful, key=lambda k: per_item[k])
        for size in range(1, min(max_rungs, len(useful)) + 1):
            for members in itertools.combinations(by_speed, size):
                cols = list(members)  # fastest per patch first
                per = per_item[cols]
                if per[-1] > 0:
                    self.sets.append((cols, per, float(fixed[cols].sum()) * passes))
        # Least error each set could reach with time to spare: visited in that order, the
        # search stops at the first set that cannot beat the best plan found (exact).
        pair_floor = np.minimum(pred_err[:, :, None], pred_err[:, None, :]).sum(axis=0)  # singles on the diagonal
        floors = [float(pair_floor[cols[0], cols[-1]]) if len(cols) <= 2 else float(pred_err[:, cols].min(axis=1).sum())
                  for cols, _per, _fixed in self.sets]
        order = np.argsort(floors, kind="stable")
        self.sets = [self.sets[i] for i in order]
        self.floors = [floors[i] for i in order]
        self._prepared: dict[int, Upgrades | tuple[np.ndarray, np.ndarray, float]] = {}
        self._joint_prepared: Upgrades | None = None

    def solve(self, limit_s: float) -> np.ndarray:
        n, r = self.pred_err.shape
        best, best_err = None, np.inf
        for i, (cols, per, fixed) in enumerate(self.sets):
            if self.floors[i] >= best_err:
                break
            left = limit_s - fixed
            if left < per[0] * n:
                continue
            if len(cols) == 2:
                rungs, err = self._solve_pair(i, cols, left - per[0] * n)
            else:
                if i not in self._prepared:
                    self._prepared[i] = prepare_upgrades(self.pred_err[:, cols], per)
                budget = min(1.0, left / (per[-1] * n))
                sol = fill(self._prepared[i], budget * per[-1] * n * (1 + 1e-12) - per[0] * n)
                rungs, err = np.asarray(cols)[sol.rungs], sol.total_error
            if self.times.seconds(rungs) <= limit_s * (1 + 1e-9) and err < best_err:
                best, best_err = rungs, err
        if self.joint is not None:
            joint = self._solve_joint(limit_s)
            if joint is not None and float(self.pred_err[np.arange(n), joint].sum()) < best_err:
                best = joint
        if best is None:
            fastest = min(range(r), key=lambda k: self.times.seconds(np.full(n, k)))
            best = np.full(n, fastest, dtype=np.int64)
        return best

    def _solve_pair(self, i: int, cols: list[int], left: float) -> tuple[np.ndarray, float]:
        """Two rungs, the knapsack in closed form: every upgrade from the cheaper rung to the
        other costs the same seconds, so the best k upgrades are the k largest error gains.
        (Equal to ``fill`` on the pair, without its per-upgrade loop: the pairs are most of
        the sets when the joint knapsack stands in for the larger ones.)"""
        lo, hi = cols
        if i not in self._prepared:
            gain = self.pred_err[:, lo] - self.pred_err[:, hi]
            order = np.argsort(-gain, kind="stable")
            order = order[gain[order] > 0]
            self._prepared[i] = (order, np.concatenate([[0.0], np.cumsum(gain[order])]),
                                 float(self.pred_err[:, lo].sum()))
        order, saved, base = self._prepared[i]
        step = self.times.per_item[hi] - self.times.per_item[lo]
        k = len(order) if step <= 0 else min(len(order), int(left * (1 + 1e-12) / step))
        rungs = np.full(len(self.pred_err), lo, dtype=np.int64)
        rungs[order[:k]] = hi
        return rungs, base - float(saved[k])

    def _solve_joint(self, limit_s: float, rounds: int = 4) -> np.ndarray | None:
        """The knapsack over every useful rung at once, the fixed costs first guessed as one
        pass of the cheapest rung, then as those of the rungs the last solution used, until
        a solution fits (None if none does within ``rounds``)."""
        n = len(self.pred_err)
        cols = np.asarray(self.joint)
        per = self.times.per_item[cols]
        if self._joint_prepared is None:
            self._joint_prepared = prepare_upgrades(self.pred_err[:, cols], per)
        passes = max(1.0, np.ceil(n / self.times.max_batch))
        fixed = float(self.times.fixed[cols].min()) * passes
        for _ in range(rounds):
            left = limit_s - fixed
            if left < per[0] * n:
                return None
            budget = min(1.0, left / (per[-1] * n))
            rungs = cols[fill(self._joint_prepared, budget * per[-1] * n * (1 + 1e-12) - per[0] * n).rungs]
            if self.times.seconds(rungs) <= limit_s * (1 + 1e-9):
                return rungs
            fixed = float(self.times.fixed[np.unique(rungs)].sum()) * passes
        return None


def min_error_within_seconds(pred_err: np.ndarray, times: RungTimes, limit_s: float) -> np.ndarray:
    """``SecondsDispatch(pred_err, times).solve(limit_s)`` for a single limit."""
    return SecondsDispatch(pred_err, times).solve(limit_s)
