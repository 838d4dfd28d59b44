"""Turn an official PSS-Net checkpoint into our bundle, once, offline.

    python -m models.pssnet.export --checkpoint checkpoint_249.pt --calib-dir /data/imagenet/train \\
        --out models/pssnet/weights/pss-mbv1-f [--class-names synsets.txt]

Each retained subnet (every pool's top-1 cfg, max_net, min_net) is recalibrated on
``--calib-batches`` x ``--calib-batch-size`` training images with the official training
transform (the official recalibration uses 9 batches of 1024), and the supernet weights
plus the per-subnet statistics are written as our bundle, which the server then loads
without any images.  Accuracy is left unset: it has to be measured on ImageNet val, which
this command does not do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.pssnet.serving import PssNetModel


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--calib-dir", type=Path, required=True, help="training images (searched recursively)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--class-names", type=Path, default=None, help="one class name per line, in label order")
    ap.add_argument("--calib-batches", type=int, default=9)
    ap.add_argument("--calib-batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = PssNetModel.from_checkpoint(args.checkpoint, class_names=args.class_names, calibration=args.calib_dir,
                                        calib_batches=args.calib_batches, calib_batch_size=args.calib_batch_size)
    path = model.export_bundle(args.out)
    print(f"wrote {path.parent}: {len(model.rungs)} rungs "
          + ", ".join(f"{r.name} {r.flops:.1f}M" for r in model.rungs))


if __name__ == "__main__":
    main()
