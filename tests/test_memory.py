"""``service.memory``: one malloc arena for every thread of the server process.

Counted in fresh interpreters with glibc's own ``malloc_stats`` (one "Arena N:" line per
arena): without the setting, threads that allocate get arenas of their own, which glibc
unmaps whole when they empty, so the scheduler thread's next small batch page-faulted its
memory in again."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.memory import one_malloc_arena

REPO = Path(__file__).resolve().parents[1]

# Three threads that each allocate past pymalloc (bytearrays of 200 kB come from malloc),
# after importing torch (which starts a thread of its own); then glibc's arena report.
_PROBE = """
import ctypes, sys, threading
{setup}
import torch
def work():
    keep = [bytearray(200_000) for _ in range(20)]
threads = [threading.Thread(target=work) for _ in range(3)]
for t in threads: t.start()
for t in threads: t.join()
sys.stderr.flush()
ctypes.CDLL("libc.so.6").malloc_stats()
"""


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_stats")
    except OSError:
        return False


def _arenas(setup: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", _PROBE.format(setup=setup)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    return sum(line.startswith("Arena ") for line in out.stderr.splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="glibc's malloc only")
def test_the_server_entry_point_gives_every_thread_the_main_arena():
    assert _arenas("") > 1  # the default the setting exists to change
    assert _arenas("from service.memory import one_malloc_arena; one_malloc_arena()") == 1
    # ``python -m service`` sets it before its own imports start a thread
    assert _arenas("import service.__main__") == 1


def test_an_arena_limit_in_the_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert one_malloc_arena() is False
