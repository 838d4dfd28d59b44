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
    assert s.arm.checkpoint == BUNDLED_ARM and BUNDLED_ARM.exists()
    assert (s.host, s.port) == ("127.0.0.1", 8000)


def test_toml_file_and_environment(monkeypatch, tmp_path: Path) -> None:
    cfg = tmp_path / "anytime.toml"
    cfg.write_text('arm_checkpoint = "/models/arm-carn.pth"\ndefault_budget = 0.4\nport = 9000\n')
    monkeypatch.setenv("ANYTIME_CONFIG", str(cfg))
    monkeypatch.setenv("ANYTIME_PORT", "9100")
    s = Settings()
    assert s.arm.checkpoint == Path("/models/arm-carn.pth") and s.default_budget == 0.4
    assert s.port == 9100  # the environment wins over the file


def test_family_settings_nest_and_keep_their_environment_names(monkeypatch, tmp_path: Path) -> None:
    """Each family's settings live with the family (``settings.seqtr.long_sides``) and are
    read from the names they had before they nested; a TOML table works too, and the
    environment still wins over the file, constructor arguments over both."""
    for name in ("ANYTIME_CONFIG", "ANYTIME_CLASS_NAMES", "ANYTIME_SEQTR_LONG_SIDES", "ANYTIME_GROUND_BATCH_MAX"):
        monkeypatch.delenv(name, raising=False)
    cfg = tmp_path / "anytime.toml"
    cfg.write_text('families = ["arm", "seqtr"]\n[seqtr]\nlong_sides = [256, 320]\nbatch_max = 2\n'
                   '[arm]\ntime_slack_db = 0.2\n')
    monkeypatch.setenv("ANYTIME_CONFIG", str(cfg))
    monkeypatch.setenv("ANYTIME_ARM_TIME_SLACK_DB", "0.3")
    monkeypatch.setenv("ANYTIME_CLASS_NAMES", "/names.txt")  # one name for both classifiers, as before
    monkeypatch.setenv("ANYTIME_GROUND_BATCH_MAX", "4")
    monkeypatch.setenv("ANYTIME_PSSNET_CHECKPOINT", "")  # '' switches a model off
    s = Settings()
    assert s.families == ["arm", "seqtr"] and s.seqtr.long_sides == [256, 320]
    assert s.arm.time_slack_db == 0.3 and s.seqtr.batch_max == 4  # the environment over the file
    assert s.pssnet.class_names == s.cfvit.class_names == Path("/names.txt") and s.pssnet.checkpoint is None
    s = Settings(arm_time_slack_db=0.0, seqtr={"batch_max": 1})  # flat or nested, arguments win
    assert s.arm.time_slack_db == 0.0 and s.seqtr.batch_max == 1 and s.seqtr.long_sides == [256, 320]


def test_invalid_values_are_rejected(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANYTIME_DEFAULT_BUDGET", "1.5")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.delenv("ANYTIME_DEFAULT_BUDGET")
    monkeypatch.setenv("ANYTIME_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError):
        Settings()


def test_the_version_has_one_home() -> None:
    """pyproject.toml says it; the package and the OpenAPI document repeat it."""
    import re

    import service
    from service.app import VERSION

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.MULTILINE).group(1) == service.__version__ == VERSION


def test_json_logs_carry_no_terminal_colour_codes() -> None:
    """uvicorn adds an ANSI-coloured copy of some messages (``color_message``) for terminals."""
    import json
    import logging

    from service.logs import JsonFormatter

    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Finished server process [%d]", (7,), None)
    record.color_message = "Finished server process [\x1b[36m%d\x1b[0m]"
    record.request_id = "abc"
    line = JsonFormatter().format(record)
    assert "\x1b" not in line and "\\u001b" not in line
    assert json.loads(line)["msg"] == "Finished server process [7]" and json.loads(line)["request_id"] == "abc"
