"""The client: typed results, a deadline that shrinks across retries, and retries that
honour Retry-After with jitter.  ``Client`` and ``AsyncClient`` share everything but the
I/O: what to send (``Call.request``), whether and how long to wait before the next attempt
(``Call.wait_after``) and how to read an answer (``parse``) live here once."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

ImageInput = bytes | str | Path
ENDPOINTS = {"superresolve": "/superresolve", "classify": "/classify", "ground": "/ground"}


# --- results and errors ---------------------------------------------------------------------------

@dataclass
class Result:
    """What every answer says about how it was served (from the X-Anytime-* headers)."""

    model: str
    rung: str
    decision: str
    policy: str
    budget: str
    flops: float
    flops_full: float
    queue_ms: float | None
    compute_ms: float | None
    server_ms: float | None
    deadline_ms: float | None
    request_id: str | None
    attempts: int
    headers: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def flops_fraction(self) -> float:
        return self.flops / self.flops_full if self.flops_full else 0.0


@dataclass
class SuperResolution(Result):
    image: bytes = field(repr=False, default=b"")
    media_type: str = "image/png"
    rung_mix: dict[str, int] = field(default_factory=dict)
    predicted_patch_psnr: float | None = None

    def save(self, path: str | Path) -> Path:
        Path(path).write_bytes(self.image)
        return Path(path)


@dataclass
class Prediction:
    label: str
    index: int
    probability: float


@dataclass
class Classification(Result):
    predictions: list[Prediction] = field(default_factory=list)
    expected_accuracy: float | None = None


@dataclass
class Grounding(Result):
    box: list[float] = field(default_factory=list)
    score: float = 0.0
    polygon: list[list[float]] | None = None
    mask: dict | None = None
    body: dict = field(repr=False, default_factory=dict)


class ServerError(Exception):
    """A 4xx/5xx answer: its status, the server's message and what it accepts."""

    def __init__(self, status: int, message: str, accepted: str | None = None, retry_after: float | None = None,
                 attempts: int = 1) -> None:
        super().__init__(f"{status}: {message}" + (f" (accepted: {accepted})" if accepted else ""))
        self.status, self.message, self.accepted = status, message, accepted
        self.retry_after, self.attempts = retry_after, attempts


class Shed(ServerError):
    """429 or 503 after the retries the deadline and the policy allowed (or a deadline that
    passed before an attempt could be made: status 429, no server answer)."""


# --- one logical request across its attempts ------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` in all; after a 429/503, sleep Retry-After x (1 + U(0, ``jitter``)); after
    a connection error, ``backoff_s`` x 2^n, jittered the same way; never a sleep that would
    leave the deadline less than ``min_left_ms``, nor one over ``max_wait_s``."""

    attempts: int = 4
    jitter: float = 0.5
    backoff_s: float = 0.1
    max_wait_s: float = 30.0
    min_left_ms: float = 1.0


class Call:
    """The state of one request across retries: when it began (its deadline counts from
    there), how many attempts were made, and the next wait."""

    def __init__(self, policy: RetryPolicy, deadline_ms: float | None, clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random) -> None:
        self.policy, self.deadline_ms, self.clock, self.rand = policy, deadline_ms, clock, rand
        self.start, self.attempts = clock(), 0
        self.gave_up = ""  # why the last wait_after said no, for the error message

    def left_ms(self) -> float | None:
        return None if self.deadline_ms is None else self.deadline_ms - 1000 * (self.clock() - self.start)

    def params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The query of the next attempt: the caller's parameters and what is left of the deadline."""
        self.attempts += 1
        query = {k: _query_value(v) for k, v in params.items() if v is not None}
        left = self.left_ms()
        if left is not None:
            if left < self.policy.min_left_ms and self.attempts > 1:  # the first attempt is the server's to judge
                raise Shed(429, f"the {self.deadline_ms:g} ms deadline passed before attempt {self.attempts}",
                           attempts=self.attempts - 1)
            query["deadline_ms"] = f"{max(left, 0.1):.1f}"
        return query

    def wait_after(self, status: int | None, retry_after: float | None) -> float | None:
        """Seconds to sleep before the next attempt, or None to give up.  ``status`` None: the
        connection failed."""
        p = self.policy
        if status is not None and status not in (429, 503):
            self.gave_up = ""
            return None
        if self.attempts >= p.attempts:
            self.gave_up = f"{p.attempts} attempt(s) made, the most the retry policy allows"
            return None
        base = p.backoff_s * 2 ** (self.attempts - 1) if status is None else \
            retry_after if retry_after is not None else p.backoff_s
        wait = min(base * (1 + p.jitter * self.rand()), p.max_wait_s)
        left = self.left_ms()
        if left is not None and 1000 * wait > left - p.min_left_ms:
            # A shed for its deadline always ends here: the server sheds when the wait it
            # predicts outlasts the deadline, and Retry-After is at least that wait.
            self.gave_up = (f"not retried: waiting {1000 * wait:.0f} ms (Retry-After {retry_after:g} s, jittered) "
                            f"would pass the deadline, {max(left, 0):.0f} ms away" if retry_after is not None else
                            f"not retried: the deadline is {max(left, 0):.0f} ms away")
            return None
        return wait


    def outcome(self, kind: str, response: httpx.Response) -> Result | float:
        """A 200's typed result, else the seconds to wait before the next attempt; raises
        the server's error when there is to be none."""
        if response.status_code == 200:
            return parse(kind, response, self.attempts)
        wait = self.wait_after(response.status_code, retry_after_s(response))
        if wait is None:
            raise error_of(response, self.attempts, self.gave_up)
        return wait


def _query_value(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def error_of(response: httpx.Response, attempts: int, why: str = "") -> ServerError:
    try:
        err = response.json().get("error", {})
        message, accepted = (err.get("message", response.text), err.get("accepted")) if isinstance(err, dict) \
            else (str(err), None)
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        message, accepted = response.text[:500], None
    cls = Shed if response.status_code in (429, 503) else ServerError
    return cls(response.status_code, f"{message}; {why}" if why else message, accepted, retry_after_s(response),
               attempts)


def parse(kind: str, response: httpx.Response, attempts: int) -> Result:
    """A typed result from a 200 answer of ``kind``'s endpoint."""
    h = response.headers

    def num(name: str) -> float | None:
        v = h.get(name)
        return float(v) if v is not None else None

    common = dict(model=h.get("x-anytime-model", ""), rung=h.get("x-anytime-rung", ""),
                  decision=h.get("x-anytime-decision", ""), policy=h.get("x-anytime-policy", ""),
                  budget=h.get("x-anytime-budget", ""), flops=num("x-anytime-flops") or 0.0,
                  flops_full=num("x-anytime-flops-full") or 0.0, queue_ms=num("x-anytime-queue-ms"),
                  compute_ms=num("x-anytime-compute-ms"), server_ms=num("x-anytime-server-ms"),
                  deadline_ms=num("x-anytime-deadline-ms"), request_id=h.get("x-request-id"), attempts=attempts,
                  headers={k: v for k, v in h.items() if k.lower().startswith("x-")})
    if kind == "superresolve":
        mix = dict(part.split("=") for part in h.get("x-anytime-rung-mix", "").split(",") if "=" in part)
        return SuperResolution(**common, image=response.content,
                               media_type=h.get("content-type", "").split(";")[0],
                               rung_mix={k: int(v) for k, v in mix.items()},
                               predicted_patch_psnr=num("x-anytime-predicted-patch-psnr"))
    body = response.json()
    if kind == "classify":
        return Classification(**common, predictions=[Prediction(p["label"], p["index"], p["probability"])
                                                     for p in body["predictions"]],
                              expected_accuracy=body.get("expected_accuracy"))
    return Grounding(**common, box=body["box"], score=body["score"], polygon=body.get("polygon"),
                     mask=body.get("mask"), body=body)


def image_bytes(image: ImageInput) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def request_parts(kind: str, image: ImageInput, expression: str | None) -> dict[str, Any]:
    """httpx keyword arguments for the body: the raw image, or (/ground) a form with the
    image and the expression."""
    data = image_bytes(image)
    if kind == "ground":
        if expression is None:
            raise ValueError("ground needs an expression")
        return {"files": {"image": ("image", data, "application/octet-stream")}, "data": {"expression": expression}}
    return {"content": data, "headers": {"content-type": "application/octet-stream"}}


# --- the clients ----------------------------------------------------------------------------------

class _Base:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", token: str | None = None, timeout_s: float = 60.0,
                 retry: RetryPolicy | None = None) -> None:
        self.base_url, self.retry = base_url.rstrip("/"), retry or RetryPolicy()
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout_s


class Client(_Base):
    """Synchronous client (one ``httpx.Client``; use it as a context manager or ``close()``)."""

    def __init__(self, *args, transport: httpx.BaseTransport | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=self._timeout,
                                  transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def models(self) -> list[dict]:
        r = self._http.get("/v1/models")
        if r.status_code != 200:
            raise error_of(r, 1)
        return r.json()["models"]

    def superresolve(self, image: ImageInput, *, deadline_ms: float | None = None, **params: Any) -> SuperResolution:
        """``params``: the endpoint's query parameters (budget, rung, min_budget, model, ...)."""
        return self._call("superresolve", image, None, deadline_ms, params)  # type: ignore[return-value]

    def classify(self, image: ImageInput, *, deadline_ms: float | None = None, **params: Any) -> Classification:
        return self._call("classify", image, None, deadline_ms, params)  # type: ignore[return-value]

    def ground(self, image: ImageInput, expression: str, *, deadline_ms: float | None = None,
               **params: Any) -> Grounding:
        return self._call("ground", image, expression, deadline_ms, params)  # type: ignore[return-value]

    def _call(self, kind: str, image: ImageInput, expression: str | None, deadline_ms: float | None,
              params: dict[str, Any]) -> Result:
        call, parts = Call(self.retry, deadline_ms), request_parts(kind, image, expression)
        while True:
            query = call.params(params)
            try:
                r = self._http.post(ENDPOINTS[kind], params=query, **parts)
            except httpx.TransportError:
                wait = call.wait_after(None, None)
                if wait is None:
                    raise
                time.sleep(wait)
                continue
            outcome = call.outcome(kind, r)
            if isinstance(outcome, Result):
                return outcome
            time.sleep(outcome)


class AsyncClient(_Base):
    """The same client for asyncio (one ``httpx.AsyncClient``; ``async with`` or ``aclose()``)."""

    def __init__(self, *args, transport: httpx.AsyncBaseTransport | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout,
                                       transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def models(self) -> list[dict]:
        r = await self._http.get("/v1/models")
        if r.status_code != 200:
            raise error_of(r, 1)
        return r.json()["models"]

    async def superresolve(self, image: ImageInput, *, deadline_ms: float | None = None,
                           **params: Any) -> SuperResolution:
        return await self._call("superresolve", image, None, deadline_ms, params)  # type: ignore[return-value]

    async def classify(self, image: ImageInput, *, deadline_ms: float | None = None, **params: Any) -> Classification:
        return await self._call("classify", image, None, deadline_ms, params)  # type: ignore[return-value]

    async def ground(self, image: ImageInput, expression: str, *, deadline_ms: float | None = None,
                     **params: Any) -> Grounding:
        return await self._call("ground", image, expression, deadline_ms, params)  # type: ignore[return-value]

    async def _call(self, kind: str, image: ImageInput, expression: str | None, deadline_ms: float | None,
                    params: dict[str, Any]) -> Result:
        call, parts = Call(self.retry, deadline_ms), request_parts(kind, image, expression)
        while True:
            query = call.params(params)
            try:
                r = await self._http.post(ENDPOINTS[kind], params=query, **parts)
            except httpx.TransportError:
                wait = call.wait_after(None, None)
                if wait is None:
                    raise
                await asyncio.sleep(wait)
                continue
            outcome = call.outcome(kind, r)
            if isinstance(outcome, Result):
                return outcome
            await asyncio.sleep(outcome)
