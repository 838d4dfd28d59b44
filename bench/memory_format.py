"""Why PSS-Net's fp32 rungs are served channels-last: each ladder rung timed in both layouts.

    python -m bench.memory_format [--rounds 7] [--threads 1]

For every rung of the bundled PSS-Net ladder it times the served network (channels-last
weights and batches, what ``PssNetModel.forward`` runs) against a contiguous (NCHW) copy of
the same network fed NCHW batches, at batch 1, 8 and 32, interleaved in a shuffled order
(``bench.quant.timings``), on the held-out test images, and prints the median ms, the
speed-up and the largest logit difference between the two layouts (float rounding only).
oneDNN reorders an NCHW tensor into its blocked layout and back around every convolution;
channels-last is a layout its depth-wise and point-wise kernels read directly.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from bench.quant import SIZES, timings
from service.bundled import bundled


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=256, help="held-out test images the batches are cut from")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from models.glyphs.data import load_split
    from models.pssnet.serving import PssNetModel

    model = PssNetModel.from_checkpoint(bundled("pssnet"), int8=False)
    test = load_split("test", n=args.images)
    x = torch.stack([model.preprocess(img) for img in test.images])
    variants, diffs = {}, {}
    for r in model.ladder:
        served = (lambda i: lambda b: model.forward(i, b))(r.index)
        nchw_net = copy.deepcopy(model._nets[r.index]).to(memory_format=torch.contiguous_format)
        variants[f"{r.name}/nchw"], variants[f"{r.name}/channels-last"] = nchw_net, served
        with torch.inference_mode():
            diffs[r.name] = float((served(x) - nchw_net(x)).abs().max())
    print(f"[memory_format] timing {len(variants)} variants x {len(SIZES)} batch sizes x {args.rounds} rounds",
          file=sys.stderr, flush=True)
    ms = timings(variants, x, args.rounds)
    print(f"PSS-Net {model.name}, fp32, {args.threads} thread(s), median ms per forward of {args.rounds} "
          "interleaved rounds\n")
    print("| rung | " + " | ".join(f"NCHW b{n} | channels-last b{n} | speed-up b{n}" for n in SIZES)
          + " | max logit diff |")
    print("|---|" + "---|---|---|" * len(SIZES) + "---|")
    for r in model.ladder:
        a, b = ms[f"{r.name}/nchw"], ms[f"{r.name}/channels-last"]
        cells = " | ".join(f"{a[n]:.2f} | {b[n]:.2f} | {a[n] / b[n]:.2f}x" for n in SIZES)
        print(f"| {r.name} | {cells} | {diffs[r.name]:.1e} |")


if __name__ == "__main__":
    main()
