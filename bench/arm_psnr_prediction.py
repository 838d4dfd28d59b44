"""How well does an ARM plan predict the PSNR of the image it produces?

    python -m bench.arm_psnr_prediction [--checkpoint PATH] [--images DIR | --synthetic N]
                                        [--budgets 0.3,0.65,1.0,bicubic] [--per-image] [--json OUT]

For every held-out image (default: the test split, the scikit-image photos that
``models.arm.evaluate`` scores; never used for training or the table) and every setting
(an ARM FLOPs budget with the ``mse`` objective, or ``bicubic`` = rung 0 everywhere) it
plans, runs and stitches the image as the server does (full tiling, uint8 output) and
compares three numbers:

* measured: ``metrics.psnr_rgb`` of the output against the ground truth (RGB, 4 px crop),
* old header: ``Plan.predicted_patch_psnr``, what ``X-Anytime-Predicted-PSNR`` carried
  (the PSNR of the unweighted mean of the patches' predicted MSE),
* new: ``Plan.predicted_image_psnr`` (the patches' predicted MSE weighted by the scored
  output pixels each stands for).

Errors are predicted minus measured (positive: the prediction is optimistic).  A fourth
column, ``oracle``, feeds the same pixel weighting the patches' *measured* MSE (each SR
patch alone, 8-bit, 4 px crop: the table's own measure) instead of the table's: its error
is what the weighting itself gets wrong, the rest of the new error is the table's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from models.arm import data, tiling
from models.arm.metrics import patch_mse, psnr_rgb
from models.arm.pipeline import ArmSR, Plan
from models.arm.table import mse_to_psnr
from models.common.progress import progress
from models.common.synthetic import synthetic_photo

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "arm" / "weights" / "arm-fsrcnn" / "model.safetensors"


def parse_settings(text: str) -> list[tuple[str, dict]]:
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item == "bicubic":
            out.append(("bicubic", {"mode": "fixed", "rung": 0}))
        else:
            b = float(item)
            if not 0.0 <= b <= 1.0:
                raise argparse.ArgumentTypeError(f"budget {b} is not in [0, 1]")
            out.append((f"budget {b:g}", {"mode": "budget", "budget": b, "objective": "mse"}))
    if not out:
        raise argparse.ArgumentTypeError("no settings given")
    return out


def synthetic_images(n: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, HR, LR) from ``synthetic_photo`` HR images, LR by MATLAB bicubic (as the splits)."""
    from models.common.matlab_resize import downscale_x4_uint8

    sizes = [(480, 640), (400, 400), (512, 384), (320, 560)]
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        hr = data.modcrop(synthetic_photo(h, w, seed=100 + i))
        out.append((f"synthetic-{i}", hr, downscale_x4_uint8(hr)))
    return out


def measure(model: ArmSR, lr: np.ndarray, hr: np.ndarray, kw: dict) -> dict:
    """Plan, run and stitch as ``ArmSR.upscale`` does; the three predictions and the truth."""
    plan: Plan = model.plan(lr, **kw)
    lr_f = lr.astype(np.float32) / 255.0
    groups = model.prepare(plan, lr_f)
    outputs = [torch.cat([model.run_patches(g.rung, g.patches[i:i + model.max_batch])
                          for i in range(0, len(g.patches), model.max_batch)]) for g in groups]
    canvas = model.assemble(plan, lr_f, groups, outputs)
    sr = np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8)
    oracle = float("nan")
    if min(lr.shape[:2]) >= tiling.PATCH:  # (padded images have no HR patch to compare with)
        measured_mse = np.empty(len(plan.positions))
        for g, out in zip(groups, outputs):
            hr_p = tiling.extract(hr, plan.positions[g.index] * tiling.SCALE, tiling.PATCH * tiling.SCALE)
            sr8 = torch.round(out * 255).permute(0, 2, 3, 1).cpu().numpy()
            measured_mse[g.index] = patch_mse(sr8, hr_p)
        w, fw = plan.pixel_weight, plan.fill_weight
        oracle = float(mse_to_psnr((w @ measured_mse + fw @ measured_mse) / (w.sum() + fw.sum())))
    return {"measured": psnr_rgb(sr, hr), "old": plan.predicted_patch_psnr, "new": plan.predicted_image_psnr,
            "oracle": oracle, "flops_fraction": plan.flops_fraction, "patches": len(plan.positions)}


def summarise(rows: list[dict]) -> dict:
    def errs(key: str) -> dict:
        e = np.array([r[key] - r["measured"] for r in rows], dtype=np.float64)
        e = e[np.isfinite(e)]
        if not len(e):
            return {"mean": float("nan"), "mean_abs": float("nan"), "max_abs": float("nan")}
        return {"mean": float(e.mean()), "mean_abs": float(np.abs(e).mean()), "max_abs": float(np.abs(e).max())}

    mean = lambda k: float(np.nanmean([r[k] for r in rows]))  # noqa: E731
    return {"images": len(rows), "flops_fraction": mean("flops_fraction"), "measured": mean("measured"),
            "old": mean("old"), "new": mean("new"), "oracle": mean("oracle"),
            "old_err": errs("old"), "new_err": errs("new"), "oracle_err": errs("oracle")}


def print_tables(summary: dict[str, dict], per_image: dict[str, list[dict]] | None) -> None:
    head = ("| setting | images | FLOPs | measured PSNR | old header (patch) | new (image) "
            "| old err mean / mean abs / max abs | new err mean / mean abs / max abs | oracle err mean / max abs |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, s in summary.items():
        e = lambda d: f"{d['mean']:+.2f} / {d['mean_abs']:.2f} / {d['max_abs']:.2f}"  # noqa: E731
        print(f"| {name} | {s['images']} | {100 * s['flops_fraction']:.1f}% | {s['measured']:.2f} | {s['old']:.2f} "
              f"| {s['new']:.2f} | {e(s['old_err'])} | {e(s['new_err'])} "
              f"| {s['oracle_err']['mean']:+.2f} / {s['oracle_err']['max_abs']:.2f} |")
    if per_image:
        print()
        print("| setting | image | patches | measured | old | new | oracle | new - measured |")
        print("|---|---|---|---|---|---|---|---|")
        for name, rows in per_image.items():
            for r in rows:
                print(f"| {name} | {r['image']} | {r['patches']} | {r['measured']:.2f} | {r['old']:.2f} "
                      f"| {r['new']:.2f} | {r['oracle']:.2f} | {r['new'] - r['measured']:+.2f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.arm_psnr_prediction", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=BUNDLED, help="default: the bundled arm-fsrcnn")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--images", type=Path, default=None,
                     help="a folder of HR images (default: the held-out test split)")
    src.add_argument("--synthetic", type=int, default=0, metavar="N",
                     help="N synthetic photos (models/common/synthetic.py) instead; a last resort")
    ap.add_argument("--budgets", type=parse_settings, default=parse_settings("0.3,0.65,1.0,bicubic"),
                    help="comma-separated FLOPs budgets in [0, 1] and/or 'bicubic' (default: 0.3,0.65,1.0,bicubic)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--per-image", action="store_true", help="also print every image's numbers")
    ap.add_argument("--json", type=Path, default=None, help="write the results there too")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = ArmSR.from_checkpoint(args.checkpoint)
    if args.synthetic:
        images, source = synthetic_images(args.synthetic), f"{args.synthetic} synthetic photos"
    elif args.images:
        images, source = data.load_folder(args.images), str(args.images)
    else:
        images = data.load_split("test")
        source = "test split: " + ", ".join(n for n, _, _ in images)
    command = "python -m bench.arm_psnr_prediction " + shlex.join(sys.argv[1:] if argv is None else argv)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    print(f"# {command}\n# {stamp}; {model.name}; images: {source}; threads {args.threads}\n", flush=True)

    t0 = time.perf_counter()
    per: dict[str, list[dict]] = {name: [] for name, _ in args.budgets}
    for img_name, hr, lr in progress(images, desc="images", log_interval=5):
        for name, kw in args.budgets:
            per[name].append({"image": img_name, **measure(model, lr, hr, kw)})
    summary = {name: summarise(rows) for name, rows in per.items()}
    print_tables(summary, per if args.per_image else None)
    allrows = [r for rows in per.values() for r in rows]
    overall = summarise(allrows)
    print(f"\nall settings ({len(allrows)} image x setting pairs): old header {overall['old_err']['mean']:+.2f} dB "
          f"mean signed ({overall['old_err']['mean_abs']:.2f} mean abs), new {overall['new_err']['mean']:+.2f} dB "
          f"({overall['new_err']['mean_abs']:.2f} mean abs), oracle weighting {overall['oracle_err']['mean']:+.2f} dB; "
          f"{time.perf_counter() - t0:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "date": stamp, "images": source,
                                         "checkpoint": str(args.checkpoint), "summary": summary,
                                         "all": overall, "per_image": per}, indent=1) + "\n")
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
