"""Start ``python -m service`` on a free loopback port and wait until it is ready: for
benchmarks that measure a server of their own and for the end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
    Raises RuntimeError (with the server's last output) if it exits or is not ready in time."""
    port = free_port()
    full_env = {**os.environ, "ANYTIME_PORT": str(port), "ANYTIME_HOST": "127.0.0.1", **env}
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=full_env, stdout=out,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            tail = proc.stdout.read().decode()[-2000:] if proc.stdout else ""
            raise RuntimeError(f"the server exited during start-up: {tail}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server did not become ready within {timeout_s:g} s")
