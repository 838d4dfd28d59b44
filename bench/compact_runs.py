"""DCFF against plain training of the same compact network: held-out top-1 per seed, mean and
spread, and what the compact network costs against its full-width one.

    python -m bench.compact_runs runs/r56 --rounds 7
    python -m bench.compact_runs runs/dcff9k --rounds 7

Reads every run folder under the given roots written by ``models.pssnet.compact`` (a compact
MobileNetV1 variant, or a CIFAR ResNet with ``--arch resnet56``), groups the runs by network,
width and schedule, and prints one table per group: a row per method with test top-1 per seed
(validation in brackets), the mean and the spread (max - min). The accuracies are those the
training command measured on the 5,000 held-out test and validation glyphs and wrote into
each manifest. Then, per group, the compact network against the full-width one (same
layout, every layer at its full width; timed with random weights, which does not change a
dense network's time): MFLOPs, parameters and the median ms per forward at batch 1, 8 and
32, every network timed interleaved in one run on ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from bench.quant import SIZES, timings
from compress.artifact import macs

FORMATS = ("cifar-resnet", "pssnet-dense-variant")


def runs_under(roots: list[Path]) -> list[tuple[Path, dict]]:
    """(folder, manifest) of every DCFF or plain compact run under ``roots``."""
    out = []
    for root in roots:
        for path in sorted(root.rglob("manifest.json")):
            try:
                m = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if m.get("format") in FORMATS and m.get("method") in ("dcff", "plain-compact"):
                out.append((path.parent, m))
    return out


def group_key(m: dict) -> tuple[str, float, int, str]:
    """Network, width, steps and the training's arithmetic: only runs alike in all four compare."""
    arch = f"resnet{m['depth']}" if m["format"] == "cifar-resnet" else "mobilenetv1"
    products = "bf16 autocast" if m["training"].get("bf16_autocast") else "float32"
    return arch, float(m["keep"]), int(m["training"]["steps"]), products


def accuracy_table(runs: list[dict]) -> list[str]:
    """Markdown rows: a method per row, test top-1 per seed (val), mean and spread."""
    seeds = sorted({m["seed"] for m in runs})
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread |",
             "|---" * (len(seeds) + 3) + "|"]
    for method, label in (("dcff", "DCFF (fused, exported)"), ("plain-compact", "plain training, same network")):
        by_seed = {m["seed"]: m["accuracy"] for m in runs if m["method"] == method}
        if not by_seed:
            continue
        cells = [f"{100 * by_seed[s]['test']:.2f} % ({100 * by_seed[s]['val']:.2f})" if s in by_seed else "-"
                 for s in seeds]
        tests = [100 * a["test"] for a in by_seed.values()]
        lines.append(f"| {label} | " + " | ".join(cells) +
                     f" | **{statistics.mean(tests):.2f} %** | {max(tests) - min(tests):.2f} points |")
    return lines


def compact_and_full(folder: Path, manifest: dict, bundle: Path) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """The run's (exported) compact network, a full-width network of the same layout, and the
    input size."""
    if manifest["format"] == "cifar-resnet":
        from models.pssnet import cifar_resnet

        net, _ = cifar_resnet.load(folder)
        return net, cifar_resnet.CifarResNet(net.depth, manifest["num_classes"]).eval(), net.input_size
    from models.pssnet.compact import plain_compact
    from models.pssnet.dense_train import load_variant
    from models.pssnet.serving import PssNetModel

    spec = PssNetModel.from_checkpoint(bundle, int8=False, variants=False).spec
    net, _ = load_variant(folder, spec)
    return net, plain_compact(spec, 1.0).eval(), net.resolution


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+", type=Path, help="folders holding runs of models.pssnet.compact")
    ap.add_argument("--bundle", type=Path, default=Path("models/pssnet/weights/pss-mbv1-glyphs"),
                    help="the PSS-Net bundle a MobileNetV1 run was built on (its architecture)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    found = runs_under(args.roots)
    if not found:
        raise SystemExit(f"no DCFF or plain compact runs under {', '.join(map(str, args.roots))}")
    groups: dict[tuple, list[tuple[Path, dict]]] = defaultdict(list)
    for folder, m in found:
        groups[group_key(m)].append((folder, m))
    for (arch, keep, steps, products), runs in sorted(groups.items()):
        print(f"\n### {arch}, keep {keep}, {steps} steps, trained in {products}\n")
        print("\n".join(accuracy_table([m for _f, m in runs])))
        folder, manifest = runs[0]
        compact, full, size = compact_and_full(folder, manifest, args.bundle)
        nets = {"full width": full, f"keep {keep}": compact}
        ms = timings(nets, torch.randn(max(SIZES), 3, size, size), args.rounds)
        print(f"\n{args.threads} torch thread(s), median of {args.rounds} interleaved rounds\n")
        print("| network | MFLOPs | parameters | " + " | ".join(f"ms b{n}" for n in SIZES) + " |")
        print("|---" * (3 + len(SIZES)) + "|")
        for name, net in nets.items():
            params = sum(p.numel() for p in net.parameters())
            print(f"| {name} | {macs(net, size) / 1e6:.2f} | {params / 1e6:.3f} M | " +
                  " | ".join(f"{ms[name][n]:.2f}" for n in SIZES) + " |")
        speed = {n: ms["full width"][n] / ms[f"keep {keep}"][n] for n in SIZES}
        print("\nfull width / compact: " + ", ".join(f"{speed[n]:.2f}x at batch {n}" for n in SIZES))


if __name__ == "__main__":
    main()
