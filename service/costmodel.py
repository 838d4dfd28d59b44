"""Predicted seconds for work on this host: measured at start-up, refreshed by observation.

FLOPs say little about time on a CPU (ARM's bicubic rung is free in FLOPs and costs a
third of full width in seconds), so the planner works in seconds.  Each rung's forward
pass is modelled as ``fixed + per_item x n`` (fitted on a few batch sizes at start-up),
times two learned factors:

* ``slowdown``: an EWMA of observed / predicted over every forward pass; it rises when
  co-located load steals the CPU or thermal limits bite, for all rungs at once.
* a per-rung ratio with a slower EWMA: under load the rungs do not slow down alike (on a
  PSS-Net server at 300 req/s a large int8 batch ran at 0.6 of its calibration while
  batches of one, contending with the HTTP loop for the GIL, ran 3-5x over it).  Only the
  products slowdown x ratio are observed, so the ratios' geometric mean is kept at 1.

Both are states of the load, and the slowdown can only learn from work that runs.  Under
overload every request may be shed, so nothing runs and a factor learnt at the peak would
stay forever: a slowdown kept shedding an idle server (/classify refused at a 60 ms
deadline "the floor needs 93 ms" for a 5 ms model), and ratios did too (after a mixed 2x
overload one cheap rung's ratio had run down to 0.006, which the normalisation turned into
1.43 on every other rung: once idle, every rung but that one was predicted 1.4x too
slow).  So once no forward pass has been observed for ``idle_grace_s`` the slowdown and
the overhead ratio decay toward 1.0 with time constant ``idle_tau_s`` (seconds: a
stale slowdown sheds every request), the rung ratios with ``ratio_tau_s`` (a lull between
bursts keeps them, a quiet minute does not): what start-up calibration measured on an
idle host is the best guess for a host that has gone quiet.  Under steady load passes
come every few milliseconds and the decay never acts.

What corrects a rung whose calibration itself is off (one outlier run at start-up) is the
idle probes: a probe's observation, made on a quiet host, rescales the rung's calibrated
line instead of its ratio, so the correction survives the next idle spell.

A variant that set the slowdown from a windowed median over all rungs and let a ratio
move only against the other rungs' observations followed the most frequent pass, a large
int8 batch at 0.4-0.5 of its calibration, and predicted that for every rung under a mixed
2x overload: /classify's planner then chose rungs of twice the budget (0.52 against 0.20)
on the strength of predictions it had not observed.

Work done around the forward passes (stitching, encoding) is modelled the same way,
linear in the output size.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass
class LinearCost:
    fixed_s: float
    per_unit_s: float

    def __call__(self, n: float) -> float:
        return self.fixed_s + self.per_unit_s * n

    @classmethod
    def fit(cls, samples: list[tuple[float, float]]) -> LinearCost:
        """Repeated-median (Siegel) line on (units, seconds), both coefficients non-negative.

        Each sample's median slope to the others, then the median of those, and the
        median residual as the intercept: one sample stalled by a co-tenant (calibration
        often runs with a single repeat) cannot make a rung look free per item, as least
        squares could (with 4 batch sizes or more; start-up uses 1, 8, 32 and the maximum).
        """
        n = np.array([s[0] for s in samples], dtype=np.float64)
        t = np.array([s[1] for s in samples], dtype=np.float64)
        if len(set(n.tolist())) < 2:
            return cls(0.0, float(t.mean() / max(n.mean(), 1e-12)))
        dn, dt = n[None, :] - n[:, None], t[None, :] - t[:, None]
        per_sample = [np.median(dt[k][dn[k] != 0] / dn[k][dn[k] != 0]) for k in range(len(n))]
        slope = max(float(np.median(per_sample)), 0.0)
        icpt = float(np.median(t - slope * n))
        if icpt < 0:  # through the origin instead
            return cls(0.0, float(np.median(t / np.maximum(n, 1e-12))))
        return cls(icpt, slope)


class TailEstimate:
    """A latency the planner cannot compute but must reserve: an EWMA of the mean and of the
    absolute deviation of observed seconds, read as mean + 2 deviations (a tail, not the
    mean: lateness is decided in the tail).  Like the slowdown it decays toward zero once
    nothing has been observed for ``idle_grace_s``, so a value learnt under overload cannot
    make an idle server shed (nothing would run to unlearn it)."""

    def __init__(self, alpha: float = 0.05, idle_grace_s: float = 0.5, idle_tau_s: float = 0.5) -> None:
        self.alpha, self.idle_grace_s, self.idle_tau_s = alpha, idle_grace_s, idle_tau_s
        self.mean = self.deviation = 0.0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            w = self._weight(time.monotonic())
            mean, dev = self.mean * w, self.deviation * w
            self.deviation = dev + self.alpha * (abs(seconds - mean) - dev)
            self.mean = mean + self.alpha * (seconds - mean)
            self._last = time.monotonic()

    def _weight(self, now: float) -> float:
        idle = now - self._last - self.idle_grace_s
        return 1.0 if idle <= 0 else math.exp(-idle / self.idle_tau_s)

    def value(self) -> float:
        return (self.mean + 2 * self.deviation) * self._weight(time.monotonic())


class CostModel:
    """Seconds per forward pass per rung key, and per request for the work around them."""

    def __init__(self, max_batch: int, alpha: float = 0.2, idle_grace_s: float = 0.5,
                 idle_tau_s: float = 0.5, ratio_tau_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_batch, self.alpha = max_batch, alpha
        self.idle_grace_s, self.idle_tau_s, self.ratio_tau_s = idle_grace_s, idle_tau_s, ratio_tau_s
        self._clock = clock  # for tests
        self.rungs: dict[Hashable, LinearCost] = {}
        self.rung_ratio: dict[Hashable, float] = {}
        self.overhead = LinearCost(0.0, 0.0)
        self._overhead_ratio = 1.0
        self._slowdown = 1.0
        self._last_observed = clock()
        self.observations = 0
        self._lock = threading.Lock()

    # --- the learnt factors, decayed toward calibration while nothing runs ------------

    def _believed(self, learnt: float, now: float, tau_s: float) -> float:
        """How much of a learnt factor's distance from 1.0 is still believed at ``now``:
        all of it until ``idle_grace_s`` without an observation, then decaying with ``tau_s``."""
        idle = now - self._last_observed - self.idle_grace_s
        return learnt if idle <= 0 else 1.0 + (learnt - 1.0) * math.exp(-idle / tau_s)

    @property
    def slowdown(self) -> float:
        return self._believed(self._slowdown, self._clock(), self.idle_tau_s)

    @slowdown.setter
    def slowdown(self, value: float) -> None:
        self._slowdown, self._last_observed = value, self._clock()

    def ratio(self, key: Hashable) -> float:
        """A rung's learnt correction as believed now (it decays like the slowdown)."""
        return self._believed(self.rung_ratio[key], self._clock(), self.ratio_tau_s)

    @property
    def overhead_ratio(self) -> float:
        return self._believed(self._overhead_ratio, self._clock(), self.idle_tau_s)

    @overhead_ratio.setter
    def overhead_ratio(self, value: float) -> None:
        self._overhead_ratio = value

    # --- calibration ------------------------------------------------------------------

    def calibrate_rungs(self, runs: Mapping[Hashable, Callable[[int], object]], sizes: Iterable[int],
                        repeats: int, clock: Callable[[], float] = time.perf_counter) -> None:
        """Time ``runs[key](n)`` (one forward pass of n items) at each size and fit each key's line.

        Interleaved: after one untimed warm-up call each, every round times every (key, size)
        once, in the same order, and each key's time at a size is the median over the rounds.
        The planner compares rungs with each other, so what matters is their *relative* times.
        Timed one rung after another, a co-tenant's burst during one rung's turn made that rung
        look up to 1.5x slower than it was (a shared 2-core VM, ARM's seven rungs: w56-bf16 at
        0.52-1.06 of w56 over eight start-ups), the planner never chose it, and a rung never
        chosen is never observed, so the error stayed.  Interleaved, a burst lands on all
        rungs alike, and one no longer than a round reaches each (key, size) in one round
        only, which the median drops.  ``clock`` is for tests."""
        sizes = list(sizes)
        cells = [(key, n) for key in runs for n in sizes]
        for key, n in cells:
            runs[key](n)
        seconds: dict[tuple[Hashable, int], list[float]] = {cell: [] for cell in cells}
        for _ in range(repeats):
            for key, n in cells:
                t0 = clock()
                runs[key](n)
                seconds[(key, n)].append(clock() - t0)
        for key in runs:
            self.rungs[key] = LinearCost.fit([(n, statistics.median(seconds[(key, n)])) for n in sizes])
            self.rung_ratio[key] = 1.0

    def calibrate_overhead(self, samples: list[tuple[float, float]]) -> None:
        self.overhead = LinearCost.fit(samples)

    @property
    def calibrated(self) -> bool:
        return bool(self.rungs)

    # --- prediction -------------------------------------------------------------------

    def predict_forward(self, key: Hashable, n: float) -> float:
        """One forward pass of n items or work units (n <= max_batch)."""
        now = self._clock()
        return (self.rungs[key](n) * self._believed(self.rung_ratio[key], now, self.ratio_tau_s)
                * self._believed(self._slowdown, now, self.idle_tau_s))

    def predict(self, work: Iterable[tuple[Hashable, float]]) -> float:
        """A request's forward passes: n work units at each key, in chunks of max_batch.  Units
        may be fractional (CF-ViT counts an image that exits early as the coarse share of a
        full pass): they were once truncated to whole items, which made every CF-ViT plan but
        all-fine cost nothing, so under load its requests were admitted at budget 1 and half
        of them answered late."""
        total = 0.0
        for key, n in work:
            full, rest = divmod(float(n), self.max_batch)
            total += int(full) * self.predict_forward(key, self.max_batch)
            if rest > 0:
                total += self.predict_forward(key, rest)
        return total

    def predict_overhead(self, units: float) -> float:
        return self.overhead(units) * self.overhead_ratio * self.slowdown

    # --- observation ------------------------------------------------------------------

    def observe_forward(self, key: Hashable, n: float, seconds: float, probe: bool = False) -> None:
        """Learn from one forward pass.  ``probe``: an idle probe's, which corrects the rung's
        calibration itself (see the module docstring) instead of its load-time ratio."""
        base = self.rungs[key](n)
        if base <= 0:
            return
        with self._lock:
            a = self.alpha
            if self._clock() - self._last_observed > self.idle_grace_s:  # settle the idle decay first
                self._overhead_ratio = self.overhead_ratio
                self.rung_ratio = {k: self.ratio(k) for k in self.rung_ratio}
            slowdown = self.slowdown
            slowdown += a * (seconds / (base * self.rung_ratio[key]) - slowdown)
            if probe:
                scale = 1.0 + (a / 2) * (seconds / (base * self.rung_ratio[key] * slowdown) - 1.0)
                self.rungs[key] = LinearCost(self.rungs[key].fixed_s * scale, self.rungs[key].per_unit_s * scale)
            else:
                self.rung_ratio[key] += (a / 4) * (seconds / (base * slowdown) - self.rung_ratio[key])
                # Only the products slowdown x ratio are observed, so the split would drift; keep
                # the rung ratios' geometric mean at 1, so that ``slowdown`` is the host's factor
                # and each ratio a rung's relative correction.  Predictions are unchanged.
                g = float(np.exp(np.mean(np.log(list(self.rung_ratio.values())))))
                for k in self.rung_ratio:
                    self.rung_ratio[k] /= g
                slowdown *= g
                self._overhead_ratio /= g
            self.slowdown = slowdown  # also marks the time of this observation
            self.observations += 1

    def observe_overhead(self, units: float, seconds: float) -> None:
        base = self.overhead(units)
        if base <= 0:
            return
        with self._lock:
            ratio = self.overhead_ratio
            self._overhead_ratio = ratio + self.alpha * (seconds / (base * self.slowdown) - ratio)

    def snapshot(self) -> dict:
        """For GET /v1/models and /v1/policy."""
        return {
            "slowdown": round(self.slowdown, 4),
            "observations": self.observations,
            "max_batch": self.max_batch,
            "rungs": {str(k): {"fixed_ms": round(1000 * c.fixed_s, 4), "per_item_ms": round(1000 * c.per_unit_s, 4),
                               "ratio": round(self.ratio(k), 4),
                               "predicted_full_batch_ms": round(1000 * self.predict_forward(k, self.max_batch), 3)}
                      for k, c in self.rungs.items()},
            "overhead": {"fixed_ms": round(1000 * self.overhead.fixed_s, 4),
                         "per_unit_us": round(1e6 * self.overhead.per_unit_s, 6),
                         "ratio": round(self.overhead_ratio, 4)},
        }
