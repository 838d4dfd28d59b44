"""How the benchmarks draw and write their extra outputs, in one place: matplotlib is optional
(the ``plots`` extra) and runs on the Agg backend (no display on a server)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_outputs(rows: list[dict], png: Path | None, json_path: Path | None,
                  plot: Callable[[list[dict], Path], bool]) -> None:
    """The PNG (``plot`` returns False without matplotlib) and the JSON rows, when asked for."""
    if png is not None:
        print(f"\nfront written to {png}" if plot(rows, png) else
              "\nno PNG: matplotlib is not installed (pip install '.[plots]')")
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=2))
