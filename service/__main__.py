"""``python -m service``: run the server with the configured host and port.

SIGTERM / SIGINT drain: the app stops taking new work at once (503, /readyz fails so a
load balancer moves on), uvicorn lets in-flight requests finish for up to
``drain_timeout_s``, then the workers stop.
"""

from __future__ import annotations

import logging

import uvicorn

from service import logs
from service.app import create_app
from service.config import Settings

log = logging.getLogger("anytime")


class DrainingServer(uvicorn.Server):
    """Tells the app to drain on the first signal, before uvicorn stops listening."""

    def __init__(self, config: uvicorn.Config, begin_drain) -> None:
        super().__init__(config)
        self.begin_drain = begin_drain

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            log.info("signal %s: draining", sig)
            self.begin_drain()
        super().handle_exit(sig, frame)


def main() -> None:
    settings = Settings()
    logs.setup(settings.log_format, settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            log_level=settings.log_level, timeout_graceful_shutdown=int(settings.drain_timeout_s))
    DrainingServer(config, app.state.begin_drain).run()


if __name__ == "__main__":
    main()
