"""Wall-clock of /superresolve requests at a budget vs at full width, through a running server.

    make serve &      # or ANYTIME_ARM_CHECKPOINT=... make serve &
    python -m bench.sr_latency --url http://127.0.0.1:8000 --budget 0.65 [--budget-unit flops] [--images DIR]

For every image (default: the held-out test photos, as their MATLAB-bicubic x1/4 LR) it
sends the request at ``rung=<full width>`` and at ``budget=B`` (in ``--budget-unit``: the
server's default, time, or flops) alternately, ``--repeats`` times each, and reports the
median client-side wall-clock of both, their ratio, and the RGB PSNR of both answers
against the HR photo (ARM's convention: 4 px crop).
Alternating the two keeps slow drifts of a shared machine out of the ratio.  Loopback only.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import httpx
from PIL import Image

from models.arm import data
from models.arm.metrics import psnr_rgb


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _decode(png: bytes):
    import numpy as np

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--budget", type=float, default=0.65)
    ap.add_argument("--images", type=Path, default=None, help="HR folder; the LR is sent (default: test split)")
    ap.add_argument("--budget-unit", choices=["time", "flops"], default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    images = data.load_folder(args.images) if args.images else data.load_split("test")
    with httpx.Client(base_url=args.url, timeout=300) as client:
        rungs = client.get("/v1/models").json()["models"][0]["rungs"]
        full_rung = [r for r in rungs if r.get("precision", "fp32") == "fp32"][-1]["name"]  # the top fp32 width
        rows = []
        for name, _hr, lr in images:
            body = _png(lr)
            times: dict[str, list[float]] = {"full": [], "budget": []}
            info, answers = {}, {}
            for _ in range(args.repeats):
                budget = {"budget": args.budget, **({"budget_unit": args.budget_unit} if args.budget_unit else {})}
                for key, params in (("full", {"rung": full_rung}), ("budget", budget)):
                    t0 = time.perf_counter()
                    r = client.post("/superresolve", content=body, params=params,
                                    headers={"content-type": "image/png"})
                    times[key].append(time.perf_counter() - t0)
                    r.raise_for_status()
                    info[key] = r.headers
                    answers[key] = r.content
            full, bud = statistics.median(times["full"]), statistics.median(times["budget"])
            rows.append({"image": name, "lr_size": f"{lr.shape[1]}x{lr.shape[0]}", "full_ms": 1000 * full,
                         "budget_ms": 1000 * bud, "ratio": bud / full,
                         "flops_fraction": float(info["budget"]["x-anytime-flops-fraction"]),
                         "psnr_full": psnr_rgb(_decode(answers["full"]), _hr),
                         "psnr_budget": psnr_rgb(_decode(answers["budget"]), _hr),
                         "rung_mix": info["budget"]["x-anytime-rung-mix"]})
    overall = statistics.median(r["ratio"] for r in rows)
    total = sum(r["budget_ms"] for r in rows) / sum(r["full_ms"] for r in rows)
    if args.json:
        print(json.dumps({"budget": args.budget, "rows": rows, "median_ratio": overall, "total_ratio": total}, indent=2))
        return
    unit = args.budget_unit or "server default"
    print(f"| image | LR size | {full_rung} ms | budget {args.budget} ({unit}) ms | time ratio | FLOPs fraction | "
          "PSNR full | PSNR budget | rung mix |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['image']} | {r['lr_size']} | {r['full_ms']:.0f} | {r['budget_ms']:.0f} | {r['ratio']:.2f} | "
              f"{r['flops_fraction']:.3f} | {r['psnr_full']:.3f} | {r['psnr_budget']:.3f} | {r['rung_mix']} |")
    drop = statistics.fmean(r["psnr_full"] - r["psnr_budget"] for r in rows)
    print(f"\nmedian per-image time ratio {overall:.2f}; total time ratio {total:.2f} (budget / full width); "
          f"mean PSNR drop {drop:.3f} dB")


if __name__ == "__main__":
    main()
