"""The compute lane: the server's torch work runs on one thread, at its thread count."""

from __future__ import annotations

import threading

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.lane import ComputeLane
from tests.conftest import FAST_START, synthetic_photo, wait_ready


def test_lane_runs_on_its_thread_keeps_its_thread_count_and_nests() -> None:
    lane = ComputeLane(2)
    try:
        # Another thread lowering torch's count (as the request threads do) must not reach the lane.
        t = threading.Thread(target=torch.set_num_threads, args=(1,))
        t.start()
        t.join()
        name, threads = lane.call(lambda: (threading.current_thread().name, torch.get_num_threads()))
        assert name.startswith("compute") and threads == 2
        assert lane.call(lambda: lane.call(lambda: 7)) == 7  # a task that calls the lane runs inline
        with pytest.raises(ZeroDivisionError):
            lane.call(lambda: 1 / 0)
    finally:
        lane.shutdown()


def test_server_forwards_run_on_the_lane_with_the_configured_threads(bundled_model) -> None:
    import io

    from PIL import Image

    seen: list[tuple[str, int]] = []
    app = create_app(Settings(**{**FAST_START, "torch_threads": 2}), model=bundled_model)
    ex = app.state.services[0].runtime.executor
    inner = ex.forward

    def spy(key, x):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return inner(key, x)

    ex.forward = spy
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(64, 64)).save(buf, format="PNG")
    with TestClient(app) as c:
        wait_ready(c)
        seen.clear()
        r = c.post("/superresolve?budget=0.65", content=buf.getvalue(), headers={"content-type": "image/png"})
        assert r.status_code == 200
    assert seen and all(name.startswith("compute") and n == 2 for name, n in seen), seen
