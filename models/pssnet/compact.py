"""Compact networks trained from scratch on the glyph set: DCFF (filters fused from the full
bank, ``compress.dcff``) against the same compact network trained plainly, on our MobileNetV1
and on the method's own CIFAR workhorse, ResNet-56 (``--arch resnet56``).

    python -m models.pssnet.compact models/pssnet/weights/pss-mbv1-glyphs --method dcff --keep 0.5 \
        --seed 0 --out runs/compact/dcff-k50-s0
    python -m models.pssnet.compact models/pssnet/weights/pss-mbv1-glyphs --method plain --keep 0.5 \
        --seed 0 --out runs/compact/plain-k50-s0
    python -m models.pssnet.compact models/pssnet/weights/pss-mbv1-glyphs --arch resnet56 --method dcff \
        --keep 0.5 --lr 0.05 --seed 0 --out runs/compact/r56-dcff-k50-s0

The bundle gives the architecture (its full-width subnet ``max``: depths, strides and
resolution 40),
the classes and the preprocessing; nothing of its weights is used. The compact network keeps
``floor(keep * n)`` of the ``n`` filters of the stem and of every point-wise convolution
(DCFF's ``m = floor(n (1 - r))`` with one rate ``r = 1 - keep`` for every layer; the paper's
per-layer rates are hand-set per network). Depth-wise convolutions, BN layers and the
classifier are compact from the start, as in DCFF. With ``--arch resnet56`` the bundle gives
only the classes and the preprocessing, and what is compact is every residual block's inner
width (its first convolution, fused in DCFF; ``models.pssnet.cifar_resnet``), the residual
path keeping its stage width; that network is written as a plain ResNet
(``cifar_resnet.save``), not as a served variant. At the default rate 0.1 plain training of
that ResNet-56 never left chance on seed 0; its runs use 0.05 (docs/COMPRESSION.md).

Both methods share one training loop (``models.pssnet.dense_train``: data order,
augmentation, SGD with Nesterov momentum, cosine learning rate with a linear warm-up, the
DCFF CIFAR recipe's weight decay 5e-4); DCFF adds only its fused layers and re-fuses them
at every epoch's first step. An epoch here is ``--steps / --epochs`` steps, and ``--epochs``
defaults to the 300 of the method's CIFAR recipe, so the temperature schedule spans the run
as it spans the paper's: soft fusion for the first 1/300 of training, then, with ``T`` near
1e4, selection (``compress.dcff`` says why the choice then stays). With one epoch per pass
over the data instead (``--epochs 4`` for 3,000 steps), a quarter of the run trains fused
filters that are near-averages of the whole bank; on the glyphs that cost 5.4 points at
keep 0.5 (62.76 % against plain training's 68.20 %, seed 0). The
network written is the plain dense export; for DCFF the manifest records the largest
difference between the fused network's and the export's logits on the test split.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

from compress import dcff
from models.pssnet import cifar_resnet, dense_train
from models.pssnet.dense_train import layer_widths, mobilenet_widths, say
from models.pssnet.nets import DenseSubnet, SupernetSpec, _init_weights, subnet_widths


def compact_widths(spec: SupernetSpec, keep: float) -> list[int]:
    """``floor(keep * n)`` (at least 1) of every prunable layer's width in the largest subnet."""
    return [dcff.compact_width(n, keep) for n in layer_widths(subnet_widths(spec, spec.max_cfg()))]


def plain_compact(spec: SupernetSpec, keep: float) -> DenseSubnet:
    """The compact network, freshly initialised."""
    cfg = spec.max_cfg()
    net = DenseSubnet(spec, cfg, mobilenet_widths(subnet_widths(spec, cfg), compact_widths(spec, keep)))
    _init_weights(net)
    return net


def fusable_slots(net: DenseSubnet) -> list[tuple[nn.Sequential, int]]:
    """(sequence, index) of the stem convolution and of every point-wise convolution."""
    return [(net.features[0], 0)] + [(block, 3) for block in net.features[1:]]


def dcff_compact(spec: SupernetSpec, keep: float) -> DenseSubnet:
    """The compact network with each stem and point-wise convolution a ``FusedConv2d`` over
    the full width's filter bank, freshly initialised."""
    net = plain_compact(spec, keep)
    full = layer_widths(subnet_widths(spec, spec.max_cfg()))
    for (seq, i), n in zip(fusable_slots(net), full):
        conv: nn.Conv2d = seq[i]
        seq[i] = dcff.FusedConv2d(conv.in_channels, conv.out_channels, n, conv.kernel_size[0], conv.stride[0],
                                  conv.padding[0], bias=conv.bias is not None)
    _init_weights(net)
    return net


def compact_resnet(depth: int, num_classes: int, keep: float, fused: bool,
                   zero_last_bn: bool = False) -> cifar_resnet.CifarResNet:
    """The CIFAR ResNet with every block's inner width at ``keep``, freshly initialised; with
    ``fused``, each block's first convolution is a ``FusedConv2d`` over its stage width's bank."""
    net = cifar_resnet.CifarResNet(depth, num_classes, cifar_resnet.compact_inner(depth, keep))
    if fused:
        for block, n in zip(net.blocks, cifar_resnet.block_widths(depth)):
            c = block.conv1
            block.conv1 = dcff.FusedConv2d(c.in_channels, c.out_channels, n, 3, c.stride[0], 1)
        cifar_resnet.init_weights(net)
    if zero_last_bn:
        cifar_resnet.zero_last_bn(net)
    return net


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, help="a PSS-Net bundle: its architecture, classes and preprocessing")
    ap.add_argument("--arch", choices=("mobilenetv1", "resnet56"), default="mobilenetv1",
                    help="mobilenetv1: the bundle's full-width subnet; resnet56: the CIFAR ResNet-56")
    ap.add_argument("--zero-last-bn", action="store_true",
                    help="resnet56: each block's last BN scale starts at 0 (not the papers' initialisation)")
    ap.add_argument("--method", choices=("dcff", "plain"), required=True)
    ap.add_argument("--keep", type=float, default=0.5, help="share of each layer's filters kept (1 - DCFF's rate)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=300, help="DCFF: re-fusions (and temperature steps) per run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="train under bf16 autocast (products in bf16, weights and "
                    "optimiser in float32): about 1.9x faster where the CPU multiplies bf16 natively (AMX)")
    args = ap.parse_args(argv)
    if not 0 < args.keep <= 1:
        raise SystemExit("--keep must be in (0, 1]")
    if args.zero_last_bn and args.arch != "resnet56":
        raise SystemExit("--zero-last-bn is for --arch resnet56")
    torch.set_num_threads(args.threads)
    from compress.artifact import command_line
    from models.pssnet.serving import PssNetModel

    resnet = args.arch == "resnet56"
    tag = f"{'resnet56 ' if resnet else ''}{args.method} keep {args.keep} seed {args.seed}"
    model = PssNetModel.from_checkpoint(args.bundle, int8=False, variants=False)
    torch.manual_seed(args.seed)
    if resnet:
        if model.input_size != cifar_resnet.CifarResNet.input_size:
            raise SystemExit(f"--arch resnet56 needs a bundle whose images are 32x32, not {model.input_size}")
        net = compact_resnet(56, len(model.classes), args.keep, fused=args.method == "dcff",
                             zero_last_bn=args.zero_last_bn)
        net = net.to(memory_format=torch.channels_last)
    else:
        net = dcff_compact(model.spec, args.keep) if args.method == "dcff" else plain_compact(model.spec, args.keep)
    images, labels = dense_train.training_split()
    epochs = args.epochs
    per_epoch = math.ceil(args.steps / epochs)
    log: list[dict] = []

    def refuse(step: int, _opt) -> None:
        if args.method == "dcff" and step % per_epoch == 0:
            e = step // per_epoch
            counts = dcff.refuse_all(net, e, epochs)
            log.append({"epoch": e, "temperature": round(dcff.temperature(e, epochs), 2), **counts})
            if e < 2 or counts["rechosen"] or e % 50 == 0:
                say("dcff", f"epoch {e}/{epochs}: T = {dcff.temperature(e, epochs):.1f}, {counts}")

    cfg = dense_train.TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay,
                                  warmup_steps=args.warmup_steps, seed=args.seed, save_every=args.save_every,
                                  bf16_autocast=args.bf16)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    dense_train.train(net, images, labels, cfg, state_path=args.out / "train_state.pt", before_step=refuse, desc=tag,
                      input_size=cifar_resnet.CifarResNet.input_size if resnet else None, channels_last=resnet)
    sets = dense_train.held_out(model.preprocess)
    exported = dcff.exported_copy(net) if args.method == "dcff" else net.eval()
    extra = {}
    if args.method == "dcff":
        x = sets["test"][0]
        with torch.inference_mode():
            diff = max(float((net(x[i:i + 500]) - exported(x[i:i + 500])).abs().max()) for i in range(0, len(x), 500))
        extra = {"export_max_abs_diff": diff, "fused_accuracy": dense_train.accuracy(net, sets),
                 "temperature_schedule": {"t_start": dcff.T_START, "t_end": dcff.T_END, "k": dcff.STEEPNESS,
                                          "epochs": epochs, "steps_per_epoch": per_epoch},
                 "refusions": {"epochs_with_a_new_choice": [x["epoch"] for x in log if x["rechosen"]],
                               "epochs_keeping_the_choice": sum(1 for x in log if not x["rechosen"])}}
    acc = dense_train.accuracy(exported, sets)
    say(tag, f"val {100 * acc['val']:.2f} %, test {100 * acc['test']:.2f} %" +
        (f", export max |diff| {extra['export_max_abs_diff']:.2e}" if extra else ""))
    manifest = {
        "method": args.method if args.method == "dcff" else "plain-compact", "keep": args.keep, "seed": args.seed,
        "source": {"bundle": model.name, "architecture_of": "resnet56" if resnet else "max",
                   "weights": "trained from scratch" + (", last BN of each block at 0" if args.zero_last_bn else "")},
        "accuracy": acc, **extra,
        "training": {**cfg.to_dict(), "schedule": "cosine with linear warm-up", "loss": "cross-entropy",
                     "seconds": round(time.time() - t0, 1), "data": "glyph train split, demo augmentation"},
        "command": command_line("models.pssnet.compact", argv), "date": date.today().isoformat()}
    if resnet:
        manifest = cifar_resnet.save(args.out, exported, {**manifest, "classes": list(model.classes)})
    else:
        manifest = dense_train.write_variant(args.out, exported, manifest)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
