"""Server settings: environment variables (prefix ``ANYTIME_``) over an optional TOML file.

    ANYTIME_ARM_CHECKPOINT=/path/arm-fsrcnn.pth make serve
    ANYTIME_CONFIG=anytime.toml make serve      # same keys, lower case, in a TOML file

Precedence: constructor arguments > environment > TOML file > defaults.  Every limit a
client can hit is here, so an operator can see and change it in one place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import (BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict,
                               TomlConfigSettingsSource)

from service.bundled import BUNDLED_ARM, REPO_ROOT, bundled, bundled_all  # noqa: F401  (re-exported)
from service.families.arm import ArmSettings
from service.families.cfvit import CfVitSettings
from service.families.pssnet import PssNetSettings
from service.families.seqtr import SeqTRSettings
from service.family import FamilySettings
from service.planner import Policy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ANYTIME_", extra="ignore")

    # --- network and process ------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = Field("cpu", description="torch device for the models: cpu, cuda or cuda:N")
    torch_threads: int = Field(0, ge=0, description="OpenMP threads of the scheduler thread that runs every "
                               "forward pass; 0: one per available core but one, which is left to the event loop, "
                               "decoding and encoding (on 2 cores: higher capacity and fewer late answers under "
                               "load, 1.25-1.5x slower single large images when idle: docs/RUNTIME.md)")
    gil_switch_interval_ms: float = Field(1.0, ge=0.0, description="Python's GIL switch interval (its default is "
                                         "5 ms). The scheduler thread hands the GIL back and forth once per layer of a "
                                         "forward pass; under load, with the event loop busy in Python, each hand-back "
                                         "can wait a whole interval, and a 5 ms forward pass took 25 ms. 0: Python's default")
    keep_freed_memory: bool = Field(True, description="keep freed memory mapped (glibc mallopt) instead of "
                                   "page-faulting every batch's activations in again; the resident size stays at its "
                                   "peak (python -m service also gives every thread the main malloc arena, where this "
                                   "holds, unless MALLOC_ARENA_MAX is set)")
    freeze_startup_objects: bool = Field(True, description="move the Python objects start-up built (models, "
                                         "libraries) out of the garbage collector's walk (gc.freeze), so that a "
                                         "full collection under load takes about a millisecond instead of 280 ms "
                                         "with every request paused")
    log_format: Literal["json", "text"] = Field("json", description="json: one structured line per event")
    log_level: str = "info"

    # --- models: each family's settings nest under its name (service/families/*.py) ---------
    families: list[str] = Field(["arm", "pssnet", "cfvit", "seqtr"], description="the families to serve, in "
                                "order (JSON list in the environment); leave one out to switch it off")
    arm: ArmSettings = Field(default_factory=ArmSettings, description="ARM (/superresolve): ANYTIME_ARM_*")
    pssnet: PssNetSettings = Field(default_factory=PssNetSettings, description="PSS-Net (/classify): "
                                   "ANYTIME_PSSNET_*")
    cfvit: CfVitSettings = Field(default_factory=CfVitSettings, description="CF-ViT (/classify): ANYTIME_CFVIT_*")
    seqtr: SeqTRSettings = Field(default_factory=SeqTRSettings, description="SeqTR (/ground): ANYTIME_SEQTR_*")

    # --- planning policy ----------------------------------------------------------------
    policy: Policy = Field("adaptive", description="adaptive: budget from deadline and load; full / smallest: "
                           "every request at the top / bottom rung with no deadline shedding (what a "
                           "conventional server does; for comparison)")
    allow_policy_override: bool = Field(True, description="let a request pick ?policy= (benchmarks)")
    default_budget: float = Field(0.65, ge=0.0, le=1.0, description="budget when a request gives neither "
                                  "budget nor deadline")
    default_deadline_ms: float | None = Field(None, gt=0, description="deadline for requests that give none "
                                              "(none: such requests get default_budget)")
    default_min_budget: float = Field(0.0, ge=0.0, le=1.0, description="quality floor when a request gives none")
    max_budget: float = Field(1.0, ge=0.0, le=1.0, description="the most an adaptive request is given")
    deadline_margin: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of the deadline kept in reserve "
                                   "against prediction error")
    deadline_margin_ms: float = Field(5.0, ge=0.0, description="and at least this much")
    target_utilization: float = Field(0.85, gt=0.0, le=1.0, description="target utilisation of the one "
                                      "compute thread: a model's adaptive requests get at most (target - the other "
                                      "models' load) / its arrival rate seconds each, so the budget falls as offered "
                                      "load rises and the queue stays short")
    rate_window_s: float = Field(2.0, gt=0.0, description="window over which the arrival rate is measured")

    # --- scheduler ----------------------------------------------------------------------
    max_queue: int = Field(64, ge=1, description="requests waiting per model (in the one deadline-ordered queue "
                           "of the scheduler); more get 429")
    batch_max_items: int = Field(128, ge=1, description="most items (ARM: patches) in one forward pass")
    batch_max_wait_ms: float = Field(0.0, ge=0.0, description="how long the worker waits for more requests to "
                                     "fill a batch when the queue is empty")
    calibration_repeats: int = Field(3, ge=1, description="timed runs per rung and batch size at start-up")
    idle_probe_s: float = Field(1.0, ge=0.0, description="after this long with nothing queued, time one rung's "
                                "forward pass on made-up inputs (round-robin over every rung) to keep the cost "
                                "model current: a rung whose start-up timing was an outlier is otherwise never "
                                "chosen and never corrected; 0 turns it off")
    probe_max_ms: float = Field(10.0, gt=0.0, description="largest predicted time of one idle probe: a request "
                                "that arrives during a probe waits at most about this long")
    ewma_alpha: float = Field(0.2, gt=0.0, le=1.0, description="weight of the newest observation in the "
                              "observed/predicted time EWMA")
    load_sample_s: float = Field(1.0, gt=0.0, description="CPU/GPU sampling interval")

    # --- limits -------------------------------------------------------------------------
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_input_pixels: int = Field(1_000_000, gt=0, description="largest accepted input image (width x height), "
                                  "checked from the header before decoding; the output has 16x as many pixels")
    max_sr_patches: int = Field(1400, ge=1, description="most 32x32 LR patches one /superresolve image may "
                                "make (what its compute and memory scale with), counted from the header before "
                                "decoding; 1400 admits every image up to 1,000,000 pixels with sides up to 16:1 "
                                "(1000x1000 makes 1296) and refuses strips such as 1x150000 (5357)")
    max_resize_pixels: int = Field(4_194_304, ge=1, description="largest intermediate image /classify "
                                   "pre-processing may make (the resize before the centre crop), computed from "
                                   "the header before decoding; extreme aspect ratios are cropped before they are "
                                   "resized, so with the bundled models it stays within max(input, 4 x resize^2)")
    request_timeout_s: float = Field(60.0, gt=0, description="a request still unanswered after this gets 504")
    png_compress_level: int = Field(1, ge=0, le=9, description="zlib level of PNG responses (speed vs size)")
    jpeg_quality: int = Field(95, ge=1, le=100, description="quality of JPEG and WebP responses")

    # --- security and lifecycle ---------------------------------------------------------
    auth_token: SecretStr | None = Field(None, description="when set, requests need 'Authorization: Bearer <token>'")
    auth_exempt: list[str] = Field(["/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc",
                                    "/openapi.json", "/docs-assets/", "/v2/health/live",
                                    "/v2/health/ready", "/", "/playground/"],
                                   description="paths served without a token; one that ends in '/' covers every "
                                   "path under it.  The API docs (/docs, /redoc, the schema they render and their "
                                   "assets, service/apidocs.py) and the playground page and its assets ('/', "
                                   "'/playground/') are among them so that they load in a browser, which sends "
                                   "no token; inference and /v1/* still need it ('/' is that one page, not a "
                                   "prefix)")
    drain_window_s: float = Field(5.0, ge=0, description="on SIGTERM, how long the server keeps accepting "
                                  "connections (answering new work 503 with Connection: close, /readyz 503) so "
                                  "load balancers move away before it stops listening; a second signal ends it")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, after the drain window, how long "
                                   "in-flight work may finish")

    @model_validator(mode="after")
    def _floor_below_ceiling(self) -> Settings:
        if self.default_min_budget > self.max_budget:
            raise ValueError(f"default_min_budget={self.default_min_budget} exceeds max_budget={self.max_budget}")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [Nested(settings_cls, init_settings), env_settings,
                                                     FamilyEnv(settings_cls)]
        toml = os.environ.get("ANYTIME_CONFIG")
        if toml:
            if not Path(toml).is_file():
                raise FileNotFoundError(f"ANYTIME_CONFIG={toml} does not name a file")
            sources.append(Nested(settings_cls, TomlConfigSettingsSource(settings_cls, toml_file=toml)))
        return tuple(sources)


def family_fields(settings_cls: type[BaseSettings]) -> dict[str, type[FamilySettings]]:
    """The nested family settings of ``settings_cls``: field name -> its class."""
    return {name: f.annotation for name, f in settings_cls.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, FamilySettings)}


class FamilyEnv(PydanticBaseSettingsSource):
    """Each family's ``ANYTIME_<FAMILY>_<FIELD>`` variables, nested under the family (with
    the environment's precedence: above the TOML file, below constructor arguments)."""

    def get_field_value(self, field, field_name):  # not used: __call__ reads every family at once
        return None, field_name, False

    def __call__(self) -> dict:
        found = {}
        for family, cls in family_fields(self.settings_cls).items():
            values = EnvSettingsSource(cls)()  # keyed by the alias that matched, when a field has several
            if values:
                found[family] = {field_of(cls, key): value for key, value in values.items()}
        return found


def field_of(cls: type[FamilySettings], key: str) -> str:
    """The field of ``cls`` that ``key`` (a field name or one of its aliases) sets."""
    if key in cls.model_fields:
        return key
    return next((name for name, f in cls.model_fields.items()
                 if key in getattr(f.validation_alias, "choices", ())), key)


class Nested(PydanticBaseSettingsSource):
    """Another source with flat family keys (``arm_checkpoint``, as constructor arguments
    and TOML files gave them before the family settings nested) moved under their family."""

    def __init__(self, settings_cls: type[BaseSettings], inner: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self.inner = inner

    def get_field_value(self, field, field_name):
        return None, field_name, False

    def __call__(self) -> dict:
        values = dict(self.inner())
        moved: set[str] = set()
        for family, cls in family_fields(self.settings_cls).items():
            names = {k: k for k in cls.model_fields}
            for k, f in cls.model_fields.items():  # older names a field accepts (e.g. ground_batch_max)
                for alias in getattr(f.validation_alias, "choices", []):
                    if isinstance(alias, str) and not alias.startswith("ANYTIME_"):
                        names[alias] = k
            for flat in [k for k in values if k not in self.settings_cls.model_fields]:
                key = flat[len(family) + 1:] if flat.startswith(f"{family}_") and \
                    flat[len(family) + 1:] in cls.model_fields else flat
                if key in names and isinstance(values.setdefault(family, {}), dict):
                    values[family].setdefault(names[key], values[flat])
                    moved.add(flat)
        return {k: v for k, v in values.items() if k not in moved}
