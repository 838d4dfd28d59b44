"""Calibration sources for PSS-Net's int8 rungs: real images, noise, BNS, FDDA and IntraQ.

    python -m bench.calibration_methods                       # the full run (about 40 min, 1 thread)
    python -m bench.calibration_methods --smoke               # a minute: tiny sizes, one seed, min rung
    python -m bench.calibration_methods --rungs min f10 f14 --seeds 0 1 2 --json out.json

For each rung (default: the smallest and the largest of the bundled ladder) and seed, one
calibration set per source:

* ``real-1pc``: one real training image per class (54), drawn by the seed: what FDDA may see;
* ``noise``: Gaussian inputs (``compress.calibration.gaussian_batches``);
* ``bns``: plain BN-statistics synthesis (``compress.calibration.bn_statistics_synthesis``);
* ``fdda``: ``compress.synthesis.fdda_synthesis`` from the centres of the ``real-1pc`` images;
* ``intraq``: ``compress.synthesis.intraq_synthesis``, no image;

plus the reference the bundle ships (``python -m models.pssnet.quantize --calibration real
--n 512``: the first 512 training images; the same for every seed).  Each set calibrates:

1. **real int8** (oneDNN kernels, ``PssNetModel.int8`` -> ``compress.int8.quantize_static``);
   top-1 on the 5,000 held-out test images (and val, in the JSON);
2. **W4A4, SIMULATED** (fake quantizers in float: no speed-up on stock CPU kernels):
   4-bit weights per output channel (asymmetric min/max of the current weights at every
   forward, widened to hold 0, as IntraQ's and FDDA's quantizers), 4-bit activations after every ReLU per
   tensor (asymmetric, range an EMA (0.9) of batch min/max observed on the set, then frozen,
   as theirs), the first convolution and the classifier at 8 bits (FDDA's "F8L8"; the input
   stays float); then distilled from the fp32 rung for ``--ft-steps`` Adam steps on the same
   set (batch 32, random resized crops of scale 0.5-1 as both papers' student training,
   without their mirror: the glyph model was trained without one).  The loss is KL(teacher ||
   student) only: IntraQ and FDDA add cross-entropy to their synthetic labels, but noise and
   BNS sets have none, and a distillation-only loss keeps the comparison about the data.

Nothing here is chosen on the test split.  The fine-tune's learning rate (``--ft-lr`` 1e-4)
was picked on val among 1e-5, 1e-4 and 1e-3 (100 steps; rungs min and f14, sets real-1pc and
BNS, seed 0; best in 3 of the 4, e.g. f14 on real-1pc: 62.9 / 65.8 / 61.9 % val top-1),
with ``--w4a4-splits val``.  int8 rungs are measured on val too (in the JSON); the simulated
W4A4 students on test only by default (each evaluation of 5,000 images costs the f14 rung
about 17 s of fake-quantized forwards).

Sizes (defaults): 108 images per synthetic / noise set, 200 synthesis steps per batch
(IntraQ's plateau schedule needs about that many to leave its first learning rate), 60
fine-tune steps, 3 seeds, rungs min and f14.  Measured on the 2-core host shared with three
other jobs (this process got about half a core): synthesis of 108 images at 200 steps took
32-39 s of CPU on min, about four times that on f14; one f14 measurement (int8 on val +
test, W4A4 calibration, 60 steps, test) about 45 s.  In all about 40 min of CPU time; the
wall time grows with the host's load (see the JSON's ``wall_seconds``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress.artifact import top1
from compress.calibration import batches_of, bn_statistics_synthesis, gaussian_batches, one_per_class
from compress.synthesis import fdda_centres, fdda_synthesis, intraq_synthesis, random_resized_crop

SOURCES = ("real-1pc", "noise", "bns", "fdda", "intraq")
REFERENCE = "real-512"
LABELS = {"real-1pc": "real images alone (1 per class)", "noise": "Gaussian noise", "bns": "plain BNS synthesis",
          "fdda": "FDDA (1 real image per class)", "intraq": "IntraQ (zero-shot)",
          "real-512": "reference: real, 512 images"}
POOL = 512  # the training images the one-per-class draw and the reference come from


# ---------------------------------------------------------------------------------------
# Simulated W4A4: fake quantizers on a BN-folded rung
# ---------------------------------------------------------------------------------------


def quantize_weight_per_channel(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min/max grid per output channel (dim 0), straight-through (torch's fused
    fake-quantize op: one pass, gradient passed inside the grid)."""
    flat = w.detach().flatten(1)
    lo, hi = flat.min(1).values.clamp(max=0), flat.max(1).values.clamp(min=0)  # the grid holds 0 exactly
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-8)
    zero = torch.round(-lo / scale).int()
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, 0, 2 ** bits - 1)


class ActQuant(nn.Module):
    """Per-tensor asymmetric k-bit activation quantizer.  While ``observing`` it passes its
    input through and keeps an EMA (``momentum``) of the batch min and max; afterwards the
    range is frozen and inputs are rounded onto its grid (straight-through inside it)."""

    def __init__(self, bits: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.bits, self.momentum = bits, momentum
        self.observing = True
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            lo, hi = x.detach().min(), x.detach().max()
            if int(self.seen) == 0:
                self.lo.copy_(lo)
                self.hi.copy_(hi)
            else:
                self.lo.mul_(self.momentum).add_((1 - self.momentum) * lo)
                self.hi.mul_(self.momentum).add_((1 - self.momentum) * hi)
            self.seen.add_(1)
            return x
        lo, hi = float(self.lo.clamp(max=0)), float(self.hi.clamp(min=0))  # the grid holds 0 exactly
        scale = max((hi - lo) / (2 ** self.bits - 1), 1e-8)
        return torch.fake_quantize_per_tensor_affine(x, scale, int(round(-lo / scale)), 0, 2 ** self.bits - 1)


class QConv2d(nn.Conv2d):
    """A convolution whose weights are fake-quantized per output channel at every forward."""

    bits: int = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, quantize_weight_per_channel(self.weight, self.bits), self.bias)


class QLinear(nn.Linear):
    bits: int = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, quantize_weight_per_channel(self.weight, self.bits), self.bias)


def w4a4_student(folded: nn.Module, bits: int = 4, edge_bits: int = 8) -> nn.Module:
    """A fake-quantized copy of a BN-folded rung: every conv / linear at ``bits`` (the first
    conv and the last linear at ``edge_bits``), an ``ActQuant(bits)`` after every ReLU.
    Its quantizers start observing: ``observe`` sets their ranges and freezes them."""
    student = copy.deepcopy(folded).cpu().train(False)
    convs = [m for m in student.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in student.modules() if isinstance(m, nn.Linear)]
    first, last = convs[0], linears[-1]
    for m in convs:
        m.__class__ = QConv2d
        m.bits = edge_bits if m is first else bits
    for m in linears:
        m.__class__ = QLinear
        m.bits = edge_bits if m is last else bits

    def wrap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, (nn.ReLU, nn.ReLU6)):
                setattr(module, name, nn.Sequential(type(child)(), ActQuant(bits)))
            else:
                wrap(child)

    wrap(student)
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def act_quantizers(student: nn.Module) -> list[ActQuant]:
    return [m for m in student.modules() if isinstance(m, ActQuant)]


@torch.no_grad()
def observe(student: nn.Module, data: torch.Tensor, batches: int, batch_size: int, g: torch.Generator) -> None:
    """Activation ranges: EMA of min/max over ``batches`` random batches of ``data``, then frozen."""
    for q in act_quantizers(student):
        q.observing, q.seen.zero_()
    for _ in range(batches):
        student(data[torch.randint(len(data), (min(batch_size, len(data)),), generator=g)])
    for q in act_quantizers(student):
        q.observing = False


def distil(student: nn.Module, teacher: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor, steps: int,
           lr: float, batch_size: int, g: torch.Generator, crop_scale: tuple[float, float] = (0.5, 1.0)) -> float:
    """``steps`` Adam steps of KL(teacher || student) on random crops of ``data``; weights and
    biases train, activation ranges stay frozen.  Returns the last loss."""
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    loss = torch.zeros(())
    for _ in range(steps):
        x = data[torch.randint(len(data), (min(batch_size, len(data)),), generator=g)]
        x = random_resized_crop(x, crop_scale, g)
        with torch.no_grad():
            t = teacher(x).log_softmax(1)
        s = student(x).log_softmax(1)
        loss = F.kl_div(s, t, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace, say: Callable[[str], None]) -> dict:
    from models.glyphs.data import load_split
    from models.pssnet.nets import fold_bn
    from models.pssnet.serving import PssNetModel

    t_start = time.perf_counter()
    model = PssNetModel.from_checkpoint(args.bundle, int8=False, variants=False)  # the supernet's subnets
    say("rendering / loading the glyph splits")
    held = {}
    for split in ("val", "test"):
        s = load_split(split, n=args.eval_n)
        held[split] = (torch.stack([model.preprocess(i) for i in s.images]), torch.from_numpy(s.labels))
    pool = load_split("train", n=POOL)
    pool_x = torch.stack([model.preprocess(i) for i in pool.images])
    pool_y = torch.from_numpy(pool.labels)
    by_name = {r.name: r for r in model.rungs}
    rungs = [by_name[n] for n in args.rungs] if args.rungs else [model.ladder[0], model.ladder[-1]]
    num_classes = len(model.classes)
    runs: list[dict] = []
    fp32: dict[str, dict] = {}

    def quality(run_fn: Callable[[torch.Tensor], torch.Tensor], splits: Iterable[str] = ("val", "test")
                ) -> dict[str, float]:
        return {split: round(top1(run_fn, *held[split]), 4) for split in splits}

    for rung in rungs:
        res, idx = rung.resolution, rung.index
        teacher = (lambda i: lambda b: model.forward(i, b))(idx)
        fp32[rung.name] = quality(teacher)
        say(f"{rung.name} ({res} px, {rung.flops} MFLOPs): fp32 test {fp32[rung.name]['test']:.4f}")
        folded = fold_bn(model.with_bn(idx)[0])

        def teacher_grad_free(b: torch.Tensor, net=folded) -> torch.Tensor:
            return net(b)

        def measure(source: str, seed: int, data: torch.Tensor, extra: dict) -> None:
            t0 = time.perf_counter()
            q = model.int8(idx, batches_of(data))
            int8 = quality(q)
            t_int8 = time.perf_counter() - t0
            g = torch.Generator().manual_seed(1000 + seed)
            t0 = time.perf_counter()
            student = w4a4_student(folded)
            data_r = F.interpolate(data, size=(res, res), mode="bilinear", align_corners=True) \
                if data.shape[-1] != res else data
            observe(student, data_r, args.observe_batches, 32, g)
            before = quality(student, args.w4a4_splits) if args.w4a4_before else None
            last = distil(student, teacher_grad_free, data_r, args.ft_steps, args.ft_lr, 32, g)
            after = quality(student, args.w4a4_splits)
            row = {"rung": rung.name, "resolution": res, "source": source, "seed": seed, "n": len(data),
                   "int8": int8, "int8_seconds": round(t_int8, 1),
                   "w4a4_simulated": {"before_finetune": before, "after_finetune": after,
                                      "final_kl": round(last, 4), "seconds": round(time.perf_counter() - t0, 1)},
                   **extra}
            runs.append(row)
            w4 = ", ".join(f"{k} {v:.4f}" for k, v in after.items())
            w4_before = ", ".join(f"{k} {v:.4f}" for k, v in before.items()) if before else ""
            say(f"{rung.name} {source} seed {seed}: int8 test {int8['test']:.4f} (val {int8['val']:.4f}); "
                f"W4A4 sim {w4}" + (f" (before fine-tune {w4_before})" if before else "")
                + f"; {extra.get('make_seconds', 0):.0f} s to make, {t_int8:.0f} s int8, "
                f"{row['w4a4_simulated']['seconds']:.0f} s W4A4  [{time.perf_counter() - t_start:.0f} s]")

        ref = pool_x[:POOL]
        for seed in args.seeds:
            if seed == args.seeds[0] or args.reference_every_seed:
                measure(REFERENCE, seed, ref, {})
            pick = one_per_class(pool_y, seed)
            real1, real1_y = pool_x[pick], pool_y[pick]
            for source in args.sources:
                t0 = time.perf_counter()
                extra: dict = {}
                dense, layers = model.with_bn(idx)
                progress = (lambda m, r=rung.name, s=seed: say(f"{r} seed {s}: {m}")) if args.verbose else None
                if source == "real-1pc":
                    data = real1
                elif source == "noise":
                    data = torch.cat(gaussian_batches((3, res, res), args.n, seed=seed))
                elif source == "bns":
                    data = bn_statistics_synthesis(dense, (3, res, res), args.n, steps=args.steps, seed=seed,
                                                   layers=layers, progress=progress)
                elif source == "fdda":
                    centres = fdda_centres(dense, real1, real1_y, layers=layers)
                    syn = fdda_synthesis(dense, (3, res, res), centres, args.n, steps=args.steps, seed=seed,
                                         layers=layers, progress=progress)
                    data, extra = syn.inputs, {"synthesis": syn.info}
                elif source == "intraq":
                    syn = intraq_synthesis(dense, (3, res, res), num_classes, args.n, steps=args.steps, seed=seed,
                                           batch_size=args.intraq_batch, layers=layers, progress=progress)
                    data, extra = syn.inputs, {"synthesis": syn.info}
                else:
                    raise ValueError(source)
                extra["make_seconds"] = round(time.perf_counter() - t0, 1)
                measure(source, seed, data, extra)
    return {"runs": runs, "fp32": fp32, "wall_seconds": round(time.perf_counter() - t_start, 1)}


def _mean_std(values: Iterable[float]) -> str:
    v = [100 * x for x in values]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.2f}"
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"


def table(result: dict, split: str = "test") -> str:
    """Markdown: rows are sources, columns per rung int8 and simulated W4A4 top-1 (%), mean ±
    std over seeds; the int8 reference row has one run (its data do not depend on the seed)."""
    runs = result["runs"]
    rungs = list(dict.fromkeys(r["rung"] for r in runs))
    sources = list(dict.fromkeys(r["source"] for r in runs if r["source"] != REFERENCE)) + [REFERENCE]
    with_before = any(x["w4a4_simulated"]["before_finetune"] for x in runs)
    head = "| calibration set (n) | " + " | ".join(
        f"{r} int8 | {r} W4A4 SIMULATED" + (" (before FT)" if with_before else "") for r in rungs) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(rungs))]
    lines.append("| fp32 | " + " | ".join(f"{100 * result['fp32'][r][split]:.2f} | -" for r in rungs) + " |")
    for s in sources:
        cells = []
        n = None
        for r in rungs:
            rows = [x for x in runs if x["rung"] == r and x["source"] == s]
            n = rows[0]["n"] if rows else n
            ints = sorted({(x["seed"], x["int8"][split]) for x in rows}) if s != REFERENCE else \
                [(0, rows[0]["int8"][split])] if rows else []
            w4 = [x["w4a4_simulated"]["after_finetune"][split] for x in rows
                  if split in x["w4a4_simulated"]["after_finetune"]]
            before = [x["w4a4_simulated"]["before_finetune"][split] for x in rows
                      if (x["w4a4_simulated"]["before_finetune"] or {}).get(split) is not None]
            cells.append(_mean_std(v for _, v in ints))
            cells.append(_mean_std(w4) + (f" ({_mean_std(before)})" if before else ""))
        lines.append(f"| {LABELS.get(s, s)} ({n}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(result: dict, margin: float = 0.005, split: str = "test") -> list[str]:
    """Each source's int8 rung against the real-512 reference: the mean gap over seeds (and
    the worst seed), and whether it is within ``margin`` (above: better than the reference
    by more than the margin; below: worse by more)."""
    out = []
    runs = result["runs"]
    for r in dict.fromkeys(x["rung"] for x in runs):
        ref = next(x["int8"][split] for x in runs if x["rung"] == r and x["source"] == REFERENCE)
        for s in ("fdda", "intraq", "bns", "real-1pc", "noise"):
            vals = [x["int8"][split] for x in runs if x["rung"] == r and x["source"] == s]
            if vals:
                gap = statistics.mean(vals) - ref
                worst = min(vals) - ref
                where = "within" if abs(gap) <= margin else ("above by more than" if gap > 0 else "NOT within")
                out.append(f"{r} {s}: int8 {split} mean {100 * gap:+.2f} points vs real-512 (worst seed "
                           f"{100 * worst:+.2f}): {where} {100 * margin:.1f}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("models/pssnet/weights/pss-mbv1-glyphs"))
    ap.add_argument("--rungs", nargs="*", default=None, help="rung names (default: the ladder's smallest and largest)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--sources", nargs="*", default=list(SOURCES), choices=list(SOURCES))
    ap.add_argument("--n", type=int, default=108, help="images per synthetic / noise set (real-1pc has one per class)")
    ap.add_argument("--steps", type=int, default=200, help="synthesis steps per batch (bns, fdda, intraq)")
    ap.add_argument("--intraq-batch", type=int, default=36,
                    help="IntraQ's batch: several batches, so that its class centres exist for the later ones")
    ap.add_argument("--ft-steps", type=int, default=60, help="simulated W4A4: distillation steps")
    ap.add_argument("--ft-lr", type=float, default=1e-4, help="simulated W4A4: Adam learning rate (chosen on val)")
    ap.add_argument("--observe-batches", type=int, default=16, help="simulated W4A4: batches of 32 for the ranges")
    ap.add_argument("--w4a4-before", action="store_true", help="also measure W4A4 before the fine-tune")
    ap.add_argument("--w4a4-splits", nargs="+", default=["test"], choices=["val", "test"],
                    help="held-out splits the simulated W4A4 students are measured on")
    ap.add_argument("--reference-every-seed", action="store_true",
                    help="repeat the real-512 reference per seed (its int8 rung is the same; its fine-tune is not)")
    ap.add_argument("--eval-n", type=int, default=None, help="held-out images per split (default: all 5,000)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: one seed, the smallest rung")
    ap.add_argument("--verbose", action="store_true", help="synthesis progress lines")
    ap.add_argument("--json", type=Path, default=Path("docs/calibration_methods.json"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.seeds, args.n, args.steps, args.ft_steps, args.observe_batches = [0], 54, 10, 5, 2
        args.rungs = args.rungs or ["min"]
        args.eval_n = args.eval_n or 500

    def say(msg: str) -> None:
        print(f"[calib] {msg}", file=sys.stderr, flush=True)

    result = run(args, say)
    result["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["host"] = f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    result["table_test"] = table(result)
    result["verdict"] = verdict(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(result["table_test"])
    print()
    print("\n".join(result["verdict"]))
    print(f"\nwall time {result['wall_seconds']:.0f} s; per-run numbers in {args.json}")


if __name__ == "__main__":
    main()
