"""Shedding costs the overloaded server almost nothing: a request that cannot make its
deadline even at its model's cheapest rung is answered 429 from its query string alone,
before its body is read (a real server over TCP)."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse


def test_an_impossible_deadline_is_shed_before_the_body_is_read(server) -> None:
    _proc, url = server
    u = urlparse(url)
    for path in ("/superresolve?deadline_ms=0.01", "/classify?deadline_ms=0.01", "/ground?deadline_ms=0.01&task=box"):
        with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
            # 5 MB announced, not one byte of it sent: only a shed that does not read the body answers
            sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: image/png\r\n"
                          "Content-Length: 5000000\r\n\r\n").encode())
            t0 = time.monotonic()
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
            elapsed = time.monotonic() - t0
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 429"), (path, head)
        assert b"retry-after: " in head.lower() and elapsed < 2, (path, elapsed)
        assert "deadline" in json.loads(body)["error"]["message"]


def test_the_early_shed_counts_the_time_an_answer_needs_to_leave() -> None:
    """The shed from the query string judges a request as the planner will: an answer also
    has to leave (the event loop's recent lag, or the model's result-to-last-byte tail).  A
    deadline that the cheapest rung fits, but not together with that, is shed before the
    body is read or decoded, not after: under overload that is the difference between a shed
    that costs the server almost nothing and one that costs a decode."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings
    from tests.conftest import wait_ready
    from tests.test_family_contract import SETTINGS, Toy

    with TestClient(create_app(Settings(**SETTINGS), families=[Toy()])) as c:
        wait_ready(c)
        c.app.state.machine.loop_lag.recent = lambda: 0.100  # answers wait 100 ms for the loop
        # a 100 ms deadline: 10 ms margin + 100 ms to leave leave nothing, whatever the queue
        r = c.post("/toy", content="[1]", params={"deadline_ms": 100})
        assert r.status_code == 429 and "cheapest rung" in r.json()["error"]["message"], r.text
        # 400 ms leaves 260 ms: served
        r = c.post("/toy", content="[1]", params={"deadline_ms": 400})
        assert r.status_code == 200, r.text
