"""bench.compact_runs: DCFF and plain runs grouped by network and width, the per-seed table
with its mean and spread, and the compact network timed against its full width."""

from __future__ import annotations

import torch

from bench import compact_runs
from models.pssnet import cifar_resnet
from models.pssnet.compact import compact_resnet


def _run(folder, method: str, seed: int, test: float, keep: float = 0.5, steps: int = 100,
         bf16: bool | None = None) -> None:
    net = compact_resnet(20, 5, keep, fused=False).eval()
    training = {"steps": steps} if bf16 is None else {"steps": steps, "bf16_autocast": bf16}  # older runs: no key
    cifar_resnet.save(folder, net, {"method": method, "keep": keep, "seed": seed, "training": training,
                                    "accuracy": {"val": test - 0.01, "test": test}})


def test_groups_runs_and_reports_mean_spread_and_speed(tmp_path, capsys):
    torch.manual_seed(0)
    _run(tmp_path / "d0", "dcff", 0, 0.80)
    _run(tmp_path / "d1", "dcff", 1, 0.84)
    _run(tmp_path / "p0", "plain-compact", 0, 0.70, bf16=False)
    _run(tmp_path / "b0", "plain-compact", 0, 0.60, bf16=True)  # trained in bf16: its own table
    _run(tmp_path / "other" / "p0", "plain-compact", 0, 0.50, steps=200)  # another schedule: its own table
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    compact_runs.main([str(tmp_path), "--rounds", "1"])
    out = capsys.readouterr().out
    assert out.count("### resnet20, keep 0.5") == 3  # 100 steps in float32 and in bf16, 200 steps
    assert "### resnet20, keep 0.5, 100 steps, trained in bf16 autocast" in out
    first = out.split("### resnet20, keep 0.5, 100 steps, trained in float32")[1].split("###")[0]
    assert "| DCFF (fused, exported) | 80.00 % (79.00) | 84.00 % (83.00) | **82.00 %** | 4.00 points |" in first
    assert "| plain training, same network | 70.00 % (69.00) | - | **70.00 %** | 0.00 points |" in first
    assert "full width / compact:" in first and "at batch 32" in first
    full_row = next(line for line in first.splitlines() if line.startswith("| full width |"))
    half_row = next(line for line in first.splitlines() if line.startswith("| keep 0.5 |"))
    assert float(full_row.split("|")[2]) > 1.8 * float(half_row.split("|")[2])  # MFLOPs: about half
