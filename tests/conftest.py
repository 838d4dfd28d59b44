"""Shared test fixtures.  Official checkpoints live beside the repository in
``../shared/fixtures`` (never in it); tests that need them skip when it is absent."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from models.common.synthetic import synthetic_photo  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = Path(os.environ.get("ANYTIME_OFFICIAL_FIXTURES", REPO.parent / "shared" / "fixtures" / "arm-official"))
BUNDLED_ARM = REPO / "models" / "arm" / "weights" / "arm-fsrcnn" / "model.safetensors"

torch.set_num_threads(2)

# Full garbage collections 100x less often than Python's default.  Why: a served process
# freezes what start-up built (``service.memory.freeze_startup_objects``), so a full
# collection walks only what requests made, about a millisecond.  This test process cannot:
# it builds and drops dozens of apps and models, each app unfreezes everything when it shuts
# down, and a full collection then walks every object the session holds, 290-720 ms on the
# shared 2-core VM (2026-12-06, a gc.callbacks probe over tests/test_api.py and two others),
# long enough to push a request past the 40-80 ms deadlines the tests give it (three
# different deadline tests failed that way in three CI runs that day).  Young garbage is
# still collected as often as ever; old cyclic garbage waits longer.
_gen0, _gen1, _gen2 = gc.get_threshold()
gc.set_threshold(_gen0, _gen1, 100 * _gen2)


@pytest.fixture(scope="session")
def official() -> Path:
    if not (OFFICIAL / "arm-fsrcnn.pth").exists():
        pytest.skip(f"official ARM fixtures not found at {OFFICIAL}")
    return OFFICIAL


@pytest.fixture(scope="session")
def golden(official: Path) -> dict:
    import json

    g = official / "golden"
    return {"json": json.loads((g / "ladybird_golden.json").read_text()),
            "inputs": dict(np.load(g / "ladybird_inputs.npz")),
            "fsrcnn": dict(np.load(g / "ladybird_fsrcnn.npz")),
            "carn": dict(np.load(g / "ladybird_carn.npz"))}


@pytest.fixture(scope="session")
def bundled_model():
    from models.arm.pipeline import ArmSR

    return ArmSR.from_checkpoint(BUNDLED_ARM, int8=False)  # the fp32 ladder; int8: tests/test_arm_int8.py


def wait_until(condition, timeout: float = 5.0, interval: float = 0.01, what: str = "the condition"):
    """Poll ``condition()`` until it returns something truthy and return that; raise
    TimeoutError after ``timeout`` seconds.  For tests that must wait for another thread or
    process to reach a point: wait for the point itself, never for a guessed time."""
    import time

    end = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > end:
            raise TimeoutError(f"{what} did not hold within {timeout:g} s")
        time.sleep(interval)


def wait_ready(client, timeout: float = 60.0) -> None:
    """Block until the app's cost model is calibrated (GET /readyz answers 200).  A server
    started on a thread may not listen yet: a refused connection is "not ready", not an error."""
    import httpx

    def ready() -> bool:
        try:
            return client.get("/readyz").status_code == 200
        except httpx.ConnectError:
            return False

    wait_until(ready, timeout, interval=0.05, what="the app's readiness (GET /readyz 200)")


# Settings that keep the start-up short in tests.  The calibration keeps the default 3 timed
# runs per rung and size (their median): with one, a single preemption on a busy host can make
# a rung look slower than the full width, and the planner's choices then follow that outlier.
FAST_START = {"calibration_repeats": 3, "batch_max_items": 64, "torch_threads": 2, "log_format": "text",
              "pssnet_checkpoint": None, "cfvit_checkpoint": None, "seqtr_checkpoints": [],
              "arm_int8": False,  # ARM's int8 rungs: tests/test_arm_int8.py
              "pssnet_engine": "torch", "cfvit_engine": "torch",  # engines timed at start-up (2-3 s): test_engines.py
              "idle_probe_s": 0.0}  # cost models move only with the tests' own requests (probes: test_runtime.py)


@pytest.fixture(scope="module")
def server():
    """``python -m service`` with every bundled model on a free loopback port, one per test
    module: (process, base URL)."""
    from bench import server as bench_server

    try:
        proc, url = bench_server.start_server(ANYTIME_TORCH_THREADS="1", ANYTIME_DRAIN_WINDOW_S="0",
                                              ANYTIME_PSSNET_INT8="false",  # int8 rungs: test_int8_rungs.py,
                                              ANYTIME_ARM_INT8="false",  # test_arm_int8.py
                                              # the default auto (10-15 s of start-up with CF-ViT's):
                                              # tests/test_engines.py, tests/test_cfvit_engines.py
                                              ANYTIME_PSSNET_ENGINE="torch", ANYTIME_CFVIT_ENGINE="torch")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(timeout=20)



# Fixtures that start a real server process: a test that uses one is in the slow tier
# (``make test-fast`` leaves it out; ``make test`` runs everything).
SERVER_FIXTURES = {"server", "server_url", "docs_server"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def assert_resumes_exactly(run, state_path, monkeypatch, *, die_at: int = 4, saved_step: int | None = None) -> None:
    """``run(state_path_or_None)`` trains and returns the network. A run that dies during
    step ``die_at + 1`` (its progress iterator raises) and is then run again must end with
    exactly the state of an uninterrupted run: the resumable-training promise."""
    import models.common.progress as progress_module

    straight = run(None)
    real_progress = progress_module.progress

    def interrupted(items, **options):
        for i, item in enumerate(real_progress(items, **options)):
            if i == die_at:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(progress_module, "progress", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(state_path)
    monkeypatch.setattr(progress_module, "progress", real_progress)
    if saved_step is not None:
        assert torch.load(state_path, weights_only=True)["step"] == saved_step
    resumed = run(state_path)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
