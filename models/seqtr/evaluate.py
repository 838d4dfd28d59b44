"""Metrics for SeqTR grounding on the synthetic scenes (used by train.py and the benchmarks).

* **Acc@0.5**: share of samples whose predicted box has IoU >= 0.5 with the target's box
  (the REC metric the SeqTR paper reports).  For a segm model the box is the one the server
  reports (the bounding box of the predicted polygon).
* **mIoU**: mean per-sample IoU - of boxes (det) and of masks (segm, the RES metric printed by
  the official code); predicted polygons go through :func:`models.seqtr.raster.polygon_to_mask`,
  the rasteriser the scenes are drawn with, so a perfect polygon scores 1.
* **Breakdowns** by phrasing template, by description kind (attr / extreme / region / relation)
  and seen vs held-out phrasings, because a model can be good on training phrasings only.
* **The expression matters**: for every sample, an expression naming a *different* object of
  the same scene (:func:`models.seqtr.scenes.wrong_expression`); counted as a success when the
  prediction moves (IoU < 0.5 with the prediction for the true expression) *and* lands on that
  other object (IoU >= 0.5 with it).  A model that ignores the text scores ~0.
* **Choice vs precision**: the share of samples whose predicted box overlaps the target more
  than any other object of the scene (and by IoU > 0.3), and the mean box / mask IoU on those
  samples.  It separates "picked the wrong object" from "outlined the right one badly", which
  need different fixes (docs/SEQTR.md, "Training the demo").
* **Latency** per image, batched and one at a time.

Predictions *are* the serving path: :class:`models.seqtr.serving.SeqTRGrounder` (prepare: long
side, bottom/right padding; greedy decoding; coordinates dequantised against each image's own
padded size and mapped back to original pixels), so the numbers are what the
server answers.

    python -m models.seqtr.evaluate --checkpoint models/seqtr/weights/seqtr-tiny-scenes-det --n 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.seqtr import scenes
from models.seqtr.checkpoint import load_bundle
from models.seqtr.model import SeqTR
from models.seqtr.raster import box_iou, mask_iou
from models.seqtr.serving import Grounding, SeqTRGrounder
from models.seqtr.text import Vocabulary


def grounder_of(model_or_grounder: object, vocab: Vocabulary | None = None) -> SeqTRGrounder:
    """The serving grounder for a bare :class:`SeqTR` (then ``vocab`` is required) or the
    grounder itself, so that metrics measure exactly what the server answers."""
    if isinstance(model_or_grounder, SeqTRGrounder):
        return model_or_grounder
    if isinstance(model_or_grounder, SeqTR):
        if vocab is None:
            raise ValueError("a bare SeqTR model needs its vocabulary")
        return SeqTRGrounder(model_or_grounder, vocab)
    raise TypeError(f"expected a SeqTR model or a SeqTRGrounder, got {type(model_or_grounder).__name__}")


def predict(model_or_grounder: object, vocab: Vocabulary | None, images: Sequence[np.ndarray],
            expressions: Sequence[str], batch: int = 64) -> list[Grounding]:
    """Served predictions (original pixels) for (image, expression) pairs, ``batch`` at a time.
    A model in training mode is put back into training mode afterwards."""
    model = model_or_grounder.model if isinstance(model_or_grounder, SeqTRGrounder) else model_or_grounder
    was_training = isinstance(model, torch.nn.Module) and model.training
    g = grounder_of(model_or_grounder, vocab)
    g.model.eval()
    try:
        out: list[Grounding] = []
        for s in range(0, len(images), batch):
            out += g.run([g.prepare(im, e) for im, e in zip(images[s:s + batch], expressions[s:s + batch])])
        return out
    finally:
        if was_training:
            model.train()


def _summary(rows: list[dict], segm: bool) -> dict:
    n = len(rows)
    if not n:
        return {"n": 0}
    d = {"n": n, "acc50": float(np.mean([r["box_iou"] >= 0.5 for r in rows])),
         "miou_box": float(np.mean([r["box_iou"] for r in rows]))}
    if segm:
        d["miou_mask"] = float(np.mean([r["mask_iou"] for r in rows]))
        d["acc50_mask"] = float(np.mean([r["mask_iou"] >= 0.5 for r in rows]))
    return d


def _breakdown(rows: list[dict], key: str, segm: bool) -> dict:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[str(r[key])].append(r)
    return {k: _summary(v, segm) for k, v in sorted(groups.items())}


def _agreement(a: Grounding, b: Grounding, segm: bool) -> float:
    if segm and a.mask is not None and b.mask is not None:
        return mask_iou(a.mask, b.mask)
    return box_iou(a.box, b.box)


def evaluate(model_or_grounder: object, samples: Sequence[scenes.Sample], vocab: Vocabulary | None = None,
             batch: int = 64, wrong: bool = True, seed: int = 0, latency_images: int = 16) -> dict:
    """All metrics for ``samples`` (see the module docstring); JSON-serialisable.

    Keys: n, acc50, miou_box (+ miou_mask, acc50_mask for segm), primary (Acc@0.5 for det,
    mask mIoU for segm), seen / held_out (the same on each phrasing pool), by_phrasing,
    by_kind, wrong_expression (rate, moved, on_other), latency_ms (batched, single)."""
    g = grounder_of(model_or_grounder, vocab)
    model = model_or_grounder if isinstance(model_or_grounder, SeqTR) else g.model
    segm = g.task == "segm"
    images = [s.image for s in samples]
    t0 = time.perf_counter()
    preds = predict(model, g.vocab, images, [s.expression for s in samples], batch)
    batched_ms = (time.perf_counter() - t0) * 1000 / max(1, len(samples))
    rows = []
    for s, p in zip(samples, preds):
        overlaps = [box_iou(p.box, o.box) for o in s.objects]
        r = {"box_iou": box_iou(p.box, s.box), "phrasing": s.phrasing, "held_out": s.held_out,
             "kind": s.desc.kind if s.desc else "?",
             "right_object": int(np.argmax(overlaps)) == s.target and max(overlaps) > 0.3}
        if segm:
            r["mask_iou"] = mask_iou(p.mask if p.mask is not None else np.zeros_like(s.mask), s.mask)
        rows.append(r)
    res = _summary(rows, segm)
    res["primary"] = {"metric": "miou_mask" if segm else "acc50", "value": res.get("miou_mask" if segm else "acc50")}
    res["seen"] = _summary([r for r in rows if not r["held_out"]], segm)
    res["held_out"] = _summary([r for r in rows if r["held_out"]], segm)
    res["by_phrasing"] = _breakdown(rows, "phrasing", segm)
    res["by_kind"] = _breakdown(rows, "kind", segm)
    right = [r for r in rows if r["right_object"]]
    res["choice"] = {"right_object": len(right) / max(1, len(rows)),
                     "miou_box_when_right": float(np.mean([r["box_iou"] for r in right])) if right else None,
                     **({"miou_mask_when_right": float(np.mean([r["mask_iou"] for r in right])) if right else None}
                        if segm else {}),
                     "rule": "the predicted box overlaps the target more than any other object, with IoU > 0.3"}
    res["distractors"] = {"min": min((len(s.objects) - 1 for s in samples), default=0),
                          "mean": float(np.mean([len(s.objects) - 1 for s in samples])) if samples else 0.0}
    if wrong and samples:
        rng = np.random.default_rng(seed)
        alt = [scenes.wrong_expression(s, rng) for s in samples]
        preds2 = predict(model, g.vocab, images, [e for e, _ in alt], batch)
        moved, on_other, both = [], [], []
        for s, p1, p2, (_, j) in zip(samples, preds, preds2, alt):
            o = s.objects[j]
            if segm:
                hit = p2.mask is not None and mask_iou(p2.mask, scenes.rasterise(o.polygon, *s.mask.shape)) >= 0.5
            else:
                hit = box_iou(p2.box, o.box) >= 0.5
            mv = _agreement(p1, p2, segm) < 0.5
            moved.append(mv)
            on_other.append(hit)
            both.append(mv and hit)
        res["wrong_expression"] = {"rate": float(np.mean(both)), "moved": float(np.mean(moved)),
                                   "on_other": float(np.mean(on_other)),
                                   "rule": "prediction for an expression naming another object of the scene moves "
                                           "(IoU < 0.5 with the prediction for the true expression) and lands on "
                                           "that object (IoU >= 0.5; mask IoU for segm)"}
    single = []
    for s in samples[:latency_images]:
        t = time.perf_counter()
        predict(model, g.vocab, [s.image], [s.expression], 1)
        single.append((time.perf_counter() - t) * 1000)
    res["latency_ms"] = {"batched_per_image": round(batched_ms, 3), "batch": batch,
                         "single_median": round(float(np.median(single)), 3) if single else None,
                         "threads": torch.get_num_threads()}
    return res


def format_summary(res: dict) -> str:
    """One line for logs."""
    parts = [f"n {res['n']}", f"Acc@0.5 {res['acc50']:.4f}", f"mIoU(box) {res['miou_box']:.4f}"]
    if "miou_mask" in res:
        parts.append(f"mIoU(mask) {res['miou_mask']:.4f}")
    for name in ("seen", "held_out"):
        if res.get(name, {}).get("n"):
            r = res[name]
            parts.append(f"{name} Acc@0.5 {r['acc50']:.4f}" + (f" mIoU {r['miou_mask']:.4f}" if "miou_mask" in r else ""))
    if "wrong_expression" in res:
        parts.append(f"wrong-expr {res['wrong_expression']['rate']:.4f}")
    return ", ".join(parts)


def load(checkpoint: Path) -> tuple[SeqTR, Vocabulary, dict]:
    """(model in eval mode, vocabulary, manifest) of a bundle directory."""
    return load_bundle(checkpoint)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Evaluate a SeqTR bundle on synthetic scenes.")
    ap.add_argument("--checkpoint", type=Path, required=True, help="bundle directory (model.safetensors + manifest)")
    ap.add_argument("--split", default="test", choices=sorted(scenes.SEEDS))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=None, help="scene seed (default: the split's)")
    ap.add_argument("--held-out", choices=("default", "yes", "no"), default="default",
                    help="phrasings: the split's mix, all held-out, or training phrasings only")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the full result here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, vocab, manifest = load(args.checkpoint)
    size = int(manifest.get("data", {}).get("canvas", model.cfg.long_side))
    held = {"default": None, "yes": True, "no": False}[args.held_out]
    samples = scenes.generate(args.split, args.n, args.seed, size, held)
    res = evaluate(model, samples, vocab, batch=args.batch)
    res["checkpoint"] = str(args.checkpoint)
    res["data"] = {"split": args.split, "n": args.n, "seed": scenes.SEEDS[args.split] if args.seed is None else args.seed,
                   "size": size, "held_out_phrasings": held, "generator_version": scenes.GENERATOR_VERSION}
    print(format_summary(res), file=sys.stderr)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
