"""Budgeted dispatch: never over budget, monotone in the budget, within its stated gap of
the exact optimum, and no worse than the paper's eta rule at equal FLOPs."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from models.arm import dispatch
from models.arm.table import EdgeTable, mse_to_psnr, psnr_to_mse

COST = np.array([0.0, 141_262_852.0, 304_570_372.0, 467_877_892.0])


def _errors(seed: int, n: int) -> np.ndarray:
    """Random (n, 4) per-pixel MSE, mostly falling with width, sometimes not (as real
    tables: bicubic can beat the subnets on flat patches)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.5, 400, size=(n, 1))
    gains = rng.uniform(0.6, 1.05, size=(n, 3)).cumprod(axis=1)
    return np.concatenate([base, base * gains], axis=1)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 60), b1=st.floats(0, 1), b2=st.floats(0, 1))
def test_budget_respected_and_monotone(seed: int, n: int, b1: float, b2: float) -> None:
    err = _errors(seed, n)
    lo, hi = sorted((b1, b2))
    s_lo = dispatch.min_error_under_budget(err, COST, lo)
    s_hi = dispatch.min_error_under_budget(err, COST, hi)
    for s, b in ((s_lo, lo), (s_hi, hi)):
        assert COST[s.rungs].sum() <= b * COST[-1] * n * (1 + 1e-9)
        assert s.lp_bound <= s.total_error + 1e-9
        np.testing.assert_allclose(s.total_error, err[np.arange(n), s.rungs].sum())
    assert s_hi.total_error <= s_lo.total_error + 1e-9  # more budget never lowers predicted PSNR


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), b=st.floats(0, 1))
def test_within_stated_gap_of_brute_force_optimum(seed: int, n: int, b: float) -> None:
    err = _errors(seed, n)
    limit = b * COST[-1] * n * (1 + 1e-12)
    best = min(err[np.arange(n), list(c)].sum()
               for c in itertools.product(range(4), repeat=n) if COST[list(c)].sum() <= limit)
    sol = dispatch.min_error_under_budget(err, COST, b)
    assert sol.lp_bound <= best + 1e-9 <= sol.total_error + 2e-9


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 80), b=st.floats(0.05, 1))
def test_eta_for_budget_fits_and_mse_objective_is_no_worse(seed: int, n: int, b: float) -> None:
    err = _errors(seed, n)
    psnr = mse_to_psnr(err)
    rungs, _eta = dispatch.eta_for_budget(psnr, COST, b)
    assert COST[rungs].sum() <= b * COST[-1] * n * (1 + 1e-9)
    ours = dispatch.min_error_under_budget(err, COST, b)
    # Our greedy is within its LP gap of the optimum, which the eta rule cannot beat.
    assert ours.lp_bound <= err[np.arange(n), rungs].sum() + 1e-9


def _batch_seconds(rungs: np.ndarray) -> float:
    """Seconds with a fixed cost per rung batch, as on a CPU (FSRCNN-like ratios, in ms)."""
    fixed, per = np.array([0.25, 1.0, 1.1, 1.2]), np.array([0.045, 0.18, 0.29, 0.37])
    counts = np.bincount(rungs, minlength=4)
    return float(sum(fixed[k] + per[k] * c for k, c in enumerate(counts) if c))


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 60), b=st.floats(0, 1), slack=st.floats(0, 0.2))
def test_fastest_within_keeps_budget_and_slack_and_is_never_slower(seed: int, n: int, b: float,
                                                                    slack: float) -> None:
    err = _errors(seed, n)
    opt = dispatch.min_error_under_budget(err, COST, b).rungs
    fast = dispatch.fastest_within(err, COST, b, _batch_seconds, slack)
    assert COST[fast].sum() <= b * COST[-1] * n * (1 + 1e-9)
    e_opt, e_fast = err[np.arange(n), opt].sum(), err[np.arange(n), fast].sum()
    assert 10 * np.log10(e_fast / e_opt) <= slack + 1e-9
    assert _batch_seconds(fast) <= _batch_seconds(opt)
    if slack == 0:
        assert e_fast <= e_opt * (1 + 1e-12)


def test_fastest_within_folds_a_straggler_rung_into_its_neighbour() -> None:
    """24 patches where w36 and w56 are nearly equal and one where w56 is a hair better: the
    optimum opens a w56 batch for one patch; within 0.05 dB it is served at w36 with the rest."""
    err = np.tile([100.0, 60.0, 40.0, 39.9], (25, 1))
    err[0] = [100.0, 60.0, 40.0, 39.0]
    b = (24 * COST[2] + COST[3]) / (25 * COST[3])  # room for exactly that one w56 patch
    opt = dispatch.min_error_under_budget(err, COST, b).rungs
    assert np.bincount(opt, minlength=4).tolist() == [0, 0, 24, 1]
    fast = dispatch.fastest_within(err, COST, b, _batch_seconds, 0.05)
    assert np.bincount(fast, minlength=4).tolist() == [0, 0, 25, 0]
    assert _batch_seconds(fast) < _batch_seconds(opt) - 1.0


def test_zero_and_full_budget() -> None:
    err = _errors(3, 50)
    assert (dispatch.min_error_under_budget(err, COST, 0.0).rungs == 0).all()
    full = dispatch.min_error_under_budget(err, COST, 1.0)
    # With the whole budget every patch reaches its lowest-error rung.
    np.testing.assert_allclose(full.total_error, err.min(axis=1).sum())


def test_eta_rule_matches_official_form_on_ties() -> None:
    pred = np.array([[30.0, 30.0, 30.0, 30.0]])
    assert dispatch.eta_rule(pred, COST, 1e9).tolist() == [0]  # ties go to the first (cheapest)
    assert dispatch.best_rule(pred).tolist() == [0]


def test_table_fills_empty_bins_and_clamps() -> None:
    centers = np.arange(5, dtype=float)
    psnr = np.array([[40, np.nan, 30, np.nan, np.nan]] * 2, dtype=float)
    t = EdgeTable(centers, psnr, np.array([0.0, 1.0]))
    np.testing.assert_allclose(t.psnr[0], [40, 35, 30, 30, 30])
    assert np.isfinite(t.predict_psnr(np.array([-5.0, 1.5, 99.0]))).all()
    assert t.bins(np.array([0.5])).tolist() == [0]  # a tie between centres goes to the lower bin
    assert t.bins(np.array([-3.0, 1e6])).tolist() == [0, 4]


def test_table_build_uses_equal_width_bins_over_the_score_range() -> None:
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 100, 500)
    mse = np.stack([scores + 1, scores / 2 + 1], axis=1)
    t = EdgeTable.build(scores, mse_to_psnr(mse), mse, np.array([0.0, 1.0]), bins=10)
    assert t.counts.sum() == 500 and len(t.x_centers) == 10
    assert np.isclose(t.x_centers[1] - t.x_centers[0], (scores.max() - scores.min()) / 10)
    # The stored bin MSE is the mean of the patch MSEs (not the MSE of the mean PSNR).
    in_first = scores <= scores.min() + (scores.max() - scores.min()) / 10
    assert np.isclose(t.mse[0, 0], mse[in_first, 0].mean())
    assert t.mse[0, 0] >= psnr_to_mse(t.psnr[0, 0])  # Jensen


def test_budgets_in_seconds_fit_and_pay_for_fixed_costs() -> None:
    """The time budget counts each rung's fixed cost per forward pass: the chosen plan's
    predicted seconds fit the limit, its predicted error never rises with the limit, and at
    any limit it is at least as good as the best plan that uses one rung only."""
    from models.arm.dispatch import RungTimes, min_error_within_seconds

    rng = np.random.default_rng(7)
    n = 60
    err = np.sort(rng.uniform(1, 50, size=(n, 4)), axis=1)[:, ::-1].copy()  # higher rungs: less error
    times = RungTimes(np.array([0.0002, 0.0009, 0.0009, 0.0009]), np.array([0.00002, 0.0003, 0.0005, 0.0008]), 128)
    full = times.seconds(np.full(n, 3))
    previous = np.inf
    for fraction in np.linspace(0.0, 1.0, 11):
        rungs = min_error_within_seconds(err, times, fraction * full)
        total = err[np.arange(n), rungs].sum()
        fits = times.seconds(rungs) <= fraction * full * (1 + 1e-9)
        assert fits or (rungs == rungs[0]).all()  # nothing fits: all at the fastest rung
        assert total <= previous + 1e-9
        previous = total
        for k in range(4):  # no single-rung plan within the limit is better
            if times.seconds(np.full(n, k)) <= fraction * full:
                assert total <= err[:, k].sum() + 1e-9
    # a few patches do not buy a rung's fixed cost: at a tight limit no rung serves 1-2 patches
    rungs = min_error_within_seconds(err, times, 0.35 * full)
    counts = np.bincount(rungs, minlength=4)
    assert not ((counts > 0) & (counts < 3)).any(), counts


def test_a_seven_rung_ladder_plans_within_the_limit_and_beats_every_single_rung():
    """With int8 rungs beside the fp32 widths the planner no longer searches every set of
    rungs: its plan must still fit the time and be no worse than any one rung that fits."""
    rng = np.random.default_rng(0)
    n = 40
    quality = np.array([0.0, 1.0, 1.6, 1.7, 0.8, 1.3, 1.45])  # bicubic, w16/36/56, their int8
    err = 60 * np.exp(-quality[None, :] * rng.uniform(0.2, 1.0, size=(n, 1)))
    times = dispatch.RungTimes(np.full(7, 4e-4), np.array([0.4, 0.4, 0.62, 0.84, 0.19, 0.27, 0.36]) * 1e-3, 64)
    solver = dispatch.SecondsDispatch(err, times)
    assert solver.joint is not None  # more than four useful rungs: the joint knapsack is used
    full = times.seconds(np.full(n, 3))
    for budget in (0.3, 0.5, 0.65, 0.9):
        rungs = solver.solve(budget * full)
        assert times.seconds(rungs) <= budget * full * (1 + 1e-9)
        total = err[np.arange(n), rungs].sum()
        for k in range(7):
            if times.seconds(np.full(n, k)) <= budget * full:
                assert total <= err[:, k].sum() + 1e-9


def test_a_seven_rung_ladder_is_no_worse_than_any_two_rung_plan():
    """Brute force over every pair of rungs and every split of the patches between them:
    the planner's plan within the limit is at least as good as the best of them.  (Before
    pairs were searched, a rung just over the limit fell back to a cheaper rung everywhere
    instead of the same rung with two patches at bicubic.)"""
    rng = np.random.default_rng(3)
    n = 9
    quality = np.array([0.0, 1.0, 1.6, 1.7, 0.95, 1.55, 1.65])  # bicubic, w16/36/56, their bf16
    err = 60 * np.exp(-quality[None, :] * rng.uniform(0.2, 1.0, size=(n, 1)))
    times = dispatch.RungTimes(np.array([0.2, 0.9, 1.1, 0.8, 1.2, 1.1, 1.1]) * 1e-3,
                               np.array([0.16, 0.31, 0.50, 0.67, 0.28, 0.37, 0.42]) * 1e-3, 128)
    solver = dispatch.SecondsDispatch(err, times)
    assert solver.joint is not None
    full = times.seconds(np.full(n, 3))
    splits = np.array(list(itertools.product([False, True], repeat=n)))
    for budget in (0.3, 0.45, 0.55, 0.6, 0.65, 0.7, 0.8):
        rungs = solver.solve(budget * full)
        assert times.seconds(rungs) <= budget * full * (1 + 1e-9)
        total = err[np.arange(n), rungs].sum()
        best_pair = np.inf
        for a, b in itertools.combinations(range(7), 2):
            for upper in splits:
                plan = np.where(upper, b, a)
                if times.seconds(plan) <= budget * full:
                    best_pair = min(best_pair, err[np.arange(n), plan].sum())
        assert total <= best_pair + 1e-9, (budget, total, best_pair)
