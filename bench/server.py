"""Start ``python -m service`` on a free loopback port and wait until it is ready: for
benchmarks that measure a server of their own and for the end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(timeout_s: float = 60.0, quiet: bool = False, **env: str) -> tuple[subprocess.Popen, str]:
    """(process, base URL) once GET /readyz answers 200; ``env`` adds ANYTIME_* settings.
    Raises RuntimeError (with the server's last output) if it exits or is not ready in time.

    The server's output goes to an unnamed temporary file (read it with ``output(proc)``),
    not a pipe: nobody drains a pipe while the server runs, and once its 64 KiB filled up
    the server blocked in its access log and stopped answering.
    """
    port = free_port()
    # no drain window unless asked for: a benchmark's server stops at once when it is done
    full_env = {**os.environ, "ANYTIME_DRAIN_WINDOW_S": "0", "ANYTIME_PORT": str(port), "ANYTIME_HOST": "127.0.0.1",
                **env}
    log = None if quiet else tempfile.TemporaryFile(prefix="anytime-server-")
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=full_env,
                            stdout=log if log is not None else subprocess.DEVNULL, stderr=subprocess.STDOUT)
    proc.output_file = log  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited during start-up: {output(proc)[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server did not become ready within {timeout_s:g} s: {output(proc)[-2000:]}")


def output(proc: subprocess.Popen) -> str:
    """Everything a server started by ``start_server`` has printed so far ("" if quiet)."""
    log = getattr(proc, "output_file", None)
    if log is None:
        return ""
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")
