"""Per request: which rung(s) can it afford, or must it be shed at once?

The planner sees a request's ladder through two calls, ``at_budget(b)`` (the family's
plan for a budget ``b``, the fraction of full-cost FLOPs) and ``seconds(plan)`` (the cost
model's predicted compute), plus what the machine's one scheduler predicts for it: the
wait (all work, of every family, that runs before it) and the room (the most it may add
without making an admitted request late), the time the request has already spent in the
server, and the share of the compute thread this model may take at the current load.

In adaptive mode with a deadline it gives the request the largest budget in
``[min_budget, max_budget]`` that meets two limits:

* deadline: predicted wait + compute + encode fits the deadline, less a safety margin;
* load: compute + encode fit the request's share of the compute thread: ``share_s``,
  which the caller derives from ``target_utilization``, this model's arrival rate and the
  load the other models put on the same thread.  Taking only the deadline into account is greedy: every
  request fills the queue up to the deadline, and at twice the capacity half of them
  find it full.  The share keeps the compute thread's utilisation below the target, so the
  budget falls as the offered load rises (and recovers when it falls) and the queue
  stays short.  It never pushes a request below its floor.

When even ``min_budget`` cannot meet the deadline it sheds the request with 429 and a
Retry-After, at once, instead of serving it late.

Fixed policies (``full``, ``smallest``) are the baselines a conventional server gives:
one rung for every request, no deadline awareness, only the bounded queue.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

if TYPE_CHECKING:
    from service.config import Settings

Policy = Literal["adaptive", "full", "smallest"]

P = TypeVar("P")


@dataclass
class Ask:
    """What the request asked for (all optional)."""

    budget: float | None = None
    deadline_ms: float | None = None
    min_budget: float | None = None
    policy: Policy | None = None
    fixed: object | None = None  # a family plan the client pinned (ARM: rung=..., budget=best)


@dataclass
class Ladder(Generic[P]):
    """One request's operating points, as the family exposes them."""

    at_budget: Callable[[float], P]
    seconds: Callable[[P], float]  # predicted compute of a plan
    top: Callable[[], P]
    bottom: Callable[[], P]
    flops_fraction: Callable[[P], float]
    # The chosen budget plan, possibly swapped for one as good that is predicted faster
    # (ARM: fewer, fuller batches); never slower, never above the plan's FLOPs budget.
    refine: Callable[[P], P] | None = None


@dataclass
class Decision(Generic[P]):
    plan: P
    policy: Policy
    how: str  # explicit, fixed, deadline, default, policy
    budget: float  # the budget the plan was made for (fixed plans: their FLOPs fraction)
    predicted_compute_s: float
    predicted_overhead_s: float  # work after compute (stitch, encode)
    predicted_wait_s: float
    deadline_s: float | None  # from arrival


class Shed(Exception):
    """Reject now: 429 with Retry-After (or 503 while draining)."""

    def __init__(self, message: str, retry_after_s: float, reason: str = "deadline") -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after_s))
        self.reason = reason


class Planner:
    def __init__(self, settings: Settings, search_steps: int = 7) -> None:
        self.s = settings
        self.search_steps = search_steps

    def margin_s(self, deadline_s: float) -> float:
        return max(self.s.deadline_margin * deadline_s, self.s.deadline_margin_ms / 1000)

    def decide(self, ladder: Ladder[P], ask: Ask, *, wait_s: float, elapsed_s: float,
               overhead_s: float, share_s: float = math.inf, room_s: float = math.inf) -> Decision[P]:
        """``wait_s``: predicted queue wait; ``elapsed_s``: time since arrival;
        ``overhead_s``: predicted work after compute (stitch, encode); ``share_s``: seconds
        of compute + encode this request may take at the current load (inf: no load limit);
        ``room_s``: the most it may add before an admitted request would be late."""
        s = self.s
        policy = ask.policy or s.policy
        deadline_ms = ask.deadline_ms if ask.deadline_ms is not None else s.default_deadline_ms
        deadline_s = deadline_ms / 1000 if deadline_ms is not None else None

        def done(plan: P, how: str, budget: float | None = None) -> Decision[P]:
            if ladder.refine is not None and how in ("explicit", "default", "deadline"):
                plan = ladder.refine(plan)
            return Decision(plan, policy, how, ladder.flops_fraction(plan) if budget is None else budget,
                            ladder.seconds(plan), overhead_s, wait_s, deadline_s)

        if policy == "full":
            return done(ladder.top(), "policy")
        if policy == "smallest":
            return done(ladder.bottom(), "policy")
        if ask.fixed is not None or ask.budget is not None:
            plan = ask.fixed if ask.fixed is not None else ladder.at_budget(ask.budget)
            d = done(plan, "fixed", None) if ask.fixed is not None else done(plan, "explicit", ask.budget)
            if deadline_s is not None:
                allowance = min(deadline_s - self.margin_s(deadline_s) - elapsed_s - wait_s, room_s) - overhead_s
                if d.predicted_compute_s > allowance:
                    raise Shed(f"the requested quality needs {1000 * d.predicted_compute_s:.0f} ms of compute, "
                               f"{1000 * max(allowance, 0):.0f} ms are left before the {deadline_ms:g} ms deadline "
                               f"(queue wait {1000 * wait_s:.0f} ms); lower the budget or raise the deadline",
                               wait_s)
            return d
        if deadline_s is None:
            return done(ladder.at_budget(s.default_budget), "default", s.default_budget)

        own = deadline_s - self.margin_s(deadline_s) - elapsed_s - wait_s
        allowance = min(own, room_s) - overhead_s
        share = share_s - overhead_s
        lo = ask.min_budget if ask.min_budget is not None else s.default_min_budget
        hi = s.max_budget
        if lo > hi:
            lo = hi
        best = ladder.at_budget(hi)
        if ladder.seconds(best) <= min(allowance, share):
            return done(best, "deadline", hi)
        floor = ladder.at_budget(lo)
        floor_s = ladder.seconds(floor)
        if floor_s > allowance:
            why = f"{1000 * max(0.0, own):.0f} ms are left before the {deadline_ms:g} ms deadline (queue wait " \
                  f"{1000 * wait_s:.0f} ms)" if own <= room_s else \
                  f"only {1000 * room_s:.0f} ms can be added without making admitted requests late"
            raise Shed(f"even the quality floor (budget {lo:g}) needs {1000 * floor_s:.0f} ms of compute and "
                       f"{1000 * overhead_s:.0f} ms to encode; {why}", wait_s + floor_s)
        limit = min(allowance, max(share, floor_s))
        chosen, a, b = floor, lo, hi
        for _ in range(self.search_steps):
            mid = 0.5 * (a + b)
            plan = ladder.at_budget(mid)
            if ladder.seconds(plan) <= limit:
                chosen, a = plan, mid
            else:
                b = mid
        return done(chosen, "deadline", a)
