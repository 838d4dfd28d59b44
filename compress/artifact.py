"""A compressed rung's manifest: what it is, how good, whether its speed is real, and how
to make it again.  Written beside (or into) the model's bundle, read by the serving family."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class RungArtifact:
    """``method``: e.g. "ptq-static" or "ptq-dynamic-linear"; ``bits``: weights/activations;
    ``real_speed``: True when the rung runs on real low-precision kernels (False: simulated,
    for accuracy studies only); ``quality``: held-out metrics; ``calibration``: what the
    activation ranges were observed on."""

    rung: str
    method: str
    bits: dict[str, int]
    backend: str
    real_speed: bool
    quality: dict[str, float | None] = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    # the exact command that made it (``command_line``)
    command: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The shell command that ran ``python -m module`` with ``argv`` (default: this process's)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(shlex.quote(a) for a in ["python", "-m", module, *args])


def write(path: Path, artifacts: list[RungArtifact], **extra) -> Path:
    """A JSON manifest of ``artifacts`` (and ``extra`` top-level facts) at ``path``."""
    path.write_text(json.dumps({**extra, "rungs": [a.to_dict() for a in artifacts]}, indent=2) + "\n")
    return path
