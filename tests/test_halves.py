"""``models.common.halves.run_both``: both halves always run and finish before it returns,
errors come back to the caller, and a caller never waits on another caller's half."""

from __future__ import annotations

import threading
import time

import pytest

from models.common.halves import run_both


def test_returns_both_results_and_runs_the_second_half_on_another_thread() -> None:
    here = threading.get_ident()
    a, b = run_both(lambda: threading.get_ident(), lambda: threading.get_ident())
    assert a == here and b != here


def test_an_error_in_either_half_reaches_the_caller_after_both_finished() -> None:
    finished = []

    def slow_ok() -> int:
        time.sleep(0.05)
        finished.append("second")
        return 1

    def boom() -> None:
        raise ValueError("first half failed")

    with pytest.raises(ValueError, match="first half"):
        run_both(boom, slow_ok)
    assert finished == ["second"]  # not left running on memory the caller may reuse
    with pytest.raises(KeyError):
        run_both(lambda: 1, lambda: {}["missing"])
    assert run_both(lambda: 2, lambda: 3) == (2, 3)  # the helper is free again after a failure


def test_a_second_caller_runs_both_halves_itself_while_the_helper_is_busy() -> None:
    release = threading.Event()
    started = threading.Event()

    def hold() -> str:
        started.set()
        release.wait(5)
        return "held"

    outer: list = []
    t = threading.Thread(target=lambda: outer.append(run_both(lambda: started.wait(5), hold)))
    t.start()
    assert started.wait(5)
    caller = threading.get_ident()
    t0 = time.perf_counter()
    assert run_both(lambda: threading.get_ident(), lambda: threading.get_ident()) == (caller, caller)
    assert time.perf_counter() - t0 < 1.0  # did not wait for the busy helper
    release.set()
    t.join(5)
    assert outer == [(True, "held")]
