"""POST /ground through the real app: request forms, answers in original pixels, limits and
errors, deadlines, and an official-layout SeqTR checkpoint served end to end."""

from __future__ import annotations

import base64
import io
import pickle

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from models.seqtr.model import SeqTR, seqtr_tiny
from models.seqtr.raster import rle_to_mask
from models.seqtr.serving import SeqTRGrounder
from models.seqtr.text import Vocabulary
from service import registry
from service.app import create_app
from service.config import Settings
from service.families.arm import ArmFamily
from service.families.seqtr import SeqTRFamily
from tests.conftest import FAST_START, synthetic_photo, wait_ready

WORDS = ["the", "red", "blue", "circle", "square", "left", "of", "on"]


def tiny_grounder(task: str, seed: int) -> SeqTRGrounder:
    torch.manual_seed(seed)
    vocab = Vocabulary.from_words(WORDS)
    model = SeqTR(seqtr_tiny(task, vocab_size=len(vocab), num_points=6, max_token=6))
    return SeqTRGrounder(model, vocab, info={"name": f"tiny-{task}"})


@pytest.fixture(scope="module")
def client(bundled_model):
    app = create_app(Settings(**FAST_START), families=[ArmFamily(bundled_model), SeqTRFamily(tiny_grounder("det", 0)),
                                                       SeqTRFamily(tiny_grounder("segm", 1))])
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def _png(w: int = 96, h: int = 60) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(h, w)).save(buf, format="PNG")
    return buf.getvalue()


def test_box_from_multipart_is_in_original_pixels(client) -> None:
    r = client.post("/ground", files={"image": ("a.png", _png(96, 60), "image/png")},
                    data={"expression": "the red circle"})
    assert r.status_code == 200, r.text
    body = r.json()
    x1, y1, x2, y2 = body["box"]
    assert 0 <= x1 <= x2 <= 96 and 0 <= y1 <= y2 <= 60
    assert body["task"] == "box" and body["model"] == "tiny-det" and len(body["tokens"]) == 4
    assert body["words_read"] == 3 and body["unknown_words"] == [] and 0 < body["score"] <= 1
    assert r.headers["x-anytime-rung"] == "side=128" and r.headers["x-anytime-task"] == "box"
    assert float(r.headers["x-anytime-flops"]) == body["flops"] > 0


def test_mask_from_json_base64_with_rle_and_png(client) -> None:
    payload = {"image": base64.b64encode(_png(80, 50)).decode(), "expression": "blue square on the left, mauve"}
    r = client.post("/ground", params={"task": "mask"}, json=payload)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-segm" and body["unknown_words"] == ["mauve"]
    assert len(body["tokens"]) == 2 * 6 + 1
    mask = rle_to_mask(body["mask"])
    assert mask.shape == (50, 80) and body["mask"]["format"] == "rle"
    if body["polygon"]:
        xs = [p[0] for p in body["polygon"]]
        assert body["box"][0] == pytest.approx(min(xs), abs=0.01)
    as_png = client.post("/ground", params={"task": "mask", "mask_format": "png"}, json=payload).json()["mask"]
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(as_png["data"]))))
    assert decoded.shape == (50, 80) and np.array_equal(decoded > 0, mask)


def test_raw_body_with_query_expression_and_explain(client) -> None:
    r = client.post("/ground", content=_png(70, 90), headers={"content-type": "image/png"},
                    params={"expression": "the blue circle", "explain": "true"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (70, 90)


@pytest.mark.parametrize("kwargs, status, words", [
    ({"data": {"expression": ""}}, 422, "empty"),
    ({"data": {"expression": "?!. ,"}}, 422, "empty"),
    ({"data": {"expression": "red " * 100}}, 422, "max_expression_chars"),
    ({"data": {}}, 422, "no expression"),
])
def test_bad_expressions_are_clear_422s(client, kwargs, status, words) -> None:
    r = client.post("/ground", files={"image": ("a.png", _png(), "image/png")}, **kwargs)
    assert r.status_code == status and words in r.json()["error"]["message"]


def test_bad_bodies_and_parameters(client) -> None:
    bad = [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400),
        (dict(json={"image": "***", "expression": "the red circle"}), 400),
        (dict(json={"expression": "the red circle"}), 422),
        (dict(json={"image": base64.b64encode(b"not an image").decode(), "expression": "red"}), 400),
        (dict(content=b"x", headers={"content-type": "text/plain"}), 415),
    ]
    for kwargs, status in bad:
        r = client.post("/ground", **kwargs)
        assert r.status_code == status, (kwargs, r.text)
        assert "error" in r.json()
    png = {"content": _png(), "headers": {"content-type": "image/png"}}
    assert client.post("/ground", params={"expression": "red", "model": "nope"}, **png).status_code == 422
    assert client.post("/ground", params={"expression": "red", "model": "tiny-det", "task": "mask"},
                       **png).status_code == 422
    assert client.post("/ground", params={"expression": "red", "side": 64}, **png).status_code == 422
    assert client.post("/ground", params={"expression": "red", "task": "polygon"}, **png).status_code == 422
    assert client.post("/ground", params={"expression": "red"}, **png).status_code == 200  # still serving


def test_deadline_that_cannot_be_met_is_shed_and_models_listed(client) -> None:
    r = client.post("/ground", content=_png(), headers={"content-type": "image/png"},
                    params={"expression": "the red circle", "deadline_ms": 0.5})
    assert r.status_code == 429 and "retry-after" in r.headers
    listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert listed["tiny-segm"]["task"] == "mask" and listed["tiny-segm"]["num_points"] == 6
    assert listed["tiny-det"]["cost_model"]["rungs"]["128"]["predicted_full_batch_ms"] > 0
    assert 'anytime_requests_total{code="429",endpoint="/ground"' in client.get("/metrics").text


def test_resolution_ladder_follows_the_budget(bundled_model) -> None:
    adapter = SeqTRFamily(tiny_grounder("det", 0), long_sides=[64, 96, 128])
    assert adapter.flops_by_side[64] < adapter.flops_by_side[96] < adapter.flops_full
    half = adapter.flops_by_side[96] / adapter.flops_full
    assert adapter.plan(None, 1.0, "flops").side == 128 and adapter.plan(None, half, "flops").side == 96
    assert adapter.plan(None, half - 1e-3, "flops").side == 64 and adapter.plan(None, 0.0, "flops").side == 64
    app = create_app(Settings(**FAST_START), families=[ArmFamily(bundled_model), adapter])
    with TestClient(app) as c:
        wait_ready(c)
        r = c.post("/ground", content=_png(), headers={"content-type": "image/png"},
                   params={"expression": "red", "budget": f"{half:.6f}"})
        assert r.status_code == 200 and r.json()["rung"]["long_side"] == 96


def test_official_layout_checkpoint_serves_end_to_end(bundled_model, tmp_path) -> None:
    """A synthesised checkpoint with the official key layout (full-size DarkNet-53 model,
    DDP prefix, EMA weights beside) and a token_to_ix.pkl, loaded by the server from
    settings like any user's official file, at a small input side to keep the test quick."""
    from models.seqtr.official_layout import synthesise_official_state_dict

    ckpt = synthesise_official_state_dict(task="det", vocab_size=len(WORDS) + 3, module_prefix=True)
    torch.save(ckpt, tmp_path / "det_refcoco.pth")
    with open(tmp_path / "token_to_ix.pkl", "wb") as f:
        pickle.dump({"PAD": 0, "UNK": 1, "CLS": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}, f)
    settings = Settings(**{**FAST_START, "seqtr_checkpoints": [tmp_path / "det_refcoco.pth"],
                           "seqtr_token_to_ix": tmp_path / "token_to_ix.pkl", "seqtr_long_sides": [64],
                           "ground_batch_max": 1, "families": ["seqtr"]})
    app = create_app(settings, families=[ArmFamily(bundled_model), *registry.load(settings)])
    with TestClient(app) as c:
        wait_ready(c, timeout=120)
        r = c.post("/ground", content=_png(120, 80), headers={"content-type": "image/png"},
                   params={"expression": "the red circle"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "seqtr-det-det_refcoco" and len(body["tokens"]) == 4
        assert all(0 <= t < 1000 for t in body["tokens"])  # the EOS logit is removed for boxes
        x1, y1, x2, y2 = body["box"]
        assert 0 <= x1 <= x2 <= 120 and 0 <= y1 <= y2 <= 80
        assert body["flops_full"] > 1e9  # the full-size network, even at side 64
