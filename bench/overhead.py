"""Server overhead: one request through HTTP vs the same work called in-process.

    python -m bench.overhead [--size 128] [--budget 0.65] [--repeats 40] [--accept image/png] [--json]

Starts the server itself (``python -m service`` on a free loopback port, same torch
thread count), then alternates, one request at a time: the in-process call (decode ->
analyse -> plan -> run -> stitch -> encode with the same model and settings) and the
same image posted to /superresolve.  Alternating keeps a noisy machine's drifts out of
the ratio; medians and p90 are reported.  ``--url`` measures a server already running.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import httpx
import numpy as np
import torch

from bench.load import default_image, ensure_loopback
from bench.server import start_server
from models.arm.pipeline import ArmSR
from service import imageio
from service.config import Settings


def in_process(model: ArmSR, body: bytes, budget: float, media: str, settings: Settings) -> bytes:
    img = imageio.decode(body, settings.max_input_pixels)
    plan = model.plan(img.rgb_u8, mode="budget", budget=budget)
    canvas = model.run(plan, img.rgb)
    return imageio.encode(canvas, img, media)


def pct(values: list[float], q: float) -> float:
    return 1000 * float(np.percentile(values, q))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128, help="side of the square input photo")
    ap.add_argument("--budget", type=float, default=0.65)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, here and in the server")
    ap.add_argument("--accept", default="image/png", choices=["image/png", "image/jpeg", "image/webp"])
    ap.add_argument("--url", default=None, help="a running server instead of starting one")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings()
    model = ArmSR.from_checkpoint(settings.arm.checkpoint)
    body = default_image(args.size)
    proc = None
    if args.url:
        ensure_loopback(args.url)
        url = args.url
    else:
        try:
            proc, url = start_server(quiet=True, ANYTIME_TORCH_THREADS=str(args.threads), ANYTIME_LOG_LEVEL="warning")
        except RuntimeError as exc:
            sys.exit(str(exc))
    try:
        direct, served = [], []
        headers = {"content-type": "image/png", "accept": args.accept}
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(3):  # warm both paths
                in_process(model, body, args.budget, args.accept, settings)
                client.post("/superresolve", content=body, params={"budget": args.budget}, headers=headers)
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                in_process(model, body, args.budget, args.accept, settings)
                direct.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                r = client.post("/superresolve", content=body, params={"budget": args.budget}, headers=headers)
                served.append(time.perf_counter() - t0)
                r.raise_for_status()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    report = {"size": args.size, "budget": args.budget, "accept": args.accept, "repeats": args.repeats,
              "threads": args.threads,
              "direct_p50_ms": pct(direct, 50), "direct_p90_ms": pct(direct, 90),
              "server_p50_ms": pct(served, 50), "server_p90_ms": pct(served, 90),
              "ratio_p50": statistics.median(served) / statistics.median(direct)}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"| path | p50 ms | p90 ms |\n|---|---|---|\n"
          f"| in-process call | {report['direct_p50_ms']:.1f} | {report['direct_p90_ms']:.1f} |\n"
          f"| through the server (HTTP, loopback) | {report['server_p50_ms']:.1f} | {report['server_p90_ms']:.1f} |")
    print(f"\n{args.size}x{args.size} input, budget {args.budget:g}, {args.accept}, {args.threads} torch threads, "
          f"{args.repeats} alternating pairs: server / in-process p50 = {report['ratio_p50']:.2f}")


if __name__ == "__main__":
    main()
