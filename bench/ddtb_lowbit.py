"""DDTB against a PAMS-like symmetric bound at 2, 3 and 4 bits on the bundled ARM-FSRCNN:
simulated (fake-quantized), no real low-bit kernels.

    python -m bench.ddtb_lowbit                                   # the default study, 18 runs
    python -m bench.ddtb_lowbit --bits 2 --seeds 0 --steps 100    # a smoke run
    python -m bench.ddtb_lowbit --methods ddtb,ddtb-static,pams   # with the gate ablation

What it measures: the RGB PSNR (4 px crop) on the 8 test photos of the full-width (56)
FSRCNN after k-bit quantization-aware training with each activation quantizer, mean and
sample standard deviation over seeds, beside the fp32 network and bicubic.  Everything is
fake quantization: the tensors stay float32, rounded onto a k-bit grid, so the numbers are
the accuracy a k-bit kernel would give, not a speed (stock PyTorch has no 2-4 bit conv;
docs/COMPRESSION.md).

Why this layout.  DDTB (Zhong et al., ECCV 2022) keeps EDSR's head and tail in fp32 and
quantizes the body; here FSRCNN's head conv (3 -> 56, 5x5) and tail deconvolution
(56 -> 3, 9x9 stride 4) stay fp32 and every body conv (the 1x1 shrink, the four 3x3 mapping
convs, the 1x1 expand: six convs) is a ``QuantConv``: a k-bit activation quantizer on its
input, then a convolution with k-bit weights.  The two methods differ *only* in that
activation quantizer (``DualBoundQuant`` with dynamic gates for DDTB, ``SymmetricBoundQuant``
for the PAMS-like baseline); weights use DDTB's per-tensor asymmetric 1st-99th percentile
quantizer for both, and biases stay fp32 for both (as in the released code's quantized
convs), so any difference comes from the activation quantizer alone.  (The weight range is
per-tensor min/max by default, not DDTB's EDSR percentiles: see the adaptations below.)  The loss is the
same too: L1(SR_q, HR) + 1000 x attention transfer between the body outputs (after the last
PReLU, the input of the tail) of the quantized student and of the fp32 teacher; DDTB adds
its gate regulariser during the static phase (the baseline has no gate to regularise).

DDTB's schedule, scaled from 60 epochs x 1,000 iterations to ``--steps``:

1. calibration (its epoch 1): ``--calib-batches`` training batches through the network with
   every quantizer in ``calibrating`` mode (float activations and float weights, no update),
   recording each quantizer's per-batch max and min; the top 30 % of the six quantizers by
   dynamic intensity (two of six) keep their gate, the others lose it (DDTB's EDSR ratio);
   the same batches are drawn for the baseline so both methods see the same training stream;
2. bound initialisation on the first training batch, layer by layer in one forward (each
   quantizer sees the already-quantized output of the ones before it, as when the released
   code re-initialises inside its first forward of epoch 2): DDTB's bounds at the 1st / 99th
   percentile of its input, the baseline's alpha at the 99th percentile of |input|;
3. a static phase (the first ``--static-frac`` of the steps; default 0.4, which is longer than
   the released code's 4 of 59 training epochs, so the gates have time to settle at beta = 1
   in a short run) with the gates run only for the regulariser that pulls their pre-sigmoid
   output to 0; then the dynamic phase with per-image bounds on the gated quantizers;
4. Adam (0.9, 0.999), lr 1e-3 for weights (gates included; DDTB: 1e-4, see below), 1e-2 for
   every ``alpha`` parameter (bounds), the whole network trained (fp32 head and tail too);
   the released code's StepLR (x0.5 every 10 of 60 epochs) becomes x0.5 at every sixth of
   the steps.

Adaptations, stated because they change numbers:

* Bound init at 3 and 4 bits.  The released code re-initialises from percentiles only at
  2 bits and keeps alpha = +-10 otherwise, a constant chosen for EDSR at rgb_range 255.  This
  network works on [0, 1] images and its body activations lie in about [-1.1, 2.0]: at
  +-10 a 4-bit grid has a step of 1.33, so every activation starts on one of three levels,
  and with Adam's ~1e-2 per step the bounds need most of a short run just to travel to the
  data.  So by default (``--init percentile``) both methods get their percentile init at
  every bit width; ``--init ddtb`` restores the released rule (percentiles at 2 bits,
  +-``--const-bound`` otherwise, for both methods).
* Weight range: per-tensor min/max (``--weight-range minmax``, DDTB's own weight quantizer
  for RDN, ``quant_conv3x3_asym``) instead of the 1st-99th percentile it uses for EDSR
  (``--weight-range p1-99``).  This FSRCNN was initialised with identity taps that carry
  the RGB image through channels 0-2 of every conv (``models.arm.nets.FSRCNN``); they are the
  few largest weights of each tensor (about 1.0 where the 99th percentile is 0.3-0.4), so
  percentile clipping cuts the image path of every mapping conv to about a third, and a
  clipped weight gets no gradient, so QAT cannot undo it.  Probe on held-out patches of the
  *training* photos (fp32 30.1 dB), 4 bits, 300 steps, seed 0: p1-99 gave 6.9 (DDTB) at
  lr 1e-4 and 18.3 / 20.3 dB (DDTB / PAMS-like) at lr 1e-3; min/max gave 21.4 / 21.5 at
  lr 1e-4 and 25.8 / 22.2 at lr 1e-3.  Even 8-bit p1-99 weights alone give 5 dB before
  training.  The choice is the same for both methods.
* Weight learning rate 1e-3 instead of 1e-4.  DDTB's 1e-4 is for 60,000 iterations; over a
  few hundred the weights barely move (Adam moves a weight about lr per step, here about
  0.01 in all against 4-bit weight steps of about 0.1), so training would reduce to fitting
  the bounds.  The same probe at 2 bits: 6.0 / 7.4 dB at 1e-4, 12.8 / 10.5 dB at 1e-3
  (DDTB / PAMS-like).  Bounds keep DDTB's 1e-2.  Same for both methods; ``--lr 1e-4``
  restores DDTB's value.
* The gate's first 1x1 conv receives gradients through a straight-through estimator
  (``compress.fakequant``'s documented choice; the released code leaves it at its random
  init).
* Data and budget: 32x32 LR / 128x128 HR patches of the ``train-ext`` photos (not DIV2K's
  48x48), hundreds of steps (not 60,000), a pretrained FSRCNN (not EDSR).  The test photos
  are only used for the final numbers; nothing here was tuned on them.

Output: progress per run (step, loss, steps/s, eta), one result line per run as it
finishes, the per-run results as JSON (``--json``, rewritten after every run so that an
interrupted study keeps what it finished), and markdown tables at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compress.fakequant import (DualBoundQuant, SymmetricBoundQuant, attention_transfer_loss, gate_regulariser,
                                quantize_weight_asym, select_dynamic)

LABEL = "simulated (fake-quantized), no real low-bit kernels"
CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "arm" / "weights" / "arm-fsrcnn" / "model.safetensors"
WIDTH = 56
AT_WEIGHT = 1000.0  # DDTB's weight of the attention-transfer term
DYNAMIC_RATIO = 0.3  # DDTB's share of gated quantizers for EDSR
WEIGHT_RANGES = {"minmax": (0.0, 100.0), "p1-99": (1.0, 99.0)}  # percentiles of the weight range
METHOD_NAMES = {"ddtb": "DDTB (dual bounds + gate)", "ddtb-static": "DDTB, static dual bounds (no gate)",
                "pams": "PAMS-like (symmetric bound)"}

Batch = tuple[torch.Tensor, torch.Tensor]  # (LR, HR), float NCHW in [0, 1]


class QuantConv(nn.Module):
    """A body convolution of the quantized network: k-bit activation quantizer on the input,
    k-bit per-tensor asymmetric weights clipped to ``weight_percentiles`` (DDTB's EDSR 1st-99th
    by default here; the study passes ``--weight-range``, min/max unless told), fp32 bias.

    While the activation quantizer is ``calibrating`` the whole layer runs in float (DDTB's
    32-bit calibration epoch).  ``init_bounds`` makes the next forward initialise the
    quantizer's bounds from the percentiles of the input it sees, then quantize with them."""

    def __init__(self, conv: nn.Conv2d, act_quant: nn.Module, bits: int,
                 weight_percentiles: tuple[float, float] = (1.0, 99.0)) -> None:
        super().__init__()
        self.conv = conv
        self.act_quant = act_quant
        self.bits = bits
        self.weight_percentiles = weight_percentiles
        self.init_bounds = False

    def quantized_weight(self) -> torch.Tensor:
        return quantize_weight_asym(self.conv.weight, self.bits, self.weight_percentiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if getattr(self.act_quant, "calibrating", False):
            self.act_quant(x)  # records the batch's max and min
            return c(x)
        if self.init_bounds:
            self.act_quant.init_from_percentiles(x)
            self.init_bounds = False
        return F.conv2d(self.act_quant(x), self.quantized_weight(), c.bias, c.stride, c.padding, c.dilation, c.groups)


def body_conv_slots(net: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of FSRCNN's six body convs, input to output: the 1x1 shrink, the
    four 3x3 mapping convs, the 1x1 expand."""
    body = net.body_conv
    return [(body[0], "0"), *((body, str(i)) for i in range(1, 5)), (body[6], "0")]


def make_act_quant(method: str, bits: int, channels: int, init: float) -> nn.Module:
    if method == "ddtb":
        return DualBoundQuant(bits, channels=channels, init=init)
    if method == "ddtb-static":
        return DualBoundQuant(bits, channels=None, init=init)
    if method == "pams":
        return SymmetricBoundQuant(bits, init=init)
    raise ValueError(f"unknown method {method!r}; known: {sorted(METHOD_NAMES)}")


def build_student(teacher: nn.Module, method: str, bits: int, init: float = 10.0,
                  weight_percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[nn.Module, list[QuantConv]]:
    """A trainable copy of ``teacher`` whose six body convs are ``QuantConv``s (the head and
    tail stay fp32).  ``extract_subnet`` freezes weights, so gradients are switched back on."""
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    wrappers = []
    for parent, name in body_conv_slots(student):
        conv = getattr(parent, name)
        wrapper = QuantConv(conv, make_act_quant(method, bits, conv.in_channels, init), bits, weight_percentiles)
        setattr(parent, name, wrapper)
        wrappers.append(wrapper)
    return student, wrappers


def sr_and_features(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FSRCNN's output and its body features (the tail's input), the tensor DDTB distils."""
    feat = net.body_conv(net.head_conv(x))
    return net.tail_conv(feat), feat


@dataclass
class TrainConfig:
    steps: int
    batch: int
    lr: float = 1e-3
    bound_lr: float = 1e-2
    static_frac: float = 0.4
    calib_batches: int = 32
    percentile_init: bool = True
    log_every: int = 100


@dataclass
class TrainStats:
    losses: list[float] = field(default_factory=list)
    l1: list[float] = field(default_factory=list)
    dynamic_layers: list[int] = field(default_factory=list)
    intensities: list[float] = field(default_factory=list)
    train_s: float = 0.0


def train_quantized(student: nn.Module, wrappers: list[QuantConv], teacher: nn.Module,
                    next_batch: Callable[[int], Batch], cfg: TrainConfig, label: str = "",
                    progress: Callable[[int, float, float], str] | None = None) -> TrainStats:
    """DDTB's schedule (calibrate, pick gates, init bounds, static then dynamic phase) for
    whichever activation quantizer the wrappers hold; quantizers without a gate simply skip
    the gate steps, so the baseline gets the same batches, steps and loss."""
    stats = TrainStats()
    teacher = teacher.eval().requires_grad_(False)
    quants = [w.act_quant for w in wrappers]
    gated = [q for q in quants if isinstance(q, DualBoundQuant) and q.gate is not None]

    # 1. calibration: float forward, record per-batch ranges; the same draws for every method
    for q in quants:
        if isinstance(q, DualBoundQuant):
            q.calibrating = True
    with torch.no_grad():
        for _ in range(cfg.calib_batches):
            x, _hr = next_batch(cfg.batch)
            if gated:
                student(x)
    for q in quants:
        if isinstance(q, DualBoundQuant):
            q.calibrating = False
    if gated:
        stats.intensities = [q.dynamic_intensity() for q in quants]
        chosen = select_dynamic(gated, DYNAMIC_RATIO)
        for q in gated:
            if q not in chosen:
                q.gate = None  # before the optimizer is built: a dropped gate has no parameters
        gated = chosen
        stats.dynamic_layers = [i for i, q in enumerate(quants) if q in chosen]

    alphas = [p for n, p in student.named_parameters() if "alpha" in n]
    others = [p for n, p in student.named_parameters() if "alpha" not in n]
    opt = torch.optim.Adam([{"params": others, "lr": cfg.lr}, {"params": alphas, "lr": cfg.bound_lr}],
                           betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.steps // 6), gamma=0.5)
    static_steps = round(cfg.static_frac * cfg.steps)

    start = time.time()
    for step in range(1, cfg.steps + 1):
        x, hr = next_batch(cfg.batch)
        if step == 1 and cfg.percentile_init:
            # 2. bounds from this batch, layer by layer in one forward (BN of the gates untouched)
            for w in wrappers:
                w.init_bounds = True
            with torch.no_grad():
                student.eval()
                student(x)
                student.train()
        if step == static_steps + 1:
            for q in gated:  # 3. the dynamic phase
                q.gated = True
        with torch.no_grad():
            t_feat = teacher.body_conv(teacher.head_conv(x))
        sr, s_feat = sr_and_features(student, x)
        l1 = F.l1_loss(sr, hr)
        loss = l1 + AT_WEIGHT * attention_transfer_loss(s_feat, t_feat)
        if gated and step <= static_steps:
            loss = loss + gate_regulariser(gated)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        stats.losses.append(float(loss.detach()))
        stats.l1.append(float(l1.detach()))
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps):
            rate = step / (time.time() - start)
            eta = (cfg.steps - step) / rate
            extra = progress(step, rate, eta) if progress else ""
            print(f"[{label}] step {step}/{cfg.steps}  loss {np.mean(stats.losses[-cfg.log_every:]):.5f}  "
                  f"{rate:.2f} steps/s  eta {eta / 60:.1f} min{extra}", flush=True)
    stats.train_s = time.time() - start
    return stats


class Bicubic(nn.Module):
    """x4 bicubic upscaling as a network, for the reference row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)


def bounds_of(q: nn.Module) -> dict[str, float]:
    if isinstance(q, DualBoundQuant):
        return {"lower": round(q.alpha_l.item(), 5), "upper": round(q.alpha_u.item(), 5)}
    return {"alpha": round(q.alpha.item(), 5)}


def summarise(runs: list[dict]) -> dict:
    """Per (method, bits): mean, sample std, min, max of the PSNR over seeds; per bits and
    method other than the baseline: the paired (same seed, same batches) difference to it."""
    by: dict[tuple[str, int], dict[int, float]] = {}
    for r in runs:
        by.setdefault((r["method"], r["bits"]), {})[r["seed"]] = r["psnr_rgb"]
    groups = {}
    for (method, bits), seeds in by.items():
        v = list(seeds.values())
        groups[f"{method}/{bits}"] = {"method": method, "bits": bits, "n": len(v), "mean": statistics.mean(v),
                                      "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                                      "min": min(v), "max": max(v)}
    paired = {}
    for (method, bits), seeds in by.items():
        base = by.get(("pams", bits))
        if method == "pams" or base is None:
            continue
        d = [seeds[s] - base[s] for s in sorted(seeds) if s in base]
        if d:
            paired[f"{method}-pams/{bits}"] = {"method": method, "bits": bits, "n": len(d),
                                               "mean": statistics.mean(d),
                                               "std": statistics.stdev(d) if len(d) > 1 else 0.0,
                                               "min": min(d), "max": max(d), "wins": sum(v > 0 for v in d)}
    return {"groups": groups, "paired": paired}


def markdown(summary: dict, references: dict[str, float], bits_order: list[int], methods: list[str],
             weight_range: str = "min/max") -> str:
    fp32 = references["fp32"]
    lines = [f"RGB PSNR (dB, 4 px crop) on the 8 test photos; ARM-FSRCNN w{WIDTH}, x4; {LABEL}. "
             f"Weights k-bit per-tensor asymmetric ({weight_range}) for every method; mean +- sample std over seeds.",
             "", "| method | W/A bits | PSNR (dB) | vs fp32 | seeds | min / max |", "|---|---|---|---|---|---|",
             f"| bicubic | - | {references['bicubic']:.3f} | {references['bicubic'] - fp32:+.3f} | - | - |",
             f"| fp32 | 32/32 | {fp32:.3f} | 0 | - | - |"]
    for bits in bits_order:
        for m in methods:
            g = summary["groups"].get(f"{m}/{bits}")
            if g:
                lines.append(f"| {METHOD_NAMES[m]} | {bits}/{bits} | {g['mean']:.3f} +- {g['std']:.3f} | "
                             f"{g['mean'] - fp32:+.3f} | {g['n']} | {g['min']:.3f} / {g['max']:.3f} |")
    if summary["paired"]:
        lines += ["", "Paired difference to the PAMS-like baseline (same seed = same batches and init batch):", "",
                  "| method | bits | mean diff (dB) | std | min / max | wins |", "|---|---|---|---|---|---|"]
        for bits in bits_order:
            for m in methods:
                p = summary["paired"].get(f"{m}-pams/{bits}")
                if p:
                    lines.append(f"| {METHOD_NAMES[m]} | {bits} | {p['mean']:+.3f} | {p['std']:.3f} | "
                                 f"{p['min']:+.3f} / {p['max']:+.3f} | {p['wins']}/{p['n']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="ddtb,pams", help=f"comma-separated, of {','.join(METHOD_NAMES)}")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--calib-batches", type=int, default=32)
    ap.add_argument("--static-frac", type=float, default=0.4, help="share of the steps with static bounds")
    ap.add_argument("--lr", type=float, default=1e-3, help="weights and gates (DDTB: 1e-4 for 60k steps)")
    ap.add_argument("--weight-range", choices=tuple(WEIGHT_RANGES), default="minmax",
                    help="per-tensor weight clipping: minmax (DDTB's RDN quantizer) or p1-99 (its EDSR one)")
    ap.add_argument("--bound-lr", type=float, default=1e-2, help="alpha parameters (DDTB: 1e-2)")
    ap.add_argument("--init", choices=("percentile", "ddtb"), default="percentile",
                    help="percentile: percentile bounds at every bit width; ddtb: only at 2 bits, else +-const")
    ap.add_argument("--const-bound", type=float, default=10.0, help="the constant bound of --init ddtb")
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    ap.add_argument("--split", default="train-ext")
    ap.add_argument("--json", type=Path, default=Path("docs/ddtb_lowbit.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bits_list = [int(b) for b in args.bits.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    for m in methods:
        if m not in METHOD_NAMES:
            ap.error(f"unknown method {m!r}")

    from models.arm import data
    from models.arm.nets import extract_subnet
    from models.arm.pipeline import ArmSR
    from models.arm.quantize import held_out_psnr

    t0 = time.time()
    model = ArmSR.from_checkpoint(args.checkpoint, int8=False, require_table=False)
    teacher = extract_subnet(model.backbone, model.full_state, WIDTH, serving_form=False)
    train_pairs = [(hr, lr) for _n, hr, lr in data.load_split(args.split)]
    test = data.load_split("test")
    references = {"fp32": held_out_psnr(teacher, test), "bicubic": held_out_psnr(Bicubic(), test)}
    print(f"{LABEL}. fp32 w{WIDTH} {references['fp32']:.3f} dB, bicubic {references['bicubic']:.3f} dB "
          f"on the {len(test)} test photos", flush=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    command = "python -m bench.ddtb_lowbit " + " ".join(sys.argv[1:] if argv is None else argv)
    plan = [(b, s, m) for b in bits_list for s in seeds for m in methods]
    runs: list[dict] = []
    durations: list[float] = []

    def write_json(done: bool) -> None:
        payload = {"label": LABEL, "date": date.today().isoformat(), "command": command, "config": config,
                   "network": f"ARM-FSRCNN w{WIDTH} ({args.checkpoint.name}), x4; head conv and tail deconv fp32",
                   "test_images": [n for n, _hr, _lr in test], "metric": "RGB PSNR, 4 px crop, mean over images",
                   "references": references, "runs": runs, "summary": summarise(runs) if runs else {},
                   "complete": done, "wall_s": round(time.time() - t0, 1)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")

    for i, (bits, seed, method) in enumerate(plan):
        run_start = time.time()
        label = f"{method} W{bits}A{bits} seed {seed} ({i + 1}/{len(plan)})"
        torch.manual_seed(seed)
        sampler = data.PatchSampler(train_pairs, seed=seed)

        def next_batch(n: int) -> Batch:
            lr_np, hr_np = sampler.batch(n)
            return torch.from_numpy(lr_np), torch.from_numpy(hr_np)

        def study_eta(_step: int, _rate: float, run_eta: float) -> str:
            per_run = statistics.mean(durations) if durations else None
            if per_run is None:
                return ""
            return f"  (study eta {(run_eta + per_run * (len(plan) - i - 1)) / 60:.0f} min)"

        percentile = args.init == "percentile" or bits == 2
        student, wrappers = build_student(teacher, method, bits, init=args.const_bound,
                                          weight_percentiles=WEIGHT_RANGES[args.weight_range])
        cfg = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, bound_lr=args.bound_lr,
                          static_frac=args.static_frac, calib_batches=args.calib_batches,
                          percentile_init=percentile, log_every=args.log_every)
        stats = train_quantized(student, wrappers, teacher, next_batch, cfg, label=label, progress=study_eta)
        psnr = held_out_psnr(student.eval(), test)
        durations.append(time.time() - run_start)
        runs.append({"method": method, "bits": bits, "seed": seed, "psnr_rgb": round(psnr, 4),
                     "drop_db": round(references["fp32"] - psnr, 4),
                     "bound_init": "percentile" if percentile else f"+-{args.const_bound:g}",
                     "final_loss_mean_last_50": round(float(np.mean(stats.losses[-50:])), 6),
                     "final_l1_mean_last_50": round(float(np.mean(stats.l1[-50:])), 6),
                     "first_loss": round(stats.losses[0], 6),
                     "dynamic_layers": stats.dynamic_layers,
                     "dynamic_intensity": [round(v, 6) for v in stats.intensities],
                     "bounds": [bounds_of(w.act_quant) for w in wrappers],
                     "train_s": round(stats.train_s, 1), "run_s": round(durations[-1], 1)})
        print(f"RESULT {method} W{bits}A{bits} seed {seed}: {psnr:.3f} dB ({psnr - references['fp32']:+.3f} vs fp32)"
              f"  gates on body convs {stats.dynamic_layers or '-'}  {durations[-1]:.0f} s", flush=True)
        write_json(done=False)

    write_json(done=True)
    print()
    print(markdown(summarise(runs), references, bits_list, methods, args.weight_range))
    print(f"\nper-run results: {args.json}; total wall time {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
