"""End to end: ``python -m service`` under real uvicorn on loopback, driven over HTTP."""

from __future__ import annotations

import io
import json
import signal
import threading
import time

import httpx
import pytest
from PIL import Image

from bench import server as bench_server
from tests.conftest import synthetic_photo


def start_server(**env_extra: str):
    """``python -m service`` on a free loopback port, once it is ready (one torch thread)."""
    try:
        return bench_server.start_server(**{"ANYTIME_TORCH_THREADS": "1", **env_extra})
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def server_url():
    proc, url = start_server()
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_superresolve_over_http(server_url: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(60, 80)).save(buf, format="PNG")
    r = httpx.post(f"{server_url}/superresolve?budget=0.6", content=buf.getvalue(),
                   headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 200
    assert Image.open(io.BytesIO(r.content)).size == (320, 240)
    assert float(r.headers["x-anytime-flops-fraction"]) <= 0.6
    assert "x-anytime-rung-mix" in r.headers and "x-anytime-predicted-psnr" in r.headers


def test_openapi_documents_the_parameters(server_url: str) -> None:
    spec = httpx.get(f"{server_url}/openapi.json", timeout=10).json()
    params = {p["name"] for p in spec["paths"]["/superresolve"]["post"]["parameters"]}
    assert {"budget", "tiling", "objective", "deadline_ms", "min_budget", "policy", "rung", "explain"} <= params
    responses = spec["paths"]["/superresolve"]["post"]["responses"]
    assert {"200", "400", "401", "406", "413", "415", "422", "429", "503", "504"} <= set(responses)
    assert "multipart/form-data" in spec["paths"]["/superresolve"]["post"]["requestBody"]["content"]


def test_sigterm_lets_in_flight_work_finish_then_exits() -> None:
    proc, url = start_server(ANYTIME_LOG_FORMAT="json")
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(400, 400)).save(buf, format="PNG")  # about a second at full width
    result: dict = {}

    def slow_request() -> None:
        r = httpx.post(f"{url}/superresolve?policy=full", content=buf.getvalue(),
                       headers={"content-type": "image/png"}, timeout=60)
        result["status"], result["size"] = r.status_code, Image.open(io.BytesIO(r.content)).size

    t = threading.Thread(target=slow_request)
    t.start()
    time.sleep(0.4)  # the request is on the worker now
    proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert result == {"status": 200, "size": (1600, 1600)}  # in-flight work finished
    # uvicorn re-raises the signal once it has shut down cleanly, so -SIGTERM is a clean exit
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    log = bench_server.output(proc)
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any("draining" in rec["msg"] for rec in lines)
    served = [rec for rec in lines if rec.get("path") == "/superresolve"]
    assert served and served[0]["status"] == 200 and len(served[0]["request_id"]) == 32
