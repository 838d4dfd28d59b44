"""torch against ONNX Runtime on each rung of the bundled PSS-Net ladder, and what the server's
``engine=auto`` would choose.

    pip install 'anytime-serve[onnx]'
    python -m bench.engines [--rounds 9] [--threads 1]

For every ladder rung (the fp32 rungs a planner picks) it times the network as the server
runs it on torch (channels-last) and its ONNX Runtime session at batch 1, 8 and 32,
interleaved in a shuffled order (``bench.quant.timings``) on held-out test glyphs, and prints
the median ms, the speed-up and the largest logit difference.  Then it runs the server's own
choice (``PssNetModel.choose_engines("auto")``, timed separately, at 1, 2, 4, 8, 16 and 32)
and prints the engine it picked per size.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from bench.quant import SIZES, timings
from models.common import ort_engine
from service.bundled import bundled


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=256, help="held-out test images the batches are cut from")
    args = ap.parse_args(argv)
    ort_engine.require()
    torch.set_num_threads(args.threads)
    from models.glyphs.data import load_split
    from models.pssnet.serving import PssNetModel

    model = PssNetModel.from_checkpoint(bundled("pssnet"), int8=False)
    test = load_split("test", n=args.images)
    x = torch.stack([model.preprocess(img) for img in test.images])
    variants, diffs = {}, {}
    for r in model.ladder:
        on_torch = (lambda i: lambda b: model.forward(i, b))(r.index)
        contiguous = copy.deepcopy(model._nets[r.index]).to(memory_format=torch.contiguous_format)
        on_ort = ort_engine.OrtNetwork(contiguous, x[:1], args.threads)
        variants[f"{r.name}/torch"], variants[f"{r.name}/onnxruntime"] = on_torch, on_ort
        with torch.inference_mode():
            diffs[r.name] = float((on_torch(x) - on_ort(x)).abs().max())
    print(f"[engines] timing {len(variants)} variants x {len(SIZES)} batch sizes x {args.rounds} rounds",
          file=sys.stderr, flush=True)
    ms = timings(variants, x, args.rounds)
    print(f"PSS-Net {model.name}, fp32, {args.threads} thread(s), median ms per forward of {args.rounds} "
          "interleaved rounds\n")
    print("| rung | " + " | ".join(f"torch b{n} | ONNX Runtime b{n} | speed-up b{n}" for n in SIZES)
          + " | max logit diff |")
    print("|---|" + "---|---|---|" * len(SIZES) + "---|")
    for r in model.ladder:
        a, b = ms[f"{r.name}/torch"], ms[f"{r.name}/onnxruntime"]
        cells = " | ".join(f"{a[n]:.2f} | {b[n]:.2f} | {a[n] / b[n]:.2f}x" for n in SIZES)
        print(f"| {r.name} | {cells} | {diffs[r.name]:.1e} |")
    choices = model.choose_engines("auto", sizes=(1, 2, 4, 8, 16, 32))
    print("\nWhat engine=auto chose (its own timing, 5 interleaved rounds):\n")
    sizes = next(iter(choices.values())).sizes
    print("| rung | " + " | ".join(f"b{n}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for i, choice in choices.items():
        print(f"| {model.rungs[i].name} | " + " | ".join(choice.engines) + " |")


if __name__ == "__main__":
    main()
