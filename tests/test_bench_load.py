"""bench.load without the model server: outcome rules, summaries, option parsing, request
bodies, and a whole mixed run (capacity, service time, load, idle check) against a small mock
HTTP server on a loopback port, through the generator's real client."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web
from PIL import Image

from bench import load


def test_outcomes_follow_the_deadline_at_the_client() -> None:
    o = load.classify_outcome
    assert o(200, 0.1, 0.3) == "in_time" and o(200, 0.4, 0.3) == "late"
    assert o(429, 0.01, 0.3) == "shed_fast" and o(503, 0.5, 0.3) == "shed_late"
    assert o(504, 0.1, 0.3) == "late"
    assert o(0, 0.1, 0.3) == "errors_conn" and o(500, 0.1, 0.3) == "errors_5xx"
    assert o(422, 0.1, 0.3) == "errors_4xx" and o(302, 0.1, 0.3) == "errors_other"


def test_summary_counts_and_ok() -> None:
    R = load.Result
    rs = [R(0.0, 0.0, 200, 0.05, 0.1, budget=0.5), R(0.1, 0.0, 200, 0.2, 0.1, budget=1.0),
          R(0.2, 0.0, 429, 0.01, 0.1), R(0.3, 0.0, 429, 0.3, 0.1), R(0.4, 0.0, 504, 0.1, 0.1),
          R(0.5, 0.0, 500, 0.01, 0.1), R(0.6, 0.0, 0, 0.01, 0.1, error="ConnectError"),
          R(0.7, 0.0, 400, 0.01, 0.1)]
    s = load.summarize(rs, offered_rps=10, duration=1)
    assert s["sent"] == 8
    assert s["counts"] == {"in_time": 1, "shed_fast": 1, "shed_late": 1, "late": 2, "errors_4xx": 1,
                           "errors_5xx": 1, "errors_conn": 1, "errors_other": 0}
    assert s["ok"] == pytest.approx(2 / 8) and s["shed"] == pytest.approx(2 / 8)
    assert s["errors"] == 3 and s["error_kinds"] == {"500": 1, "conn:ConnectError": 1, "400": 1}
    assert s["mean_budget"] == pytest.approx(0.75)
    assert load._errors(s) == "3 (4xx 1, 5xx 1, conn 1)"
    assert "**0.250**" in load._row({**s, "endpoint": "x", "policy": "adaptive", "deadline_ms": 100.0})


def test_deadline_options() -> None:
    svc = {"superresolve": 20.0, "classify": 10.0, "ground": 30.0}
    names = list(svc)
    assert load.resolve_deadlines(names, None, None, svc) == {n: 300.0 for n in names}
    assert load.resolve_deadlines(names, ["60"], None, svc) == {n: 60.0 for n in names}
    assert load.resolve_deadlines(names, None, ["4"], svc) == {"superresolve": 80.0, "classify": 40.0, "ground": 120.0}
    # per endpoint beats common; ms and x mix per endpoint
    assert load.resolve_deadlines(names, ["classify=100"], ["2"], svc) == \
        {"superresolve": 40.0, "classify": 100.0, "ground": 60.0}
    assert load.resolve_deadlines(names, ["200", "ground=50"], ["classify=3"], svc) == \
        {"superresolve": 200.0, "classify": 30.0, "ground": 50.0}
    with pytest.raises(SystemExit):
        load.resolve_deadlines(names, ["100"], ["3"], svc)
    with pytest.raises(SystemExit):
        load.parse_named(["nope=3"], "--deadline-ms")
    assert load.parse_mixed(["superresolve=1", "classify:cf-tiny-glyphs=0.5"]) == \
        [("superresolve", 1.0), ("classify:cf-tiny-glyphs", 0.5)]
    for bad in (["classify"], ["foo=1"], ["classify=x"], ["classify=1", "classify=2"]):
        with pytest.raises(SystemExit):
            load.parse_mixed(bad)


def _args(**kw) -> argparse.Namespace:
    base = {"sr_image": None, "sr_size": 64, "accept": "image/png", "classify_image": None, "classify_size": 32,
            "ground_image": None, "ground_expression": None, "ground_size": 128}
    return argparse.Namespace(**{**base, **kw})


def test_the_idle_check_leaves_the_servers_deadline_margin() -> None:
    assert load.idle_deadline_ms(14.0, 5.0) == pytest.approx(42.0)  # 3x the service time
    assert load.idle_deadline_ms(1.9, 5.0) == pytest.approx(8.8)  # 2x, and the 5 ms margin for the third
    assert load.idle_deadline_ms(2.0, 0.0) == pytest.approx(6.0)


def test_bodies() -> None:
    sr = load.build_workload("superresolve", _args())
    assert Image.open(io.BytesIO(sr.body)).size == (64, 64) and sr.headers["accept"] == "image/png"
    cl = load.build_workload("classify:cf-tiny-glyphs", _args())
    assert Image.open(io.BytesIO(cl.body)).size == (32, 32) and cl.params == {"model": "cf-tiny-glyphs"}
    gr = load.build_workload("ground:seg", _args(), {"seg": "mask"})
    assert gr.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert b'name="expression"' in gr.body and b'name="image"; filename="scene.png"' in gr.body
    assert gr.params == {"model": "seg", "task": "mask"}
    with pytest.raises(SystemExit):
        load.ensure_loopback("http://10.1.2.3:8000")
    load.ensure_loopback("http://localhost:8000")


MODELS = {"models": [{"name": "sr", "endpoint": "/superresolve"}, {"name": "pss", "endpoint": "/classify"},
                     {"name": "det", "endpoint": "/ground", "task": "box"}]}


@pytest.fixture
def mock_server() -> Iterator[tuple[str, list]]:
    """20 ms a request; with a deadline under 8 ms it sheds (429) at once, like a planner
    would.  An aiohttp server on its own thread and loop (the generator runs its own
    ``asyncio.run``): (base URL, the (path, query) of every load request it saw)."""
    seen: list = []

    async def handler(request: web.Request) -> web.Response:
        if request.path == "/readyz":
            return web.json_response({"status": "ready"})
        if request.path == "/v1/models":
            return web.json_response(MODELS)
        await request.read()
        seen.append((request.path, dict(request.query)))
        if float(request.query.get("deadline_ms", 1e9)) < 8:
            return web.json_response({}, status=429)
        await asyncio.sleep(0.02)
        return web.json_response({}, headers={"x-anytime-flops-fraction": "0.5"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    host, port = runner.addresses[0][:2]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{port}", seen
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def test_mixed_run_end_to_end(mock_server, capsys) -> None:
    url, seen = mock_server
    load.main(["--url", url, "--mixed", "superresolve=0.5", "classify=0.25", "ground=0.25",
               "--deadline-ms", "2000", "ground=5", "--duration", "0.5", "--capacity-seconds", "0.2",
               "--service-requests", "3", "--pause", "0", "--then-idle", "0", "--idle-requests", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    eps = report["endpoints"]
    assert set(eps) == {"superresolve", "classify", "ground"}
    assert all(e["capacity_rps"] > 10 and 19 < e["service_ms"] < 200 for e in eps.values())
    (phase,) = report["phases"]
    rows = {r["endpoint"]: r for r in phase["endpoints"]}
    assert rows["superresolve"]["offered_rps"] == pytest.approx(0.5 * eps["superresolve"]["capacity_rps"])
    assert rows["superresolve"]["load_factor"] == 0.5 and rows["superresolve"]["deadline_ms"] == 2000
    # a 20 ms mock against a 2 s deadline: in time however loaded the test host is
    assert rows["superresolve"]["sent"] > 0 and rows["superresolve"]["in_time"] > 0.9
    assert rows["superresolve"]["mean_budget"] == pytest.approx(0.5)
    assert rows["ground"]["shed"] == 1.0 and rows["ground"]["in_time"] == 0  # 5 ms deadline: all shed
    assert phase["all"]["sent"] == sum(r["sent"] for r in rows.values())
    assert all(c["recovered"] and len(c["answers"]) == 2 for c in phase["idle_check"].values())
    # load requests carry the policy and their deadline; capacity and service time ran at policy=full
    assert ("/classify", {"policy": "adaptive", "deadline_ms": "2000.0"}) in seen
    assert ("/ground", {"policy": "full"}) in seen


def test_no_answer_is_status_0_with_the_reason(mock_server) -> None:
    """A refused connection and a client timeout are counted as status 0 (errors_conn), never
    raised out of the load loop; a failed set-up request raises a clear error."""
    url, _ = mock_server
    wl = load.Workload("classify", "/classify", b"x", {"content-type": "image/png"}, {}, "test")

    async def run() -> tuple[load.Answer, load.Answer]:
        refused = load.Clients(4, base_url="http://127.0.0.1:9", timeout=5)  # the discard port: nothing listens
        impatient = load.Clients(4, base_url=url, timeout=0.005)  # the mock takes 20 ms
        patient = load.Clients(4, base_url=url, timeout=30)
        try:
            a = await load.send(refused, wl, {})
            b = await load.send(impatient, wl, {"deadline_ms": 1000})
            with pytest.raises(load.StatusError, match="HTTP 429"):
                (await patient.post("/classify", params={"deadline_ms": 1})).raise_for_status()
            return a, b
        finally:
            for c in (refused, impatient, patient):
                await c.aclose()

    a, b = asyncio.run(run())
    assert a.status == 0 and a.error == "ClientConnectorError" and load.classify_outcome(0, 0.0, 1.0) == "errors_conn"
    assert b.status == 0 and b.error in ("TimeoutError", "ServerTimeoutError")
