"""The API docs, /docs (Swagger UI) and /redoc (ReDoc), served without the internet.

FastAPI's own pages load Swagger UI's and ReDoc's JavaScript and CSS from cdn.jsdelivr.net
(and ReDoc's fonts from Google Fonts), so on a machine that cannot reach them (air-gapped,
behind a firewall, a laptop on a train) the pages stay blank.  Here the assets come from the
``fastapi-offline`` package, which vendors Swagger UI 5 and ReDoc 2 in its wheel; they are
mounted under ``ASSETS_URL`` (/docs-assets) and the pages are FastAPI's own HTML builders
pointed at them, so neither page needs anything from elsewhere (ReDoc still asks
cdn.redoc.ly for the small logo of its "API docs by Redocly" footer; offline that image fails
and ReDoc leaves it out).  ``create_app`` turns FastAPI's default pages off (``docs_url=None,
redoc_url=None``) and calls ``install_api_docs``.

Only the package's asset files are used (its ``FastAPIOffline`` app factory is not: the app
is built in ``service.app``).  Their names are checked when the docs are installed, so that a
release of the package that moved them fails at start-up, not as a blank page."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

DOCS_URL, REDOC_URL, ASSETS_URL = "/docs", "/redoc", "/docs-assets"
ASSETS_DIR = Path(str(files("fastapi_offline").joinpath("static")))
SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON = "swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", \
    "favicon.png"


def install_api_docs(app: FastAPI) -> None:
    """Mount the assets under ``ASSETS_URL`` and add GET ``DOCS_URL``, its OAuth2 redirect
    (``app.swagger_ui_oauth2_redirect_url``: ``/docs/oauth2-redirect``) and ``REDOC_URL``, none
    of them in the OpenAPI schema.  Create the app with ``docs_url=None, redoc_url=None``, so
    that FastAPI's CDN pages do not take these paths first.  URLs follow the ASGI root_path
    (a server behind a proxy under a prefix), as FastAPI's own pages do."""
    if app.openapi_url is None:  # no schema, nothing to show
        return
    missing = [name for name in (SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON) if not (ASSETS_DIR / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline's assets {missing} are not in {ASSETS_DIR}: "
                           "its layout changed, see service/apidocs.py")
    openapi_url = app.openapi_url
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url or f"{DOCS_URL}/oauth2-redirect"
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        assets = f"{root}{ASSETS_URL}"
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{assets}/{SWAGGER_JS}", swagger_css_url=f"{assets}/{SWAGGER_CSS}",
            swagger_favicon_url=f"{assets}/{FAVICON}", oauth2_redirect_url=f"{root}{oauth2_redirect_url}",
            init_oauth=app.swagger_ui_init_oauth, swagger_ui_parameters=app.swagger_ui_parameters)

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        assets = f"{root}{ASSETS_URL}"
        return get_redoc_html(openapi_url=f"{root}{openapi_url}", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{assets}/{REDOC_JS}", redoc_favicon_url=f"{assets}/{FAVICON}",
                              with_google_fonts=False)
