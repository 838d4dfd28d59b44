"""Milliseconds per forward pass of each ARM rung at each batch size, in this process.

    python -m bench.arm_forward --checkpoint PATH [--sizes 1 8 25 128] [--rounds 15]
                                [--malloc default|keep] [--threads 2] [--per-layer N]

Every round runs every (rung, batch size) once, in the same order as the server meets
them (small and large batches mixed), and the table gives the median over rounds, so
slow drifts of a shared machine spread over every cell.  ``--malloc keep`` applies
``service.memory.keep_freed_memory`` first (what the server does by default); compare it
with ``default`` to see what glibc's page-returning costs on this host.

``--per-layer N`` adds a second table: ms per leaf layer of every subnet for one batch of N
patches (forward hooks around each leaf; the sum is a little below the whole pass, which also
pays the module calls between them).  It shows which layers shrink with the width and which
do not: on FSRCNN the four 12-channel mapping convolutions cost the same at every width.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from models.arm.pipeline import ArmSR
from service.memory import keep_freed_memory


def measure(model: ArmSR, sizes: list[int], rounds: int) -> dict[tuple[int, int], float]:
    x = torch.rand(max(sizes), 3, 32, 32)
    times: dict[tuple[int, int], list[float]] = {}
    for rnd in range(rounds + 1):  # round 0 warms up (primitive creation), untimed
        for rung in range(len(model.rungs)):
            for n in sizes:
                t0 = time.perf_counter()
                model.run_patches(rung, x[:n])
                if rnd:
                    times.setdefault((rung, n), []).append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def per_layer(model: ArmSR, n: int, rounds: int) -> tuple[list[str], dict[int, list[float]]]:
    """Median ms per leaf module (in call order) of each subnet, for a batch of ``n`` patches."""
    x = torch.rand(n, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    names: list[str] = []
    table: dict[int, list[float]] = {}
    for rung, net in enumerate(model.subnets, start=1):
        spans: dict[str, list[float]] = {}
        start: dict[str, float] = {}
        hooks = []
        for name, mod in net.named_modules():
            if any(True for _ in mod.children()):
                continue
            hooks.append(mod.register_forward_pre_hook(lambda _m, _i, k=name: start.__setitem__(k, time.perf_counter())))
            hooks.append(mod.register_forward_hook(
                lambda _m, _i, _o, k=name: spans.setdefault(k, []).append(time.perf_counter() - start[k])))
        with torch.no_grad():
            net(x)  # warm-up (primitive creation), untimed; it also gives the call order
            order = list(spans)
            spans.clear()
            for _ in range(rounds):
                net(x)
        for h in hooks:
            h.remove()
        names = names or order
        table[rung] = [1000 * statistics.median(spans[k]) for k in order]
    return names, table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 8, 25, 32, 64, 128])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--malloc", choices=("default", "keep"), default="keep")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-layer", type=int, default=None, metavar="N",
                    help="also print ms per leaf layer of every subnet for a batch of N patches")
    args = ap.parse_args(argv)
    if min(args.sizes) < 1:
        ap.error("batch sizes must be >= 1")
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.malloc == "keep" else False
    model = ArmSR.from_checkpoint(args.checkpoint)
    ms = measure(model, args.sizes, args.rounds)
    print(f"{model.name}, {args.threads} threads, malloc {args.malloc} (in effect: {kept}), "
          f"median of {args.rounds} rounds, ms per forward pass")
    print("| rung | " + " | ".join(f"n={n}" for n in args.sizes) + " | ms/patch at the largest |")
    print("|---|" + "---|" * (len(args.sizes) + 1))
    for r in model.rungs:
        cells = " | ".join(f"{ms[r.index, n]:.2f}" for n in args.sizes)
        print(f"| {r.name} | {cells} | {ms[r.index, max(args.sizes)] / max(args.sizes):.3f} |")
    if args.per_layer:
        names, table = per_layer(model, args.per_layer, args.rounds)
        print(f"\nms per leaf layer, batch of {args.per_layer} patches (median of {args.rounds} rounds)")
        print("| rung | " + " | ".join(names) + " | sum |")
        print("|---|" + "---|" * (len(names) + 1))
        for r in model.rungs[1:]:
            row = table[r.index]
            print(f"| {r.name} | " + " | ".join(f"{v:.2f}" for v in row) + f" | {sum(row):.2f} |")


if __name__ == "__main__":
    main()
