"""Anytime Serve: the HTTP service (FastAPI) around the model families in ``models``.

``__version__`` comes from pyproject.toml, its one home."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _version() -> str:
    try:
        return version("anytime-serve")
    except PackageNotFoundError:  # run from a checkout that was never installed (PYTHONPATH=.)
        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
        return re.search(r'^version = "([^"]+)"', text, re.MULTILINE).group(1)


__version__ = _version()
