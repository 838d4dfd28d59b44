"""The runtime's parts on their own: cost model, executor, planner."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from service.config import Settings
from service.costmodel import CostModel, LinearCost
from service.executor import Draining, Executor, Expired, Infeasible, Job, QueueFull, Scheduler
from service.planner import Ask, Ladder, Planner, Shed
from tests.conftest import wait_until

# --- cost model -------------------------------------------------------------------------


def test_linear_fit_recovers_fixed_and_per_item_cost() -> None:
    c = LinearCost.fit([(1, 0.0021), (8, 0.0091), (32, 0.0331), (128, 0.1291)])
    assert c.fixed_s == pytest.approx(0.0011, abs=2e-4) and c.per_unit_s == pytest.approx(0.001, rel=0.01)
    assert LinearCost.fit([(1, 0.5), (10, 0.1)]).per_unit_s == 0.0  # never negative


def test_one_stalled_calibration_sample_does_not_make_a_rung_free() -> None:
    """A co-tenant stall on the batch-of-1 run (seen on CI) drove least squares to a negative
    slope, i.e. a per-item cost of zero; the robust fit keeps the true slope."""
    samples = [(1, 0.0021 + 0.2), (8, 0.0091), (32, 0.0331), (64, 0.0651)]
    c = LinearCost.fit(samples)
    assert c.per_unit_s == pytest.approx(0.001, rel=0.05) and c.fixed_s < 0.01


def _model(per_item: float = 0.001) -> CostModel:
    cm = CostModel(max_batch=16, alpha=0.5)
    cm.rungs = {"a": LinearCost(0.0, per_item), "b": LinearCost(0.0, 2 * per_item)}
    cm.rung_ratio = {"a": 1.0, "b": 1.0}
    return cm


def test_a_burst_during_calibration_does_not_single_out_one_rung() -> None:
    """A co-tenant's burst as long as a round of calls landed on the rung being timed (rung
    after rung: here rung b), which then looked 4x slower and was never chosen.  Calibration
    interleaves the rungs, so the burst reaches each (rung, size) once and the median over
    rounds drops it."""
    now = [0.0]
    calls = [0]

    def run(n: int) -> None:  # three identical rungs: 1 ms + 0.1 ms per item, 4x during calls 14-22
        calls[0] += 1
        now[0] += (0.001 + 0.0001 * n) * (4.0 if 14 <= calls[0] < 23 else 1.0)

    cost = CostModel(max_batch=32)
    cost.calibrate_rungs({key: run for key in "abc"}, [1, 8, 32], repeats=3, clock=lambda: now[0])
    for key in "abc":
        assert cost.predict_forward(key, 32) == pytest.approx(0.0042, rel=1e-6)
        assert cost.predict_forward(key, 1) == pytest.approx(0.0011, rel=1e-6)


def test_prediction_chunks_by_max_batch_and_slowdown_follows_observations() -> None:
    cm = _model()
    assert cm.predict([("a", 40)]) == pytest.approx(0.040)
    cm.rungs["a"] = LinearCost(0.005, 0.001)
    assert cm.predict([("a", 40)]) == pytest.approx(0.040 + 3 * 0.005)  # 16 + 16 + 8: three passes
    cm = _model()
    for _ in range(20):  # the host runs twice as slow as calibrated, on every rung
        cm.observe_forward("a", 10, 0.020)
    assert cm.predict([("a", 10)]) == pytest.approx(0.020, rel=0.01)
    # Most of it is put down to the host (slowdown), so b, never observed, follows too.
    assert cm.slowdown > 1.8 and cm.predict([("b", 10)]) == pytest.approx(0.040, rel=0.1)
    assert np.prod(list(cm.rung_ratio.values())) == pytest.approx(1.0)  # the split cannot drift
    cm = _model()
    for _ in range(200):  # one rung really is miscalibrated (1.5x), the host is not
        cm.observe_forward("a", 10, 0.015)
        cm.observe_forward("b", 10, 0.020)
    assert cm.predict([("a", 10)]) == pytest.approx(0.015, rel=0.05)
    assert cm.predict([("b", 10)]) == pytest.approx(0.020, rel=0.05)


def test_what_overload_taught_is_forgotten_once_the_host_idles() -> None:
    """The drift seen on a live server: under overload a cheap rung (batched large) ran at
    0.67 of its calibration while the others ran 3.4x over theirs.  The model follows that
    while it lasts, but the ratios it learnt outlived the load: every rung but the cheap one
    was then predicted 1.4x too slow on an idle host.
    Replayed on a simulated clock: the slowdown is forgotten within seconds of idling (it
    sheds everything at once), the ratios more slowly (a lull between bursts keeps them),
    and after a few minutes every rung is back at calibration."""
    now = [0.0]
    cm = CostModel(max_batch=32, alpha=0.2, clock=lambda: now[0])
    keys = [f"r{i}" for i in range(20)]
    cm.rungs = {k: LinearCost(0.0005, 0.0001 * (i + 1)) for i, k in enumerate(keys)}
    cm.rung_ratio = dict.fromkeys(keys, 1.0)
    cheap, busy = "r0", ["r5", "r10", "r15", "r19"]
    for step in range(1600):  # 8 s of overload, a pass every 5 ms
        now[0] += 0.005
        key = cheap if step % 2 else busy[step // 2 % len(busy)]
        cm.observe_forward(key, 32, cm.rungs[key](32) * (0.67 if key == cheap else 3.4))
    assert cm.predict_forward(cheap, 32) == pytest.approx(0.67 * cm.rungs[cheap](32), rel=0.15)
    assert cm.predict_forward("r10", 32) == pytest.approx(3.4 * cm.rungs["r10"](32), rel=0.15)
    now[0] += 5.0
    assert cm.slowdown == pytest.approx(1.0, abs=1e-3)
    assert min(cm.ratio(k) for k in keys) < 0.8 < 1.2 < max(cm.ratio(k) for k in keys)
    now[0] += 300.0
    for key in keys:
        assert cm.predict_forward(key, 1) == pytest.approx(cm.rungs[key](1), rel=1e-3)
    cm.observe_forward(cheap, 32, cm.rungs[cheap](32))  # learning starts again from calibration
    assert cm.predict_forward("r10", 32) == pytest.approx(cm.rungs["r10"](32), rel=1e-3)


def test_fractional_work_units_are_predicted_not_truncated() -> None:
    """CF-ViT counts an image that exits early as the coarse share of a full pass (0.27 units).
    Truncated to whole items that cost nothing: every CF-ViT plan but all-fine was predicted
    free, so under twice its capacity its requests were admitted at budget 1 and half of them
    answered late."""
    cm = CostModel(max_batch=32)
    cm.rungs = {"k": LinearCost(0.002, 0.001)}
    cm.rung_ratio = {"k": 1.0}
    assert cm.predict([("k", 0.27)]) == pytest.approx(cm.predict_forward("k", 0.27))
    assert cm.predict([("k", 0.27)]) > 0.002
    assert cm.predict([("k", 33.5)]) == pytest.approx(cm.predict_forward("k", 32) + cm.predict_forward("k", 1.5))
    assert cm.predict([("k", 3)]) == pytest.approx(cm.predict_forward("k", 3))
    assert cm.predict([("k", 64)]) == pytest.approx(2 * cm.predict_forward("k", 32))


def test_idle_probes_correct_a_rung_calibrated_too_slow_for_good() -> None:
    """Ratios are forgotten over an idle spell, so a start-up outlier (rung b timed 3x too
    slow) is corrected by the idle probes in its calibrated line, which survives the idle
    spells between probes (one a second, as served)."""
    now = [0.0]
    cm = CostModel(max_batch=16, alpha=0.2, clock=lambda: now[0])
    cm.rungs = {"a": LinearCost(0.001, 0.0001), "b": LinearCost(0.003, 0.0003)}
    cm.rung_ratio = {"a": 1.0, "b": 1.0}
    for i in range(100):
        now[0] += 1.0
        key = "ab"[i % 2]
        cm.observe_forward(key, 8, 0.001 + 0.0001 * 8, probe=True)  # both really cost a's time
    now[0] += 5.0
    assert cm.predict_forward("b", 8) == pytest.approx(0.0018, rel=0.15)
    assert cm.predict_forward("a", 8) == pytest.approx(0.0018, rel=0.05)


# --- executor ---------------------------------------------------------------------------


class Recorder:
    """A fake family: doubles its input, records the batch sizes, can be slowed or broken.
    ``entered`` is set once the scheduler thread is inside a forward pass (held there while
    ``gate`` is clear)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.calls, self.fail = delay, [], False
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, key, x: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        self.gate.wait(10)
        self.calls.append((key, len(x)))
        if self.fail:
            raise RuntimeError("broken batch")
        time.sleep(self.delay)
        return x * 2


def _executor(fwd: Recorder, **kw) -> Executor:
    ex = Executor("t", fwd, _model(), **{"max_queue": 8, "max_batch": 16, **kw})
    ex.start()
    return ex


def test_queued_jobs_sharing_a_rung_run_as_one_batch() -> None:
    fwd = Recorder()
    ex = _executor(fwd)
    fwd.gate.clear()  # hold the worker on a first job while three more queue up
    first = ex.submit(Job([("a", torch.ones(1))], 0.001))
    assert fwd.entered.wait(5)  # the worker holds the first job
    jobs = [ex.submit(Job([("a", torch.full((3,), float(i))), ("b", torch.ones(2))], 0.005)) for i in range(3)]
    assert ex.depth == 3 and ex.predicted_wait() > 0.014
    fwd.gate.set()
    first.result(5)
    outs = [j.result(5) for j in jobs]
    assert [o[0].tolist() for o in outs] == [[0, 0, 0], [2, 2, 2], [4, 4, 4]]  # each job gets its own rows back
    assert fwd.calls[1:] == [("a", 9), ("b", 6)]  # three requests, one forward pass per rung
    assert ex.shutdown(5)


def test_tuple_items_are_batched_row_aligned() -> None:
    """Families whose items carry per-row data (CF-ViT: image and exit threshold)."""
    seen = []

    def fwd(key, x):
        seen.append(tuple(t.tolist() for t in x))
        return x[0] * x[1], x[1] > 1

    ex = Executor("t", fwd, _model(), max_queue=8, max_batch=16)
    hold = threading.Event()
    ex.submit(Job([], 0.0, finish=lambda _: hold.wait(5)))  # keep the worker busy while two queue up
    a = ex.submit(Job([("a", (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0])))], 0.001))
    b = ex.submit(Job([("a", (torch.tensor([5.0]), torch.tensor([2.0])))], 0.001))
    ex.start()
    hold.set()
    (prod_a, flag_a), = a.result(5)
    (prod_b, flag_b), = b.result(5)
    assert prod_a.tolist() == [1.0, 6.0] and flag_a.tolist() == [False, True]
    assert prod_b.tolist() == [10.0] and flag_b.tolist() == [True]
    assert seen == [([1.0, 2.0, 5.0], [1.0, 3.0, 2.0])]  # one forward pass for both
    ex.shutdown(5)


def test_merging_stops_at_max_batch_and_respects_deadlines() -> None:
    fwd = Recorder()
    ex = _executor(fwd)
    fwd.gate.clear()
    ex.submit(Job([("a", torch.ones(1))], 0.001))
    assert fwd.entered.wait(5)  # the worker holds the first job
    big = [ex.submit(Job([("a", torch.ones(10))], 0.01)) for _ in range(2)]  # 20 > 16: not merged
    tight = ex.submit(Job([("a", torch.ones(1))], 0.001, deadline=time.monotonic() + 0.5))
    fwd.gate.set()
    for f in (*big, tight):
        f.result(5)
    # Earliest deadline first: the tight one leads and the first big one joins it; the second
    # big one would pass 16 items and runs alone.
    assert [n for _, n in fwd.calls[1:]] == [11, 10]
    ex.shutdown(5)


def test_expired_and_cancelled_jobs_are_not_computed() -> None:
    fwd = Recorder()
    ex = _executor(fwd)
    fwd.gate.clear()
    ex.submit(Job([("a", torch.ones(1))], 0.001))
    assert fwd.entered.wait(5)  # the worker holds the first job
    deadline = time.monotonic() + 0.01
    expired = ex.submit(Job([("a", torch.ones(4))], 0.001, deadline=deadline))
    cancelled = ex.submit(Job([("a", torch.ones(5))], 0.001))
    assert cancelled.cancel()
    wait_until(lambda: time.monotonic() > deadline, what="the deadline")  # it can no longer be met
    fwd.gate.set()
    with pytest.raises(Expired):
        expired.result(5)
    ex.shutdown(5)
    assert fwd.calls == [("a", 1)]


def test_bounded_queue_failures_and_drain() -> None:
    fwd = Recorder()
    ex = _executor(fwd, max_queue=2)
    fwd.gate.clear()
    ex.submit(Job([("a", torch.ones(1))], 0.001))
    assert fwd.entered.wait(5)  # the worker holds the first job
    waiting = [ex.submit(Job([("a", torch.ones(16))], 0.001)) for _ in range(2)]
    with pytest.raises(QueueFull):
        ex.submit(Job([("a", torch.ones(1))], 0.001))
    fwd.fail = True
    fwd.gate.set()
    with pytest.raises(RuntimeError, match="broken batch"):
        waiting[0].result(5)
    fwd.fail = False
    ex.stop_accepting()
    with pytest.raises(Draining):
        ex.submit(Job([("a", torch.ones(1))], 0.001))
    assert ex.shutdown(5)


def test_one_scheduler_orders_every_familys_work_by_deadline() -> None:
    """Two families on one scheduler: work runs earliest deadline first across them, and a
    family's jobs merge only with their own family's."""
    fwd_a, fwd_b = Recorder(), Recorder()
    sched = Scheduler()
    a = Executor("a", fwd_a, _model(), max_queue=8, max_batch=16, scheduler=sched)
    b = Executor("b", fwd_b, _model(), max_queue=8, max_batch=16, scheduler=sched)
    order: list[str] = []
    hold = threading.Event()
    a.submit(Job([], 0.0, finish=lambda _: hold.wait(5)))  # keep the thread busy while the others queue
    now = time.monotonic()
    late = a.submit(Job([("a", torch.ones(2))], 0.01, deadline=now + 5, finish=lambda o: order.append("a-late")))
    soon = b.submit(Job([("a", torch.ones(3))], 0.01, deadline=now + 1, finish=lambda o: order.append("b-soon")))
    free = a.submit(Job([("a", torch.ones(1))], 0.01, finish=lambda o: order.append("a-none")))
    assert a.depth == 3 and b.depth == 1 and sched.depth() == 4
    wait, room = sched.view(now + 2)  # a request due in 2 s runs after b-soon, before a-late
    assert wait == pytest.approx(0.01, abs=1e-3) and 4.9 < room < 5.0
    sched.start()
    hold.set()
    for f in (late, soon, free):
        f.result(5)
    assert order[0] == "b-soon" and set(order[1:]) == {"a-late", "a-none"}
    assert fwd_b.calls == [("a", 3)] and fwd_a.calls == [("a", 3)]  # a's two jobs merged, b ran alone
    assert sched.shutdown(5)


def test_admission_keeps_the_promises_already_made() -> None:
    """A job that would finish late, or push an admitted job past its deadline, is refused;
    a cancelled job leaves the queue and its predicted work with it."""
    fwd = Recorder()
    ex = _executor(fwd)
    fwd.gate.clear()
    ex.submit(Job([("a", torch.ones(1))], 0.0))
    assert fwd.entered.wait(5)  # the worker holds the first job
    now = time.monotonic()
    first = Job([("a", torch.ones(1))], 0.3, deadline=now + 0.35)
    ex.submit(first)
    with pytest.raises(Infeasible, match="queued ahead"):  # 0.3 s ahead of it, 0.2 s needed, 0.4 s left
        ex.submit(Job([("a", torch.ones(1))], 0.2, deadline=now + 0.4))
    with pytest.raises(Infeasible, match="admitted request late"):  # earlier deadline, but would push `first` out
        ex.submit(Job([("a", torch.ones(1))], 0.1, deadline=now + 0.2))
    assert ex.predicted_wait() == pytest.approx(0.3, abs=0.01)
    assert ex.cancel(first) and ex.depth == 0 and ex.predicted_wait() == pytest.approx(0.0, abs=1e-3)
    ok = ex.submit(Job([("a", torch.ones(1))], 0.1, deadline=now + 0.4))
    fwd.gate.set()
    ok.result(5)
    assert first.future.cancelled() and [n for _, n in fwd.calls] == [1, 1]
    ex.shutdown(5)


def test_slowdown_learnt_under_overload_decays_once_the_host_is_idle() -> None:
    """The latch: if everything is shed nothing runs, so a slowdown learnt at the peak must
    not outlive the load."""
    cm = CostModel(max_batch=16, alpha=0.5, idle_grace_s=0.05, idle_tau_s=0.05)
    cm.rungs, cm.rung_ratio = {"a": LinearCost(0.0, 0.001)}, {"a": 1.0}
    for _ in range(10):
        cm.observe_forward("a", 10, 0.05)  # five times slower than calibrated
    assert cm.slowdown > 4 and cm.predict([("a", 10)]) > 0.04
    time.sleep(0.4)  # the behaviour under test: the host idles for grace + 7 time constants
    assert cm.slowdown == pytest.approx(1.0, abs=0.01)
    assert cm.predict([("a", 10)]) == pytest.approx(0.010, rel=0.02)
    cm.observe_forward("a", 10, 0.02)  # learning starts again from the decayed value
    assert 1.0 < cm.slowdown < 2.0


# --- planner ----------------------------------------------------------------------------


def _ladder(seconds_at_full: float = 0.1, floor_s: float = 0.02) -> Ladder[float]:
    """Plans are just their budgets; time grows linearly from floor to full."""
    return Ladder(at_budget=lambda b: b, seconds=lambda b: floor_s + b * (seconds_at_full - floor_s),
                  top=lambda: 1.0, bottom=lambda: 0.0, flops_fraction=lambda b: b)


def _decide(ask: Ask, wait_s: float = 0.0, **settings) -> object:
    planner = Planner(Settings(deadline_margin=0.0, deadline_margin_ms=0.0, **settings))
    return planner.decide(_ladder(), ask, wait_s=wait_s, elapsed_s=0.0, overhead_s=0.0)


def test_largest_budget_that_fits_the_deadline_falls_with_the_queue() -> None:
    budgets = [_decide(Ask(deadline_ms=100), wait_s=w).budget for w in (0.0, 0.02, 0.04, 0.06)]
    assert budgets[0] == 1.0
    assert budgets == sorted(budgets, reverse=True) and budgets[-1] < 0.3
    d = _decide(Ask(deadline_ms=100), wait_s=0.04)
    assert d.predicted_compute_s <= 0.06 + 1e-9 and d.how == "deadline"


def test_shed_when_even_the_floor_cannot_fit() -> None:
    with pytest.raises(Shed) as e:
        _decide(Ask(deadline_ms=100, min_budget=0.5), wait_s=0.05)
    assert e.value.retry_after >= 1 and "floor" in str(e.value)
    assert _decide(Ask(deadline_ms=100, min_budget=0.3), wait_s=0.05).budget >= 0.3


def test_explicit_budget_default_and_fixed_policies() -> None:
    assert _decide(Ask()).budget == 0.65 and _decide(Ask()).how == "default"
    assert _decide(Ask(budget=0.3)).how == "explicit"
    with pytest.raises(Shed):  # the asked quality cannot make the deadline
        _decide(Ask(budget=1.0, deadline_ms=50))
    full = _decide(Ask(deadline_ms=1, policy="full"))  # a conventional server: no shedding
    assert full.plan == 1.0 and full.how == "policy"
    assert _decide(Ask(), policy="smallest").plan == 0.0
    assert _decide(Ask(), default_deadline_ms=100.0, default_budget=0.2).budget == 1.0


class _WatchedCondition(threading.Condition):
    """The scheduler's condition variable, telling when its thread waits with a timeout
    (the wait for a fuller batch; it waits for work without one)."""

    def __init__(self) -> None:
        super().__init__()
        self.timed_wait = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            self.timed_wait.set()  # still under the lock: whoever takes it next finds the thread waiting
        return super().wait(timeout)


def _waiting_executor(max_wait_s: float) -> tuple[Recorder, Executor, _WatchedCondition]:
    """A started executor that waits ``max_wait_s`` for fuller batches, its condition watched."""
    fwd = Recorder()
    ex = Executor("t", fwd, _model(), max_queue=8, max_batch=16, max_wait_s=max_wait_s)
    ex.scheduler._cv = cv = _WatchedCondition()  # before its thread starts
    ex.start()
    return fwd, ex, cv


def test_waiting_for_a_fuller_batch_serves_what_arrived_meanwhile() -> None:
    """With batch_max_wait the thread waits for more work; a job that arrives meanwhile
    joins the batch, and one that was cancelled meanwhile is never run."""
    fwd, ex, cv = _waiting_executor(0.2)
    cancelled = Job([("a", torch.ones(1))], 0.001)
    ex.submit(cancelled)
    assert cv.timed_wait.wait(5)  # the thread now waits for a fuller batch
    with cv:  # all three while it waits: the first arrival's notify must not let it run alone
        assert ex.cancel(cancelled)
        late = ex.submit(Job([("a", torch.ones(2))], 0.001))
        also = ex.submit(Job([("a", torch.ones(3))], 0.001))
    late.result(5), also.result(5)
    assert fwd.calls == [("a", 5)]
    ex.shutdown(5)


def test_a_new_head_gets_its_own_wait_for_a_fuller_batch() -> None:
    """When the job the thread waits on is cancelled, the job that takes its place waits for
    a fuller batch too, instead of running alone at once."""
    fwd, ex, cv = _waiting_executor(0.3)
    first = Job([("a", torch.ones(1))], 0.001)
    ex.submit(first)
    assert cv.timed_wait.wait(5)
    with cv:
        cv.timed_wait.clear()
        assert ex.cancel(first)
        late = ex.submit(Job([("a", torch.ones(2))], 0.001))
    assert cv.timed_wait.wait(5)  # the new head waits for company
    also = ex.submit(Job([("a", torch.ones(3))], 0.001))
    late.result(5), also.result(5)
    assert fwd.calls == [("a", 5)]
    ex.shutdown(5)


def test_idle_probes_correct_a_rung_calibrated_too_slow_and_yield_to_requests() -> None:
    """Start-up calibrated rung "b" 3x too slow (an outlier), so a planner would never
    choose it and no request would ever correct it.  While the scheduler is idle it times
    every rung in turn, within ``probe_max_s``, and b's prediction comes back to its real
    time; a request that arrives is served as usual and gets the thread first."""
    sizes: list[tuple[str, int, float]] = []

    def forward(key: str, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.001 + 0.0001 * len(x))  # both rungs really cost the same
        return x

    def probe(key: str, n: int) -> torch.Tensor:
        sizes.append((key, n, cost.predict_forward(key, n)))  # as predicted when the probe was sized
        return torch.ones(n)

    cost = CostModel(max_batch=64)
    cost.rungs = {"a": LinearCost(0.001, 0.0001), "b": LinearCost(0.003, 0.0003),  # b: the outlier
                  "big": LinearCost(0.02, 0.0001)}  # one item is far over probe_max_s: never probed
    cost.rung_ratio = {"a": 1.0, "b": 1.0, "big": 1.0}
    sched = Scheduler(idle_probe_s=0.005, probe_max_s=0.004)
    ex = Executor("m", forward, cost, max_batch=64, scheduler=sched, probe=probe)
    ex.start()
    wait_until(lambda: sched.probes_run >= 80, timeout=30, what="80 idle probes")
    assert {k for k, _, _ in sizes} == {"a", "b"}  # not "big"
    assert all(predicted <= 0.004 for _, _, predicted in sizes)  # each probe sized to probe_max_s
    assert max(n for _, n, _ in sizes) > 1
    ratio = cost.predict_forward("b", 16) / cost.predict_forward("a", 16)
    assert ratio < 1.8, ratio  # from 3.0: b is on its way back to a's time
    assert ex.submit(Job([("a", torch.ones(4))], 0.001)).result(5)[0].shape == (4,)
    assert sched.shutdown(5)


def test_no_idle_probes_when_turned_off() -> None:
    calls: list[int] = []
    cost = CostModel(max_batch=8)
    cost.rungs, cost.rung_ratio = {"a": LinearCost(0.001, 0.0001)}, {"a": 1.0}
    sched = Scheduler(idle_probe_s=0.0)
    ex = Executor("m", lambda k, x: x, cost, max_batch=8, scheduler=sched,
                  probe=lambda k, n: calls.append(n) or torch.ones(n))
    ex.start()
    time.sleep(0.2)
    assert calls == [] and sched.probes_run == 0
    assert sched.shutdown(5)


# --- start-up objects out of the garbage collector's walk ---------------------------------


def test_serving_freezes_what_start_up_built_and_releases_it_at_shutdown() -> None:
    """While the app serves, the objects alive after start-up sit in the collector's permanent
    generation (a full collection under load then skips them instead of pausing every request
    for hundreds of ms); at shutdown they are handed back, so a dropped app can be collected."""
    import gc

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.memory import freeze_startup_objects
    from tests.conftest import FAST_START, wait_ready
    from tests.test_family_contract import Toy

    gc.unfreeze()  # what an app built earlier in this process and never served may have left frozen
    sentinel = [object() for _ in range(1000)]  # alive before the app starts: frozen with it
    with TestClient(create_app(Settings(**{**FAST_START, "families": []}), families=[Toy()])) as c:
        wait_ready(c)
        assert gc.get_freeze_count() >= len(sentinel)
        t0 = time.perf_counter()
        gc.collect()
        walked_s = time.perf_counter() - t0
    assert gc.get_freeze_count() == 0
    t0 = time.perf_counter()
    gc.collect()
    assert walked_s < time.perf_counter() - t0  # the frozen objects were not walked
    with TestClient(create_app(Settings(**{**FAST_START, "families": [], "freeze_startup_objects": False}),
                               families=[Toy()])) as c:
        wait_ready(c)
        assert gc.get_freeze_count() == 0
    freeze_startup_objects()
    try:
        assert gc.get_freeze_count() > len(sentinel)
    finally:
        gc.unfreeze()
