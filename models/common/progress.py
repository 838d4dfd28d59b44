"""Progress output for long commands (training, table building, benchmarks).

A tqdm bar on a terminal; when output goes to a log file (CI, ``nohup``), a plain line
every ``log_interval`` seconds instead, so logs stay readable rather than one line of
carriage returns."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], *, desc: str, total: int | None = None, initial: int = 0,
             log_interval: float = 60.0) -> Iterator[T]:
    if sys.stderr.isatty():
        yield from tqdm(items, desc=desc, total=total, initial=initial, file=sys.stderr, dynamic_ncols=True)
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    start = last = time.monotonic()
    done = initial
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= log_interval or done == total:
            rate = (done - initial) / max(now - start, 1e-9)
            eta = f", {(total - done) / rate / 60:.1f} min left" if total and rate > 0 else ""
            print(f"{desc}: {done}/{total or '?'} ({rate:.2f}/s{eta})", file=sys.stderr, flush=True)
            last = now
