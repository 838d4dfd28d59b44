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

import copy

import torch

from bench.quant import pssnet_ladder_bench, rung_pairs


def main(argv: list[str] | None = None) -> None:
    args, model, x = pssnet_ladder_bench(__doc__, argv)

    def pair(r):  # a contiguous copy fed NCHW batches, and the served network
        nchw_net = copy.deepcopy(model._nets[r.index]).to(memory_format=torch.contiguous_format)
        return nchw_net, lambda b: model.forward(r.index, b)

    rung_pairs(model.ladder, pair, ("NCHW", "channels-last"), x, args.rounds,
               f"PSS-Net {model.name}, fp32, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
