"""Quality vs compute for an ARM checkpoint: PSNR, FLOPs and wall-clock per setting.

    python -m bench.sr_tradeoff --checkpoint PATH [--images DIR] [--json]

Rows: bicubic and each fixed width; ARM at budgets 0.4-1.0 with our objective
(``mse``: minimise predicted total squared error, interpolated table look-up), the
paper's objective on our look-up (``psnr_sum``: eta rule at the largest eta that fits),
the paper's rule exactly (``paper``: eta rule, nearest-bin look-up, largest eta that
fits); an ``oracle`` that knows every patch's true error (the limit any table can
reach); and the paper's eta modes (nearest-bin, as the official code).  PSNR is RGB with a 4 px
crop (ARM's number) and Y (the usual benchmark number) on the full, uint8 output;
FLOPs are per patch in the official convention, as a fraction of full width; time is the
median wall-clock of plan + run per image.  A second table gives the measured time per
patch of each rung, because on a CPU time does not follow FLOPs.  Images default to the
held-out test split (scikit-image photos).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch

from bench import arm_forward
from models.arm import data, dispatch, tiling
from models.arm.metrics import patch_mse, psnr_rgb, psnr_y
from models.arm.pipeline import ArmSR, rung_work
from service.costmodel import CostModel

BUDGETS = (0.4, 0.5, 0.6, 0.65, 0.7, 0.8, 0.9, 1.0)
ETA_KS = (0.5, 1.0, 2.0, 4.0, 8.0)


def true_patch_errors(model: ArmSR, lr: np.ndarray, hr: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """(N, R) measured MSE of every rung on every tile (for the oracle)."""
    x = torch.from_numpy(np.ascontiguousarray(tiling.extract(lr, pos).transpose(0, 3, 1, 2), dtype=np.float32) / 255)
    hr_p = tiling.extract(hr, pos * tiling.SCALE, tiling.PATCH * tiling.SCALE)
    cols = []
    for r in range(len(model.rungs)):
        sr = torch.round(model.run_patches(r, x) * 255).permute(0, 2, 3, 1).numpy()
        cols.append(patch_mse(sr, hr_p))
    return np.stack(cols, axis=1)


def settings(model: ArmSR, budgets: tuple[float, ...] = BUDGETS, time_slack_db: float = 0.0) -> list[tuple[str, dict]]:
    rows: list[tuple[str, dict]] = [(r.name if r.index else "bicubic", {"mode": "fixed", "rung": r.index})
                                    for r in model.rungs]
    for b in budgets:
        rows.append((f"ARM b={b:.2f} mse", {"mode": "budget", "budget": b, "objective": "mse"}))
        if time_slack_db > 0:
            rows.append((f"ARM b={b:.2f} mse, fastest within {time_slack_db:g} dB",
                         {"mode": "budget", "budget": b, "objective": "mse", "time_slack_db": time_slack_db}))
        rows.append((f"ARM b={b:.2f} psnr_sum", {"mode": "budget", "budget": b, "objective": "psnr_sum"}))
        rows.append((f"paper b={b:.2f}", {"mode": "budget", "budget": b, "objective": "psnr_sum",
                                          "interpolate": False}))
        rows.append((f"oracle b={b:.2f}", {"mode": "oracle", "budget": b}))
    rows.append(("eta best", {"mode": "best", "interpolate": False}))
    rows += [(f"eta k={k:g}", {"mode": "eta", "eta": k, "interpolate": False}) for k in ETA_KS]
    return rows


def run_setting(model: ArmSR, lr: np.ndarray, hr: np.ndarray, kw: dict, repeats: int,
                oracle_err: np.ndarray | None, seconds: Callable[[np.ndarray], float] | None = None) -> dict:
    lr_f = lr.astype(np.float32) / 255
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if kw["mode"] == "oracle":
            plan = model.plan(lr, mode="budget", budget=kw["budget"])
            sol = dispatch.min_error_under_budget(oracle_err, model.cost, kw["budget"])
            plan.rungs = sol.rungs
            plan.flops = float(model.cost[sol.rungs].sum())
        elif "time_slack_db" in kw:
            a = model.analyse(lr)
            plan = model.faster_within(a, model.choose(a, mode="budget", budget=kw["budget"], objective="mse"),
                                       seconds, kw["time_slack_db"])
        else:
            plan = model.plan(lr, **kw)
        out = model.run(plan, lr_f)
        times.append(time.perf_counter() - t0)
    sr = np.clip(np.rint(out * 255), 0, 255)
    return {"psnr_rgb": psnr_rgb(sr, hr), "psnr_y": psnr_y(sr, hr), "flops_fraction": plan.flops_fraction,
            "predicted_psnr": plan.predicted_psnr, "seconds": statistics.median(times),
            "rung_counts": plan.rung_counts(len(model.rungs))}


def host_seconds(model: ArmSR, repeats: int = 5) -> Callable[[np.ndarray], float]:
    """Predicted forward seconds of a rung assignment, from this host's timings (the
    server's cost model, calibrated the same way: fixed + per patch, batches up to 64)."""
    cost = CostModel(max_batch=64)
    x = torch.rand(64, 3, tiling.PATCH, tiling.PATCH)
    cost.calibrate_rungs({r.index: (lambda n, k=r.index: model.run_patches(k, x[:n])) for r in model.rungs},
                         (1, 8, 32, 64), repeats)

    return lambda rungs: cost.predict(rung_work(rungs))


def rung_times(model: ArmSR, batch: int = 64, repeats: int = 5) -> dict[str, float]:
    """Median seconds per 32x32 patch at each rung, batched."""
    ms = arm_forward.measure(model, [batch], repeats)
    return {r.name: ms[r.index, batch] / 1000 / batch for r in model.rungs}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--table", type=Path, default=None, help="table JSON to use instead of the one beside the checkpoint")
    ap.add_argument("--images", type=Path, default=None, help="image folder (HR); default: the test split")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per image and setting (median)")
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-slack-db", type=float, default=0.05,
                    help="also run the server's time-aware choice (fastest plan within this many dB; 0: skip)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = ArmSR.from_checkpoint(args.checkpoint, table=args.table)
    images = data.load_folder(args.images) if args.images else data.load_split("test")
    rows = settings(model, tuple(args.budgets), args.time_slack_db)
    seconds = host_seconds(model) if args.time_slack_db > 0 else None
    per_image: dict[str, list[dict]] = {name: [] for name, _ in rows}
    for name_img, hr, lr in images:
        oracle_err = None  # images smaller than a patch have no oracle (no HR for the padding)
        if min(lr.shape[:2]) >= tiling.PATCH:
            pos = tiling.positions(lr.shape[0], lr.shape[1], "full")
            oracle_err = true_patch_errors(model, lr, hr, pos)
        for name, kw in rows:
            if kw["mode"] == "oracle" and oracle_err is None:
                continue
            per_image[name].append(run_setting(model, lr, hr, kw, args.repeats, oracle_err, seconds))
        print(f"  {name_img} done", flush=True)

    summary = []
    for name, kw in rows:
        res = per_image[name]
        if not res:
            continue
        summary.append({"setting": name, **{k: float(np.mean([r[k] for r in res]))
                                            for k in ("psnr_rgb", "psnr_y", "flops_fraction", "predicted_psnr")},
                        "ms_per_image": 1000 * float(np.median([r["seconds"] for r in res])),
                        "rung_share": (np.sum([r["rung_counts"] for r in res], axis=0)
                                       / np.sum([r["rung_counts"] for r in res])).round(3).tolist()})
    full = next(s for s in summary if s["setting"] == model.rungs[model.top].name)
    for s in summary:
        s["drop_vs_full_db"] = full["psnr_rgb"] - s["psnr_rgb"]
        s["time_vs_full"] = s["ms_per_image"] / full["ms_per_image"]
    result = {"checkpoint": str(args.checkpoint), "images": [n for n, _, _ in images],
              "table": model.table.source,
              "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
              "date": date.today().isoformat(), "rows": summary, "seconds_per_patch": rung_times(model)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"\n{model.name} on {len(images)} images ({', '.join(result['images'])}); "
          f"table: {result['table'] or 'manifest'}; {result['machine']}")
    print("| setting | PSNR RGB | PSNR Y | drop vs full (dB) | FLOPs % full | pred. PSNR | ms/image | time vs full | rung share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['setting']} | {s['psnr_rgb']:.3f} | {s['psnr_y']:.3f} | {s['drop_vs_full_db']:+.3f} | "
              f"{100 * s['flops_fraction']:.1f} | {s['predicted_psnr']:.2f} | {s['ms_per_image']:.1f} | "
              f"{s['time_vs_full']:.2f} | {s['rung_share']} |")
    print("\n| rung | FLOPs/patch (official) | measured µs/patch (batch 64) | time vs full | FLOPs vs full |")
    print("|---|---|---|---|---|")
    t = result["seconds_per_patch"]
    for r in model.rungs:
        print(f"| {r.name} | {r.flops_per_patch:,} | {1e6 * t[r.name]:.1f} | {t[r.name] / t[model.rungs[model.top].name]:.2f} | "
              f"{r.flops_per_patch / model.rungs[model.top].flops_per_patch:.2f} |")


if __name__ == "__main__":
    main()
