"""The measurement behind the class set: which upper/lower case pairs can a model tell apart
once glyphs are scaled to the canvas?

Renders all 62 characters as separate classes (same fonts, renderer and split as the real
set, uncached), trains the baseline CNN, and reports for each letter the share of its upper
and lower case val samples predicted as the other case.  Pairs that a model confuses about
as often as a coin flip are merged in ``classes.MERGED_LOWER``.

    python -m models.glyphs.case_pairs     # about 2 CPU-minutes
"""

from __future__ import annotations

import argparse
import string
import time
from collections.abc import Iterable

import numpy as np
import torch

from models.glyphs import fonts as F
from models.glyphs.baseline import predict, train
from models.glyphs.data import SEEDS, generate

CHARS62 = list(string.digits + string.ascii_uppercase + string.ascii_lowercase)


def case_confusion(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Letter -> share of its upper and lower case samples predicted as the other case."""
    idx = {c: i for i, c in enumerate(CHARS62)}
    out = {}
    for u in string.ascii_uppercase:
        a, b = idx[u], idx[u.lower()]
        n = ((labels == a) | (labels == b)).sum()
        swapped = ((labels == a) & (pred == b)).sum() + ((labels == b) & (pred == a)).sum()
        out[u + u.lower()] = float(swapped / max(n, 1))
    return out


def main(argv: Iterable[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=30_000)
    ap.add_argument("--n-val", type=int, default=5_000)
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(list(argv) if argv is not None else None)
    torch.set_num_threads(1)
    t = time.monotonic()
    tr = generate(F.split_groups("train"), args.n_train, 32, SEEDS["train"], CHARS62, args.workers, "62-class train")
    va = generate(F.split_groups("val"), args.n_val, 32, SEEDS["val"], CHARS62, args.workers, "62-class val")
    model = train(tr[0], tr[1], len(CHARS62), args.epochs, width=args.width)
    pred = predict(model, va[0])
    acc = float((pred == va[1]).mean())
    conf = case_confusion(pred, va[1])
    print(f"62 classes: val accuracy {acc:.2%} ({time.monotonic() - t:.0f} s)")
    print("upper/lower swapped (share of the pair's val samples; 50% = indistinguishable):")
    for pair, v in sorted(conf.items(), key=lambda kv: -kv[1]):
        print(f"  {pair}: {v:6.1%}")


if __name__ == "__main__":
    main()
