"""The family contract: what a served model family provides, and nothing else.

A family is one class (``service/families/<name>.py``) over its model package
(``models/<name>/``, which knows nothing of HTTP).  The runtime (``service/serving.py``)
runs every request of every family through one template,

    open -> read -> shed early -> decode -> admit (plan + queue) -> wait -> observe -> respond

so deadlines, shedding, batching, metrics, headers, readiness and the OpenAPI description
behave the same for all of them; a family only says what is particular to it, through the
hooks of :class:`ServedFamily`.  ``tests/test_family_contract.py`` registers a toy family in
a few dozen lines and shows it gets the whole serving path.

Units.  Every FLOPs figure a family reports is in FLOPs, a multiply-add counting two, over
the layers its ``flops_convention`` names (papers differ: CF-ViT's and PSS-Net's "FLOPs"
are multiply-accumulates, which a family converts).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.requests import Request

from service.body import IMAGE_REQUEST_BODY, Upload, read_image
from service.executor import Items
from service.planner import Decision, Policy

if TYPE_CHECKING:
    from service.config import Settings

Work = TypeVar("Work")
Plan = TypeVar("Plan")


class RequestParams(BaseModel):
    """The query parameters every inference endpoint takes; an endpoint's own parameters
    extend it (``Endpoint.params``).  Unknown parameters are refused with 422."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="a model from GET /v1/models (default: the first that "
                                                "serves the request)")
    budget: str = Field("auto", description="a number in [0, 1]: the fraction of the top rung's cost the request "
                                            "may use, in budget_unit; 'auto' lets the planner choose from the "
                                            "deadline and the load (the configured default when there is no deadline)")
    budget_unit: Literal["time", "flops"] | None = Field(None, description="what budget is a fraction of: 'time' "
                                                         "(the top rung's predicted compute time on this host) or "
                                                         "'flops' (its FLOPs, the papers' convention); default: the "
                                                         "model's first unit in GET /v1/models (budget_units)")
    deadline_ms: float | None = Field(None, gt=0, le=600_000, description="answer within this many ms of "
                                      "arrival: the planner picks the largest budget that fits and sheds (429) what "
                                      "cannot fit even at min_budget")
    min_budget: float | None = Field(None, ge=0, le=1, description="quality floor for budget=auto with a deadline")
    policy: Policy | None = Field(None, description="override the server's policy (if allowed): adaptive, full "
                                                    "(top rung, no shedding) or smallest")


@dataclass(frozen=True)
class Endpoint:
    """A public inference route.  Families that share a path share its ``Endpoint`` (the
    same object): one route, one OpenAPI entry, their parameters merged in ``params``.
    ``responses`` and ``request_body`` are OpenAPI fragments (FastAPI cannot infer them:
    bodies are read by hand, under the byte limit)."""

    path: str
    summary: str
    params: type[RequestParams] = RequestParams
    responses: dict = field(default_factory=dict)
    request_body: dict = field(default_factory=lambda: IMAGE_REQUEST_BODY)
    # query parameters that pick a family when ``model`` is not given (e.g. /ground's task)
    selects_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rung:
    """One operating point as /v1/models lists it.  ``quality``: held-out metrics (name ->
    value, None where not measured); ``dominated``: no better than a cheaper rung, never
    chosen by the planner (still servable when pinned)."""

    name: str
    flops: float  # FLOPs of one input at this rung (ARM: one 32x32 LR patch)
    params: int | None
    quality: dict[str, float | None] = field(default_factory=dict)
    dominated: bool = False
    detail: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"name": self.name, "flops": self.flops, "params": self.params, **self.quality,
                "dominated": self.dominated, **self.detail}


@dataclass
class Answer:
    """What a family makes of a served request: the response body (a dict, JSON to which
    the runtime adds the fields every answer carries; or bytes with their media type), the
    rung and FLOPs actually spent, and headers of its own."""

    body: dict | bytes
    rung: str
    flops: float
    flops_full: float
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Pinned(Generic[Plan]):
    """A plan the client fixed (a rung by name, ARM's budget=best), and how to label it."""

    plan: Plan
    label: str


# A rung whose predicted time is within this share above a time budget still fits it.  Why:
# /v1/models lists each rung's ms rounded (4 decimals), so a budget a client computes from
# those numbers, one rung's ms over the top's, can fall a rounding below that rung's exact
# share (5e-4 of it for a 0.09 ms rung) and would buy the next rung down for nothing.
TIME_BUDGET_TOLERANCE = 1e-3


class ServedFamily(ABC, Generic[Work, Plan]):
    """A model served behind the runtime.  Subclasses set the class attributes and
    implement the abstract hooks; the others have defaults that fit most families.

    Plans (``Plan``) are the family's own objects; the runtime reads two attributes of
    them, ``flops`` and ``flops_full`` (FLOPs, expected where they depend on the input, e.g.
    CF-ViT's early exit), and otherwise hands them back to the family's hooks."""

    family: ClassVar[str]  # registry name, e.g. "pssnet"
    endpoint: ClassVar[Endpoint]
    flops_convention: ClassVar[str]  # what the FLOPs count, e.g. "2 x MACs of convs and FC"
    # the endpoint's parameters this family uses; a request setting another one is a 422
    uses: ClassVar[frozenset[str]] = frozenset()
    # extra words ``budget`` accepts besides 'auto' and a number (ARM: 'best'), handled by ``pin``
    budget_words: ClassVar[tuple[str, ...]] = ()
    # what a budget can be a fraction of ("time", "flops"), the default first
    budget_units: ClassVar[tuple[str, ...]] = ("flops",)
    name: str  # the model's name, unique on a server

    # --- batched compute (the scheduler thread) -------------------------------------------

    @abstractmethod
    def batch_keys(self) -> dict[Hashable, str]:
        """The keys of the forward passes the scheduler batches (one per distinct network
        or input shape), with the names metrics give them.  Each key is timed at start-up."""

    @abstractmethod
    def example(self, key: Hashable, n: int) -> Items:
        """A batch of ``n`` inputs for ``key`` to time the network with at start-up, on the
        CPU or the family's device."""

    @abstractmethod
    def forward(self, key: Hashable, batch: Items) -> Items:
        """One batched forward pass on the family's own device (inputs may arrive on the
        CPU: move them).  The scheduler waits for CUDA kernels before timing it."""

    def work_units(self, key: Hashable, batch: Items, out: Items) -> float | None:
        """Work a batch really did, in units of one item at ``key``'s full cost, for inputs
        whose cost depends on the data (CF-ViT: rows that exit early); None: one per item."""
        return None

    max_batch: int | None = None  # items per forward pass; None: the server's batch_max_items

    def before_timing(self, max_batch: int) -> None:
        """Called once at start-up on the scheduler thread (its thread count), before the
        rungs are timed: where a family picks each network's engine by measuring it where it
        will run (PSS-Net: torch or ONNX Runtime per batch size).  The start-up timing then
        measures what will be served."""

    def calibrated(self, predict, max_batch: int) -> None:
        """Called once the start-up timing is done.  ``predict([(key, n), ...])`` is then the
        cost model's live prediction, in seconds, of those forward passes (n items at key,
        in passes of at most ``max_batch``).  Families whose budgets are in time keep it to
        order and choose their rungs."""

    def calibrate_extra(self, repeats: int) -> list[tuple[float, float]]:
        """(units, seconds) samples (medians of ``repeats`` runs) of the work after the network (stitching, encoding),
        timed at start-up on the scheduler thread; the cost model fits seconds per unit
        (``overhead_units``).  Empty: none worth predicting."""
        return []

    # --- one request ----------------------------------------------------------------------

    def check(self, request: Request, params: RequestParams) -> None:
        """Checks on the query and headers before the body is read (cheap; raise
        ``ApiError``), e.g. a rung name that does not exist or an unservable Accept."""

    async def read(self, request: Request, params: RequestParams, limit: int) -> Upload:
        """Read the body under ``limit`` bytes: by default an image, raw or as the file
        field 'image' of a multipart form."""
        return await read_image(request, limit)

    @abstractmethod
    def decode(self, upload: Upload, params: RequestParams, settings: Settings) -> Work:
        """Turn the body into the request's work: decode (under the server's limits,
        checked from the image header first), pre-process, analyse.  CPU only; runs on
        the event loop for small bodies and on a request thread for large ones.  Raises
        ``imageio.ImageError`` or ``ApiError`` for bad input (the runtime maps both)."""

    @abstractmethod
    def plan(self, work: Work, budget: float, unit: str) -> Plan:
        """The best plan whose cost fits ``budget`` x the top rung's, in ``unit`` (one of
        ``budget_units``: predicted time or FLOPs); the cheapest when none fits.  Must be
        monotone: a larger budget never gives a cheaper plan."""

    @abstractmethod
    def top(self, work: Work) -> Plan:
        """The most expensive plan (policy=full)."""

    @abstractmethod
    def bottom(self, work: Work) -> Plan:
        """The cheapest plan (policy=smallest, and the floor shedding compares with)."""

    @abstractmethod
    def batches(self, plan: Plan) -> list[tuple[Hashable, float]]:
        """(key, items) of the forward passes a plan needs, for the cost model's prediction
        (items may be fractional: expected work)."""

    def floor_batches(self) -> list[tuple[Hashable, float]] | None:
        """The batches of the cheapest plan any request can get, when that is known before
        the body is read (shedding then needs no decoding); None when it depends on the input."""
        return None

    def floor_of(self, upload: Upload, params: RequestParams,
                 settings: Settings) -> tuple[list[tuple[Hashable, float]], float] | None:
        """Where ``floor_batches`` cannot say: the batches and the overhead units of this
        body's cheapest plan, read without decoding it (an image header's size); None when
        they cannot be read so, or when ``decode`` will refuse the body (malformed, or over
        a limit: its 4xx says what is wrong, where a 429 would invite a retry).  The
        early shed after the body is read uses it, so that under overload a request the
        planner would shed is not decoded first."""
        return None

    def pin(self, work: Work, params: RequestParams) -> Pinned[Plan] | None:
        """A plan the client fixed through the family's own parameters, or None."""
        return None

    def refine(self, work: Work, plan: Plan, seconds) -> Plan:
        """Optionally swap the chosen plan for one as good and predicted faster
        (``seconds(plan)``); never a more expensive one.  Default: as chosen."""
        return plan

    def overhead_units(self, work: Work) -> float:
        """Units of post-network work (see ``calibrate_extra``); 0: none."""
        return 0.0

    def plans_inline(self, work: Work) -> bool:
        """Whether planning and ``prepare`` are cheap enough (well under a millisecond) to
        run on the event loop rather than the planning thread."""
        return True

    def plan_only(self, params: RequestParams) -> bool:
        """Whether this request asks for the plan alone (no network run), answered by
        ``explain``."""
        return False

    def explain(self, work: Work, decision: Decision) -> Answer:
        """The answer of a plan-only request."""
        raise NotImplementedError

    @abstractmethod
    def prepare(self, work: Work, plan: Plan) -> list[tuple[Hashable, Items]]:
        """The request's items per batch key, on the CPU, in the plan's order."""

    @abstractmethod
    def finish(self, work: Work, plan: Plan, outputs: list[Items]) -> Any:
        """Turn the forward outputs (one per ``prepare`` entry) into the result; runs on the
        scheduler thread right after the last forward pass (stitching, encoding)."""

    @abstractmethod
    def respond(self, work: Work, decision: Decision, result: Any, params: RequestParams,
                request: Request) -> Answer:
        """The answer: body, rung and FLOPs spent, headers of the family's own."""

    def respond_inline(self, work: Work, params: RequestParams) -> bool:
        """Whether ``respond`` is cheap enough for the event loop (False: a request thread
        runs it, e.g. to draw and encode a picture)."""
        return True

    def record(self, metrics, work: Work, decision: Decision, answer: Answer) -> None:
        """Family metrics beyond those every request records (rung, FLOPs, times)."""

    # --- description ----------------------------------------------------------------------

    @abstractmethod
    def rungs(self) -> list[Rung]:
        """Every operating point, cheapest first, with FLOPs, parameters and held-out quality."""

    def describe(self) -> dict:
        """Family-specific facts for GET /v1/models (the runtime adds name, family,
        endpoint, FLOPs convention, rungs, readiness and the cost model)."""
        return {}

    def selects(self, params: RequestParams) -> bool:
        """Whether this model answers a request that names no model (/ground: its task)."""
        return True

    def selection(self) -> dict[str, Any]:
        """The values of ``Endpoint.selects_by`` this model answers (for error messages)."""
        return {}




# What a family's ``engine`` setting accepts (``models.common.engines.ENGINES``): auto times torch
# and every installed engine at start-up and serves each batch on the faster at its size.
EngineSetting = Literal["torch", "auto", "onnxruntime", "openvino"]


def batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes an engine choice is measured at: powers of two up to ``max_batch``, and it."""
    return sorted({n for n in (1, 2, 4, 8, 16, 32, max_batch) if n <= max_batch})


class FamilySettings(BaseSettings):
    """A family's own settings.  They nest in ``Settings`` under the family's name (TOML:
    a ``[pssnet]`` table, or flat ``pssnet_checkpoint`` keys) and are read from the
    environment as ``ANYTIME_<FAMILY>_<FIELD>``, the names they had before they nested.
    A subclass sets ``model_config = SettingsConfigDict(env_prefix="ANYTIME_<FAMILY>_")``."""

    model_config = SettingsConfigDict(extra="ignore")

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any, info: ValidationInfo) -> Any:
        """'' or 'none' switches off an optional path (ANYTIME_PSSNET_CHECKPOINT= serves no PSS-Net)."""
        field = cls.model_fields.get(info.field_name or "")
        if value in ("", "none") and field is not None and type(None) in get_args(field.annotation):
            return None
        return value
