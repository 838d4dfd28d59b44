"""Linear probes: which object attributes can be read off a SeqTR model's visual features.

    python -m models.seqtr.probe --checkpoint models/seqtr/weights/seqtr-tiny-scenes-det [--n 3000]

For every object of ``--n`` generated train scenes it takes the feature vector at the
object's centre cell from C3, C4, C5 and the fused map's visual half (the input of the
language gate, before ``tanh(v) * tanh(y)``), fits a linear classifier per attribute
(colour, shape, size) on 75 % of the objects and prints its accuracy on the other 25 %.

Why: the grounding head can only choose "the blue one" if blueness reaches the gate.  The
plain recipe's errors were mostly the right shape of the wrong colour, and this probe showed
why (colour 27 % at C3 where the majority class is 15 %, shape 79 %); see docs/SEQTR.md, "Training the demo".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.seqtr import scenes
from models.seqtr.evaluate import load
from models.seqtr.model import SeqTR

ATTRIBUTES = ("colour", "shape", "size")
LEVELS = ("c3", "c4", "c5", "v")


@torch.no_grad()
def visual_maps(model: SeqTR, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """C3, C4, C5 and the pre-gate fused map ``v`` for a batch of RGB 0-255 images."""
    feats = model.vis_enc(images)
    return {"c3": feats[0], "c4": feats[1], "c5": feats[2], "v": model.fusion.visual(feats)}


def object_features(model: SeqTR, samples: list[scenes.Sample], batch: int = 100
                    ) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Per object: the feature vector at its centre cell on every level, and its attributes."""
    feats: dict[str, list[np.ndarray]] = {k: [] for k in LEVELS}
    labels: dict[str, list[str]] = {a: [] for a in ATTRIBUTES}
    model.eval()
    for b in range(0, len(samples), batch):
        chunk = samples[b:b + batch]
        img = torch.from_numpy(np.stack([s.image for s in chunk])).permute(0, 3, 1, 2).float()
        maps = visual_maps(model, img)
        for k, x in maps.items():
            stride_y, stride_x = img.shape[2] / x.shape[2], img.shape[3] / x.shape[3]
            for i, s in enumerate(chunk):
                for o in s.objects:
                    cx, cy = o.centre
                    r = min(int(cy // stride_y), x.shape[2] - 1)
                    c = min(int(cx // stride_x), x.shape[3] - 1)
                    feats[k].append(x[i, :, r, c].float().numpy())
        for s in chunk:
            for o in s.objects:
                for a in ATTRIBUTES:
                    labels[a].append(getattr(o, a))
    return {k: np.stack(v) for k, v in feats.items()}, labels


def probe_accuracy(x: np.ndarray, y: list[str], train_share: float = 0.75, steps: int = 300, seed: int = 0) -> float:
    """Held-out accuracy of a softmax-regression probe (features standardised on the fit part)."""
    torch.manual_seed(seed)
    classes = sorted(set(y))
    target = torch.tensor([classes.index(v) for v in y])
    n_fit = int(len(y) * train_share)
    feats = torch.from_numpy(x)
    mu, sd = feats[:n_fit].mean(0), feats[:n_fit].std(0) + 1e-5
    feats = (feats - mu) / sd
    lin = torch.nn.Linear(feats.shape[1], len(classes))
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin(feats[:n_fit]), target[:n_fit]).backward()
        opt.step()
    with torch.no_grad():
        return float((lin(feats[n_fit:]).argmax(1) == target[n_fit:]).float().mean())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="a SeqTR bundle directory")
    ap.add_argument("--n", type=int, default=3000, help="train scenes to probe (all their objects)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _, _ = load(args.checkpoint)
    samples = scenes.generate("train", args.n, size=model.cfg.long_side)
    feats, labels = object_features(model, samples)
    n_obj = len(labels["colour"])
    chance = {a: max(labels[a].count(v) for v in set(labels[a])) / n_obj for a in ATTRIBUTES}
    print(f"{args.checkpoint}: linear probes on {n_obj} objects of {args.n} train scenes (75/25 split)")
    print("| features | channels | " + " | ".join(ATTRIBUTES) + " |")
    print("|---|---|" + "---|" * len(ATTRIBUTES))
    for k in LEVELS:
        accs = " | ".join(f"{probe_accuracy(feats[k], labels[a]):.1%}" for a in ATTRIBUTES)
        print(f"| {k} | {feats[k].shape[1]} | {accs} |")
    print("| majority class | | " + " | ".join(f"{chance[a]:.1%}" for a in ATTRIBUTES) + " |")


if __name__ == "__main__":
    main()
