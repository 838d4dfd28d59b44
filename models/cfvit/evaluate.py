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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ContextManager

import numpy as np
import torch

from compress.artifact import RungArtifact, write
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


STAGES = (("coarse", "accuracy_coarse_only"), ("fine", "accuracy_all_fine"))


def version_command(doc: str, argv: list[str] | None) -> tuple[argparse.Namespace, Path, object]:
    """The command line every reduced-precision version's command shares (``models.cfvit.quantize``,
    ``models.cfvit.bf16``): its arguments, the bundle folder and the bundle's checkpoint."""
    from compress.artifact import bundle_dir
    from models.cfvit.checkpoint import load_ours

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = bundle_dir(args.bundle)
    return args, folder, load_ours(folder / "model.safetensors")


def evaluate_versions(dataset: str, versions: dict[str, tuple[CfVisionTransformer, Callable[[], ContextManager]]],
                      tag: str) -> dict[str, dict[str, dict]]:
    """``evaluate_split`` of every version of a network, each as (network, the context it runs
    in), on the held-out val and test splits: split -> version -> result."""
    out: dict[str, dict[str, dict]] = {}
    for split in ("val", "test"):
        print(f"[{tag}] {split}: {' and '.join(versions)}", file=sys.stderr, flush=True)
        s = data.load(dataset, split)
        out[split] = {}
        for name, (net, context) in versions.items():
            with context():
                out[split][name] = evaluate_split(net, s)
    return out


def write_version(path: Path, evaluation: dict[str, dict[str, dict]], version: str, *, method: str, bits: dict,
                  backend: str, calibration: dict, command: str, model_name: str | None, note: str, tag: str,
                  dry_run: bool = False, extra: dict | None = None) -> list[RungArtifact]:
    """A reduced-precision version's manifest (``int8.json``, ``bf16.json``): per stage its
    and float32's top-1 on val and test, and its val eta curves, which the planner uses."""
    test, val = evaluation["test"], evaluation["val"]
    artifacts = [RungArtifact(stage, method, bits, backend, True,
                              {"test_accuracy": test[version][key], "test_accuracy_fp32": test["fp32"][key],
                               "val_accuracy": val[version][key], "val_accuracy_fp32": val["fp32"][key]},
                              calibration, command) for stage, key in STAGES]
    for a in artifacts:
        q = a.quality
        print(f"[{tag}] {a.rung}: {version} test {q['test_accuracy']:.4f} vs fp32 {q['test_accuracy_fp32']:.4f}",
              file=sys.stderr)
    if not dry_run:
        write(path, artifacts, model=model_name, eta_curve=val[version]["eta_curve"],
              eta_curve_dense=val[version]["eta_curve_dense"], note=note, **(extra or {}))
        print(f"[{tag}] wrote {path}", file=sys.stderr)
    return artifacts


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
