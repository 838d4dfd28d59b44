"""Build the Edge->PSNR table of any ARM checkpoint from a validation image set.

    python -m models.arm.build_table --checkpoint runs/arm-fsrcnn/model.safetensors
    python -m models.arm.build_table --checkpoint arm-carn.pth --images my_val_photos/

For every LR patch (32x32, stride ``--step``) of the validation images it computes the
edge score and, for bicubic and each width, the 8-bit SR patch's PSNR and MSE against
the HR patch (4 px border crop), as ARM does; then it bins by edge score (30 equal
bins) and stores the per-bin mean PSNR *and* mean MSE.  Rung 0 is measured with the
same bicubic the server runs.  Validation images only: never the training photos.

The table goes into ``manifest.json`` when the checkpoint has one (our models), else to
``<checkpoint stem>.table.json`` beside it, or to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from models.arm import data, tiling
from models.arm.edge import edge_scores
from models.arm.metrics import mse_to_db, patch_mse
from models.arm.pipeline import ArmSR
from models.arm.table import EdgeTable
from models.common.progress import progress


def patch_pairs(images: Iterable[tuple[str, np.ndarray, np.ndarray]],
                step: int) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
    """Per image: its LR patches (N, 32, 32, 3) uint8 at stride ``step``, the HR patches they
    map to (N, 128, 128, 3), and the LR patches as a float NCHW batch in [0, 1] (images
    smaller than a patch give none)."""
    for _name, hr, lr in images:
        if min(lr.shape[:2]) < tiling.PATCH:
            continue
        pos = tiling.positions(lr.shape[0], lr.shape[1], "full", step=step)
        lr_p = tiling.extract(lr, pos)
        hr_p = tiling.extract(hr, pos * tiling.SCALE, tiling.PATCH * tiling.SCALE)
        yield lr_p, hr_p, torch.from_numpy(np.ascontiguousarray(lr_p.transpose(0, 3, 1, 2), dtype=np.float32) / 255)


def patch_errors(runs: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                 images: Iterable[tuple[str, np.ndarray, np.ndarray]], step: int,
                 batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(scores (N,), mse (N, len(runs))) over every patch of ``images`` at stride ``step``:
    each run maps a float NCHW batch in [0, 1] to its SR, which is clamped, rounded to 8 bits
    and compared with the HR patch as the table measures."""
    scores, mses = [], []
    for lr_p, hr_p, x in patch_pairs(images, step):
        per_run = []
        for run in runs:
            with torch.inference_mode():
                sr = torch.cat([run(x[i:i + batch]).clamp(0, 1) for i in range(0, len(x), batch)])
            per_run.append(patch_mse(torch.round(sr * 255).permute(0, 2, 3, 1).numpy(), hr_p))
        scores.append(edge_scores(lr_p))
        mses.append(np.stack(per_run, axis=1))
    return np.concatenate(scores), np.concatenate(mses)


def patch_measurements(model: ArmSR, images: list[tuple[str, np.ndarray, np.ndarray]],
                       step: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores (N,), mse (N, R)) of every rung of ``model`` over all validation patches."""
    runs = [functools.partial(model.run_patches, r) for r in range(len(model.rungs))]
    return patch_errors(runs, progress(images, desc="table", log_interval=5), step)


def build(model: ArmSR, images: list[tuple[str, np.ndarray, np.ndarray]], step: int, bins: int,
          source: str) -> EdgeTable:
    scores, mse = patch_measurements(model, images, step)
    psnr = np.vectorize(mse_to_db)(mse)
    return EdgeTable.build(scores, psnr, mse, model.cost, bins=bins, source=source,
                           meta={"patches": int(len(scores)), "step": step, "images": [n for n, _, _ in images]})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--backbone", default=None, help="default: from the manifest or the checkpoint keys")
    ap.add_argument("--images", type=Path, default=None, help="validation image folder (default: our val split)")
    ap.add_argument("--step", type=int, default=8, help="LR stride between patches (ARM uses 28)")
    ap.add_argument("--bins", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = ArmSR.from_checkpoint(args.checkpoint, backbone=args.backbone, require_table=False)
    images = data.load_folder(args.images) if args.images else data.load_split("val")
    source = str(args.images) if args.images else "val split: " + ", ".join(p.name for p in data.split("val"))
    table = build(model, images, args.step, args.bins, source)
    print(f"{table.meta['patches']} patches; per-bin counts {np.asarray(table.counts, dtype=int).tolist()}")
    for r, rung in enumerate(model.rungs):
        print(f"  {rung.name:>8}: " + " ".join(f"{v:5.1f}" for v in table.psnr[r]))

    manifest = args.checkpoint.with_name("manifest.json")
    if args.out is None and manifest.exists():
        m = json.loads(manifest.read_text())
        m["table"] = table.to_dict()
        manifest.write_text(json.dumps(m, indent=2) + "\n")
        print(f"table written into {manifest}")
    else:
        out = args.out or args.checkpoint.with_suffix(".table.json")
        out.write_text(json.dumps(table.to_dict(), indent=1) + "\n")
        print(f"table written to {out}")


if __name__ == "__main__":
    main()
