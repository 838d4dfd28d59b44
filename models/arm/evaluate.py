"""Measure an ARM checkpoint on held-out photos and record the metrics in its manifest.

    python -m models.arm.evaluate --checkpoint models/arm/weights/arm-fsrcnn/model.safetensors

PSNR (RGB with a 4 px crop, ARM's number, and Y) on the test split (scikit-image photos,
never seen in training or table building), for bicubic, each fixed width and ARM at a
few budgets; averaged over images as the paper does.  ``--images DIR`` evaluates on
another folder; ``--no-write`` only prints.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch

from models.arm import data
from models.arm.metrics import psnr_rgb, psnr_y
from models.arm.pipeline import ArmSR
from models.common.progress import progress

BUDGETS = (0.5, 0.65, 0.8)


def evaluate(model: ArmSR, images: list[tuple[str, np.ndarray, np.ndarray]]) -> dict[str, dict[str, float]]:
    settings: dict[str, dict] = {r.name: {"mode": "fixed", "rung": r.index} for r in model.rungs}
    settings.update({f"budget_{b}": {"mode": "budget", "budget": b} for b in BUDGETS})
    acc: dict[str, list[tuple[float, float, float]]] = {k: [] for k in settings}
    for _name, hr, lr in progress(images, desc="evaluate", log_interval=10):
        for key, kw in settings.items():
            sr, plan = model.upscale(lr, **kw)
            acc[key].append((psnr_rgb(sr, hr), psnr_y(sr, hr), plan.flops_fraction))
    return {k: {"psnr_rgb": round(float(np.mean([v[0] for v in vals])), 4),
                "psnr_y": round(float(np.mean([v[1] for v in vals])), 4),
                "flops_fraction": round(float(np.mean([v[2] for v in vals])), 4)} for k, vals in acc.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--images", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = ArmSR.from_checkpoint(args.checkpoint)
    images = data.load_folder(args.images) if args.images else data.load_split("test")
    metrics = evaluate(model, images)
    for k, v in metrics.items():
        print(f"{k:>12}: PSNR RGB {v['psnr_rgb']:.3f}  Y {v['psnr_y']:.3f}  FLOPs {100 * v['flops_fraction']:.1f}%")
    manifest = args.checkpoint.with_name("manifest.json")
    if args.no_write or not manifest.exists():
        return
    m = json.loads(manifest.read_text())
    m["metrics"] = {
        "command": "python -m models.arm.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": date.today().isoformat(),
        "images": str(args.images) if args.images else "test split: " + ", ".join(p.name for p in data.split("test")),
        "protocol": "HR mod-4 crop, LR = MATLAB bicubic x1/4; full tiling; uint8 output; PSNR with a 4 px crop, "
                    "mean over images",
        "results": metrics,
    }
    manifest.write_text(json.dumps(m, indent=2) + "\n")
    print(f"metrics written into {manifest}")


if __name__ == "__main__":
    main()
