"""A corpus of malformed requests against the real server (uvicorn on loopback).

Every one must get a 4xx, never a 5xx or a dropped connection, and the server must
stay healthy and keep serving good requests after each.  Protocol-level garbage (huge
headers, lying Content-Length) goes through a raw socket, since no HTTP client sends it.
"""

from __future__ import annotations

import io
import socket
import struct
import zlib
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import synthetic_photo
from tests.test_e2e import server_url  # noqa: F401  (the module-scoped server fixture)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _encoded(fmt: str, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(size, size)).save(buf, format=fmt)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels with almost no pixel data behind it."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        _chunk(b"IEND", b"")


def _corrupt(data: bytes) -> bytes:
    b = bytearray(data)
    mid = len(b) // 2
    b[mid:mid + 64] = bytes(64)  # zero a run inside the compressed pixel data
    return bytes(b)


GOOD = _png(synthetic_photo(40, 40))
PNG_CT = {"content-type": "image/png"}

# (name, body, headers, params, expected statuses)
CORPUS = [
    ("empty body", b"", PNG_CT, {}, {400}),
    ("truncated png", GOOD[: len(GOOD) // 2], PNG_CT, {}, {400}),
    ("png header only", GOOD[:8], PNG_CT, {}, {400}),
    ("corrupt png data", _corrupt(GOOD), PNG_CT, {}, {400}),
    ("truncated jpeg", _encoded("JPEG")[:300], {"content-type": "image/jpeg"}, {}, {400}),
    ("truncated webp", _encoded("WEBP")[:60], {"content-type": "image/webp"}, {}, {400}),
    ("webp with a broken chunk header", _encoded("WEBP")[:12] + bytes(20) + _encoded("WEBP")[32:],
     {"content-type": "image/webp"}, {}, {400}),
    ("text as png", b"definitely not an image", PNG_CT, {}, {400}),
    ("json body", b'{"image": "x"}', {"content-type": "application/json"}, {}, {415}),
    ("text/plain", b"hello", {"content-type": "text/plain"}, {}, {415}),
    ("gif image", _encoded("GIF"), {"content-type": "image/gif"}, {}, {415}),
    ("tiff sent as png", _encoded("TIFF"), PNG_CT, {}, {415}),
    ("decompression bomb 100k x 100k", _bomb_png(100_000, 100_000), PNG_CT, {}, {413}),
    ("absurd width 2^31-1", _bomb_png(2**31 - 1, 1), PNG_CT, {}, {400, 413}),
    ("over the pixel limit", _png(np.zeros((1100, 1000, 3), np.uint8)), PNG_CT, {}, {413}),
    ("budget word", GOOD, PNG_CT, {"budget": "lots"}, {422}),
    ("budget above 1", GOOD, PNG_CT, {"budget": "7"}, {422}),
    ("budget nan", GOOD, PNG_CT, {"budget": "nan"}, {422}),
    ("budget infinity", GOOD, PNG_CT, {"budget": "inf"}, {422}),
    ("negative deadline", GOOD, PNG_CT, {"deadline_ms": "-5"}, {422}),
    ("deadline word", GOOD, PNG_CT, {"deadline_ms": "soon"}, {422}),
    ("deadline of a year", GOOD, PNG_CT, {"deadline_ms": str(365 * 86400 * 1000)}, {422}),
    ("min budget above 1", GOOD, PNG_CT, {"min_budget": "2", "deadline_ms": "100"}, {422}),
    ("unknown policy", GOOD, PNG_CT, {"policy": "yolo"}, {422}),
    ("unknown rung", GOOD, PNG_CT, {"rung": "w1000"}, {422}),
    ("bad tiling", GOOD, PNG_CT, {"tiling": "hexagonal"}, {422}),
    ("bad explain flag", GOOD, PNG_CT, {"explain": "perhaps"}, {422}),
    ("unacceptable Accept", GOOD, {**PNG_CT, "accept": "application/pdf"}, {}, {406}),
    ("multipart without a boundary", b"--x\r\n\r\n", {"content-type": "multipart/form-data"}, {}, {400, 422}),
    ("multipart with no file", b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b--\r\n",
     {"content-type": "multipart/form-data; boundary=b"}, {}, {422}),
    ("multipart truncated", b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
     + GOOD[:100], {"content-type": "multipart/form-data; boundary=b"}, {}, {400, 422}),
    ("body over the byte limit", b"\x89PNG" + b"\0" * (21 * 1024 * 1024), PNG_CT, {}, {413}),
]


def _healthy(url: str) -> None:
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    r = httpx.post(f"{url}/superresolve", content=GOOD, headers=PNG_CT, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("name,body,headers,params,expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_request_gets_a_clear_4xx(server_url: str, name, body, headers, params, expected) -> None:  # noqa: F811
    r = httpx.post(f"{server_url}/superresolve", content=body, headers=headers, params=params, timeout=60)
    assert r.status_code in expected, f"{name}: {r.status_code} {r.text[:300]}"
    err = r.json()["error"]
    assert err["status"] == r.status_code and len(err["message"]) > 10
    _healthy(server_url)


def _raw(url: str, request: bytes) -> bytes:
    u = urlparse(url)
    data = b""
    with socket.create_connection((u.hostname, u.port), timeout=20) as s:
        try:  # the server may answer and close before it has read everything
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            while chunk := s.recv(65536):
                data += chunk
        except OSError:
            pass
    return data


RAW = [
    ("huge header", b"POST /superresolve HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"),
    ("10k headers", b"POST /superresolve HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(10_000))
     + b"\r\n"),
    ("non-numeric content-length", b"POST /superresolve HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n"),
    ("content-length longer than the body", b"POST /superresolve HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
     b"Content-Length: 100000\r\n\r\n" + GOOD[:50]),
    ("garbage request line", b"\x00\x01\x02 NOT HTTP\r\n\r\n"),
]


@pytest.mark.parametrize("name,request_bytes", RAW, ids=[c[0] for c in RAW])
def test_protocol_garbage_never_gets_a_5xx(server_url: str, name, request_bytes) -> None:  # noqa: F811
    reply = _raw(server_url, request_bytes)
    if reply:  # the server may also just close the connection, which is fine
        status = int(reply.split(b" ", 2)[1])
        assert 400 <= status < 500, f"{name}: {reply[:200]!r}"
    _healthy(server_url)
