"""Clients who hang up, against a real server over TCP: work not yet started is dropped and
counted as cancelled (status 499 in the metrics, never 200 or 500), and a hang-up during
the upload is an info line in the log, not a traceback."""

from __future__ import annotations

import io
import json
import re
import socket
import threading
from urllib.parse import urlparse

import httpx
from PIL import Image

from bench import server as bench_server
from tests.conftest import synthetic_photo, wait_until


def png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(side, side)).save(buf, format="PNG")
    return buf.getvalue()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def raw_request(url: str, path: str, body: bytes, send_bytes: int | None = None) -> socket.socket:
    """Send a POST by hand (all of ``body``, or only its first ``send_bytes``) and return the
    open socket, so that the test decides when the client hangs up."""
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port))
    head = (f"POST {path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body[:send_bytes if send_bytes is not None else len(body)])
    return sock


def test_a_queued_request_whose_client_leaves_is_never_computed(server) -> None:
    proc, url = server
    before = httpx.get(f"{url}/metrics").text
    busy: dict = {}

    def slow() -> None:  # seconds of full-width work ahead of the next request
        r = httpx.post(f"{url}/superresolve?policy=full", content=png(600), headers={"content-type": "image/png"},
                       timeout=60)
        busy["status"] = r.status_code
        busy["patches"] = sum(int(kv.split("=")[1]) for kv in r.headers["x-anytime-rung-mix"].split(","))

    model = httpx.get(f"{url}/v1/models").json()["models"][0]["name"]

    def policy() -> dict:
        assert "status" not in busy, "the slow request finished before the second one queued behind it"
        return httpx.get(f"{url}/v1/policy").json()

    t = threading.Thread(target=slow)
    t.start()
    wait_until(lambda: policy()["scheduler"]["predicted_wait_ms"] > 0, timeout=20, what="the slow request running")
    sock = raw_request(url, "/superresolve?policy=full", png(96))
    wait_until(lambda: policy()["models"][model]["queue_depth"] >= 1, timeout=20,
               what="the second request queueing behind the slow one")
    sock.close()
    t.join(60)
    assert busy["status"] == 200

    def counted() -> str | None:  # the server has seen the hang-up and answered 499
        text = httpx.get(f"{url}/metrics").text
        return text if metric(text, "anytime_requests_total", endpoint="/superresolve", code="499") > \
            metric(before, "anytime_requests_total", endpoint="/superresolve", code="499") else None

    after = wait_until(counted, timeout=10, what="the 499 in the metrics")
    assert metric(after, "anytime_cancelled_total", stage="queued") - \
        metric(before, "anytime_cancelled_total", stage="queued") == 1
    assert metric(after, "anytime_requests_total", endpoint="/superresolve", code="499") - \
        metric(before, "anytime_requests_total", endpoint="/superresolve", code="499") == 1
    # only the slow request's patches ran: the 96x96 request's never did
    served = metric(after, "anytime_patches_total", model=model) - metric(before, "anytime_patches_total", model=model)
    assert served == busy["patches"]
    r = httpx.post(f"{url}/superresolve", content=png(64), headers={"content-type": "image/png"}, timeout=30)
    assert r.status_code == 200


def test_a_hang_up_during_the_upload_is_logged_without_a_traceback(server) -> None:
    proc, url = server

    def log() -> list[dict]:
        text = bench_server.output(proc)
        text = text[:text.rfind("\n") + 1]  # complete lines only: the server may be writing one
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def hang_ups(lines: list[dict]) -> list[dict]:
        return [rec for rec in lines if rec.get("path") == "/superresolve" and rec.get("status") == 499]

    earlier = len(hang_ups(log()))  # the server is shared with the other tests of this module
    sock = raw_request(url, "/superresolve", png(200), send_bytes=1000)
    # the handler runs (the in-flight gauge counts it) and waits for the rest of the body
    wait_until(lambda: metric(httpx.get(f"{url}/metrics").text, "anytime_inflight_requests") >= 1,
               what="the server reading the upload")
    sock.close()

    def logged() -> list[dict] | None:
        lines = log()
        return lines if len(hang_ups(lines)) > earlier else None

    lines = wait_until(logged, what="the hang-up's log line")
    closed = hang_ups(lines)
    assert closed and all(rec["level"] == "info" for rec in closed)
    assert not any("Traceback" in json.dumps(rec) or rec.get("status") == 500 for rec in lines)
    assert httpx.post(f"{url}/superresolve", content=png(64), headers={"content-type": "image/png"},
                      timeout=30).status_code == 200
