"""Open-loop load on a running server: Poisson arrivals, a deadline per request, per endpoint.

    make serve &
    # one endpoint, absolute rates (phases), as before
    python -m bench.load --url http://127.0.0.1:8000 --rate 40 --duration 20 --deadline-ms 300 --policy adaptive
    python -m bench.load --url ... --capacity-factors 0.5 1 2 1 0.5 --duration 15 --deadline-ms 300
    # /classify at 2x its full-width capacity, deadline 4x its full-width service time
    python -m bench.load --url ... --endpoint classify --rate-x 2 --deadline-x 4 --duration 15
    # all three endpoints at once, each at 1x its own capacity, 300 ms deadline
    python -m bench.load --url ... --mixed superresolve=1 classify=1 ground=1 --deadline-ms 300
    # 2x overload at 60 ms, then 5 s idle and a few requests at 3x service time to each endpoint
    python -m bench.load --url ... --mixed superresolve=2 classify=2 ground=2 --deadline-ms 60 --then-idle 5

Workloads (bodies encoded once, before any load): ``superresolve`` a PNG photo (the
scikit-image astronaut, ``--sr-size`` square, default 64); ``classify`` a 32x32 glyph PNG (the
bundled classifiers' input size); ``ground`` a multipart form (file ``image``, field
``expression``) holding a synthetic scene from models/seqtr/scenes.py and its referring
expression.  ``classify:MODEL`` / ``ground:MODEL`` pick a model other than the server's first.

Requests are sent at exponential inter-arrival times whatever the server's answers (open
loop, as MLPerf's Server scenario), one Poisson stream per endpoint, so an overloaded server
cannot slow the offered load down.  Each request is classified at the client, against its own
deadline:

    in time    200 within the deadline
    shed fast  429/503 within the deadline (the client learns in time to go elsewhere)
    shed late  429/503 after the deadline
    late       200 after the deadline, or 504
    errors     4xx other than 429, 5xx other than 503/504, connection errors and client
               timeouts (status 0), and anything else, counted apart
    ok         in time + shed fast: issue 12's acceptance number (>= 0.95 wanted)

Latency percentiles are of the 200 answers; ``mean budget`` is the mean X-Anytime-Flops-Fraction
of the 200 answers.

Reference points, measured per endpoint on the idle server before the load, at policy=full:
the *capacity* (closed loop, two requests in flight, requests per second) and the *service
time* (median latency of single sequential requests).  ``--rate-x`` / ``--capacity-factors``
and ``--mixed NAME=X`` offer multiples of the capacity; ``--deadline-x X`` sets each
endpoint's deadline to X times its service time.  ``--then-idle S`` waits S seconds after each
load phase, then sends a few sequential requests to every endpoint at 3x its service time
(2x plus the server's ``deadline_margin_ms`` where that margin is longer than one service time:
the server keeps it in reserve even when idle) and says whether each was answered 200 in time
(does an overloaded server recover?).

The generator is one asyncio loop with aiohttp: one session, ``--max-connections`` (1024)
keep-alive connections, no proxies, bodies encoded once.  Its client costs 0.11-0.25 ms of CPU
a request where httpx cost 1.1-3.3 ms (more with more in flight: httpcore scans its pool on
every request), measured with both against one trivial server on the 2-core dev VM
(2026-12-06); at 600 req/s httpx alone needed more than the two cores.  Per phase it reports
its own CPU (``generator: ... cores, ... ms CPU a request`` on stderr), the peak number in
flight, and how late requests left against their Poisson schedule (``gen lag p99 ms``).  A lag
of more than a few ms, or a peak at --max-connections, means the generator and not the server
set the pace.  Run on the same host as the server it *shares the cores with it*: on a small
host the generator's CPU is taken from the server and is part of what is measured.

Traffic goes to loopback addresses only, and every run is bounded in requests and time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import aiohttp
import httpx  # only to encode the multipart body once
import numpy as np
from PIL import Image, ImageDraw, ImageFont

ENDPOINTS = {"superresolve": "/superresolve", "classify": "/classify", "ground": "/ground"}
IDLE_DEADLINE_X = 3.0  # --then-idle: deadline of the check requests, in service times
GEN_LAG_WARN_MS = 10.0  # warn when requests left later than this (or 10 % of the deadline) behind schedule


def ensure_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(f"refusing to load {url}: this benchmark sends traffic to loopback addresses only")


# ----------------------------------------------------------------------------- request bodies

def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def default_image(size: int) -> bytes:
    """A real photo: the scikit-image astronaut, resized to size x size (PNG)."""
    try:
        from skimage import data as skdata

        arr = skdata.astronaut()
        im = Image.fromarray(arr).resize((size, size), Image.Resampling.BICUBIC)
    except ImportError:  # scikit-image is in the dev extra; fall back to our synthetic photo
        from models.common.synthetic import synthetic_photo

        im = Image.fromarray(synthetic_photo(size, size))
    return _png(im)


def glyph_image(size: int = 32, char: str = "R") -> bytes:
    """A glyph-like PNG for the bundled classifiers (32x32 glyphs): a dark letter on a light ground."""
    im = Image.new("RGB", (size, size), (236, 228, 210))
    draw = ImageDraw.Draw(im)
    try:
        font = ImageFont.load_default(size=int(size * 0.8))
    except TypeError:  # Pillow < 10.1: the bitmap font only
        font = ImageFont.load_default()
    draw.text((size / 2, size / 2), char, fill=(30, 40, 90), font=font, anchor="mm")
    return _png(im)


def ground_scene(size: int = 128, index: int = 0) -> tuple[bytes, str]:
    """A synthetic scene (models/seqtr/scenes.py, test split) and the expression that names its target."""
    try:
        from models.seqtr.scenes import SEEDS, make_sample

        s = make_sample("test", index, SEEDS["test"], size)
        return _png(Image.fromarray(s.image)), s.expression
    except ImportError:  # outside the repository: one red circle
        im = Image.new("RGB", (size, size), (90, 90, 90))
        ImageDraw.Draw(im).ellipse((size * 0.3, size * 0.3, size * 0.6, size * 0.6), fill=(220, 30, 30))
        return _png(im), "the red circle"


@dataclass
class Workload:
    """One endpoint's request, encoded once."""

    name: str  # "superresolve", "classify", "classify:cf-tiny-glyphs", ...
    path: str
    body: bytes
    headers: dict[str, str]
    params: dict[str, str]
    what: str  # a few words on what is sent
    capacity_rps: float | None = None
    service_ms: float | None = None

    def describe(self) -> dict:
        return {"path": self.path, "params": self.params, "request": self.what, "body_bytes": len(self.body),
                "capacity_rps": self.capacity_rps, "service_ms": self.service_ms}


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``classify`` or ``classify:MODEL`` -> (endpoint, model)."""
    base, _, model = spec.partition(":")
    if base not in ENDPOINTS:
        raise argparse.ArgumentTypeError(f"unknown endpoint {base!r} (one of {', '.join(ENDPOINTS)})")
    return base, model or None


def build_workload(spec: str, args: argparse.Namespace, ground_tasks: dict[str, str] | None = None) -> Workload:
    base, model = parse_spec(spec)
    params: dict[str, str] = {"model": model} if model else {}
    if base == "superresolve":
        body = Path(args.sr_image).read_bytes() if args.sr_image else default_image(args.sr_size)
        what = args.sr_image or f"{args.sr_size}x{args.sr_size} photo PNG"
        return Workload(spec, ENDPOINTS[base], body, {"content-type": "image/png", "accept": args.accept}, params, what)
    if base == "classify":
        body = Path(args.classify_image).read_bytes() if args.classify_image else glyph_image(args.classify_size)
        what = args.classify_image or f"{args.classify_size}x{args.classify_size} glyph PNG"
        return Workload(spec, ENDPOINTS[base], body, {"content-type": "image/png"}, params, what)
    if args.ground_image:
        png, expr = Path(args.ground_image).read_bytes(), args.ground_expression or "the red circle"
    else:
        png, expr = ground_scene(args.ground_size)
        expr = args.ground_expression or expr
    req = httpx.Request("POST", "http://127.0.0.1/ground", files={"image": ("scene.png", png, "image/png")},
                        data={"expression": expr})
    body = req.read()
    task = (ground_tasks or {}).get(model or "")
    if task and task != "box":
        params["task"] = task
    what = f"multipart: {args.ground_image or f'{args.ground_size}px scene'} + '{expr}'"
    return Workload(spec, ENDPOINTS[base], body, {"content-type": req.headers["content-type"]}, params, what)


# ----------------------------------------------------------------------------- one request, outcomes

@dataclass
class Result:
    sent_at: float  # seconds since the phase started
    lag_s: float  # how late it left against its Poisson schedule
    status: int  # 0: no HTTP answer (connection error, client timeout)
    latency_s: float
    deadline_s: float
    budget: float | None = None
    psnr: float | None = None
    error: str | None = None  # the exception's class name when status is 0

    @property
    def outcome(self) -> str:
        return classify_outcome(self.status, self.latency_s, self.deadline_s)


OUTCOMES = ["in_time", "shed_fast", "shed_late", "late", "errors_4xx", "errors_5xx", "errors_conn", "errors_other"]


def classify_outcome(status: int, latency_s: float, deadline_s: float) -> str:
    on_time = latency_s <= deadline_s
    if status == 200:
        return "in_time" if on_time else "late"
    if status in (429, 503):
        return "shed_fast" if on_time else "shed_late"
    if status == 504:
        return "late"
    if status == 0:
        return "errors_conn"
    if 400 <= status < 500:
        return "errors_4xx"
    if status >= 500:
        return "errors_5xx"
    return "errors_other"


class Flight:
    """Requests in flight now, and the peak."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    def up(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def down(self) -> None:
        self.now -= 1


@dataclass
class Answer:
    status: int  # 0: no HTTP answer
    headers: Mapping[str, str]  # case-insensitive where it came from a response
    seconds: float
    error: str | None = None  # the exception's class name when status is 0
    text: str = ""  # the start of the body of a non-200 answer

    def refusal(self, wl: Workload) -> str:
        why = f"connection error {self.error}" if self.status == 0 else f"HTTP {self.status} {self.text}"
        return f"{wl.name} ({wl.path}) at policy=full: {why}"


class StatusError(RuntimeError):
    """A set-up request (readiness, the model list) answered other than 2xx."""


@dataclass
class Reply:
    """A whole response, read: what the set-up requests need of it."""

    status_code: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)

    def raise_for_status(self) -> None:
        if not 200 <= self.status_code < 300:
            raise StatusError(f"HTTP {self.status_code}: {self.text[:300]}")


class Clients:
    """One aiohttp session with up to ``max_connections`` keep-alive connections to the server.

    Why aiohttp and not httpx (the project's client library): the generator shares a small
    host's cores with the server it loads, so its CPU per request is taken from the server.
    aiohttp's client costs a tenth of httpx's or less, and its connection pool queues waiters
    instead of scanning every connection per request.  Created inside the running loop."""

    def __init__(self, max_connections: int, *, base_url: str, timeout: float,
                 headers: Mapping[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout),
                                             headers=dict(headers or {}), trust_env=False)

    async def aclose(self) -> None:
        await self.session.close()

    async def request(self, method: str, path: str, *, content: bytes | None = None,
                      params: Mapping[str, object] | None = None,
                      headers: Mapping[str, str] | None = None) -> Reply:
        """The whole answer (its body read, so that the connection goes back to the pool)."""
        query = {k: str(v) for k, v in (params or {}).items()}
        async with self.session.request(method, self.base_url + path, data=content, params=query,
                                        headers=headers) as r:
            return Reply(r.status, r.headers, await r.read())

    async def post(self, path: str, **kwargs) -> Reply:
        return await self.request("POST", path, **kwargs)

    async def get(self, path: str, **kwargs) -> Reply:
        return await self.request("GET", path, **kwargs)


CLIENT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)  # no HTTP answer: status 0


async def send(client: Clients, wl: Workload, params: dict) -> Answer:
    """POST the workload once."""
    t0 = time.perf_counter()
    try:
        r = await client.post(wl.path, content=wl.body, params={**wl.params, **params}, headers=wl.headers)
    except CLIENT_ERRORS as exc:
        return Answer(0, {}, time.perf_counter() - t0, type(exc).__name__)
    dt = time.perf_counter() - t0
    return Answer(r.status_code, r.headers, dt, None, "" if r.status_code == 200 else r.text[:300])


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v else None
    except ValueError:
        return None


async def one(client: Clients, wl: Workload, params: dict, deadline_s: float, t_phase: float,
              scheduled: float, out: list[Result], flight: Flight) -> None:
    flight.up()
    t0 = time.perf_counter()
    try:
        a = await send(client, wl, params)
    finally:
        flight.down()
    h = a.headers
    out.append(Result(t0 - t_phase, max(0.0, t0 - t_phase - scheduled), a.status, a.seconds, deadline_s,
                      _float(h.get("x-anytime-flops-fraction")), _float(h.get("x-anytime-predicted-patch-psnr")), a.error))


# ----------------------------------------------------------------------------- summaries

def _pct(v: list[float], q: float) -> float | None:
    return 1000 * float(np.percentile(v, q)) if v else None


def summarize(results: list[Result], offered_rps: float, duration: float) -> dict:
    """Counts, shares of the sent requests, latency of the 200s, budgets; deadlines are per request."""
    n = len(results)
    counts = Counter(r.outcome for r in results)
    frac = {k: counts[k] / n if n else 0.0 for k in OUTCOMES}
    ok200 = [r for r in results if r.status == 200]
    shed = [r for r in results if r.status in (429, 503)]
    budgets = [r.budget for r in ok200 if r.budget is not None]
    psnrs = [r.psnr for r in ok200 if r.psnr is not None]
    errors = sum(counts[k] for k in OUTCOMES if k.startswith("errors"))
    kinds = Counter(f"conn:{r.error}" if r.status == 0 else str(r.status)
                    for r in results if r.outcome.startswith("errors"))
    span = max((r.sent_at for r in results), default=0.0) or duration
    return {
        "offered_rps": offered_rps, "sent": n, "sent_rps": n / span if span else 0.0,
        "in_time": frac["in_time"], "shed_fast": frac["shed_fast"], "shed_late": frac["shed_late"],
        "shed": frac["shed_fast"] + frac["shed_late"], "late": frac["late"],
        "ok": frac["in_time"] + frac["shed_fast"],
        "errors": errors, "errors_4xx": counts["errors_4xx"], "errors_5xx": counts["errors_5xx"],
        "errors_conn": counts["errors_conn"], "errors_other": counts["errors_other"],
        "error_kinds": dict(kinds), "counts": {k: counts[k] for k in OUTCOMES},
        "p50_ms": _pct([r.latency_s for r in ok200], 50), "p95_ms": _pct([r.latency_s for r in ok200], 95),
        "p99_ms": _pct([r.latency_s for r in ok200], 99), "shed_p99_ms": _pct([r.latency_s for r in shed], 99),
        "mean_budget": statistics.fmean(budgets) if budgets else None,
        "mean_predicted_patch_psnr": statistics.fmean(psnrs) if psnrs else None,
        "gen_lag_p99_ms": _pct([r.lag_s for r in results], 99),
    }


# ----------------------------------------------------------------------------- phases and measurements

@dataclass
class Stream:
    wl: Workload
    rate: float
    deadline_ms: float
    factor: float | None = None  # offered rate in multiples of the endpoint's capacity
    results: list[Result] = field(default_factory=list)


async def _arrivals(client: Clients, s: Stream, params: dict, duration: float, t_phase: float,
                    rng: random.Random, max_requests: int, tasks: list, flight: Flight) -> None:
    if s.rate <= 0:
        return
    deadline_s, n = s.deadline_ms / 1000, 0
    next_at = rng.expovariate(s.rate)
    while next_at < duration and n < max_requests:
        delay = t_phase + next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(client, s.wl, {**params, "deadline_ms": s.deadline_ms}, deadline_s,
                                             t_phase, next_at, s.results, flight)))
        n += 1
        next_at += rng.expovariate(s.rate)


async def run_phase(client: Clients, streams: list[Stream], policy: str, duration: float, seed: int,
                    max_requests: int) -> Flight:
    """All streams at once, each its own Poisson process; returns the in-flight counter (its peak)."""
    tasks: list[asyncio.Task] = []
    flight = Flight()
    t_phase = time.perf_counter()
    await asyncio.gather(*(_arrivals(client, s, {"policy": policy}, duration, t_phase,
                                     random.Random(seed + 1000 * j), max_requests, tasks, flight)
                           for j, s in enumerate(streams)))
    await asyncio.gather(*tasks)
    return flight


async def measure_capacity(client: Clients, wl: Workload, seconds: float, in_flight: int = 2) -> float:
    """Full-width requests per second with ``in_flight`` requests in flight (closed loop)."""
    done, stop = 0, time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            a = await send(client, wl, {"policy": "full"})
            if a.status != 200:
                raise RuntimeError(a.refusal(wl))
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return done / (time.perf_counter() - t0)


async def measure_service_time(client: Clients, wl: Workload, n: int, max_seconds: float) -> float:
    """Median latency (ms) of single sequential full-width requests: n of them, or what fits max_seconds (>= 3)."""
    lat: list[float] = []
    stop = time.perf_counter() + max_seconds
    while len(lat) < n and (len(lat) < 3 or time.perf_counter() < stop):
        a = await send(client, wl, {"policy": "full"})
        if a.status != 200:
            raise RuntimeError(a.refusal(wl))
        lat.append(a.seconds)
    return 1000 * statistics.median(lat)


async def deadline_margin_ms(client: Clients) -> float:
    """The server's ``deadline_margin_ms`` (``GET /v1/policy``); 0 where it does not say."""
    try:
        r = await client.get("/v1/policy")
        return float(r.json().get("deadline_margin_ms") or 0.0) if r.status_code == 200 else 0.0
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
        return 0.0


def idle_deadline_ms(service_ms: float, margin_ms: float) -> float:
    """The idle check's deadline: IDLE_DEADLINE_X service times, the last of them replaced by
    the server's deadline margin where that is longer.  Why: the server keeps
    ``deadline_margin_ms`` (5 ms by default) of every deadline in reserve, so for a 2 ms model
    3x its service time is shed on a fresh idle server too, by design: the check asks whether
    the server recovered, not whether it keeps that reserve."""
    return (IDLE_DEADLINE_X - 1) * service_ms + max(service_ms, margin_ms)


async def idle_check(client: Clients, workloads: list[Workload], n: int, policy: str, margin_ms: float = 0.0) -> dict:
    """n sequential requests per endpoint at ``idle_deadline_ms``: answered 200 in time?"""
    out = {}
    for wl in workloads:
        deadline_ms = idle_deadline_ms(wl.service_ms or 0.0, margin_ms)
        answers = []
        for _ in range(n):
            a = await send(client, wl, {"policy": policy, "deadline_ms": deadline_ms})
            answers.append({"status": a.status, "latency_ms": 1000 * a.seconds,
                            "in_time": a.status == 200 and 1000 * a.seconds <= deadline_ms,
                            "budget": _float(a.headers.get("x-anytime-flops-fraction")),
                            **({"error": a.error} if a.error else {})})
        out[wl.name] = {"deadline_ms": deadline_ms, "answers": answers,
                        "recovered": all(a["in_time"] for a in answers)}
    return out


# ----------------------------------------------------------------------------- options

def parse_named(values: list[str] | None, what: str) -> tuple[float | None, dict[str, float]]:
    """``300`` or ``classify=100 ground=200`` (or both): (common value, per-endpoint values)."""
    common, per = None, {}
    for v in values or []:
        name, sep, num = v.rpartition("=")
        try:
            x = float(num)
        except ValueError:
            raise SystemExit(f"{what}: {v!r} is not a number or NAME=NUMBER") from None
        if x <= 0:
            raise SystemExit(f"{what}: {v!r} must be > 0")
        if sep:
            try:
                parse_spec(name)
            except argparse.ArgumentTypeError as exc:
                raise SystemExit(f"{what}: {exc}") from None
            per[name] = x
        else:
            common = x
    return common, per


def parse_mixed(values: list[str]) -> list[tuple[str, float]]:
    out = []
    for v in values:
        name, sep, num = v.rpartition("=")
        try:
            if not sep:
                raise ValueError("no '='")
            parse_spec(name)
            x = float(num)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise SystemExit(f"--mixed: {v!r} is not ENDPOINT[:MODEL]=MULTIPLE: {exc}") from None
        if x < 0:
            raise SystemExit(f"--mixed: {v!r}: the multiple must be >= 0")
        out.append((name, x))
    if len({n for n, _ in out}) != len(out):
        raise SystemExit("--mixed: an endpoint is named twice")
    return out


def resolve_deadlines(names: list[str], ms: list[str] | None, x: list[str] | None,
                      service_ms: dict[str, float | None], default_ms: float = 300.0) -> dict[str, float]:
    """Per endpoint: its own ms, else its own x, else the common ms, else the common x, else default_ms."""
    ms_common, ms_per = parse_named(ms, "--deadline-ms")
    x_common, x_per = parse_named(x, "--deadline-x")
    if ms_common is not None and x_common is not None:
        raise SystemExit("give a common --deadline-ms or a common --deadline-x, not both")
    out = {}
    for n in names:
        if n in ms_per:
            out[n] = ms_per[n]
        elif n in x_per or (x_common is not None and ms_common is None):
            out[n] = (x_per.get(n) or x_common) * service_ms[n]
        elif ms_common is not None:
            out[n] = ms_common
        else:
            out[n] = default_ms
    return out


def needs_service_time(args: argparse.Namespace) -> bool:
    return bool(args.deadline_x) or args.then_idle is not None


# ----------------------------------------------------------------------------- the run

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def served_endpoints(client: Clients) -> tuple[set[str], dict[str, str]]:
    """Which of the three endpoints the server serves, and the task of each grounding model."""
    r = await client.get("/v1/models")
    r.raise_for_status()
    models = r.json().get("models", [])
    paths = {m.get("endpoint") for m in models}
    served = {name for name, path in ENDPOINTS.items() if path in paths}
    tasks = {m["name"]: m.get("task", "box") for m in models if m.get("endpoint") == "/ground"}
    ground = [m for m in models if m.get("endpoint") == "/ground"]
    if ground:
        tasks[""] = ground[0].get("task", "box")
    return served, tasks


async def main_async(args: argparse.Namespace) -> dict:
    mixed = parse_mixed(args.mixed) if args.mixed else None
    load_specs = [n for n, _ in mixed] if mixed else list(dict.fromkeys(args.endpoint))
    for s in load_specs:
        parse_spec(s)
    relative = bool(mixed) or bool(args.capacity_factors)
    phase_factors = (args.capacity_factors or [1.0]) if relative else None
    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
    client = Clients(args.max_connections, base_url=args.url, timeout=args.timeout, headers=headers)
    try:
        return await _run(client, args, mixed, load_specs, relative, phase_factors)
    finally:
        await client.aclose()


async def _run(client: Clients, args: argparse.Namespace, mixed: list[tuple[str, float]] | None,
               load_specs: list[str], relative: bool, phase_factors: list[float] | None) -> dict:
    (await client.get("/readyz")).raise_for_status()
    served, ground_tasks = await served_endpoints(client)
    missing = [s for s in load_specs if parse_spec(s)[0] not in served]
    if missing:
        raise SystemExit(f"the server at {args.url} serves no model at {', '.join(missing)} "
                         f"(it serves: {', '.join(sorted(served)) or 'nothing'})")
    idle_specs = []
    if args.then_idle is not None:
        idle_specs = list(dict.fromkeys(load_specs + [e for e in ENDPOINTS if e in served]))
    specs = list(dict.fromkeys(load_specs + idle_specs))
    wls = {s: build_workload(s, args, ground_tasks) for s in specs}
    for wl in wls.values():  # warm the connection pool and the server's caches; fail early
        for _ in range(3):
            a = await send(client, wl, {"policy": "full"})
            if a.status != 200:
                raise RuntimeError(a.refusal(wl))
    for s, wl in wls.items():
        if needs_service_time(args) or relative:
            wl.service_ms = await measure_service_time(client, wl, args.service_requests, args.service_seconds)
            log(f"{s}: full-width service time {wl.service_ms:.1f} ms (median of sequential requests)")
        if relative and s in load_specs:
            wl.capacity_rps = await measure_capacity(client, wl, args.capacity_seconds)
            log(f"{s}: full-width capacity {wl.capacity_rps:.2f} req/s (closed loop, 2 in flight)")
    deadlines = resolve_deadlines(load_specs, args.deadline_ms, args.deadline_x,
                                  {s: wls[s].service_ms for s in load_specs})
    report: dict = {"url": args.url, "accept": args.accept, "duration_s": args.duration,
                    "endpoints": {s: {**wls[s].describe(), "deadline_ms": deadlines.get(s)} for s in specs},
                    "phases": []}
    if len(load_specs) == 1:  # the old top-level keys, for a single endpoint
        wl = wls[load_specs[0]]
        report.update(image_bytes=len(wl.body), deadline_ms=deadlines[wl.name])
        if wl.capacity_rps is not None:
            report["capacity_rps"] = wl.capacity_rps
    if not args.json:
        print(endpoint_table(wls, deadlines, load_specs), flush=True)
    own = dict(mixed) if mixed else {s: 1.0 for s in load_specs}
    steps = phase_factors if relative else args.rate
    first = True
    for i, step in enumerate(steps):
        for policy in args.policy:
            streams = [Stream(wls[s], own[s] * step * wls[s].capacity_rps if relative else step, deadlines[s],
                              own[s] * step if relative else None) for s in load_specs]
            t0, c0 = time.perf_counter(), time.process_time()
            flight = await run_phase(client, streams, policy, args.duration, args.seed + i, args.max_requests)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            n_sent = sum(len(st.results) for st in streams)
            rows = []
            for st in streams:
                row = {"endpoint": st.wl.name, "policy": policy, "deadline_ms": st.deadline_ms,
                       **summarize(st.results, st.rate, args.duration)}
                if st.factor is not None:
                    row["load_factor"] = st.factor
                rows.append(row)
            phase: dict = {"step": step, "policy": policy, "endpoints": rows, "peak_in_flight": flight.peak,
                           "gen_cpu_cores": cpu / wall, "gen_cpu_ms_per_request": 1000 * cpu / max(1, n_sent)}
            if relative:
                phase["load_factor"] = step
            if len(streams) == 1:  # the old flat keys (policy, offered_rps, in_time, ...) for one endpoint
                phase.update({k: v for k, v in rows[0].items() if k not in phase})
            else:
                phase["all"] = {"endpoint": "all", "policy": policy, "deadline_ms": None,
                                **summarize([r for st in streams for r in st.results],
                                            sum(st.rate for st in streams), args.duration)}
            warnings = []
            if flight.peak >= args.max_connections:
                warnings.append(f"{flight.peak} requests in flight reached --max-connections "
                                f"{args.max_connections}: requests waited for a connection in the client")
            lag = max((r["gen_lag_p99_ms"] or 0.0) for r in rows)
            if lag > max(GEN_LAG_WARN_MS, 0.1 * min(st.deadline_ms for st in streams)):
                warnings.append(f"the generator fell behind its schedule (lag p99 up to {lag:.0f} ms): the "
                                f"offered load was lower and burstier than asked (cores shared with the server?)")
            if warnings:
                phase["warnings"] = warnings
            if not args.json:
                if first:
                    print("\n" + _header())
                    first = False
                for row in rows + ([phase["all"]] if "all" in phase else []):
                    print(_row(row), flush=True)
                log(f"generator: {phase['gen_cpu_cores']:.2f} cores, {phase['gen_cpu_ms_per_request']:.2f} ms CPU "
                    f"a request, peak {flight.peak} in flight")
                for w in warnings:
                    log("warning: " + w)
            if args.then_idle is not None:
                await asyncio.sleep(args.then_idle)
                phase["idle_check"] = await idle_check(client, [wls[s] for s in idle_specs], args.idle_requests,
                                                       policy, await deadline_margin_ms(client))
                if not args.json:
                    after = ", ".join(f"{st.wl.name} {st.factor:g}x capacity" if relative else
                                      f"{st.wl.name} {st.rate:g} rps" for st in streams) + f", {policy}"
                    print("\n" + idle_table(phase["idle_check"], args.then_idle, after) + "\n"
                          + ("\n" + _header() if (i, policy) != (len(steps) - 1, args.policy[-1]) else ""),
                          flush=True)
            report["phases"].append(phase)
            if args.pause and (i, policy) != (len(steps) - 1, args.policy[-1]):
                await asyncio.sleep(args.pause)
    return report


# ----------------------------------------------------------------------------- printing

COLUMNS = [("load x capacity", "load_factor"), ("endpoint", "endpoint"), ("policy", "policy"),
           ("offered rps", "offered_rps"), ("deadline ms", "deadline_ms"), ("sent", "sent"),
           ("in time", "in_time"), ("shed fast", "shed_fast"), ("shed late", "shed_late"), ("late", "late"),
           ("errors", "errors"), ("**ok**", "ok"), ("p50 ms", "p50_ms"), ("p95 ms", "p95_ms"), ("p99 ms", "p99_ms"),
           ("shed p99 ms", "shed_p99_ms"), ("mean budget", "mean_budget"),
           ("mean predicted patch PSNR", "mean_predicted_patch_psnr"), ("gen lag p99 ms", "gen_lag_p99_ms")]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return str(v)


def _errors(s: dict) -> str:
    if not s["errors"]:
        return "0"
    parts = [f"{k.split('_')[1]} {s[k]}" for k in ("errors_4xx", "errors_5xx", "errors_conn", "errors_other") if s[k]]
    return f"{s['errors']} ({', '.join(parts)})"


def _header() -> str:
    return "| " + " | ".join(c for c, _ in COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def _row(s: dict) -> str:
    cells = []
    for _, k in COLUMNS:
        if k == "errors":
            cells.append(_errors(s))
        elif k == "load_factor":
            cells.append(f"{s[k]:g}" if s.get(k) is not None else "-")
        elif k == "ok":
            cells.append(f"**{_fmt(s[k])}**")
        else:
            cells.append(_fmt(s.get(k)))
    return "| " + " | ".join(cells) + " |"


def endpoint_table(wls: dict[str, Workload], deadlines: dict[str, float], load_specs: list[str]) -> str:
    head = ("| endpoint | request | body bytes | full-width service ms (sequential p50) "
            "| full-width capacity rps (2 in flight) | deadline ms |")
    lines = [head, "|---|---|---|---|---|---|"]
    for s, wl in wls.items():
        dl = _fmt(deadlines[s]) if s in deadlines else "(idle check only)"
        lines.append(f"| {s} | {wl.what} | {len(wl.body)} | {_fmt(wl.service_ms)} | {_fmt(wl.capacity_rps)} | {dl} |")
    return "\n".join(lines)


def idle_table(check: dict, idle_s: float, after: str) -> str:
    lines = [f"Idle check {idle_s:g} s after the phase {after} (deadline {IDLE_DEADLINE_X:g}x service time, "
             "the server's deadline margin in place of the last one where longer):",
             "", "| endpoint | deadline ms | answers (status in ms) | recovered |", "|---|---|---|---|"]
    for name, c in check.items():
        answers = ", ".join(f"{a['status'] or a.get('error', 'conn')} in {a['latency_ms']:.0f}" +
                            ("" if a["in_time"] else " (LATE)" if a["status"] == 200 else "") for a in c["answers"])
        n_ok, n = sum(a["in_time"] for a in c["answers"]), len(c["answers"])
        verdict = "yes" if c["recovered"] else f"**NO** ({n_ok}/{n} in time)"
        lines.append(f"| {name} | {c['deadline_ms']:.0f} | {answers} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    what = ap.add_argument_group("what to send")
    what.add_argument("--endpoint", nargs="+", default=None, metavar="ENDPOINT[:MODEL]",
                      help="endpoint(s) to load, each its own Poisson stream at the same rate or multiple "
                           "(superresolve, classify, ground; ':MODEL' picks a model; default superresolve)")
    what.add_argument("--mixed", nargs="+", default=None, metavar="ENDPOINT[:MODEL]=X",
                      help="several endpoints at once, each at X times its own full-width capacity "
                           "(measured first); --rate-x multiplies all of them, phase by phase")
    rate = ap.add_argument_group("how much")
    rate.add_argument("--rate", type=float, nargs="+", default=None,
                      help="offered requests per second per endpoint (one phase each; default 10)")
    rate.add_argument("--capacity-factors", "--rate-x", dest="capacity_factors", type=float, nargs="+", default=None,
                      help="measure each endpoint's full-width capacity, then offer these multiples of it (phases)")
    rate.add_argument("--capacity-seconds", type=float, default=8.0, help="closed-loop seconds per endpoint")
    rate.add_argument("--service-requests", type=int, default=15,
                      help="sequential requests per endpoint for the full-width service time")
    rate.add_argument("--service-seconds", type=float, default=5.0, help="... or as many as fit this (at least 3)")
    rate.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    rate.add_argument("--deadline-ms", nargs="+", default=None, metavar="MS|ENDPOINT=MS",
                      help="deadline per request: common and/or per endpoint (default 300)")
    rate.add_argument("--deadline-x", nargs="+", default=None, metavar="X|ENDPOINT=X",
                      help="deadline = X times the endpoint's full-width service time (common and/or per endpoint)")
    rate.add_argument("--policy", nargs="+", default=["adaptive"], choices=["adaptive", "full", "smallest"],
                      help="server policy per phase (several: each rate is run under each)")
    rate.add_argument("--then-idle", type=float, default=None, metavar="S",
                      help="after each phase wait S s, then send --idle-requests sequential requests to every "
                           f"endpoint at {IDLE_DEADLINE_X:g}x its service time: recovered?")
    rate.add_argument("--idle-requests", type=int, default=3)
    bodies = ap.add_argument_group("request bodies")
    bodies.add_argument("--sr-image", "--image", dest="sr_image", default=None,
                        help="/superresolve: PNG to send (default: a real photo, --sr-size square)")
    bodies.add_argument("--sr-size", "--size", dest="sr_size", type=int, default=64,
                        help="/superresolve: side of the default photo")
    bodies.add_argument("--accept", default="image/png", help="/superresolve: Accept")
    bodies.add_argument("--classify-image", default=None, help="/classify: PNG to send (default: a glyph)")
    bodies.add_argument("--classify-size", type=int, default=32, help="/classify: side of the default glyph")
    bodies.add_argument("--ground-image", default=None, help="/ground: PNG to send (default: a synthetic scene)")
    bodies.add_argument("--ground-expression", default=None, help="/ground: the expression (default: the scene's)")
    bodies.add_argument("--ground-size", type=int, default=128, help="/ground: side of the default scene")
    client = ap.add_argument_group("client")
    client.add_argument("--token", default=None, help="bearer token, if the server needs one")
    client.add_argument("--timeout", type=float, default=30.0)
    client.add_argument("--max-connections", type=int, default=1024)
    client.add_argument("--max-requests", type=int, default=5000, help="per endpoint and phase, whatever the rate")
    client.add_argument("--pause", type=float, default=2.0, help="seconds between phases (lets queues drain)")
    client.add_argument("--seed", type=int, default=0)
    client.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    ensure_loopback(args.url)
    if args.rate is not None and (args.mixed or args.capacity_factors):
        ap.error("--rate is an absolute rate; --mixed and --rate-x / --capacity-factors offer multiples of capacity")
    args.rate = args.rate or [10.0]
    if args.mixed and args.endpoint:
        ap.error("--mixed names its endpoints; leave out --endpoint")
    args.endpoint = args.endpoint or ["superresolve"]
    try:
        for s in args.endpoint:
            parse_spec(s)
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    if args.mixed:
        parse_mixed(args.mixed)
    if parse_named(args.deadline_ms, "--deadline-ms")[0] is not None and \
            parse_named(args.deadline_x, "--deadline-x")[0] is not None:
        ap.error("give a common --deadline-ms or a common --deadline-x, not both")
    try:
        report = asyncio.run(main_async(args))
    except (RuntimeError, *CLIENT_ERRORS) as exc:
        sys.exit(f"bench.load: {type(exc).__name__}: {exc}")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"\n{args.duration:g} s per phase; latency percentiles of the 200s; ok = in time + shed fast; "
              f"Accept {args.accept} for /superresolve")


if __name__ == "__main__":
    main()
