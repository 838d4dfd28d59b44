"""How much an ARM time budget's real quality depends on the start-up timing, per planner.

    python -m bench.sr_time_plans --checkpoint PATH [--images DIR] [--calibrations 5] [--budgets 0.6 0.65 0.7]

A time budget is a share of full width's *predicted* seconds, so the plan an image gets
depends on how the cost model timed the rungs at start-up, and on a shared host that timing
varies from one start-up to the next.  This command calibrates the rungs as the server does
(``CostModel.calibrate_rungs``: interleaved, batch sizes 1, 8, 32 and 128, median of
``--repeats`` rounds) ``--calibrations`` times, and for each calibration plans every image
at every budget with the time-budget dispatch (``dispatch.SecondsDispatch``) in two forms,
its sets of rungs searched as single rungs plus the joint knapsack (the planner before pairs
were added) and as single rungs, pairs and the joint knapsack (the served planner), runs the
plans and measures RGB PSNR against the HR photo (4 px crop).  It prints, per budget and
calibration, each planner's mean PSNR drop against full width and the predicted time of
each rung's 25-patch pass relative to full width's, so the rows show which rungs fitted, and
the time each planner takes to plan one image.  Quality only: the plans' times are
predictions; ``bench.sr_latency`` measures them through a server.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from models.arm import data, dispatch
from models.arm.metrics import psnr_rgb
from models.arm.pipeline import ArmSR
from service.costmodel import CostModel

PLANNERS = {"singles + joint": 1, "singles + pairs + joint (served)": 2}


def calibrated_times(model: ArmSR, repeats: int, max_batch: int = 128) -> dispatch.RungTimes:
    """The rungs' fixed and per-patch seconds, timed as the server times them at start-up."""
    cost = CostModel(max_batch)
    x = torch.rand(max_batch, 3, 32, 32, device=model.device)
    with torch.inference_mode():
        cost.calibrate_rungs({r.index: (lambda n, k=r.index: model.run_patches(k, x[:n])) for r in model.rungs},
                             (1, 8, 32, max_batch), repeats)
    lines = [cost.rungs[r.index] for r in model.rungs]
    return dispatch.RungTimes(np.array([c.fixed_s for c in lines]), np.array([c.per_unit_s for c in lines]), max_batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--images", type=Path, help="HR folder (default: the test split)")
    ap.add_argument("--calibrations", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="rounds per calibration (the server's default)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.65, 0.7])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-bf16", action="store_true", help="fp32 rungs only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = ArmSR.from_checkpoint(args.checkpoint, device="cpu", int8=False, bf16=not args.no_bf16)
    images = data.load_folder(args.images) if args.images else data.load_split("test")
    top = model.top

    def psnr_at(rungs: np.ndarray, a, hr: np.ndarray, lr: np.ndarray) -> float:
        """RGB PSNR of the 8-bit output with ``rungs`` per patch."""
        canvas = model.run(model._plan(a, rungs, None, {}), lr.astype(np.float32) / 255)
        return psnr_rgb(np.clip(np.rint(canvas * 255), 0, 255), hr)

    work = []
    for name, hr, lr in images:
        a = model.analyse(lr, "full")
        work.append((name, hr, lr, a, psnr_at(np.full(len(a.positions), top), a, hr, lr)))

    def drop(rungs: np.ndarray, item: tuple) -> float:
        _name, hr, lr, a, full_psnr = item
        return full_psnr - psnr_at(rungs, a, hr, lr)

    names = [r.name for r in model.rungs]
    print(f"{Path(args.checkpoint).name}, {len(images)} images, {date.today()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    print("\n| calibration | predicted 25-patch pass / w56 | budget | " + " | ".join(PLANNERS) + " |")
    print("|---|---|---|" + "---|" * len(PLANNERS))
    means: dict[tuple[float, str], list[float]] = {}
    plan_ms: dict[str, list[float]] = {}
    for c in range(args.calibrations):
        times = calibrated_times(model, args.repeats)
        per_pass = [times.seconds(np.full(25, k)) for k in range(len(names))]
        relative = ", ".join(f"{n} {t / per_pass[top]:.2f}" for n, t in zip(names, per_pass) if n != names[top])
        for b in args.budgets:
            cells = []
            for planner, pair_rungs in PLANNERS.items():
                drops = []
                for item in work:
                    a = item[3]
                    limit = b * times.seconds(np.full(len(a.positions), top))
                    t0 = time.perf_counter()
                    rungs = dispatch.SecondsDispatch(a.pred_mse, times, joint_set_rungs=pair_rungs).solve(limit)
                    plan_ms.setdefault(planner, []).append(1000 * (time.perf_counter() - t0))
                    drops.append(drop(rungs, item))
                means.setdefault((b, planner), []).append(float(np.mean(drops)))
                cells.append(f"{np.mean(drops):.3f} dB")
            print(f"| {c} | {relative} | {b:.2f} | " + " | ".join(cells) + " |", flush=True)
    print("\n| budget | " + " | ".join(f"{p}: mean [min, max] over calibrations" for p in PLANNERS) + " |")
    print("|---|" + "---|" * len(PLANNERS))
    for b in args.budgets:
        print(f"| {b:.2f} | " + " | ".join(
            f"{np.mean(v):.3f} [{min(v):.3f}, {max(v):.3f}] dB" for v in (means[(b, p)] for p in PLANNERS)) + " |")
    print("| ms to plan an image at one budget, median | " + " | ".join(
        f"{np.median(plan_ms[p]):.2f} ms" for p in PLANNERS) + " |")


if __name__ == "__main__":
    main()
