"""The playground at ``/``: one page (``index.html``, ``playground.js``, ``playground.css``)
over the server's own API, and a few bundled samples (``samples/``, made by
``python -m service.playground.samples``).  Everything is served from here: no CDN, so it
works offline.  The page and its assets need no token (a browser sends none); its API
calls carry the one typed into the page."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

HERE = Path(__file__).parent
ASSETS_URL = "/playground"


def install_playground(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(HERE / "index.html", media_type="text/html")

    app.mount(ASSETS_URL, StaticFiles(directory=HERE, check_dir=True), name="playground")
