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


def bundle_dir(path: str | Path) -> Path:
    """The folder of a bundle given as the folder or as one of its files (its artifacts lie there)."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def top1(run, x, y, batch: int = 500) -> float:
    """Top-1 accuracy of ``run`` (a batch of inputs -> logits) on ``x`` with labels ``y``: the
    held-out quality of a classification rung."""
    import torch

    with torch.inference_mode():
        pred = torch.cat([run(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).float().mean())


def macs(net, size: int = 32) -> int:
    """Multiply-accumulates of ``net``'s forward pass on one ``size`` x ``size`` RGB image
    (convolutions and linear layers), as the pruning papers count "FLOPs"."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    was_training = net.training
    net.eval()
    with counter, torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    net.train(was_training)
    return counter.get_total_flops() // 2


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The shell command that ran ``python -m module`` with ``argv`` (default: this process's)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(shlex.quote(a) for a in ["python", "-m", module, *args])


def write(path: Path, artifacts: list[RungArtifact | dict], **extra) -> Path:
    """A JSON manifest of ``artifacts`` (and ``extra`` top-level facts) at ``path``."""
    rungs = [a.to_dict() if isinstance(a, RungArtifact) else a for a in artifacts]
    path.write_text(json.dumps({**extra, "rungs": rungs}, indent=2) + "\n")
    return path


def read(path: Path) -> dict:
    """A manifest ``write`` wrote."""
    return json.loads(Path(path).read_text())
