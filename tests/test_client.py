"""The Python client and its command line (anytime_client): the deadline shrinks across
retries, Retry-After is honoured with jitter, errors are typed; then the command line
against a real server, including the retries of a server that is still warming up."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from anytime_client import AsyncClient, Client, RetryPolicy, ServerError, Shed
from anytime_client.client import Call
from tests.conftest import REPO


def png(h: int = 40, w: int = 56) -> bytes:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


SERVED = {"x-anytime-model": "m", "x-anytime-rung": "f10", "x-anytime-decision": "deadline",
          "x-anytime-policy": "adaptive", "x-anytime-budget": "0.8", "x-anytime-flops": "80",
          "x-anytime-flops-full": "100", "x-anytime-queue-ms": "1.5", "x-anytime-compute-ms": "4.0"}
ANSWER = {"predictions": [{"label": "A", "index": 10, "probability": 0.9}], "expected_accuracy": 0.8}


class Script:
    """A server that answers from a script, recording every request it gets."""

    def __init__(self, *answers: httpx.Response) -> None:
        self.answers, self.requests = list(answers), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((time.monotonic(), request))
        return self.answers.pop(0)


def shed(retry_after: str = "1", status: int = 429) -> httpx.Response:
    return httpx.Response(status, headers={"retry-after": retry_after},
                          json={"error": {"status": status, "message": "shed: queue full"}})


def test_a_shed_request_is_retried_after_retry_after_with_what_is_left_of_its_deadline() -> None:
    script = Script(shed("1"), httpx.Response(200, headers=SERVED, json=ANSWER))
    with Client("http://test", transport=httpx.MockTransport(script), retry=RetryPolicy(jitter=0.2)) as c:
        r = c.classify(png(), deadline_ms=5000, top_k=1)
    (t1, first), (t2, second) = script.requests
    assert 1.0 <= t2 - t1 <= 1.2 + 0.2  # Retry-After x (1 + U(0, jitter))
    d1, d2 = float(first.url.params["deadline_ms"]), float(second.url.params["deadline_ms"])
    assert d1 == pytest.approx(5000, abs=50) and d1 - d2 == pytest.approx(1000 * (t2 - t1), abs=60)
    assert first.url.params["top_k"] == "1"
    assert r.attempts == 2 and r.rung == "f10" and r.flops_fraction == pytest.approx(0.8)
    assert r.predictions[0].label == "A" and r.expected_accuracy == 0.8 and r.compute_ms == 4.0


def test_no_retry_when_the_deadline_would_pass_while_waiting() -> None:
    script = Script(shed("2"))
    with Client("http://test", transport=httpx.MockTransport(script)) as c:
        with pytest.raises(Shed) as caught:
            c.classify(png(), deadline_ms=500)
    assert len(script.requests) == 1 and caught.value.status == 429 and caught.value.retry_after == 2
    assert "queue full" in caught.value.message and "would pass the deadline" in caught.value.message


def test_attempts_are_bounded_and_other_errors_are_not_retried() -> None:
    script = Script(*(shed("0", 503) for _ in range(3)))
    with Client("http://test", transport=httpx.MockTransport(script), retry=RetryPolicy(attempts=3)) as c:
        with pytest.raises(Shed) as caught:
            c.superresolve(png())
    assert len(script.requests) == 3 and caught.value.attempts == 3
    bad = httpx.Response(422, json={"error": {"status": 422, "message": "budget=2 is outside [0, 1]",
                                              "accepted": "a number in [0, 1]"}})
    script = Script(bad)
    with Client("http://test", transport=httpx.MockTransport(script)) as c:
        with pytest.raises(ServerError) as caught:
            c.superresolve(png(), budget=2)
    assert len(script.requests) == 1 and not isinstance(caught.value, Shed)
    assert caught.value.status == 422 and caught.value.accepted == "a number in [0, 1]"


def test_the_waits_jitter_and_the_deadline_shrinks_on_a_fake_clock() -> None:
    now = [100.0]
    call = Call(RetryPolicy(attempts=5, jitter=0.5, backoff_s=0.1), 3000, clock=lambda: now[0], rand=lambda: 1.0)
    assert call.params({"budget": None, "explain": False}) == {"explain": "false", "deadline_ms": "3000.0"}
    assert call.wait_after(429, 1.0) == 1.5  # Retry-After x (1 + jitter x U), U = 1 here
    assert call.wait_after(None, None) == pytest.approx(0.15)  # a connection error: backoff x 2^0, jittered
    now[0] += 1.5
    assert call.params({})["deadline_ms"] == "1500.0"
    assert call.wait_after(429, 1.0) is None  # 1.5 s of waiting would leave nothing of the 1.5 s left
    now[0] += 1.6
    with pytest.raises(Shed, match="deadline passed"):
        call.params({})


def test_the_async_client_does_the_same() -> None:
    script = Script(shed("0"), httpx.Response(200, headers=SERVED, json={"box": [1, 2, 3, 4], "score": 0.5}))

    async def run():
        async with AsyncClient("http://test", transport=httpx.MockTransport(script)) as c:
            return await c.ground(png(), "the red circle", deadline_ms=2000, task="box")

    r = asyncio.run(run())
    assert r.box == [1, 2, 3, 4] and r.attempts == 2
    form = script.requests[1][1]
    assert b'name="expression"' in form.content and b"the red circle" in form.content


# --- the command line against a real server -------------------------------------------------------

def cli(*args: str, url: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anytime_client.cli", "--url", url, *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_the_command_line_against_a_running_server(server, tmp_path: Path) -> None:
    _proc, url = server
    photo = tmp_path / "photo.png"
    photo.write_bytes(png())
    out = tmp_path / "out.png"
    done = cli("superresolve", str(photo), "--deadline-ms", "3000", "-o", str(out), url=url)
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (4 * 56, 4 * 40)
    assert "rung " in done.stderr and "compute" in done.stderr, done.stderr
    assert json.loads(done.stdout)["rung_mix"]
    done = cli("classify", str(photo), "--top-k", "3", "--model", "pss-mbv1-glyphs", url=url)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["predictions"]) == 3
    done = cli("models", url=url)
    assert done.returncode == 0 and "pss-mbv1-glyphs" in done.stdout
    done = cli("classify", str(photo), "--deadline-ms", "0.5", "--retries", "1", url=url)  # cannot be met
    assert done.returncode == 3 and "shed after 1 attempt" in done.stderr, done.stderr
    done = cli("classify", str(photo), "--budget", "7", url=url)
    assert done.returncode == 2 and "422" in done.stderr


@pytest.mark.slow
def test_the_command_line_waits_out_a_warming_server(tmp_path: Path) -> None:
    """Started before the server is ready: 503 with Retry-After until it is, then served."""
    from bench import server as bench_server

    port = bench_server.free_port()
    env = {"ANYTIME_PORT": str(port), "ANYTIME_HOST": "127.0.0.1", "ANYTIME_TORCH_THREADS": "1",
           "ANYTIME_FAMILIES": '["pssnet"]', "ANYTIME_PSSNET_INT8": "false",
           "ANYTIME_CALIBRATION_REPEATS": "15"}  # a warm-up long enough to be seen
    import os

    server = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # listening, not yet ready
            try:
                if httpx.get(f"{url}/readyz").status_code == 503:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        photo = tmp_path / "glyph.png"
        photo.write_bytes(png(32, 32))
        done = cli("classify", str(photo), "--retries", "30", url=url)
        assert done.returncode == 0, done.stderr
        assert "attempts" in done.stderr, done.stderr  # it did retry
    finally:
        server.terminate()
        server.wait(timeout=20)


@pytest.mark.slow
def test_the_command_line_retries_a_429_after_its_retry_after(tmp_path: Path) -> None:
    """A real server whose one scheduler thread is held (the first request's forward pass
    waits on a gate) and whose queue for the model is full: the command line's first attempt
    gets 429 (queue_full) with Retry-After; once the gate opens, its retry is served."""
    import threading

    import uvicorn

    from bench.server import free_port
    from service import registry
    from service.app import create_app
    from service.config import Settings
    from tests.conftest import wait_until

    settings = Settings(families=["pssnet"], pssnet_int8=False, max_queue=1, calibration_repeats=1, torch_threads=1,
                        log_format="text", log_level="warning")
    (family,) = registry.load(settings)
    gate = threading.Event()
    gate.set()
    forward = family.forward
    family.forward = lambda key, batch: (gate.wait(60), forward(key, batch))[1]  # type: ignore[method-assign]
    app = create_app(settings, families=[family])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def shed_queue_full() -> float:
        text = httpx.get(f"{url}/metrics").text
        line = next((l for l in text.splitlines() if l.startswith("anytime_shed_total") and "queue_full" in l), None)
        return float(line.split()[-1]) if line else 0.0

    try:
        wait_until(lambda: _ready(url), timeout=60, what="the server's readiness")
        gate.clear()  # from now on the scheduler thread stops in the next forward pass
        body = png(32, 32)
        holders = [threading.Thread(target=httpx.post, args=(f"{url}/classify",), kwargs={"content": body,
                                                                                       "timeout": 60})
                   for _ in range(2)]  # one running (held), one waiting: the queue of 1 is full
        for h in holders:
            h.start()
            time.sleep(0.3)
        photo = tmp_path / "glyph.png"
        photo.write_bytes(body)
        cmd = subprocess.Popen([sys.executable, "-m", "anytime_client.cli", "--url", url, "classify", str(photo),
                                "--retries", "6"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: shed_queue_full() >= 1, timeout=30, what="the command line's first attempt being shed")
        assert cmd.poll() is None  # it waits for Retry-After instead of giving up
        gate.set()
        out, err = cmd.communicate(timeout=60)
        assert cmd.returncode == 0, err
        assert re.search(r"\b[2-6] attempts\b", err), err
        assert json.loads(out)["predictions"]
        for h in holders:
            h.join(timeout=30)
    finally:
        gate.set()
        server.should_exit = True
        thread.join(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz").status_code == 200
    except httpx.HTTPError:
        return False
