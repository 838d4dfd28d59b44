"""``python -m service``: run the server with the configured host and port.

SIGTERM / SIGINT drain, in a way a load balancer can see:

1. the first signal makes the app drain at once (``begin_drain``: /readyz and new inference
   work answer 503 with Retry-After, and every response carries ``Connection: close``), but
   the listener stays open for ``drain_window_s``, so a client or load balancer that has not
   yet noticed gets a 503 to retry elsewhere, never a refused connection;
2. after the window (or at once on a second signal: Ctrl-C twice) uvicorn stops listening,
   closes idle connections and lets in-flight requests finish for up to ``drain_timeout_s``,
   then the workers stop and the process exits 0;
3. a third signal forces the exit (in-flight work is cut; exit code 1).
"""

from __future__ import annotations

from service.memory import one_malloc_arena

# First, before an import starts a thread: glibc fixes how many malloc arenas there may be
# when the first thread other than the main one allocates (service/memory.py says why one).
one_malloc_arena()

import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import uvicorn  # noqa: E402

from service import logs  # noqa: E402
from service.app import create_app  # noqa: E402
from service.config import Settings  # noqa: E402

log = logging.getLogger("anytime")


def _name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain window between the first signal and closing the listener.

    uvicorn's own handling (should_exit at the first signal: the listener closes at once, so
    new connections are refused; force_exit at a second SIGINT; the captured signal re-raised
    after shutdown, so the exit status is 143) is replaced: the first signal only starts the
    window, and no signal is re-raised, so a graceful drain exits 0.
    """

    def __init__(self, config: uvicorn.Config, begin_drain, drain_window_s: float = 0.0) -> None:
        super().__init__(config)
        self.begin_drain = begin_drain
        self.drain_window_s = drain_window_s
        self.drain_started: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.drain_started is None:
            self.drain_started = time.monotonic()
            log.info("signal %s: draining; new work answers 503 for %.1f s, then the listener closes and in-flight "
                     "work may finish for up to %.0f s (another signal ends the window now)",
                     _name(sig), self.drain_window_s, self.config.timeout_graceful_shutdown or 0)
            self.begin_drain()
            if self.drain_window_s <= 0:
                self.should_exit = True
        elif not self.should_exit:
            log.info("signal %s: drain window ended early; closing the listener", _name(sig))
            self.should_exit = True
        else:
            log.warning("signal %s: forced exit; in-flight work is cut", _name(sig))
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit and \
                time.monotonic() - self.drain_started >= self.drain_window_s:
            self.should_exit = True
        return await super().on_tick(counter)


def main() -> None:
    settings = Settings()
    logs.setup(settings.log_format, settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            log_level=settings.log_level, timeout_graceful_shutdown=settings.drain_timeout_s)
    server = DrainingServer(config, app.state.begin_drain, settings.drain_window_s)
    server.run()
    if server.force_exit:
        sys.exit(1)


if __name__ == "__main__":
    main()
