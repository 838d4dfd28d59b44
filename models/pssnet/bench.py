"""Measured CPU latency of every rung of a PSS-Net bundle, at batch 1 and batch 32.

    python -m models.pssnet.bench --checkpoint models/pssnet/weights/pss-mbv1-glyphs --threads 1 --write

Each rung runs the served form (dense, BN folded, ``inference_mode``) on preprocessed
inputs; after warm-up, the median of ``--repeats`` timed calls is reported (ms per call).
Waits while ``/tmp/anytime-quiet`` exists (someone else is measuring), and ``--write``
records the numbers, the thread count and the host in the bundle's manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from models.pssnet.serving import PssNetModel

QUIET_FILE = Path("/tmp/anytime-quiet")


def time_call(fn, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        while QUIET_FILE.exists():
            time.sleep(30)
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--write", action="store_true", help="record the results in the bundle's manifest.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = PssNetModel.from_checkpoint(args.checkpoint)
    s = model.input_size
    results = []
    for rung in model.rungs:
        row = {"rung": rung.name, "flops": rung.flops}
        for b in args.batches:
            x = torch.randn(b, 3, s, s)
            row[f"ms_batch{b}"] = round(time_call(lambda: model.forward(rung.index, x), args.repeats), 3)
        results.append(row)
        print(" ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    if args.write:
        folder = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
        path = folder / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["latency_cpu"] = {
            "command": "python -m models.pssnet.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "threads": args.threads, "repeats": args.repeats, "statistic": "median ms per forward call",
            "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "note": "shared machine: other jobs may have been running", "date": time.strftime("%Y-%m-%d"),
            "rungs": results}
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
