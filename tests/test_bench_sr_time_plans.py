"""bench.sr_time_plans runs end to end: a calibration, both planners, a table per budget."""

from __future__ import annotations

import re
import sys

from PIL import Image

from bench import sr_time_plans
from models.common.synthetic import synthetic_photo
from tests.conftest import BUNDLED_ARM


def test_prints_a_drop_per_planner_for_every_budget_and_calibration(tmp_path, monkeypatch, capsys) -> None:
    Image.fromarray(synthetic_photo(96, 128, seed=3)).save(tmp_path / "photo.png")
    monkeypatch.setattr(sys, "argv", ["sr_time_plans", "--checkpoint", str(BUNDLED_ARM), "--images", str(tmp_path),
                                      "--calibrations", "2", "--repeats", "1", "--budgets", "0.3", "1.0"])
    sr_time_plans.main()
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\| [01] \|", line)]
    assert len(rows) == 4  # 2 calibrations x 2 budgets
    for row in rows:
        drops = [float(d) for d in re.findall(r"(-?\d+\.\d+) dB", row)]
        assert len(drops) == len(sr_time_plans.PLANNERS) and all(d > -0.5 for d in drops)
    # each row names every rung's predicted pass against full width's (which rungs could fit)
    assert all("bicubic" in row and "w16" in row and "w36" in row for row in rows)
