"""Work is bounded by what it costs, not by pixels (issue 12, item 4).

Strips within ``max_input_pixels`` (1x150000, 150000x1, 2x60000) against the real server
(uvicorn on loopback, every bundled model): each is answered within 5 s with a 200 or a
clear 4xx, never a 5xx, and the endpoint serves a normal request afterwards.  Then the
pieces: the header checks run before decoding, ARM's patch count from the size alone,
classification's crop-before-resize, SeqTR's clamped resize, and /ground's JSON and text
paths (deep nesting, lone surrogates).
"""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from models.arm import tiling
from models.cfvit import preprocess as cfvit_pre
from models.pssnet import data as pss_data
from models.seqtr.preprocess import prepare
from service import imageio, limits
from service.errors import ApiError
from tests.conftest import synthetic_photo
from tests.test_e2e import server_url  # noqa: F401  (the module-scoped server fixture)

STRIPS = [(1, 150_000), (150_000, 1), (2, 60_000)]  # (width, height) as PIL says it
PNG_CT = {"content-type": "image/png"}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _strip(w: int, h: int) -> bytes:
    return _png(np.random.default_rng(w * 7 + h).integers(0, 256, size=(h, w, 3), dtype=np.uint8))


GOOD = _png(synthetic_photo(60, 80))


def _timed_post(url: str, **kwargs) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = httpx.post(url, timeout=60, **kwargs)
    return r, time.perf_counter() - t0


def _ground(url: str, png: bytes) -> tuple[httpx.Response, float]:
    return _timed_post(f"{url}/ground", files={"image": ("a.png", png, "image/png")},
                       data={"expression": "the red circle"})


# --- the real server ---------------------------------------------------------------------


@pytest.mark.parametrize("w,h", STRIPS, ids=[f"{w}x{h}" for w, h in STRIPS])
def test_strip_on_superresolve_is_a_clear_413(server_url: str, w: int, h: int) -> None:  # noqa: F811
    r, took = _timed_post(f"{server_url}/superresolve", content=_strip(w, h), headers=PNG_CT)
    assert r.status_code == 413 and took < 5, (r.status_code, took, r.text[:300])
    err = r.json()["error"]
    assert "max_sr_patches" in err["message"] and f"{w}x{h}" in err["message"] and "patches" in err["accepted"]
    r = httpx.post(f"{server_url}/superresolve", content=GOOD, headers=PNG_CT, timeout=60)
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (320, 240)


def test_strip_under_the_patch_limit_is_super_resolved(server_url: str) -> None:  # noqa: F811
    r, took = _timed_post(f"{server_url}/superresolve", content=_strip(4000, 1), headers=PNG_CT,
                          params={"budget": "0"})
    assert r.status_code == 200 and took < 5, (r.status_code, took, r.text[:300])
    assert Image.open(io.BytesIO(r.content)).size == (16000, 4)
    assert sum(int(kv.split("=")[1]) for kv in r.headers["x-anytime-rung-mix"].split(",")) == tiling.count(1, 4000)


@pytest.mark.parametrize("model", ["pss-mbv1-glyphs", "cf-tiny-glyphs"])
@pytest.mark.parametrize("w,h", STRIPS, ids=[f"{w}x{h}" for w, h in STRIPS])
def test_strip_is_classified_quickly(server_url: str, w: int, h: int, model: str) -> None:  # noqa: F811
    r, took = _timed_post(f"{server_url}/classify", content=_strip(w, h), headers=PNG_CT, params={"model": model})
    assert r.status_code == 200 and took < 5, (r.status_code, took, r.text[:300])
    body = r.json()
    assert body["model"] == model and len(body["predictions"]) == 5
    r = httpx.post(f"{server_url}/classify", content=GOOD, headers=PNG_CT, params={"model": model}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == model


@pytest.mark.parametrize("w,h", STRIPS, ids=[f"{w}x{h}" for w, h in STRIPS])
def test_strip_is_grounded_in_original_pixels(server_url: str, w: int, h: int) -> None:  # noqa: F811
    r, took = _ground(server_url, _strip(w, h))
    assert r.status_code == 200 and took < 5, (r.status_code, took, r.text[:300])
    x1, y1, x2, y2 = r.json()["box"]
    assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
    r, _ = _ground(server_url, GOOD)
    assert r.status_code == 200 and r.json()["expression"] == "the red circle"


def _json_ground(url: str, text: str) -> httpx.Response:
    return httpx.post(f"{url}/ground", content=text.encode(), headers={"content-type": "application/json"},
                      timeout=60)


def test_ground_json_and_text_paths_never_get_a_5xx(server_url: str) -> None:  # noqa: F811
    image = base64.b64encode(GOOD).decode()
    cases = [
        ("nested 100,000 deep", "[" * 100_000 + "]" * 100_000, 400, "nested too deeply"),
        ("object nested 100,000 deep", '{"a": ' * 100_000 + "1" + "}" * 100_000, 400, "nested too deeply"),
        ("integer of 5000 digits", '{"image": "' + image + '", "n": ' + "7" * 5000 + "}", 400, "malformed JSON"),
        ("lone high surrogate", '{"image": "' + image + '", "expression": "\\ud800 red"}', 422, "surrogates"),
        ("lone low surrogate", '{"image": "' + image + '", "expression": "red \\udfff"}', 422, "surrogates"),
        ("surrogate in the image field", '{"image": "\\ud800", "expression": "red"}', 400, "base64"),
    ]
    for name, text, status, words in cases:
        r = _json_ground(server_url, text)
        assert r.status_code == status and words in r.json()["error"]["message"], (name, r.status_code, r.text[:300])
    # a paired surrogate is a real character and is echoed as one
    r = _json_ground(server_url, '{"image": "' + image + '", "expression": "the red circle \\ud83d\\ude00"}')
    assert r.status_code == 200 and r.json()["expression"] == "the red circle \U0001F600"
    # a multipart text field in UTF-7 can decode to a lone surrogate too
    form = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png'
            b'\r\n\r\n' + GOOD + b'\r\n--b\r\nContent-Disposition: form-data; name="expression"\r\n\r\n+2AA- red'
            b'\r\n--b--\r\n')
    r = httpx.post(f"{server_url}/ground", content=form, timeout=60,
                   headers={"content-type": "multipart/form-data; boundary=b; charset=utf-7"})
    assert r.status_code == 422 and "surrogates" in r.json()["error"]["message"], r.text[:300]
    # the query string: an encoded surrogate and invalid UTF-8 are replaced (U+FFFD), never a 5xx
    for q in ("%ED%A0%80%20red", "%80%FF%20red", "red%00circle"):
        r = httpx.post(f"{server_url}/ground?expression={q}", content=GOOD, headers=PNG_CT, timeout=60)
        assert r.status_code == 200, (q, r.text[:300])
        r.json()
    r, _ = _ground(server_url, GOOD)
    assert r.status_code == 200


# --- the pieces ----------------------------------------------------------------------------


def _header_only_png(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_the_family_check_runs_on_the_header_before_decoding() -> None:
    seen = []

    def check(w: int, h: int) -> None:
        seen.append((w, h))
        raise imageio.ImageError(413, "too costly")

    with pytest.raises(imageio.ImageError, match="too costly"):  # no pixel data: decoding would fail with 400
        imageio.decode(_header_only_png(150_000, 1), 1_000_000, check)
    assert seen == [(150_000, 1)]
    with pytest.raises(ApiError) as exc:
        imageio.decode(_header_only_png(1, 150_000), 1_000_000, limits.sr_patches(1400, "full"))
    assert exc.value.status == 413 and "5357 LR patches" in exc.value.message
    img = imageio.decode(GOOD, 1_000_000, limits.sr_patches(1400, "full"))  # under the limit: decoded as before
    assert img.size == (80, 60)


def test_patch_count_from_the_size_matches_the_tiling() -> None:
    for h in (1, 2, 31, 32, 33, 60, 61, 88, 1000):
        for w in (1, 5, 32, 57, 200, 999):
            for mode in ("full", "official"):
                n = len(tiling.positions(max(h, 32), max(w, 32), mode))
                assert tiling.count(h, w, mode) == tiling.count(w, h, mode) == n
    assert tiling.count(1, 150_000) == 5357 and tiling.count(1000, 1000) == 1296
    assert tiling.count(1000, 1000) <= 1400 and tiling.count(3891, 257) <= 1400  # 1 Mpx up to 16:1 admitted


@pytest.mark.slow
@pytest.mark.parametrize("resize,crop", [(256, 224), (32, 32)])
def test_classification_crops_before_resizing_extreme_strips(resize: int, crop: int) -> None:
    rng = np.random.default_rng(0)
    for h, w in [(1, 150_000), (150_000, 1), (2, 60_000), (60_000, 2)]:
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        for fn in (pss_data.resize_center_crop, cfvit_pre.resize_center_crop):
            t0 = time.perf_counter()
            out = fn(img, resize, crop)
            assert out.shape == (crop, crop, 3) and time.perf_counter() - t0 < 0.5
        assert pss_data.resize_pixels(w, h, resize, crop) == cfvit_pre.resize_pixels(w, h, resize, crop) == crop ** 2
    # where the plain path is affordable, cropping first gives its answer up to a level or two
    for h, w in [(3, 1000), (1, 4000), (20, 3000)]:
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        assert cfvit_pre._crop_first(h, w, resize, crop)
        plain = cfvit_pre.center_crop(cfvit_pre.resize_short_side(img, resize), crop)
        assert np.abs(cfvit_pre.resize_center_crop(img, resize, crop).astype(int) - plain).max() <= 2
        nw, nh = pss_data._resized(w, h, resize)
        left, top = (nw - crop) // 2, (nh - crop) // 2
        plain = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))[top:top + crop, left:left + crop]
        assert np.abs(pss_data.resize_center_crop(img, resize, crop).astype(int) - plain).max() <= 2
    # ordinary images keep the plain path exactly
    img = rng.integers(0, 256, size=(375, 500, 3), dtype=np.uint8)
    assert not cfvit_pre._crop_first(375, 500, resize, crop) and not pss_data._crop_first(500, 375, resize, crop)


def test_classification_intermediate_limit_refuses_from_the_header() -> None:
    class Model:  # a classifier whose pre-processing would make a 9 Mpx intermediate
        def preprocess_pixels(self, w: int, h: int) -> int:
            return 9_000_000

    with pytest.raises(ApiError) as exc:
        imageio.decode(_header_only_png(100, 100), 1_000_000, limits.resize_pixels(4_194_304, Model()))
    assert exc.value.status == 413 and "max_resize_pixels" in exc.value.message
    assert limits.resize_pixels(10, object()) is None  # a model that cannot say is not checked


def test_grounding_resize_never_makes_a_zero_sized_side() -> None:
    for h, w in [(1, 100_000), (100_000, 1), (2, 60_000), (1, 150_000)]:
        p = prepare(np.zeros((h, w, 3), np.uint8), 640, 32)
        assert min(p.img_shape) >= 1 and max(p.img_shape) == 640
        assert max(p.pad_shape) == 640 and min(p.pad_shape) == 32  # the canvas is bounded by the rung
