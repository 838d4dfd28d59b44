"""CLR-RNF filter pruning of a PSS-Net bundle's largest subnet (MobileNetV1), compared with
L1-norm and random filter choice at the same widths.

    python -m models.pssnet.prune models/pssnet/weights/pss-mbv1-glyphs --like f10 --seeds 0 1 2
    python -m models.pssnet.prune models/pssnet/weights/pss-mbv1-glyphs --like f10 --selectors rnf \
        --seeds 0 --steps 3000 --out runs/prune/f10-rnf-s0

The largest subnet, as a dense network with its own BN statistics, is cut to the FLOPs of the
ladder rung ``--like`` names: CLR sets each layer's width (``compress.prune.clr_for_flops``),
then each selector (RNF, L1, random) picks the filters at those widths, and the network is cut
(``cut``: a kept filter takes its BN entries along, and the next depth-wise convolution, its BN
and the next point-wise convolution's inputs follow it). Prints the held-out top-1 of every
cut network before any fine-tuning, per seed, next to the ladder rung's own.

With ``--out`` (one selector, one seed) the cut network is then fine-tuned with plain
cross-entropy, as CLR-RNF does (SGD with momentum 0.9, weight decay on the convolution and
classifier weights but not the depth-wise ones, a cosine learning rate instead of the
paper's steps, the glyph training augmentation), printing progress and saving a resumable
state every ``--save-every`` steps (rerun the same command to continue), and written as
``model.safetensors`` (the dense network with its BN layers) and ``manifest.json`` (the
command, widths, FLOPs, and held-out top-1 before and after fine-tuning).

``--align 8`` rounds every width to a multiple of 8 (the target still holds for the rounded
network): ONNX Runtime's blocked kernels run such widths up to 2.5x faster than the method's
exact counts at the same FLOPs.

Prunable layers: the stem and every point-wise convolution (a depth-wise convolution has one
filter per input channel and follows its input). Cost coefficient of a layer, CLR's ``c_l``:
the multiply-accumulates one of its filters costs, its own and those of the depth-wise and
point-wise work that follows it, over their mean across layers (the official code hand-sets
this table per network; for MobileNets its ``lam`` is 1, used here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

from compress import prune
from compress.artifact import top1
from models.pssnet import dense_train
from models.pssnet.dense_train import mobilenet_widths
from models.pssnet.nets import DenseSubnet, SubnetWidths, SupernetSpec, _conv_out, widths_flops

LAMBDA = 1.0  # CLR's lam for MobileNets


def prunable_convs(net: DenseSubnet) -> list[nn.Conv2d]:
    """The stem convolution and every block's point-wise convolution, in order."""
    if net.spec.model_name != "mobilenet_v1":
        raise ValueError(f"pruning is implemented for mobilenet_v1, not {net.spec.model_name}")
    return [net.features[0][0]] + [block[3] for block in net.features[1:]]


def cost_coefficients(spec: SupernetSpec, widths: SubnetWidths, resolution: int) -> list[float]:
    """CLR's ``c_l`` per prunable layer: the MACs one of its filters costs (its own, plus the
    next depth-wise filter and that channel's share of the next point-wise layer, or of the
    classifier), over the mean across layers."""
    sizes = [_conv_out(resolution, spec.stem_stride)]  # the stem's output side, then each block's
    for b in widths.blocks:
        sizes.append(_conv_out(sizes[-1], b.stride))
    taps = [9 * 3] + [b.cin for b in widths.blocks]  # a stem filter's taps, a point-wise filter's inputs
    costs = []
    for i, t in enumerate(taps):
        own = t * sizes[i] ** 2
        if i < len(widths.blocks):  # the next block's depth-wise filter and point-wise input
            after = (9 + widths.blocks[i].cout) * sizes[i + 1] ** 2
        else:  # the average pool and the classifier
            after = sizes[-1] ** 2 + spec.num_classes
        costs.append(float(own + after))
    mean = statistics.fmean(costs)
    return [c / mean for c in costs]


@torch.no_grad()
def cut(net: DenseSubnet, kept: list[torch.Tensor]) -> DenseSubnet:
    """A dense copy of ``net`` (with its BN layers, not folded) keeping filters ``kept[l]`` of
    prunable layer l: the filter's BN entries go with it, and so do the next depth-wise
    filter, its BN entries and the next point-wise layer's (or the classifier's) input."""
    if net.folded:
        raise ValueError("cut a network with its BN layers (PssNetModel.with_bn), not a folded one")
    widths = mobilenet_widths(net.widths, [len(k) for k in kept])
    out = DenseSubnet(net.spec, net.cfg, widths).eval()
    src, dst = net.state_dict(), out.state_dict()

    def take(prefix: str, rows: torch.Tensor | None, cols: torch.Tensor | None = None) -> None:
        for key in [k for k in src if k.startswith(prefix)]:
            t = src[key]
            if t.dim() == 0:
                dst[key] = t.clone()
                continue
            if rows is not None:
                t = t.index_select(0, rows)
            if cols is not None and t.dim() > 1:
                t = t.index_select(1, cols)
            dst[key] = t.clone()

    take("features.0.0.", kept[0])  # stem conv: 3 inputs
    take("features.0.1.", kept[0])  # its BN
    for i in range(1, len(net.features)):
        cin, cout = kept[i - 1], kept[i]
        take(f"features.{i}.0.", cin)  # depth-wise: one filter per kept input channel
        take(f"features.{i}.1.", cin)
        take(f"features.{i}.3.", cout, cin)  # point-wise: kept filters, kept inputs
        take(f"features.{i}.4.", cout)
    take("classifier.0.weight", None, kept[-1])
    take("classifier.0.bias", None)
    out.load_state_dict(dst)
    return out


def prune_to_flops(net: DenseSubnet, target_mflops: float, select: prune.Selector,
                   generator: torch.Generator | None = None, align: int = 1) -> tuple[DenseSubnet, float]:
    """``net`` cut to at most ``target_mflops`` (PSS-Net's MFLOPs count) by CLR widths (each a
    multiple of ``align``, see ``compress.prune.aligned``) and the filters ``select`` picks;
    also returns CLR's prune ratio."""
    spec, res = net.spec, net.resolution
    convs = prunable_convs(net)
    coefficients = cost_coefficients(spec, net.widths, res)
    keep, ratio = prune.clr_for_flops(
        [c.weight for c in convs], coefficients, LAMBDA,
        lambda k: widths_flops(spec, mobilenet_widths(net.widths, k), res), target_mflops, align=align)
    kept = [select(c.weight, k, generator) for c, k in zip(convs, keep)]
    return cut(net, kept), ratio


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--like", default="f10", help="the ladder rung whose FLOPs the pruned network must fit")
    ap.add_argument("--selectors", nargs="+", default=list(prune.SELECTORS), choices=list(prune.SELECTORS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=None,
                    help="fine-tune the one cut network (one selector, one seed) and write it here")
    ap.add_argument("--align", type=int, default=1,
                    help="round every CLR width to a multiple of this (8: the widths ONNX Runtime's and oneDNN's "
                         "blocked kernels run at full speed; 1: the method's exact widths)")
    ap.add_argument("--steps", type=int, default=3000, help="fine-tuning steps (with --out)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01, help="CLR-RNF's CIFAR fine-tuning rate")
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.out is not None and (len(args.selectors) != 1 or len(args.seeds) != 1):
        raise SystemExit("--out fine-tunes one network: give one --selectors and one --seeds")
    torch.set_num_threads(args.threads)
    from models.glyphs.data import load_split
    from models.pssnet.serving import PssNetModel

    def say(msg: str) -> None:
        print(f"[prune] {msg}", file=sys.stderr, flush=True)

    model = PssNetModel.from_checkpoint(args.bundle, int8=False, variants=False)  # cut a subnet, not a variant
    by_name = {r.name: r for r in model.rungs}
    if args.like not in by_name:
        raise SystemExit(f"--like {args.like!r} is not a rung of {model.name} ({', '.join(by_name)})")
    like, top = by_name[args.like], model.ladder[-1]
    say("rendering the held-out val and test splits")
    held_out = {}
    for split in ("val", "test"):
        s = load_split(split)
        held_out[split] = (torch.stack([model.preprocess(i) for i in s.images]), torch.from_numpy(s.labels))
    dense, _layers = model.with_bn(top.index)

    def accuracy(net: nn.Module) -> dict[str, float]:
        with torch.inference_mode():
            return {split: top1(net.eval(), x, y) for split, (x, y) in held_out.items()}

    reference = {split: top1(lambda b: model.forward(like.index, b), x, y) for split, (x, y) in held_out.items()}
    if args.out is not None:
        write_finetuned(args, argv, model, dense, like, reference, accuracy, say)
        return
    print("| network | seed | MFLOPs | val top-1 | test top-1 |\n|---|---|---|---|---|")
    uncut = accuracy(dense)
    print(f"| {top.name} (uncut) | - | {top.flops:.2f} | {100 * uncut['val']:.2f} % | {100 * uncut['test']:.2f} % |")
    print(f"| {like.name} (ladder rung) | - | {like.flops:.2f} | {100 * reference['val']:.2f} % | "
          f"{100 * reference['test']:.2f} % |")
    for name in args.selectors:
        for seed in args.seeds:
            net, ratio = prune_to_flops(dense, like.flops, prune.SELECTORS[name],
                                        torch.Generator().manual_seed(seed), args.align)
            acc = accuracy(net)
            flops = widths_flops(net.spec, net.widths, net.resolution)
            say(f"{name} seed {seed}: CLR prune ratio {ratio:.3f}, widths {[net.widths.stem] + [b.cout for b in net.widths.blocks]}")
            print(f"| CLR + {name}, not fine-tuned | {seed} | {flops:.2f} | {100 * acc['val']:.2f} % | "
                  f"{100 * acc['test']:.2f} % |", flush=True)


def write_finetuned(args, argv, model, dense: DenseSubnet, like, reference: dict, accuracy, say) -> None:
    """Cut, fine-tune and write one network (``--out``)."""
    from compress.artifact import command_line

    [name], [seed] = args.selectors, args.seeds
    net, ratio = prune_to_flops(dense, like.flops, prune.SELECTORS[name], torch.Generator().manual_seed(seed),
                                args.align)
    before = accuracy(net)
    say(f"{name} seed {seed}: before fine-tuning val {100 * before['val']:.2f} %, test {100 * before['test']:.2f} %")
    cfg = dense_train.TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay,
                                  seed=seed, save_every=args.save_every)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t0 = time.time()
    dense_train.train(net, *dense_train.training_split(), cfg, state_path=args.out / "train_state.pt",
                      desc="fine-tune")
    after = accuracy(net)
    say(f"{name} seed {seed}: after {args.steps} steps val {100 * after['val']:.2f} %, test {100 * after['test']:.2f} %")
    manifest = dense_train.write_variant(args.out, net, {
        "method": f"clr-{name}", "source": {"bundle": model.name, "cut_from": model.ladder[-1].name},
        "like": {"rung": like.name, "mflops": like.flops, "val_accuracy": reference["val"],
                 "test_accuracy": reference["test"]},
        "clr_prune_ratio": round(ratio, 5), "clr_lambda": LAMBDA, "clr_align": args.align, "seed": seed,
        "accuracy_before_finetune": before, "accuracy": after,
        "training": {**cfg.to_dict(), "schedule": "cosine", "loss": "cross-entropy",
                     "seconds": round(time.time() - t0, 1), "data": "glyph train split, demo augmentation"},
        "command": command_line("models.pssnet.prune", argv), "date": date.today().isoformat()})
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
