"""Accuracy, FLOPs and wall-clock per rung (PSS-Net) or per eta (CF-ViT) on the held-out split.

    python -m bench.cls_tradeoff --checkpoint models/pssnet/weights/<name>/model.safetensors [--json]
    python -m bench.cls_tradeoff --checkpoint models/cfvit/weights/<name>/model.safetensors [--json]

The family is read from the manifest beside the checkpoint (or the path). CF-ViT goes to
``bench.cfvit_tradeoff`` (the real early-exit path per eta: exit rate, MACs spent, top-1,
wall-clock at batch 1 and 32). PSS-Net runs every retained subnet in its served form
(dense, BN folded) through ``PssNetModel.preprocess`` and ``forward`` on the test split:
top-1, FLOPs (and as a fraction of the largest), parameters, and the median wall-clock
per image at batch 1 and per batch of 32, interleaved over rungs so that load from other
processes spreads over all rows. One torch thread by default.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def family_of(checkpoint: Path) -> str:
    manifest = checkpoint.with_name("manifest.json") if checkpoint.is_file() else checkpoint / "manifest.json"
    if manifest.exists():
        fam = json.loads(manifest.read_text()).get("family")
        if fam in ("pssnet", "cfvit"):
            return fam
    for fam in ("pssnet", "cfvit"):
        if fam in checkpoint.parts:
            return fam
    raise SystemExit(f"cannot tell the family of {checkpoint}: put 'family' in its manifest.json")


def pssnet_rows(checkpoint: Path, n1: int, rounds: int) -> dict:
    from models.glyphs.data import load_split
    from models.pssnet.serving import PssNetModel

    model = PssNetModel.from_checkpoint(checkpoint)
    test = load_split("test")
    x = torch.stack([model.preprocess(img) for img in test.images])
    y = torch.from_numpy(test.labels)
    ladder = model.ladder
    top = max(r.flops for r in ladder)
    rows = {r.index: {"rung": r.name, "flops_m": r.flops, "flops_fraction": r.flops / top, "params": r.params,
                      "resolution": r.resolution, "val_top1": r.val_accuracy, "on_ladder": r in ladder}
            for r in model.rungs}
    with torch.inference_mode():
        for r in model.rungs:
            pred = torch.cat([model.forward(r.index, x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
            rows[r.index]["top1"] = float((pred == y).float().mean())
        t1: dict[int, list[float]] = {i: [] for i in rows}
        t32: dict[int, list[float]] = {i: [] for i in rows}
        order = list(rows)
        for _ in range(rounds):
            random.shuffle(order)
            for i in order:
                for k in range(n1):
                    t0 = time.perf_counter()
                    model.forward(i, x[k:k + 1])
                    t1[i].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                model.forward(i, x[:32])
                t32[i].append(time.perf_counter() - t0)
    for i, row in rows.items():
        row["ms_batch1"] = 1000 * statistics.median(t1[i])
        row["ms_batch32"] = 1000 * statistics.median(t32[i])
    return {"model": model.name, "family": "pssnet", "test_images": len(y),
            "rows": sorted(rows.values(), key=lambda r: r["flops_m"])}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n1", type=int, default=50, help="images timed one by one per rung and round (PSS-Net)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args, rest = ap.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(0)
    np.random.seed(0)
    if family_of(args.checkpoint) == "cfvit":
        from bench import cfvit_tradeoff

        cfvit_tradeoff.main(["--checkpoint", str(args.checkpoint), *rest])
        return
    report = pssnet_rows(args.checkpoint, args.n1, args.rounds)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['model']} on {report['test_images']} held-out test images, {args.threads} torch thread(s); "
          "'ladder': the rungs the planner climbs (each measurably better on val than every cheaper one); "
          "FLOPs relative to the largest ladder rung\n")
    print("| rung | ladder | resolution | MFLOPs | FLOPs vs largest | params | val top-1 | test top-1 "
          "| ms/image (batch 1) | ms/batch of 32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        val = f"{100 * r['val_top1']:.2f}%" if r["val_top1"] is not None else "-"
        print(f"| {r['rung']} | {'yes' if r['on_ladder'] else 'no'} | {r['resolution']} | {r['flops_m']:.2f} | "
              f"{r['flops_fraction']:.3f} | {r['params']:,} | {val} | {100 * r['top1']:.2f}% | {r['ms_batch1']:.2f} | "
              f"{r['ms_batch32']:.2f} |")


if __name__ == "__main__":
    main()
