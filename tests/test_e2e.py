"""End to end: ``python -m service`` under real uvicorn on loopback, driven over HTTP."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, synthetic_photo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url():
    port = _free_port()
    env = {**os.environ, "ANYTIME_PORT": str(port), "ANYTIME_HOST": "127.0.0.1", "ANYTIME_TORCH_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("server did not become ready within 30 s")
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
    assert {"budget", "tiling", "objective"} <= params
