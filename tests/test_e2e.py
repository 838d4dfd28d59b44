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
from tests.conftest import synthetic_photo, wait_until

pytestmark = pytest.mark.slow  # every test starts a server process


def start_server(**env_extra: str):
    """``python -m service`` on a free loopback port, once it is ready (one torch thread)."""
    try:
        # PSS-Net's int8 rungs take 1.5 s each to build (tests/test_int8_rungs.py serves them), the
        # default engine=auto's timing 2-3 s for PSS-Net and 10 s for CF-ViT (tests/test_engines.py,
        # tests/test_cfvit_engines.py)
        return bench_server.start_server(**{"ANYTIME_TORCH_THREADS": "1", "ANYTIME_PSSNET_INT8": "false",
                                            "ANYTIME_PSSNET_ENGINE": "torch", "ANYTIME_CFVIT_ENGINE": "torch",
                                            **env_extra})
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def server_url():
    proc, url = start_server(ANYTIME_DRAIN_WINDOW_S="0")  # no drain window: the teardown stops at once
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_superresolve_over_http(server_url: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(60, 80)).save(buf, format="PNG")
    # FLOPs budget: the FLOPs fraction is bounded exactly (a time budget may buy int8 patches,
    # which cost full width's FLOPs in less time).
    r = httpx.post(f"{server_url}/superresolve?budget=0.6&budget_unit=flops", content=buf.getvalue(),
                   headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 200
    assert Image.open(io.BytesIO(r.content)).size == (320, 240)
    assert float(r.headers["x-anytime-flops-fraction"]) <= 0.6
    assert "x-anytime-rung-mix" in r.headers and "x-anytime-predicted-patch-psnr" in r.headers


def test_openapi_documents_the_parameters(server_url: str) -> None:
    spec = httpx.get(f"{server_url}/openapi.json", timeout=10).json()
    params = {p["name"] for p in spec["paths"]["/superresolve"]["post"]["parameters"]}
    assert {"budget", "tiling", "objective", "deadline_ms", "min_budget", "policy", "rung", "explain"} <= params
    responses = spec["paths"]["/superresolve"]["post"]["responses"]
    assert {"200", "400", "401", "406", "413", "415", "422", "429", "503", "504"} <= set(responses)
    assert "multipart/form-data" in spec["paths"]["/superresolve"]["post"]["requestBody"]["content"]


# The drain tests need one model only (the drain covers every family alike): a quicker start.
# The shutdown tests need one family's requests, not its int8 rungs (their build and timing)
ARM_ONLY = {"ANYTIME_PSSNET_CHECKPOINT": "", "ANYTIME_CFVIT_CHECKPOINT": "", "ANYTIME_SEQTR_CHECKPOINTS": "[]",
            "ANYTIME_ARM_INT8": "false"}


def small_png(h: int = 32, w: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(h, w)).save(buf, format="PNG")
    return buf.getvalue()


def assert_drain_503(r: httpx.Response) -> None:
    """What new inference work gets during the drain window: a 503 that sends the client elsewhere."""
    assert r.status_code == 503, (r.status_code, r.text[:200])
    assert r.headers["connection"] == "close" and r.headers["retry-after"] == "1"
    assert "shutting down" in r.json()["error"]["message"]


def test_sigterm_lets_in_flight_work_finish_then_exits() -> None:
    """SIGTERM: /readyz and new work answer 503 (Connection: close) while the listener stays open
    for the drain window, in-flight work finishes, then the server closes and exits 0."""
    proc, url = start_server(ANYTIME_LOG_FORMAT="json", ANYTIME_DRAIN_WINDOW_S="2", **ARM_ONLY)
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(400, 400)).save(buf, format="PNG")  # about a second at full width
    small = small_png()
    result: dict = {}

    def slow_request() -> None:
        r = httpx.post(f"{url}/superresolve?policy=full", content=buf.getvalue(),
                       headers={"content-type": "image/png"}, timeout=60)
        result["status"], result["size"] = r.status_code, Image.open(io.BytesIO(r.content)).size

    t = threading.Thread(target=slow_request)
    t.start()
    wait_until(lambda: httpx.get(f"{url}/v1/policy").json()["scheduler"]["predicted_wait_ms"] > 0, timeout=20,
               what="the slow request being admitted")  # its work is queued or on the worker now
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    probes = 0
    while time.monotonic() - signalled < 1.0:  # the first second: new connections are accepted, and told 503
        with httpx.Client(timeout=10) as client:  # a new connection for each probe
            assert_drain_503(client.post(f"{url}/superresolve", content=small,
                                         headers={"content-type": "image/png"}))
        with httpx.Client(timeout=10) as client:
            ready = client.get(f"{url}/readyz")
            assert ready.status_code == 503 and ready.json()["error"]["message"] == "draining"
            assert ready.headers["connection"] == "close"
        probes += 1
        time.sleep(0.05)  # paces the probes through the first second
    assert probes >= 3
    t.join(60)
    assert result == {"status": 200, "size": (1600, 1600)}  # in-flight work finished
    assert proc.wait(timeout=30) == 0  # a graceful drain exits 0 (uvicorn alone re-raised SIGTERM: 143)
    log = bench_server.output(proc)
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any("draining" in rec["msg"] for rec in lines)
    served = [rec for rec in lines if rec.get("path") == "/superresolve"]
    ok = [rec for rec in served if rec["status"] == 200]
    assert len(ok) == 1 and len(ok[0]["request_id"]) == 32
    assert len(served) == 1 + probes and {rec["status"] for rec in served} == {200, 503}


def test_sigterm_under_steady_load_serves_what_came_before_and_refuses_nothing() -> None:
    """Clients sending small requests back to back (keep-alive, like a load balancer's pool):
    around SIGTERM every request sent before it is served, and no connection is refused
    during the drain window; the 503s close their connection, so the next request opens a new one."""
    proc, url = start_server(ANYTIME_DRAIN_WINDOW_S="2", **ARM_ONLY)
    small = small_png(48, 48)
    records: list[tuple[float, int | str, httpx.Headers | None]] = []  # (sent at, status or error, headers)
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = c.post(f"{url}/superresolve?budget=0.3", content=small, headers={"content-type": "image/png"})
                    records.append((sent, r.status_code, r.headers))
                except httpx.HTTPError as exc:
                    records.append((sent, f"{type(exc).__name__}: {exc}", None))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for th in threads:
        th.start()
    # steady load first: enough requests served that those sent before the signal are a real sample
    wait_until(lambda: sum(status == 200 for _, status, _ in records) >= 15, timeout=30,
               what="15 requests served before the signal")
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(1.0)  # the load runs on for the first half of the 2 s drain window (the behaviour under test)
    stop.set()
    for th in threads:
        th.join(30)
    assert proc.wait(timeout=30) == 0
    # Sent before SIGTERM: served (200): the server serves what arrived before the drain began,
    # even what it had not read yet. Only a request sent in the last instant before the signal
    # may reach the server after it, and a 503 is then its right answer: 20 ms covers that.
    before = [(sent, status) for sent, status, _ in records if sent < signalled - 0.02]
    assert len(before) >= 10 and all(status == 200 for _, status in before), [s for _, s in before if s != 200]
    after = [(status, headers) for sent, status, headers in records if sent >= signalled]
    assert after, "no request was sent during the drain window"
    refused = [status for _, status, _ in records if not isinstance(status, int)]
    assert not refused, refused[:3]
    assert {status for status, _ in after} <= {200, 503}
    for status, headers in after:
        if status == 503:
            assert headers["connection"] == "close" and headers["retry-after"] == "1"
    assert sum(status == 503 for status, _ in after) >= 3


def test_second_signal_ends_the_drain_window() -> None:
    """Ctrl-C twice: the second signal closes the listener at once instead of after the window."""
    proc, url = start_server(ANYTIME_DRAIN_WINDOW_S="60", **ARM_ONLY)
    proc.send_signal(signal.SIGTERM)
    # draining (it has handled the signal), still listening
    wait_until(lambda: httpx.get(f"{url}/readyz", timeout=10).status_code == 503, what="/readyz answering 503")
    signalled = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0 and time.monotonic() - signalled < 20
    assert "drain window ended early" in bench_server.output(proc)
