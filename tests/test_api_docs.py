"""/docs (Swagger UI) and /redoc (ReDoc) work with no internet (service/apidocs.py): the
pages name only this server's URLs, it serves every asset, and a headless Chromium that can
resolve no host but 127.0.0.1 renders both against ``python -m service``."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from service.apidocs import ASSETS_URL, install_api_docs
from service.config import Settings
from service.metrics import Metrics
from service.middleware import RequestContext
from tests.conftest import FAST_START

PAGES = ("/docs", "/redoc")
REFERENCE = re.compile(r"""\b(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|\burl:\s*'([^']+)'""")
MIN_BYTES = {".js": 100_000, ".css": 10_000, ".png": 100}
CONTENT_TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",), ".png": ("image/png",)}


def docs_app() -> FastAPI:
    """A small app wired as service.app wires the real one."""
    app = FastAPI(title="Docs Test", version="1.2.3", docs_url=None, redoc_url=None)
    install_api_docs(app)

    @app.post("/superresolve", summary="Make it bigger")
    async def superresolve(budget: float = 0.5) -> dict:
        return {"budget": budget}

    return app


def references(page: str) -> list[str]:
    """Every URL the page loads: src/href attributes, ReDoc's spec-url, Swagger UI's ``url:``."""
    return [a or b for a, b in REFERENCE.findall(page)]


def check_pages(client: TestClient, prefix: str = "") -> None:
    for page in PAGES:
        r = client.get(f"{prefix}{page}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), (page, r.status_code)
        text = r.text
        assert "http://" not in text and "https://" not in text and "fonts.googleapis" not in text, text
        refs = references(text)
        assert refs, text
        assert f"{prefix}/openapi.json" in refs, (page, refs)
        assets = [u for u in refs if u != f"{prefix}/openapi.json"]
        assert len(assets) == (3 if page == "/docs" else 2), (page, refs)  # Swagger: JS, CSS, icon; ReDoc: JS, icon
        for url in assets:
            assert url.startswith(f"{prefix}{ASSETS_URL}/"), (page, url)
            a = client.get(url)
            suffix = Path(url).suffix
            assert a.status_code == 200, (url, a.status_code)
            assert a.headers["content-type"].split(";")[0] in CONTENT_TYPES[suffix], (url, a.headers["content-type"])
            assert len(a.content) >= MIN_BYTES[suffix], (url, len(a.content))
    assert client.get(f"{prefix}/docs/oauth2-redirect").status_code == 200


def test_pages_name_only_local_assets_and_each_is_served() -> None:
    check_pages(TestClient(docs_app()))


def test_pages_follow_the_root_path() -> None:
    """Behind a proxy that serves the app under a prefix (ASGI root_path), the URLs carry it."""
    check_pages(TestClient(docs_app(), root_path="/api"), prefix="/api")


def test_docs_routes_are_not_in_the_schema() -> None:
    paths = TestClient(docs_app()).get("/openapi.json").json()["paths"]
    assert list(paths) == ["/superresolve"]


def test_docs_load_without_a_token_when_auth_is_on() -> None:
    """A browser sends no bearer token: the pages, the schema and the assets are exempt by
    default (Settings.auth_exempt, "/docs-assets/" as a prefix), the API is not."""
    app = RequestContext(docs_app(), settings=Settings(auth_token="s3cret", **FAST_START), metrics=Metrics(),
                         endpoints=set())
    client = TestClient(app)
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect", "/openapi.json", f"{ASSETS_URL}/swagger-ui.css"):
        assert client.get(path).status_code == 200, path
    assert client.post("/superresolve").status_code == 401
    assert client.get(f"{ASSETS_URL}-not/x.css").status_code == 401  # a prefix ends at its '/'
    ok = client.post("/superresolve", headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_the_real_app_serves_the_offline_pages(bundled_model) -> None:
    """service.app turns FastAPI's CDN pages off and installs these (no lifespan: no calibration)."""
    from service.app import create_app
    from service.families.arm import ArmFamily

    check_pages(TestClient(create_app(Settings(**FAST_START), families=[ArmFamily(bundled_model)])))


# --- a real browser -----------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def docs_server():
    """``python -m service`` (ARM only, one calibration run: the docs need no more)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install --no-install-recommends chromium; .ci/run does)")
    from bench import server as bench_server

    try:
        proc, url = bench_server.start_server(ANYTIME_TORCH_THREADS="1", ANYTIME_CALIBRATION_REPEATS="1",
                                              ANYTIME_FAMILIES='["arm"]')
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def render(url: str, tmp_path: Path, screenshot: Path) -> str:
    """The DOM of ``url`` after its scripts ran, and a screenshot of it, from headless
    Chromium that resolves no host but 127.0.0.1: what a browser shows with no internet."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # every other host: not found
           "--hide-scrollbars", "--window-size=1280,900", "--virtual-time-budget=10000",
           f"--screenshot={screenshot}", "--dump-dom", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def first_post(schema: dict) -> tuple[str, dict]:
    """/superresolve if the schema has it, else its first POST operation."""
    posts = [(path, ops["post"]) for path, ops in schema["paths"].items() if "post" in ops]
    assert posts, "the schema lists no POST operation"
    return next(((p, op) for p, op in posts if p == "/superresolve"), posts[0])


def assert_not_blank(png: Path) -> None:
    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert pixels.shape[:2] == (900, 1280), pixels.shape
    assert (pixels.min(axis=2) < 200).mean() > 0.01, f"{png} is (almost) blank"


def test_a_browser_without_internet_renders_swagger_ui_and_redoc(docs_server: str, tmp_path: Path) -> None:
    """Swagger UI shows the first POST operation, ReDoc the API's title and that operation;
    the screenshots (under tmp_path) are not blank."""
    schema = httpx.get(f"{docs_server}/openapi.json").json()
    path, op = first_post(schema)

    dom = render(f"{docs_server}/docs", tmp_path, tmp_path / "docs.png")
    assert re.search(r'class="opblock opblock-post\b', dom), dom[-3000:]
    assert f'class="opblock-summary-path" data-path="{path}"' in dom, dom[-3000:]
    assert "Failed to load API definition" not in dom
    assert_not_blank(tmp_path / "docs.png")

    dom = render(f"{docs_server}/redoc", tmp_path, tmp_path / "redoc.png")
    assert re.search(rf"<h1[^>]*>{re.escape(schema['info']['title'])}", dom), dom[-3000:]
    assert re.search(rf'http-verb post">post</span><span[^>]*>{re.escape(path)}</span>', dom), dom[-3000:]
    if op.get("summary"):
        assert html.escape(op["summary"], quote=False) in dom
    assert_not_blank(tmp_path / "redoc.png")
