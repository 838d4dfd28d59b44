"""Held-out evaluation of a CF-ViT: coarse-only and all-fine accuracy and the eta curve.

One pass of :meth:`forward_all` per split gives every image's coarse confidence, coarse
prediction and fine prediction; at a threshold eta an image exits when its confidence >= eta,
so the whole curve follows without rerunning the network (``forward_exit`` computes exactly
this, as the tests and ``bench.cfvit_tradeoff`` check).

    python -m models.cfvit.evaluate --checkpoint models/cfvit/weights/cf-tiny-glyphs/model.safetensors

rewrites the ``evaluation`` entry of the manifest beside the checkpoint (val and test).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from models.cfvit import data
from models.cfvit.model import CfVisionTransformer, Macs, count_macs

ETAS = [round(0.05 * i, 2) for i in range(21)] + [1.01]
ETAS_DENSE = [round(0.01 * i, 2) for i in range(101)] + [1.01]


def predict(model: CfVisionTransformer, x: torch.Tensor, batch: int = 250) -> dict[str, np.ndarray]:
    was_training = model.training
    model.eval()
    conf, cp, fp = [], [], []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            c, f = model.forward_all(x[i:i + batch])
            p = c.float().softmax(-1)
            conf.append(p.max(-1).values)
            cp.append(c.argmax(-1))
            fp.append(f.argmax(-1))
    model.train(was_training)
    return {"confidence": torch.cat(conf).numpy(), "coarse": torch.cat(cp).numpy(), "fine": torch.cat(fp).numpy()}


def eta_curve(pred: dict[str, np.ndarray], labels: np.ndarray, macs: Macs, etas=ETAS) -> list[dict]:
    conf = pred["confidence"]
    ok_c, ok_f = pred["coarse"] == labels, pred["fine"] == labels
    out = []
    for eta in etas:
        ex = conf >= np.float32(eta)
        p = float(ex.mean())
        cost = macs.expected(p)
        out.append({"eta": eta, "exit_rate": p, "expected_flops": cost, "flops_fraction": cost / macs.full,
                    "accuracy": float(np.where(ex, ok_c, ok_f).mean())})
    return out


def evaluate_split(model: CfVisionTransformer, split: data.Split, limit: int | None = None) -> dict:
    images, labels = split.images, split.labels
    if limit:
        images, labels = images[:limit], labels[:limit]
    cfg = model.cfg
    pred = predict(model, data.to_tensor(images, cfg.mean, cfg.std))
    macs = count_macs(cfg)
    curve = eta_curve(pred, labels, macs)
    return {"n": int(len(labels)), "source": split.source,
            "accuracy_coarse_only": float((pred["coarse"] == labels).mean()),
            "accuracy_all_fine": float((pred["fine"] == labels).mean()),
            "eta_curve": curve, "eta_curve_dense": eta_curve(pred, labels, macs, ETAS_DENSE)}


def best_saving(curve: list[dict], full_accuracy: float, tolerance: float = 0.005) -> dict | None:
    """The curve point with the lowest cost whose accuracy is within ``tolerance`` of all-fine."""
    ok = [p for p in curve if p["accuracy"] >= full_accuracy - tolerance]
    return min(ok, key=lambda p: (p["expected_flops"], -p["eta"])) if ok else None


def main(argv: list[str] | None = None) -> None:
    from models.cfvit.checkpoint import load_ours

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ck = load_ours(args.checkpoint)
    man = ck.meta
    dataset = man["data"]["dataset"]
    ev = {s: evaluate_split(ck.model, data.load(dataset, s)) for s in ("val", "test")}
    man["evaluation"] = ev
    for s in ("val", "test"):
        e = ev[s]
        print(f"{s}: coarse {e['accuracy_coarse_only']:.4f} fine {e['accuracy_all_fine']:.4f}")
    path = Path(args.checkpoint)
    path = path if path.is_dir() else path.parent
    (path / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")


if __name__ == "__main__":
    main()
