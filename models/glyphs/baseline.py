"""How hard the glyph set is: a small CNN trained on CPU, scored on held-out fonts at full
resolution and on a coarse view (down-sampled by 2 and back up).

Two models are trained with the same recipe: one on the full-resolution images, one on
their coarse views.  The first, scored on coarse views too, shows what a full-view model
loses when it is handed a coarse view; the second shows what the coarse view itself still
carries, which is the fair measure of the information lost (a coarse-to-fine model's first
stage sees such a view).

    python -m models.glyphs.baseline            # about 3.5 CPU-minutes (one thread), plus generation once
    python -m models.glyphs.baseline --json runs/glyphs-baseline.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as tf

from models.glyphs.data import DEFAULT_N, load_split


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Six 3x3 conv layers (widths w, w, 2w, 2w, 4w, 4w; stride 2 every second), global
    average pooling, one linear layer: about 0.1 M parameters at w=16."""

    def __init__(self, n_classes: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(_block(3, w, 1), _block(w, w, 2), _block(w, 2 * w, 1), _block(2 * w, 2 * w, 2),
                                      _block(2 * w, 4 * w, 1), _block(4 * w, 4 * w, 2))
        self.head = nn.Linear(4 * w, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def coarse(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Area down-sampling by ``factor`` and bilinear up-sampling back to the input size."""
    small = tf.avg_pool2d(x, factor)
    return tf.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def train(images: np.ndarray, labels: np.ndarray, n_classes: int, epochs: float = 4.0, batch: int = 128,
          lr: float = 0.1, width: int = 16, view_coarse: bool = False, seed: int = 0,
          log_every: int = 100) -> SmallCNN:
    """SGD with momentum, one-cycle learning rate, label smoothing 0.1; deterministic for a seed."""
    torch.manual_seed(seed)
    model = SmallCNN(n_classes, width).to(memory_format=torch.channels_last)
    steps = max(1, math.ceil(epochs * len(labels) / batch))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    rng = np.random.default_rng(seed)
    y_all = torch.from_numpy(labels)
    order = np.empty(0, np.int64)
    model.train()
    t0 = time.monotonic()
    for step in range(steps):
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(len(labels))])
        idx, order = order[:batch], order[batch:]
        x = to_tensor(images[idx]).contiguous(memory_format=torch.channels_last)
        if view_coarse:
            x = coarse(x)
        loss = tf.cross_entropy(model(x), y_all[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps} loss {loss.item():.3f} ({time.monotonic() - t0:.0f} s)", flush=True)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, view_coarse: bool = False, batch: int = 500) -> np.ndarray:
    out = []
    for s in range(0, len(images), batch):
        x = to_tensor(images[s:s + batch]).contiguous(memory_format=torch.channels_last)
        out.append(model(coarse(x) if view_coarse else x).argmax(1).numpy())
    return np.concatenate(out)


def top_confusions(pred: np.ndarray, labels: np.ndarray, classes: list[str], k: int = 10) -> list[tuple[str, int]]:
    """The k most frequent (true -> predicted) mistakes."""
    c = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(c, (labels, pred), 1)
    np.fill_diagonal(c, 0)
    flat = np.argsort(c.ravel())[::-1][:k]
    return [(f"{classes[i // len(classes)]}->{classes[i % len(classes)]}", int(c.ravel()[i])) for i in flat]


def main(argv: Iterable[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train a small CNN on the glyph set; report full vs coarse accuracy.")
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--n-train", type=int, default=DEFAULT_N["train"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(list(argv) if argv is not None else None)
    torch.set_num_threads(args.threads)
    t_all = time.monotonic()
    tr = load_split("train", n=args.n_train, progress=True)
    va, te = load_split("val", progress=True), load_split("test", progress=True)
    classes = tr.classes
    results: dict = {"args": vars(args), "classes": len(classes), "n_train": len(tr), "n_val": len(va),
                     "n_test": len(te), "chance": 1 / len(classes)}
    for view in ("full", "coarse"):
        t = time.monotonic()
        print(f"training on {view} views: {args.epochs} epochs of {len(tr)}, width {args.width}", flush=True)
        model = train(tr.images, tr.labels, len(classes), args.epochs, args.batch, args.lr, args.width,
                      view_coarse=view == "coarse", seed=args.seed)
        r = {"train_s": round(time.monotonic() - t, 1),
             "params": sum(p.numel() for p in model.parameters())}
        for name, ds in (("val", va), ("test", te)):
            for ev in (("full", "coarse") if view == "full" else ("coarse",)):
                pred = predict(model, ds.images, view_coarse=ev == "coarse")
                r[f"{name}_{ev}"] = round(float((pred == ds.labels).mean()), 4)
                if name == "test":
                    r[f"test_{ev}_confusions"] = top_confusions(pred, ds.labels, classes)
        results[f"trained_{view}"] = r
        print(json.dumps(r), flush=True)
    results["total_s"] = round(time.monotonic() - t_all, 1)
    f, c = results["trained_full"], results["trained_coarse"]
    print(f"\n{len(classes)} classes, train {len(tr)} / val {len(va)} / test {len(te)} (fonts never seen in training)")
    print(f"{'':34s} {'val':>7s} {'test':>7s}")
    print(f"{'full-view model, full view':34s} {f['val_full']:7.2%} {f['test_full']:7.2%}")
    print(f"{'full-view model, coarse view':34s} {f['val_coarse']:7.2%} {f['test_coarse']:7.2%}")
    print(f"{'coarse-view model, coarse view':34s} {c['val_coarse']:7.2%} {c['test_coarse']:7.2%}")
    print(f"commonest test mistakes (full view): {', '.join(f'{p} {n}' for p, n in f['test_full_confusions'])}")
    print(f"total {results['total_s']:.0f} s")
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
