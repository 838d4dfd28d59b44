"""Unstructured sparsity of the PSS-Net bundle's largest subnet: OptG against gradual magnitude
pruning (GMP) on the same schedule (``compress.sparsity``).

    python -m models.pssnet.sparse models/pssnet/weights/pss-mbv1-glyphs --method optg --sparsity 0.9 \
        --seed 0 --out runs/sparse/optg-90-s0

Both start from the trained weights and BN statistics of the bundle's top ladder subnet
(``--start scratch`` trains the supernet's full-width ``max`` architecture from scratch, as
the method's code does; in 1,500 steps neither method left chance accuracy that way, and the
dense network itself was still at chance after 300, so on this budget only a trained start
compares the two). They mask every convolution but the stem, and not the classifier (the
method's ``--first-layer-dense --last-layer-dense``; ``--masked-ends`` masks them too), and
train ``--steps`` steps in ``--epochs`` epochs, the unit at which masks are re-chosen and
the sigmoid schedules advance (``E = 100`` and ``beta = 1`` as the method's ImageNet
configuration, so the sparsity ramps from 45 % to 55 % of the run), with the shared loop of
``models.pssnet.dense_train``: SGD with Nesterov momentum, cosine learning rate with a
5-epoch linear warm-up, label smoothing 0.1 and weight decay 4e-5 (the method's MobileNetV1
configuration). OptG's scores learn at the weights' rate by default (``--score-lr``; why in
``compress.sparsity``).

Written: ``model.safetensors`` (the dense network with exact zeros; BN not folded) and
``manifest.json``: sparsity overall and per layer, held-out top-1 before and after, the
weights' storage dense and in CSR, and the measured time of the network with its 1x1
convolutions and classifier on CSR kernels against dense (batch 1 and 32, interleaved,
medians): ``real_speed`` is true only where CSR is faster at batch 32.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import date

import torch

from compress import sparsity
from compress.artifact import command_line
from models.pssnet import dense_train
from models.pssnet.dense_train import say


def csr_speed(net: torch.nn.Module, size: int) -> dict:
    """The network with BN folded, dense against CSR 1x1/linear kernels (``compress.sparsity``)."""
    import copy

    from models.pssnet.nets import fold_bn

    dense = fold_bn(copy.deepcopy(net).eval())
    return sparsity.dense_vs_csr_seconds(dense, {b: torch.randn(b, 3, size, size) for b in (1, 32)})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sparsity.add_arguments(ap, score_init="zero")
    ap.add_argument("--start", choices=("trained", "scratch"), default="trained")
    ap.add_argument("--masked-ends", action="store_true", help="mask the stem convolution and the classifier "
                    "too (default: dense, the method's --first-layer-dense --last-layer-dense)")
    ap.add_argument("--score-lr", choices=("constant", "ramp"), default="constant",
                    help="OptG: the scores learn at the weights' rate ('constant'), or at that rate times the "
                    "sparsity sigmoid as in the method's code ('ramp': in a run this short its scores are noise; "
                    "see compress.sparsity)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None, help="default: 0.01 from the trained network, 0.05 from "
                    "scratch (the method's MobileNetV1 configuration)")
    ap.add_argument("--weight-decay", type=float, default=4e-5)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--save-every", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    args.lr = args.lr if args.lr is not None else (0.05 if args.start == "scratch" else 0.01)
    torch.set_num_threads(args.threads)
    from models.pssnet.nets import DenseSubnet, _init_weights
    from models.pssnet.serving import PssNetModel

    tag = f"{args.method} {args.sparsity:.0%} seed {args.seed}"
    model = PssNetModel.from_checkpoint(args.bundle, int8=False, variants=False)
    top = model.ladder[-1]
    torch.manual_seed(args.seed)
    if args.start == "trained":
        net, _ = model.with_bn(top.index)
    else:
        net = DenseSubnet(model.spec, model.spec.max_cfg())
        _init_weights(net)
    sets = dense_train.held_out(model.preprocess)
    before = dense_train.accuracy(net, sets)
    steps_per_epoch = math.ceil(args.steps / args.epochs)
    sp = sparsity.Sparsifier(net, args.method, args.sparsity, args.epochs, steps_per_epoch, args.beta,
                             score_lr_ramp=args.score_lr == "ramp", dense_ends=not args.masked_ends,
                             score_init=args.score_init)
    cfg = dense_train.TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay,
                                  warmup_steps=5 * steps_per_epoch, label_smoothing=args.label_smoothing,
                                  seed=args.seed, save_every=args.save_every)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    groups = [sp.score_group(args.lr)] if args.method == "optg" else []
    dense_train.train(net, *dense_train.training_split(), cfg, state_path=args.out / "train_state.pt",
                      extra_groups=groups, before_step=sp.before_step, desc=tag)
    seconds = time.time() - t0
    sp.reallocate(args.sparsity)  # the exact target over the masked layers (the schedule ends within 1e-20 of it)
    per_layer, sp_masked = sp.per_layer(), sp.sparsity()
    sp.export()
    after = dense_train.accuracy(net, sets)
    achieved = sparsity.weight_sparsity(net)
    say(tag, f"sparsity {achieved:.4f}; val {100 * after['val']:.2f} %, test {100 * after['test']:.2f} % "
             f"(at the start: {100 * before['test']:.2f} %)")
    speed = csr_speed(net, model.input_size)
    say(tag, f"CSR 1x1/linear kernels vs dense: {speed}")
    manifest = dense_train.write_variant(args.out, net, {
        "method": args.method, "target_sparsity": args.sparsity, "sparsity": round(achieved, 5),
        "masked_sparsity": round(sp_masked, 5), "dense_ends": not args.masked_ends,
        "per_layer_sparsity": per_layer, "seed": args.seed,
        "source": {"bundle": model.name, "architecture_of": top.name if args.start == "trained" else "max",
                   "start": f"trained weights of {top.name}" if args.start == "trained" else "from scratch"},
        "accuracy_before": before, "accuracy": after,
        "storage_bytes": sparsity.storage_bytes(net), "speed_1_thread": speed,
        "real_speed": speed["batch_32"]["csr_over_dense"] < 1.0,
        "schedule": {"epochs": args.epochs, "steps_per_epoch": steps_per_epoch, "beta": args.beta,
                     "score_lr": (None if args.method != "optg" else "weights' lr x sigmoid(beta (e - E/2))"
                                  if args.score_lr == "ramp" else "weights' lr"),
                     "score_init": args.score_init if args.method == "optg" else None},
        "training": {**cfg.to_dict(), "schedule": "cosine with linear warm-up", "seconds": round(seconds, 1),
                     "data": "glyph train split, demo augmentation"},
        "command": command_line("models.pssnet.sparse", argv), "date": date.today().isoformat()})
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
