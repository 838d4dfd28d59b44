"""Serve every bundled family on a GPU and time each rung through its endpoint.

    python -m bench.gpu_check                      # ANYTIME_DEVICE=cuda, 20 requests per rung
    python -m bench.gpu_check --device cuda:1 --requests 50 --json

Starts ``python -m service`` with ``ANYTIME_DEVICE`` set (every family: ARM, PSS-Net, CF-ViT,
SeqTR), waits until it has calibrated every rung on the device, then sends sequential
requests pinned to each rung of each model (``rung=`` / ``side=``) and prints, per rung, the
median forward time the server measured (``X-Anytime-Compute-Ms``: the scheduler waits for
the CUDA kernels before it stops the clock), the server's time from arrival to response and
the client's round trip, next to what the cost model calibrated at start-up.  A rung that
answers anything but 200 is reported with its status and message: the check is that every
family really runs on the device, not only that it loads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import httpx
import torch

from bench import server as bench_server
from bench.load import default_image, glyph_image, ground_scene


def requests_for(model: dict, sr_size: int) -> list[tuple[str, str, dict, dict, bytes]]:
    """(rung name, path, params, headers, body) for every rung of one /v1/models entry."""
    endpoint, name = model["endpoint"], model["name"]
    if endpoint == "/superresolve":
        body = default_image(sr_size)
        return [(r["name"], endpoint, {"rung": r["name"]}, {"content-type": "image/png"}, body)
                for r in model["rungs"]]
    if endpoint == "/classify":
        body, headers = glyph_image(model.get("input_size") or 32), {"content-type": "image/png"}
        return [(r["name"], endpoint, {"model": name, "rung": r["name"]}, headers, body) for r in model["rungs"]]
    png, expression = ground_scene(128)
    req = httpx.Request("POST", "http://127.0.0.1/ground", files={"image": ("scene.png", png, "image/png")},
                        data={"expression": expression})
    body, headers = req.read(), {"content-type": req.headers["content-type"]}
    return [(r["name"], endpoint, {"model": name, "task": model["task"], "side": str(r["long_side"])}, headers, body)
            for r in model["rungs"]]


def calibration_key(model: dict, rung: dict) -> str:
    """The cost model's key (as /v1/models prints it) of one listed rung."""
    if "key" in rung:  # PSS-Net and CF-ViT name their batch keys (CF-ViT: one per precision)
        return str(rung["key"])
    if "long_side" in rung:
        return str(rung["long_side"])
    return str(rung["index"])


def measure(client: httpx.Client, path: str, params: dict, headers: dict, body: bytes, n: int) -> dict:
    compute, server, rtt, statuses, message = [], [], [], {}, None
    for i in range(n + 1):  # the first is a warm-up, not counted
        t0 = time.perf_counter()
        r = client.post(path, params=params, headers=headers, content=body)
        dt = time.perf_counter() - t0
        if i == 0:
            continue
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code == 200:
            compute.append(float(r.headers["x-anytime-compute-ms"]))
            server.append(float(r.headers["x-anytime-server-ms"]))
            rtt.append(1000 * dt)
        elif message is None:
            message = r.text[:200]

    def med(v: list[float]) -> float | None:
        return round(statistics.median(v), 3) if v else None

    return {"compute_ms_p50": med(compute), "server_ms_p50": med(server), "client_ms_p50": med(rtt),
            "statuses": statuses, "first_error": message}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--requests", type=int, default=20, help="timed requests per rung (after one warm-up)")
    ap.add_argument("--sr-size", type=int, default=256, help="side of the /superresolve photo")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device here")
    t0 = time.perf_counter()
    try:
        proc, url = bench_server.start_server(timeout_s=600, ANYTIME_DEVICE=args.device, ANYTIME_LOG_LEVEL="warning")
    except RuntimeError as exc:
        sys.exit(f"the server did not start on {args.device}: {exc}")
    ready_s = time.perf_counter() - t0
    rows = []
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            models = client.get("/v1/models").json()["models"]
            policy = client.get("/v1/policy").json()
            for m in models:
                calibrated = (m.get("cost_model") or {}).get("rungs", {})
                for rung_entry, (rung, path, params, headers, body) in zip(m["rungs"], requests_for(m, args.sr_size)):
                    cal = calibrated.get(calibration_key(m, rung_entry))
                    rows.append({"model": m["name"], "endpoint": path, "rung": rung,
                                 "calibrated_fixed_ms": cal and cal["fixed_ms"],
                                 "calibrated_per_item_ms": cal and cal["per_item_ms"],
                                 **measure(client, path, params, headers, body, args.requests)})
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else args.device
    report = {"device": args.device, "gpu": gpu, "torch": torch.__version__, "ready_s": round(ready_s, 1),
              "requests_per_rung": args.requests, "sr_size": args.sr_size, "load": policy.get("load"), "rungs": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{gpu} ({args.device}), torch {torch.__version__}; server ready (all families calibrated) in "
          f"{ready_s:.1f} s; {args.requests} requests per rung, /superresolve on a {args.sr_size}x{args.sr_size} "
          f"photo, /classify a glyph, /ground a 128 px scene")
    print("\n| model | endpoint | rung | compute ms p50 | server ms p50 | client ms p50 | calibrated fixed ms | "
          "calibrated per item ms | answers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        answers = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
        if r["first_error"]:
            answers += f" ({r['first_error']})"
        print(f"| {r['model']} | {r['endpoint']} | {r['rung']} | {r['compute_ms_p50']} | {r['server_ms_p50']} | "
              f"{r['client_ms_p50']} | {r['calibrated_fixed_ms']} | {r['calibrated_per_item_ms']} | {answers} |")
    print(f"\nGPU load seen by the server (/v1/policy): {json.dumps((policy.get('load') or {}).get('gpus'))}")


if __name__ == "__main__":
    main()
