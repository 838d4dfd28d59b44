"""The playground at ``/`` (service/playground/): its page and assets are served and name
no other host, and in a real headless Chromium that can resolve no host but 127.0.0.1
(driven by Playwright, with Debian's chromium) a user uploads a photo and gets it
super-resolved with the rung map, classifies a glyph and grounds an expression, each with
the rung the server reported."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.playground import HERE

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ASSET = re.compile(r"""\b(?:src|href)\s*=\s*["']([^"'#]+)["']""")


def test_the_page_and_its_assets_are_served_and_name_no_other_host() -> None:
    from fastapi import FastAPI

    from service.playground import install_playground

    app = FastAPI()
    install_playground(app)
    client = TestClient(app)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = ASSET.findall(page.text)
    local = [u for u in refs if not u.startswith(("data:", "docs", "v1/", "metrics"))]
    assert {"playground/playground.css", "playground/playground.js"} <= set(local), refs
    for text in (page.text, (HERE / "playground.js").read_text(), (HERE / "playground.css").read_text()):
        assert "http://" not in text and "https://" not in text and "//" + "cdn" not in text
    for url in local:
        assert client.get("/" + url).status_code == 200, url
    samples = client.get("/playground/samples/samples.json").json()
    assert {s["endpoint"] for s in samples.values()} == {"/superresolve", "/classify", "/ground"}
    for name in samples:
        assert Image.open(io.BytesIO(client.get(f"/playground/samples/{name}").content)).size[0] >= 32


def test_the_page_needs_no_token_but_the_api_does() -> None:
    from fastapi import FastAPI

    from service.config import Settings
    from service.metrics import Metrics
    from service.middleware import RequestContext
    from service.playground import install_playground
    from tests.conftest import FAST_START

    app = FastAPI()
    install_playground(app)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"models": []}

    client = TestClient(RequestContext(app, settings=Settings(auth_token="s3cret", **FAST_START), metrics=Metrics(),
                                       endpoints=set()))
    assert client.get("/").status_code == 200
    assert client.get("/playground/playground.js").status_code == 200
    assert client.get("/v1/models").status_code == 401  # '/' exempts the page only, not every path


# --- a real browser ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install --no-install-recommends chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    try:
        p = sync_api.sync_playwright().start()
    except Exception as exc:  # its Node.js driver did not start: a missing system library
        pytest.skip(f"playwright's driver could not start ({str(exc).strip().splitlines()[-1][:200]}); "
                    "apt-get install libatomic1 (.ci/run does)")
    try:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])  # every other host: not found
        try:
            yield b
        finally:
            b.close()
    finally:
        p.stop()


@pytest.fixture
def page(browser, server):
    _proc, url = server
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    failed: list[str] = []
    pg.on("requestfailed", lambda r: failed.append(r.url))
    pg.on("pageerror", lambda e: failed.append(f"page error: {e}"))
    pg.goto(url + "/")
    pg.wait_for_function("document.querySelectorAll('#model option').length > 0")
    yield pg
    assert not failed, failed
    context.close()


def served_fields(pg) -> dict[str, str]:
    pg.wait_for_selector("#status.ok, #status.error")
    assert "error" not in pg.get_attribute("#status", "class"), pg.inner_text("#status")
    return {el.get_attribute("data-field"): el.inner_text() for el in pg.query_selector_all("#served dd")}


def test_super_resolution_of_an_uploaded_photo_with_its_rung_map(page, server, tmp_path: Path) -> None:
    models = httpx.get(f"{server[1]}/v1/models").json()["models"]
    rungs = {r["name"] for m in models if m["endpoint"] == "/superresolve" for r in m["rungs"]}
    rng = np.random.default_rng(3)
    photo = tmp_path / "upload.png"
    smooth = np.kron(rng.random((6, 8, 3)), np.ones((8, 8, 1)))
    Image.fromarray((255 * (0.7 * smooth + 0.3 * rng.random((48, 64, 3)))).astype(np.uint8)).save(photo)
    page.select_option("#endpoint", "/superresolve")
    page.set_input_files("#file", str(photo))
    page.click("#run")
    served = served_fields(page)
    assert served["rung"] in rungs and "%" in served["FLOPs"] and "compute" in served["time"], served
    assert "w56=" in served["patches per rung"]
    size = page.evaluate("""() => { const i = document.querySelector('#served-image img');
                                    return [i.naturalWidth, i.naturalHeight]; }""")
    assert size == [256, 192]  # x4
    page.wait_for_function("document.querySelector('#rung-map') && document.querySelector('#rung-map').naturalWidth")
    assert page.evaluate("document.querySelector('#rung-map').naturalWidth") == 64  # the map at the input size
    assert page.evaluate("document.querySelector('#bicubic img').naturalWidth") == 256
    legend = page.inner_text("#rung-legend")
    assert all(name in legend for name in ("bicubic", "w56")), legend
    page.screenshot(path=str(tmp_path / "superresolve.png"))


def test_classification_and_grounding_of_uploaded_images(page, tmp_path: Path) -> None:
    """Uploads (the bundled samples' files, chosen with the file input like any photo)."""
    page.select_option("#endpoint", "/classify")
    page.set_input_files("#file", str(HERE / "samples" / "glyph.png"))
    page.click("#run")
    served = served_fields(page)
    assert served["rung"] and "held-out" in served["expected accuracy"], served
    rows = page.query_selector_all("#predictions tbody tr")
    assert len(rows) == 5 and all("%" in r.inner_text() for r in rows)

    page.select_option("#endpoint", "/ground")
    page.set_input_files("#file", str(HERE / "samples" / "scene.png"))
    page.fill("#expression", json.loads((HERE / "samples" / "samples.json").read_text())["scene.png"]["expression"])
    page.click("#run")
    served = served_fields(page)
    assert served["rung"].startswith("side="), served
    box = [float(v) for v in page.get_attribute("#ground-canvas", "data-box").split(",")]
    assert len(box) == 4 and box[0] < box[2] and box[1] < box[3]
    page.screenshot(path=str(tmp_path / "ground.png"))


def test_the_bundled_samples_fill_in_the_form(page) -> None:
    page.click("button[data-sample='scene.png']")
    page.wait_for_function("document.querySelector('#endpoint').value === '/ground'")
    assert page.input_value("#expression")  # the sample's expression
    page.click("#run")
    assert served_fields(page)["rung"].startswith("side=")


def test_a_shed_request_says_so_with_its_retry_after(page) -> None:
    page.click("button[data-sample='glyph.png']")
    page.wait_for_function("document.querySelector('#endpoint').value === '/classify'")
    page.eval_on_selector("#deadline", "(el) => { el.step = 1; el.value = 1; el.dispatchEvent(new Event('input')); }")
    page.click("#run")
    page.wait_for_selector("#status.error")
    text = page.inner_text("#status")
    assert text.startswith("429") and "retry after" in text, text
