"""torch against ONNX Runtime on each rung of the bundled PSS-Net ladder, and what the server's
``engine=auto`` would choose.

    pip install 'anytime-serve[onnx]'
    python -m bench.engines [--rounds 9] [--threads 1]

For every ladder rung (the fp32 rungs a planner picks) it times the network as the server
runs it on torch (channels-last) and its ONNX Runtime session at batch 1, 8 and 32,
interleaved in a shuffled order (``bench.quant.timings``) on held-out test glyphs, and prints
the median ms, the speed-up and the largest logit difference.  Then it runs the server's own
choice (``PssNetModel.choose_engines("auto")``, timed separately, at 1, 2, 4, 8, 16 and 32)
and prints the engine it picked per size (OpenVINO too where installed: ``pip install
'anytime-serve[openvino]'``; ``python -m bench.quant --family pssnet`` times the int8 rungs on
the engines the server picks).
"""

from __future__ import annotations

import copy

import torch

from bench.quant import pssnet_ladder_bench, rung_pairs
from models.common import engines


def main(argv: list[str] | None = None) -> None:
    engines.require()
    args, model, x = pssnet_ladder_bench(__doc__, argv)

    def pair(r):  # the served torch network, and its ONNX Runtime session
        contiguous = copy.deepcopy(model._nets[r.index]).to(memory_format=torch.contiguous_format)
        return (lambda b: model.forward(r.index, b)), engines.OrtNetwork(contiguous, x[:1], args.threads)

    rung_pairs(model.ladder, pair, ("torch", "ONNX Runtime"), x, args.rounds,
               f"PSS-Net {model.name}, fp32, {args.threads} thread(s)")
    choices = model.choose_engines("auto", sizes=(1, 2, 4, 8, 16, 32))
    print("\nWhat engine=auto chose (its own timing, 5 interleaved rounds):\n")
    sizes = next(iter(choices.values())).sizes
    print("| rung | " + " | ".join(f"b{n}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for i, choice in choices.items():
        print(f"| {model.rungs[i].name} | " + " | ".join(choice.engines) + " |")


if __name__ == "__main__":
    main()
