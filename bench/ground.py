"""Grounding quality and latency on held-out synthetic scenes, per model and input side.

    python -m bench.ground --checkpoint models/seqtr/weights/seqtr-tiny-scenes-det \\
        --checkpoint models/seqtr/weights/seqtr-tiny-scenes-segm --n 1000 [--sides 128 96 64] [--json]

For every bundle and every long side (the rungs of /ground's input-resolution ladder;
default: the model's own) it prints Acc@0.5, box mIoU, mask mIoU (segm), Acc@0.5 on the
held-out phrasings only, the wrong-expression rate (an expression naming another object of
the scene moves the answer onto that object), FLOPs per request and latency per image
(batched, and one request at a time), all through the serving path
(models.seqtr.evaluate).  The scenes are the test split: seeds and phrasings never used in
training, >= 3 distractors each.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from models.seqtr import scenes
from models.seqtr.evaluate import evaluate
from models.seqtr.serving import SeqTRGrounder


def rows_for(checkpoint: Path, sides: list[int] | None, n: int, batch: int) -> list[dict]:
    g = SeqTRGrounder.from_bundle(checkpoint)
    size = int(g.info.get("data", {}).get("canvas", g.long_side))
    samples = scenes.generate("test", n, None, size)
    own = g.long_side
    out = []
    for side in sides or [own]:
        g.model.cfg = replace(g.model.cfg, long_side=side)  # the grounder resizes to cfg.long_side
        ph, pw = g.padded_shape(size, size)
        res = evaluate(g, samples, batch=batch)
        out.append({"model": g.name, "task": g.task, "long_side": side, "trained_side": own, "n": res["n"],
                    "distractors_min": res["distractors"]["min"], "acc50": res["acc50"],
                    "miou_box": res["miou_box"], "miou_mask": res.get("miou_mask"),
                    "held_out_acc50": res["held_out"].get("acc50"), "held_out_n": res["held_out"].get("n"),
                    "held_out_miou_mask": res["held_out"].get("miou_mask"),
                    "wrong_expression": res.get("wrong_expression", {}).get("rate"),
                    "right_object": res["choice"]["right_object"],
                    "iou_when_right": res["choice"].get("miou_mask_when_right", res["choice"]["miou_box_when_right"]),
                    "gflops": g.flops(ph, pw)["total"] / 1e9,
                    "ms_batched": res["latency_ms"]["batched_per_image"], "batch": batch,
                    "ms_single": res["latency_ms"]["single_median"]})
    g.model.cfg = replace(g.model.cfg, long_side=own)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, action="append", required=True, help="a bundle folder (repeatable)")
    ap.add_argument("--sides", type=int, nargs="+", default=None, help="long sides to measure (default: the model's)")
    ap.add_argument("--n", type=int, default=1000, help="held-out test scenes")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [r for ck in args.checkpoint for r in rows_for(ck, args.sides, args.n, args.batch)]
    if args.json:
        print(json.dumps({"generator_version": scenes.GENERATOR_VERSION, "threads": args.threads, "rows": rows},
                         indent=2))
        return

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    print(f"held-out test scenes (generator {scenes.GENERATOR_VERSION}), {args.threads} torch thread(s)\n")
    print("| model | task | long side | scenes | min distractors | Acc@0.5 | box mIoU | mask mIoU | Acc@0.5 held-out "
          "phrasings | wrong expression moves to its object | right object | its mask (segm) or box IoU | GFLOPs | ms/image (batch {b}) | ms/request alone |"
          .format(b=args.batch))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mask = "-" if r["miou_mask"] is None else f"{r['miou_mask']:.3f}"
        print(f"| {r['model']} | {r['task']} | {r['long_side']} | {r['n']} | {r['distractors_min']} | {pct(r['acc50'])} "
              f"| {r['miou_box']:.3f} | {mask} | {pct(r['held_out_acc50'])} (n={r['held_out_n']}) "
              f"| {pct(r['wrong_expression'])} | {pct(r['right_object'])} "
              f"| {'-' if r['iou_when_right'] is None else format(r['iou_when_right'], '.3f')} | {r['gflops']:.3f} | {r['ms_batched']:.2f} | {r['ms_single']:.2f} |")


if __name__ == "__main__":
    main()
