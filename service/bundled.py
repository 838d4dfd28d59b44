"""Where the bundled weights live (``models/<family>/weights/<name>/``): the default
checkpoints of ``make serve``."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_ARM = REPO_ROOT / "models" / "arm" / "weights" / "arm-fsrcnn" / "model.safetensors"


def bundled(family: str) -> Path | None:
    """The first bundled weights of a family (models/<family>/weights/*/model.safetensors)."""
    found = sorted((REPO_ROOT / "models" / family / "weights").glob("*/model.safetensors"))
    return found[0] if found else None


def bundled_all(family: str) -> list[Path]:
    """Every bundled weight folder of a family (models/<family>/weights/*/), by name."""
    return [p.parent for p in sorted((REPO_ROOT / "models" / family / "weights").glob("*/model.safetensors"))]
