"""``python -m service``: run the server with the configured host and port."""

from __future__ import annotations

import logging

import uvicorn

from service.app import create_app
from service.config import Settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
