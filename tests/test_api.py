"""POST /superresolve and friends, through the ASGI app with the bundled model."""

from __future__ import annotations

import asyncio
import io
import math
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.families.arm import ArmFamily
from service.config import Settings
from tests.conftest import FAST_START, synthetic_photo, wait_ready, wait_until


def _encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format=fmt) if mode else Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(bundled_model) -> TestClient:
    settings = Settings(max_input_pixels=200_000, max_body_bytes=2_000_000, **FAST_START)
    with TestClient(create_app(settings, families=[ArmFamily(bundled_model)])) as c:
        wait_ready(c)
        yield c


def _post(client: TestClient, body: bytes, ctype: str = "image/png", **params) -> "httpx.Response":  # noqa: F821
    return client.post("/superresolve", content=body, headers={"content-type": ctype}, params=params)


def test_png_round_trip_with_cost_headers(client: TestClient) -> None:
    img = synthetic_photo(70, 90)
    r = _post(client, _encode(img), budget="0.6", budget_unit="flops")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    out = np.asarray(Image.open(io.BytesIO(r.content)))
    assert out.shape == (280, 360, 3)
    h = r.headers
    assert float(h["x-anytime-flops"]) <= 0.6 * float(h["x-anytime-flops-full"]) * (1 + 1e-9)
    assert 0 < float(h["x-anytime-flops-fraction"]) <= 0.6
    mix = dict(kv.split("=") for kv in h["x-anytime-rung-mix"].split(","))
    assert set(mix) == {"bicubic", "w16", "w36", "w56"}
    n_tiles = sum(int(v) for v in mix.values())
    assert n_tiles == 3 * 4  # 70x90 LR: rows at 0,28,38; columns at 0,28,56,58
    assert float(h["x-anytime-predicted-patch-psnr"]) > 20
    assert h["x-anytime-budget"] == "0.6"


@pytest.mark.parametrize("fmt,ctype", [("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_jpeg_and_webp_inputs(client: TestClient, fmt: str, ctype: str) -> None:
    r = _post(client, _encode(synthetic_photo(40, 40), fmt), ctype, budget="auto")
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == (160, 160)


def test_budget_extremes_and_best(client: TestClient) -> None:
    body = _encode(synthetic_photo(64, 64))
    zero = _post(client, body, budget="0", budget_unit="flops").headers
    assert zero["x-anytime-flops"] == "0" and zero["x-anytime-rung-mix"].startswith("bicubic=9,")
    full = _post(client, body, budget="1").headers
    assert float(full["x-anytime-flops-fraction"]) <= 1.0
    best = _post(client, body, budget="best")
    assert best.status_code == 200 and best.headers["x-anytime-budget"] == "best"
    auto = _post(client, body).headers
    assert auto["x-anytime-budget"] == "0.65"
    fixed = _post(client, body, rung="w36").headers
    assert fixed["x-anytime-rung-mix"] == "bicubic=0,w16=0,w36=9,w56=0" and fixed["x-anytime-budget"] == "rung:w36"
    assert _post(client, body, rung="3").headers["x-anytime-flops-fraction"] == "1.0000"


def test_more_budget_never_predicts_worse(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """At one state of the cost model, more budget never predicts worse.  Each served request
    teaches the cost model its rungs' relative times, so the state is held still here (no
    learning); across moments a time budget may buy other rungs, as it should."""
    monkeypatch.setattr(client.app.state.services[0].runtime.cost, "alpha", 0.0)
    body = _encode(synthetic_photo(96, 96, seed=3))
    for unit in ("time", "flops"):
        preds = [float(_post(client, body, budget=str(b), budget_unit=unit).headers["x-anytime-predicted-patch-psnr"])
                 for b in (0.2, 0.4, 0.6, 0.8, 1.0)]
        assert preds == sorted(preds), unit


def test_official_tiling_still_returns_the_whole_image(client: TestClient) -> None:
    r = _post(client, _encode(synthetic_photo(70, 90)), tiling="official", budget="1")
    assert r.status_code == 200
    out = np.asarray(Image.open(io.BytesIO(r.content)))
    assert out.shape == (280, 360, 3)
    assert out[-8:, -8:].max() > 0  # the uncovered remainder is filled, not black
    assert r.headers["x-anytime-tiling"] == "official"


def test_grey_rgba_sixteen_bit_and_tiny_inputs(client: TestClient) -> None:
    rgb = synthetic_photo(36, 40)
    grey = _post(client, _encode(rgb[:, :, 1], mode="L"))
    assert grey.status_code == 200 and Image.open(io.BytesIO(grey.content)).mode == "L"
    rgba = np.concatenate([rgb, np.full((36, 40, 1), 128, np.uint8)], axis=2)
    out = Image.open(io.BytesIO(_post(client, _encode(rgba, mode="RGBA")).content))
    assert out.mode == "RGBA" and out.size == (160, 144)
    assert abs(int(np.asarray(out)[..., 3].mean()) - 128) <= 1
    deep = (rgb[:, :, 0].astype(np.uint16) * 257)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    out16 = Image.open(io.BytesIO(_post(client, buf.getvalue()).content))
    assert out16.mode.startswith("I") and out16.size == (160, 144)
    assert np.asarray(out16).max() > 255  # still 16-bit
    tiny = Image.open(io.BytesIO(_post(client, _encode(rgb[:1, :1])).content))
    assert tiny.size == (4, 4)


def test_models_and_health(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    m = client.get("/v1/models").json()["models"][0]
    assert [r["name"] for r in m["rungs"]] == ["bicubic", "w16", "w36", "w56"]
    assert m["rungs"][-1]["flops"] == 467_877_892 and "2 x multiply-accumulates" in m["flops_convention"]


BAD = [
    ("empty body", b"", "image/png", {}, 400),
    ("truncated png", None, "image/png", {}, 400),
    ("text as png", b"hello world", "image/png", {}, 400),
    ("text content type", b"hello", "text/plain", {}, 415),
    ("gif", None, "image/gif", {}, 415),
    ("budget above 1", None, "image/png", {"budget": "1.5"}, 422),
    ("budget negative", None, "image/png", {"budget": "-0.1"}, 422),
    ("budget nan", None, "image/png", {"budget": "nan"}, 422),
    ("budget word", None, "image/png", {"budget": "lots"}, 422),
    ("bad tiling", None, "image/png", {"tiling": "diagonal"}, 422),
    ("unknown rung", None, "image/png", {"rung": "w99"}, 422),
    ("too many pixels", "big", "image/png", {}, 413),
]


@pytest.mark.parametrize("name,body,ctype,params,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_clear_json_errors(client: TestClient, name, body, ctype, params, status) -> None:
    png = _encode(synthetic_photo(40, 40))
    if body is None:
        body = png[: len(png) // 2] if name == "truncated png" else png
    if name == "gif":
        buf = io.BytesIO()
        Image.fromarray(synthetic_photo(8, 8)).save(buf, format="GIF")
        body = buf.getvalue()
    if body == "big":
        body = _encode(np.zeros((500, 500, 3), np.uint8))  # 250k pixels > the 200k limit
    r = _post(client, body, ctype, **params)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and err["message"]
    # The server is unharmed: a good request right after succeeds.
    assert _post(client, png).status_code == 200


def test_body_over_the_byte_limit_is_413(client: TestClient) -> None:
    r = _post(client, b"\x89PNG" + b"\0" * 2_100_000)
    assert r.status_code == 413


# --- runtime features through the API ---------------------------------------------------


def test_multipart_upload_and_accept_negotiation(client: TestClient) -> None:
    png = _encode(synthetic_photo(40, 48))
    r = client.post("/superresolve", files={"image": ("photo.png", png, "image/png")}, params={"budget": "0.5"},
                    headers={"accept": "image/webp;q=0.9, image/jpeg"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).format == "JPEG" and Image.open(io.BytesIO(r.content)).size == (192, 160)
    webp = client.post("/superresolve", content=png, headers={"content-type": "image/png", "accept": "image/webp"})
    assert Image.open(io.BytesIO(webp.content)).format == "WEBP"
    none = client.post("/superresolve", content=png, headers={"content-type": "image/png", "accept": "text/html"})
    assert none.status_code == 406 and "image/png" in none.json()["error"]["accepted"]
    no_file = client.post("/superresolve", data={"note": "no image here"}, files={"x": ("", b"", "")})
    assert no_file.status_code in (400, 422)


def test_every_inference_says_rung_cost_queue_and_compute(client: TestClient) -> None:
    r = _post(client, _encode(synthetic_photo(64, 64)), deadline_ms="5000")
    h = r.headers
    assert r.status_code == 200 and h["x-anytime-decision"] == "deadline" and h["x-anytime-policy"] == "adaptive"
    for key in ("rung", "rung-mix", "flops", "flops-full", "budget", "predicted-patch-psnr", "queue-ms", "compute-ms",
                "encode-ms", "predicted-ms", "server-ms", "deadline-ms"):
        assert f"x-anytime-{key}" in h, key
    assert h["x-anytime-rung"] in {"bicubic", "w16", "w36", "w56"} and len(h["x-request-id"]) == 32
    assert float(h["x-anytime-server-ms"]) <= 5000
    mine = client.post("/superresolve", content=_encode(synthetic_photo(8, 8)),
                       headers={"content-type": "image/png", "x-request-id": "trace-42"})
    assert mine.headers["x-request-id"] == "trace-42"


def test_fixed_policies_and_explain_map(client: TestClient) -> None:
    body = _encode(synthetic_photo(64, 64))
    full = _post(client, body, policy="full", deadline_ms="1").headers  # no shedding under a fixed policy
    assert full["x-anytime-rung-mix"] == "bicubic=0,w16=0,w36=0,w56=9" and full["x-anytime-policy"] == "full"
    small = _post(client, body, policy="smallest").headers
    assert small["x-anytime-rung-mix"] == "bicubic=9,w16=0,w36=0,w56=0"
    ex = _post(client, body, explain="true", rung="w36")
    assert ex.status_code == 200 and ex.headers["content-type"] == "image/png"
    im = np.asarray(Image.open(io.BytesIO(ex.content)))
    assert im.shape == (64, 64, 3)  # the map is at the input size
    assert "w36=#" in ex.headers["x-anytime-rung-colours"] and "x-anytime-compute-ms" not in ex.headers
    green = np.array([52, 168, 83]) * 0.65
    assert np.all(im.astype(float) >= green - 1)  # every pixel carries w36's colour


def test_impossible_deadline_is_shed_at_once_with_retry_after(client: TestClient) -> None:
    r = _post(client, _encode(synthetic_photo(96, 96)), deadline_ms="1")
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert "deadline" in r.json()["error"]["message"]
    floor = _post(client, _encode(synthetic_photo(96, 96)), deadline_ms="60000", min_budget="0.9", budget_unit="flops")
    assert floor.status_code == 200 and float(floor.headers["x-anytime-flops-fraction"]) >= 0.85
    assert _post(client, _encode(synthetic_photo(8, 8)), deadline_ms="abc").status_code == 422


def test_a_slowdown_learnt_under_overload_does_not_outlive_it(client: TestClient) -> None:
    """The latch: a slowdown learnt at a peak made the planner shed every request, so no
    work ran to unlearn it.  Once nothing runs it decays and an idle server serves again."""
    body = _encode(synthetic_photo(64, 64))
    service_ms = sorted(float(_post(client, body, policy="full").headers["x-anytime-server-ms"]) for _ in range(5))[2]
    deadline = str(max(3 * service_ms, 30.0))
    assert _post(client, body, deadline_ms=deadline).status_code == 200
    cost = client.app.state.services[0].runtime.cost
    # A factor as learnt at the end of an overload, when every request was shed: large enough
    # that even the cheapest plan, as predicted on this host, outlasts the deadline twice over.
    floor_ms = float(_post(client, body, policy="smallest").headers["x-anytime-predicted-ms"])
    learnt = max(20.0, 2 * float(deadline) / floor_ms)
    cost.slowdown = learnt
    shed = _post(client, body, deadline_ms=deadline)  # by the early shed or the planner: both compare the floor
    assert shed.status_code == 429 and any(w in shed.json()["error"]["message"] for w in ("floor", "cheapest rung"))
    # Idle: the learnt factor is all but forgotten (its excess decays below 1 %).
    time.sleep(cost.idle_grace_s + cost.idle_tau_s * (math.log(100 * (learnt - 1)) + 0.5))
    assert cost.slowdown < 1.01
    # A VM's CPU can take a while to come back from idle (the shared 2-core VM, 2026-12-06: a
    # torch pass 8x slower right after a 5 s sleep, back within about ten; this request 90-150 ms
    # instead of 20), which no short deadline absorbs: run the host warm again first (the
    # latch itself is the factor asserted above, learnt or decayed with nothing running).
    for _ in range(30):
        if float(_post(client, body, policy="full").headers["x-anytime-server-ms"]) <= 1.5 * service_ms:
            break
    served = _post(client, body, deadline_ms=deadline)
    assert served.status_code == 200, served.text


def test_a_large_image_that_cannot_make_its_deadline_is_shed_before_it_is_decoded(client: TestClient) -> None:
    """ARM's cheapest plan depends on the image, but its size is in the header: bicubic on
    every patch plus the output's stitch and encode is known once the body is read, so a
    request whose deadline that floor outlasts is shed then (the early shed's message), not
    decoded, analysed and shed by the planner."""
    body = _encode(synthetic_photo(400, 400))  # 225 patches, a 1600x1600 answer
    # Let the cost model forget the tests before this one: a slowdown learnt under their load and
    # decaying between the two requests below could shrink the floor past the deadline's margin.
    cost = client.app.state.services[0].runtime.cost
    time.sleep(cost.idle_grace_s + 3 * cost.idle_tau_s)
    smallest = _post(client, body, policy="smallest")
    assert smallest.status_code == 200, smallest.text
    floor_ms = float(smallest.headers["x-anytime-predicted-ms"])
    deadline = max(floor_ms / 3, 1.0)
    shed = _post(client, body, deadline_ms=f"{deadline:.3f}")
    assert shed.status_code == 429 and "cheapest rung" in shed.json()["error"]["message"], shed.text
    assert _post(client, body, deadline_ms="60000").status_code == 200
    # an image over the pixel limit is refused as such (413), never shed with a 429 that invites a retry;
    # its deadline is the smaller image's floor, which it cannot make either, but which leaves room before
    # its body is read for the answer's reserve the 1600x1600 answers above taught (a third of it did not:
    # shed unread, a request cannot be told from its size; after the read: the test below on a deadline
    # that runs out while the body is read)
    too_big = _post(client, _encode(synthetic_photo(480, 480)), deadline_ms=f"{floor_ms:.3f}")
    assert too_big.status_code == 413, too_big.text


def test_metrics_policy_and_models_show_the_runtime(client: TestClient) -> None:
    _post(client, _encode(synthetic_photo(64, 64)), deadline_ms="5000")
    text = client.get("/metrics").text
    for name in ("anytime_request_duration_seconds_bucket", "anytime_queue_duration_seconds_count",
                 "anytime_compute_duration_seconds_sum", "anytime_requests_total", "anytime_deadline_met_total",
                 "anytime_budget_chosen_bucket", "anytime_flops_served_total", "anytime_predicted_patch_psnr_decibels_count",
                 "anytime_patches_total", "anytime_queue_depth", "anytime_slowdown_ratio", "anytime_ready",
                 "anytime_rung_item_seconds", "anytime_batch_items_bucket"):
        assert name in text, name
    assert 'anytime_requests_total{code="200",endpoint="/superresolve"' in text
    assert 'anytime_shed_total{model="arm-fsrcnn-demo",reason="deadline"}' in text or "anytime_shed" in text
    pol = client.get("/v1/policy").json()
    assert pol["policy"] == "adaptive" and pol["load"]["cores"] >= 1
    cm = client.get("/v1/models").json()["models"][0]["cost_model"]
    assert set(cm["rungs"]) == {"0", "1", "2", "3"}, cm
    # Each rung's line as the runtime fitted it.  Not "per_item_ms > 0": the fixture calibrates with
    # one repeat, and on a loaded host stalls of tens of ms against a cheap rung's few ms can make
    # the fit's slope negative, which LinearCost.fit clamps to 0 (seen: 3 of 80 rung fits).
    for key, line in client.app.state.services[0].runtime.cost.rungs.items():
        shown = cm["rungs"][str(key)]
        assert (shown["fixed_ms"], shown["per_item_ms"]) == (round(1000 * line.fixed_s, 4),
                                                             round(1000 * line.per_unit_s, 4)), (key, cm)
        assert shown["fixed_ms"] >= 0 and shown["per_item_ms"] >= 0 and shown["predicted_full_batch_ms"] > 0, cm


def test_auth_and_drain(bundled_model) -> None:
    settings = Settings(auth_token="s3cret", **FAST_START)
    app = create_app(settings, families=[ArmFamily(bundled_model)])
    with TestClient(app) as c:
        wait_ready(c)
        body = _encode(synthetic_photo(16, 16))
        assert c.post("/superresolve", content=body).status_code == 401
        wrong = c.post("/superresolve", content=body, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
        ok = c.post("/superresolve", content=body, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200  # exempt
        assert c.get("/v1/models").status_code == 401
        app.state.begin_drain()
        assert c.get("/readyz").status_code == 503
        # A request whose arrival (as the loop-lag correction estimates it) precedes the drain
        # is still served; one that surely arrived later gets 503.
        drained = wait_until(lambda: (lambda r: r if r.status_code == 503 else None)(
            c.post("/superresolve", content=body, headers={"authorization": "Bearer s3cret"})), timeout=2,
            what="503 for work arriving after the drain started")
        assert drained.headers["retry-after"] == "1"
        assert 'anytime_ready{model="arm-fsrcnn-demo"} 0.0' in c.get("/metrics").text


def test_not_ready_until_calibrated(bundled_model) -> None:
    app = create_app(Settings(**FAST_START), families=[ArmFamily(bundled_model)])
    svc = app.state.services[0]
    svc.start = lambda: svc.runtime.executor.start()  # never calibrates
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503
        r = c.post("/superresolve", content=_encode(synthetic_photo(16, 16)))
        assert r.status_code == 503 and "warming up" in r.json()["error"]["message"]
        svc.runtime.cost.calibrate_rungs({0: lambda n: None}, [1, 8], 1)  # half-way through calibration
        assert c.get("/metrics").status_code == 200 and c.get("/v1/models").status_code == 200


def test_ready_comes_after_start_ups_own_collection_whose_pause_is_not_counted_as_load(
        bundled_model, monkeypatch) -> None:
    """After the models calibrate, start-up collects and freezes what they built, holding the
    event loop (0.1-0.7 s).  /readyz says ready only after that, and the pause is not left in
    the loop-lag reading that requests reserve against their deadlines."""
    collections = []

    def slow_freeze() -> float:
        time.sleep(0.3)  # as a full collection holds the loop
        collections.append(time.monotonic())
        return 0.3

    monkeypatch.setattr("service.app.freeze_startup_objects", slow_freeze)
    app = create_app(Settings(**FAST_START), families=[ArmFamily(bundled_model)])
    assert len(collections) == 1  # the one before the server listens
    with TestClient(app) as c:
        wait_ready(c)
        assert len(collections) == 2  # the one after the calibrations, before ready
        assert app.state.services[0].machine.loop_lag.recent() < 0.1


def test_a_deadline_that_runs_out_while_the_body_is_read_sheds_it_unless_decode_refuses_it(
        client: TestClient, monkeypatch) -> None:
    """After the body is read the early shed looks again: a readable image whose deadline ran
    out meanwhile gets 429, but one over the pixel limit gets the 413 that says what to send
    instead (a 429 would invite the same request again)."""
    family = client.app.state.services[0].family
    # Time before the read for the planner's margin and the answer's reserve, which a pause of
    # the event loop in this test process (up to 0.3 s) counts in too.
    slow_read, deadline_ms = family.read, 1000.0

    async def read_past_the_deadline(*args, **kwargs):
        upload = await slow_read(*args, **kwargs)
        await asyncio.sleep(1.2 * deadline_ms / 1000)
        return upload

    monkeypatch.setattr(family, "read", read_past_the_deadline)
    readable = _post(client, _encode(synthetic_photo(64, 64)), deadline_ms=str(deadline_ms))
    assert readable.status_code == 429 and "0 ms left" in readable.json()["error"]["message"], readable.text
    too_big = _post(client, _encode(synthetic_photo(480, 480)), deadline_ms=str(deadline_ms))
    assert too_big.status_code == 413, too_big.text


def test_an_unknown_query_parameter_is_named_not_ignored(client: TestClient) -> None:
    """A misspelt deadline would otherwise be served without the deadline its client meant."""
    r = _post(client, _encode(synthetic_photo(16, 16)), deadline_msec="50")
    assert r.status_code == 422
    err = r.json()["error"]
    assert "deadline_msec" in err["message"] and "deadline_ms" in err["accepted"] and "budget" in err["accepted"]
    assert _post(client, _encode(synthetic_photo(16, 16)), deadline_ms="5000").status_code == 200


def test_errors_keep_the_model_label(client: TestClient) -> None:
    """A request refused before routing (a 422 on a query parameter) is still counted under
    the model it was for, so a dashboard filtered by model shows its errors; a model name
    that is not served never becomes a label."""
    name = client.get("/v1/models").json()["models"][0]["name"]
    assert _post(client, b"x", budget_unit="carats").status_code == 422
    assert _post(client, b"x", model="not-served", budget_unit="carats").status_code == 422
    assert client.post("/v2/models/not-served/infer", content=b"{}").status_code == 404
    text = client.get("/metrics").text
    assert f'anytime_requests_total{{code="422",endpoint="/superresolve",model="{name}"}}' in text
    assert "not-served" not in text
