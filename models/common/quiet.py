"""Pausing long trainings while somebody benchmarks on this host.

The project's machines are small and shared: a benchmark creates ``/tmp/anytime-quiet``
(see docs/RUNTIME.md) and every training loop calls :func:`pause_while` between steps, so
the measurement sees a quiet CPU and the training loses nothing but time.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

QUIET_FILE = Path("/tmp/anytime-quiet")


def add_pause_argument(ap: argparse.ArgumentParser) -> None:
    """``--pause-file`` (default QUIET_FILE; '' never pauses)."""
    ap.add_argument("--pause-file", type=lambda v: Path(v) if v else None, default=QUIET_FILE,
                    help="while this file exists (someone is benchmarking), training sleeps ('' to never pause)")


def pause_while(path: Path | None, before: Callable[[], None] | None = None, poll_s: float = 1.0) -> float:
    """Sleep while ``path`` exists; returns the seconds slept (0 when it does not exist).
    ``before`` runs once before sleeping (e.g. save the training state)."""
    if path is None or not path.exists():
        return 0.0
    if before is not None:
        before()
    t0 = time.time()
    print(f"{path} exists: pausing", flush=True)
    while path.exists():
        time.sleep(poll_s)
    slept = time.time() - t0
    print(f"resuming after {slept:.0f}s", flush=True)
    return slept
