"""Server settings: environment variables (prefix ``ANYTIME_``) over an optional TOML file.

    ANYTIME_ARM_CHECKPOINT=/path/arm-fsrcnn.pth make serve
    ANYTIME_CONFIG=anytime.toml make serve      # same keys, lower case, in a TOML file

Precedence: constructor arguments > environment > TOML file > defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_ARM = REPO_ROOT / "models" / "arm" / "weights" / "arm-fsrcnn" / "model.safetensors"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ANYTIME_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    arm_checkpoint: Path = Field(BUNDLED_ARM, description="our .safetensors (manifest beside it) or an official .pth")
    arm_table: Path | None = Field(None, description="table JSON overriding the one found beside the checkpoint")
    default_budget: float = Field(0.65, ge=0.0, le=1.0, description="budget used for budget=auto")
    torch_threads: int = Field(0, ge=0, description="0: one per available core")
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_input_pixels: int = Field(1_000_000, gt=0, description="largest accepted input image (width x height); "
                                  "the output has 16x as many pixels")
    device: str = "cpu"

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = os.environ.get("ANYTIME_CONFIG")
        if toml:
            if not Path(toml).is_file():
                raise FileNotFoundError(f"ANYTIME_CONFIG={toml} does not name a file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)
