"""Settings come from the environment and an optional TOML file (environment wins)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import BUNDLED_ARM, Settings


def test_defaults_point_at_the_bundled_model(monkeypatch) -> None:
    monkeypatch.delenv("ANYTIME_CONFIG", raising=False)
    monkeypatch.delenv("ANYTIME_ARM_CHECKPOINT", raising=False)
    s = Settings()
    assert s.arm_checkpoint == BUNDLED_ARM and BUNDLED_ARM.exists()
    assert (s.host, s.port) == ("127.0.0.1", 8000)


def test_toml_file_and_environment(monkeypatch, tmp_path: Path) -> None:
    cfg = tmp_path / "anytime.toml"
    cfg.write_text('arm_checkpoint = "/models/arm-carn.pth"\ndefault_budget = 0.4\nport = 9000\n')
    monkeypatch.setenv("ANYTIME_CONFIG", str(cfg))
    monkeypatch.setenv("ANYTIME_PORT", "9100")
    s = Settings()
    assert s.arm_checkpoint == Path("/models/arm-carn.pth") and s.default_budget == 0.4
    assert s.port == 9100  # the environment wins over the file


def test_invalid_values_are_rejected(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANYTIME_DEFAULT_BUDGET", "1.5")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.delenv("ANYTIME_DEFAULT_BUDGET")
    monkeypatch.setenv("ANYTIME_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError):
        Settings()
