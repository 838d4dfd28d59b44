"""Open-loop load on a running server: Poisson arrivals, a deadline per request.

    make serve &
    python -m bench.load --url http://127.0.0.1:8000 --rate 40 --duration 20 --deadline-ms 300 --policy adaptive
    python -m bench.load --url ... --capacity-factors 0.5 1 2 1 0.5 --duration 15 --deadline-ms 300

Requests are sent at exponential inter-arrival times whatever the server's answers
(open loop, as MLPerf's Server scenario), so an overloaded server cannot slow the
offered load down.  A request counts as *in time* when it got 200 within its deadline
measured at the client; *shed* when it got 429/503; *late* when it got 200 after its
deadline, or 504.  ``--capacity-factors`` first measures the full-width capacity
(closed loop, two requests in flight, policy=full) and then runs one phase per factor
at that multiple of it, to show how the chosen budget follows the load.

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
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image


def ensure_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(f"refusing to load {url}: this benchmark sends traffic to loopback addresses only")


def default_image(size: int) -> bytes:
    """A real photo: the scikit-image astronaut, resized to size x size (PNG)."""
    try:
        from skimage import data as skdata

        arr = skdata.astronaut()
        im = Image.fromarray(arr).resize((size, size), Image.Resampling.BICUBIC)
    except ImportError:  # scikit-image is in the dev extra; fall back to our synthetic photo
        from models.common.synthetic import synthetic_photo

        im = Image.fromarray(synthetic_photo(size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Result:
    sent_at: float  # seconds since the phase started
    status: int
    latency_s: float
    budget: float | None = None
    psnr: float | None = None
    rung_mix: str | None = None


@dataclass
class Phase:
    rate: float
    duration: float
    deadline_ms: float
    policy: str
    results: list[Result] = field(default_factory=list)

    def summary(self) -> dict:
        r = self.results
        n = len(r)
        ok = [x for x in r if x.status == 200]
        lat = sorted(x.latency_s for x in ok)
        d = self.deadline_ms / 1000
        in_time = sum(1 for x in ok if x.latency_s <= d)
        shed = [x for x in r if x.status in (429, 503)]
        late = sum(1 for x in ok if x.latency_s > d) + sum(1 for x in r if x.status == 504)
        other = n - len(ok) - len(shed) - sum(1 for x in r if x.status == 504)

        def pct(v: list[float], q: float) -> float | None:
            return 1000 * float(np.percentile(v, q)) if v else None

        budgets = [x.budget for x in ok if x.budget is not None]
        psnrs = [x.psnr for x in ok if x.psnr is not None]
        span = max((x.sent_at for x in r), default=0.0) or self.duration
        return {
            "policy": self.policy, "offered_rps": self.rate, "sent": n, "sent_rps": n / span if span else 0.0,
            "in_time": in_time / n if n else 0.0, "shed": len(shed) / n if n else 0.0, "late": late / n if n else 0.0,
            "errors": other, "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99),
            "shed_p99_ms": pct([x.latency_s for x in shed], 99),
            "mean_budget": statistics.fmean(budgets) if budgets else None,
            "mean_predicted_psnr": statistics.fmean(psnrs) if psnrs else None,
        }


async def one(client: httpx.AsyncClient, body: bytes, params: dict, t_phase: float, out: list[Result]) -> None:
    t0 = time.perf_counter()
    try:
        r = await client.post("/superresolve", content=body, params=params, headers={"content-type": "image/png"})
        status, h = r.status_code, r.headers
    except httpx.HTTPError:
        status, h = 0, {}
    dt = time.perf_counter() - t0
    budget = h.get("x-anytime-flops-fraction")
    psnr = h.get("x-anytime-predicted-psnr")
    out.append(Result(t0 - t_phase, status, dt, float(budget) if budget else None, float(psnr) if psnr else None,
                      h.get("x-anytime-rung-mix")))


async def run_phase(client: httpx.AsyncClient, body: bytes, phase: Phase, seed: int, max_requests: int) -> Phase:
    rng = random.Random(seed)
    params = {"deadline_ms": phase.deadline_ms, "policy": phase.policy}
    tasks = []
    t_phase = time.perf_counter()
    next_at = rng.expovariate(phase.rate)
    while next_at < phase.duration and len(tasks) < max_requests:
        delay = t_phase + next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(client, body, params, t_phase, phase.results)))
        next_at += rng.expovariate(phase.rate)
    await asyncio.gather(*tasks)
    return phase


async def measure_capacity(client: httpx.AsyncClient, body: bytes, seconds: float) -> float:
    """Full-width requests per second with two in flight (closed loop)."""
    done, stop = 0, time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            r = await client.post("/superresolve", content=body, params={"policy": "full"},
                                  headers={"content-type": "image/png"})
            r.raise_for_status()
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(worker(), worker())
    return done / (time.perf_counter() - t0)


async def main_async(args: argparse.Namespace) -> dict:
    body = Path(args.image).read_bytes() if args.image else default_image(args.size)
    limits = httpx.Limits(max_connections=args.max_connections, max_keepalive_connections=args.max_connections)
    headers = {"accept": args.accept}
    if args.token:
        headers["authorization"] = f"Bearer {args.token}"
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, limits=limits, headers=headers) as client:
        (await client.get("/readyz")).raise_for_status()
        for _ in range(3):  # warm the connection pool and the server's caches
            await client.post("/superresolve", content=body, params={"policy": "full"},
                              headers={"content-type": "image/png"})
        report: dict = {"url": args.url, "image_bytes": len(body), "deadline_ms": args.deadline_ms,
                        "accept": args.accept}
        if args.capacity_factors:
            cap = await measure_capacity(client, body, args.capacity_seconds)
            report["capacity_rps"] = cap
            rates = [f * cap for f in args.capacity_factors]
        else:
            rates = args.rate
        phases = []
        policies = args.policy
        for i, rate in enumerate(rates):
            for policy in policies:
                p = await run_phase(client, body, Phase(rate, args.duration, args.deadline_ms, policy),
                                    args.seed + i, args.max_requests)
                s = p.summary()
                if args.capacity_factors:
                    s["load_factor"] = args.capacity_factors[i]
                phases.append(s)
                if not args.json:
                    if len(phases) == 1:
                        print(_header(bool(args.capacity_factors)))
                    print(_row(s), flush=True)
                if args.pause:
                    await asyncio.sleep(args.pause)
        report["phases"] = phases
        return report


COLUMNS = ["policy", "offered_rps", "sent", "in_time", "shed", "late", "p50_ms", "p95_ms", "p99_ms", "shed_p99_ms",
           "mean_budget", "mean_predicted_psnr"]


def _header(with_factor: bool) -> str:
    cols = (["load x capacity"] if with_factor else []) + COLUMNS
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return str(v)


def _row(s: dict) -> str:
    cols = ([f"{s['load_factor']:g}"] if "load_factor" in s else []) + [_fmt(s[c]) for c in COLUMNS]
    return "| " + " | ".join(cols) + " |"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--rate", type=float, nargs="+", default=[10.0], help="offered requests per second (phases)")
    ap.add_argument("--capacity-factors", type=float, nargs="+", default=None,
                    help="measure full-width capacity, then offer these multiples of it (phases)")
    ap.add_argument("--capacity-seconds", type=float, default=8.0)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    ap.add_argument("--deadline-ms", type=float, default=300.0)
    ap.add_argument("--policy", nargs="+", default=["adaptive"], choices=["adaptive", "full", "smallest"],
                    help="server policy per phase (several: each rate is run under each)")
    ap.add_argument("--image", default=None, help="PNG to send (default: a real photo, --size square)")
    ap.add_argument("--size", type=int, default=128, help="side of the default image")
    ap.add_argument("--accept", default="image/png")
    ap.add_argument("--token", default=None, help="bearer token, if the server needs one")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--max-connections", type=int, default=256)
    ap.add_argument("--max-requests", type=int, default=5000, help="per phase, whatever the rate")
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between phases (lets queues drain)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    ensure_loopback(args.url)
    report = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        if "capacity_rps" in report:
            print(f"\nfull-width capacity {report['capacity_rps']:.2f} req/s (closed loop, 2 in flight)")
        print(f"deadline {args.deadline_ms:g} ms; image {report['image_bytes']} bytes; Accept {args.accept}")


if __name__ == "__main__":
    main()
