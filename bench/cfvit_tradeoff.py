"""Accuracy, MACs and wall-clock of a CF-ViT checkpoint per exit threshold eta.

    python -m bench.cfvit_tradeoff --checkpoint models/cfvit/weights/cf-tiny-glyphs/model.safetensors [--json PATH]

Every row runs the real early-exit path (``CfVitModel.forward``: coarse stage on the batch,
fine stage on the rows that did not exit) on the held-out test split and reports the exit
rate, the MACs actually spent as a fraction of all-fine, top-1, and the wall-clock per image
at batch 1 (one image per call, over the first ``--n1`` test images) and at batch 32 (over
the first ``--n32``).  Timing is interleaved: ``--rounds`` passes over the etas in a shuffled
order, the median per eta is reported, so load from other processes spreads over all rows.
One torch thread by default (on a shared 2-core host two threads oversubscribe).  fp32, on
the engines ``--engine`` chooses here as the server does (``ANYTIME_CFVIT_ENGINE``; default
torch, the network as written).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from models.cfvit import data
from models.cfvit.evaluate import ETAS
from models.cfvit.serving import CfVitModel


def run_eta(model: CfVitModel, x: torch.Tensor, eta: float, batch: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Seconds for the whole of ``x`` in batches of ``batch``, predictions and exit flags."""
    preds, exits = [], []
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        logits, exited, _ = model.forward(xb, torch.full((len(xb),), eta))
        preds.append(logits.argmax(-1))
        exits.append(exited)
    dt = time.perf_counter() - t0
    return dt, torch.cat(preds).numpy(), torch.cat(exits).numpy()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--etas", type=float, nargs="*", default=ETAS)
    ap.add_argument("--n1", type=int, default=300, help="images timed one per call")
    ap.add_argument("--n32", type=int, default=1600, help="images timed in batches of 32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--engine", default="torch", choices=["torch", "auto", "onnxruntime", "openvino"],
                    help="what runs the stages, chosen per batch size at the start as the server does")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = CfVitModel.from_checkpoint(args.checkpoint, int8=False, bf16=False)
    model.choose_engines(args.engine, (1, 8, 32, 256))
    dataset = model.meta["data"]["dataset"]
    split = data.load(dataset, args.split)
    x = torch.stack([model.preprocess(img) for img in split.images])
    y = split.labels
    # accuracy / exit rate / MACs on the whole split with the early-exit path itself
    rows = []
    for eta in args.etas:
        _, pred, ex = run_eta(model, x, eta, 256)
        spent = model.flops_for(torch.from_numpy(ex)).double().mean().item()
        rows.append({"eta": eta, "exit_rate": float(ex.mean()), "flops": spent, "flops_fraction": spent / model.flops_full,
                     "accuracy": float((pred == y).mean())})
    # wall-clock, interleaved
    t1 = {eta: [] for eta in args.etas}
    t32 = {eta: [] for eta in args.etas}
    x1, x32 = x[:args.n1], x[:args.n32]
    run_eta(model, x[:64], 1.01, 1)  # warm-up
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(args.etas)
        rng.shuffle(order)
        for eta in order:
            t1[eta].append(run_eta(model, x1, eta, 1)[0] / len(x1))
            t32[eta].append(run_eta(model, x32, eta, 32)[0] / len(x32))
    for r in rows:
        r["ms_per_image_b1"] = 1e3 * statistics.median(t1[r["eta"]])
        r["ms_per_image_b32"] = 1e3 * statistics.median(t32[r["eta"]])
    full = next(r for r in rows if r["eta"] == max(args.etas))
    for r in rows:
        r["time_fraction_b1"] = r["ms_per_image_b1"] / full["ms_per_image_b1"]
        r["time_fraction_b32"] = r["ms_per_image_b32"] / full["ms_per_image_b32"]

    src = split.source if isinstance(split.source, str) else \
        f"{split.source.get('dataset', '?')}, generator {split.source.get('generator_version', '?')}"
    print(f"{model.name} on {src} ({args.split}, {len(y)} images); MACs coarse {model.flops_coarse / 1e6:.2f}M, "
          f"all-fine {model.flops_full / 1e6:.2f}M; {args.threads} thread(s); engines: "
          f"{model.runners['fp32'].describe() if model.runners else 'torch'}")
    print("| eta | exit rate | MACs / all-fine | top-1 | ms/img b=1 | ms/img b=32 | time / all-fine b=1 | b=32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['eta']:.2f} | {r['exit_rate']:.3f} | {r['flops_fraction']:.3f} | {100 * r['accuracy']:.2f} | "
              f"{r['ms_per_image_b1']:.2f} | {r['ms_per_image_b32']:.3f} | {r['time_fraction_b1']:.2f} | "
              f"{r['time_fraction_b32']:.2f} |")
    if args.json:
        meta = {"checkpoint": str(args.checkpoint), "split": args.split, "n": int(len(y)), "n1": len(x1),
                "n32": len(x32), "rounds": args.rounds, "threads": args.threads, "engine": args.engine,
                "machine": f"{platform.machine()}, torch {torch.__version__}, shared 2-core host",
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "command": "python -m bench.cfvit_tradeoff " + " ".join(argv or __import__("sys").argv[1:])}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
