"""Unstructured sparsity of CF-ViT's Linear layers: OptG against gradual magnitude pruning
(GMP) on the same schedule (``compress.sparsity``), fine-tuning the trained bundle.

    python -m models.cfvit.sparse models/cfvit/weights/cf-tiny-glyphs --method optg --sparsity 0.9 \
        --seed 0 --out runs/cfvit-sparse/optg-90-s0

Masked: every Linear layer of the transformer blocks (attention ``qkv`` and ``proj``, MLP
``fc1`` and ``fc2``) and of the feature-reuse MLP, 94 % of the parameters; the
convolutional patch embedding and the classifier stay dense (the method's
``--first-layer-dense --last-layer-dense``). One global threshold over all masked layers,
re-chosen once per epoch (``--epochs`` per run, ``E = 100`` and ``beta = 1`` as the method's
ImageNet configuration: the sparsity ramps from 45 % to 55 % of the run).

The loop is the bundle's own recipe (``models.cfvit.train``): both stages on every batch,
cross-entropy on the fine logits with label smoothing plus the fine-to-coarse KL, AdamW with
a linear warm-up and cosine decay, the same light augmentation, informative selection on. The
weights keep AdamW (a ViT does not fine-tune well with plain SGD); OptG's scores are trained as
in the method, by SGD with momentum 0.9 and no weight decay, at ``--score-lr`` (constant: why
in ``compress.sparsity``). From the trained network the scores start at ``|W|`` by default
(``--score-init``), measured on PSS-Net to be the start that keeps up with magnitude pruning.

Written: ``model.safetensors`` (the bundle format, pruned weights exact zeros) and
``manifest.json``: sparsity overall and per layer, held-out accuracy (coarse-only and
all-fine, on val and test) before and after, the Linear weights' storage dense and in CSR, and
the measured time of the whole network with its Linear layers on CSR kernels against dense at
batch 1 and 32 (``real_speed`` is true only where CSR is faster at batch 32). Resumable.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import date

import numpy as np
import torch
from torch import nn

from compress import sparsity
from compress.artifact import command_line
from models.cfvit import data
from models.cfvit.checkpoint import load_ours, save_ours
from models.cfvit.evaluate import evaluate_split
from models.cfvit.model import CfVisionTransformer
from models.cfvit.train import cfvit_loss, lr_at, param_groups
from models.common.progress import progress


def masked_linears(model: CfVisionTransformer) -> list[nn.Linear]:
    """The Linear layers OptG and GMP mask: all but the classifier."""
    return [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and not name.startswith("head")]


def weight_groups(model: CfVisionTransformer, sp: sparsity.Sparsifier, weight_decay: float) -> list[dict]:
    """AdamW's groups (the bundle's decay rule) without OptG's scores, which are parameters of
    the model too but have their own optimiser (SGD, no decay)."""
    scores = {id(p) for p in sp.scores()}
    return [{**g, "params": [p for p in g["params"] if id(p) not in scores]}
            for g in param_groups(model, weight_decay)]


def evaluate(model: CfVisionTransformer, sets: dict[str, data.Split], limit: int | None) -> dict[str, dict]:
    """The bundle's evaluation (accuracy coarse-only and all-fine, and the eta curve) per split."""
    return {split: evaluate_split(model, ds, limit) for split, ds in sets.items()}


def summary(evaluation: dict[str, dict]) -> dict[str, dict[str, float]]:
    return {split: {"coarse_only": round(e["accuracy_coarse_only"], 4), "all_fine": round(e["accuracy_all_fine"], 4)}
            for split, e in evaluation.items()}


def linear_storage_bytes(layers: list[nn.Linear]) -> dict[str, int]:
    holder = nn.ModuleList(layers)
    return sparsity.storage_bytes(holder)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sparsity.add_arguments(ap, score_init="magnitude")
    ap.add_argument("--score-lr", type=float, default=0.01, help="OptG's scores: SGD, momentum 0.9, constant rate")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW peak rate for the weights (the bundle's second "
                    "phase used 2.5e-4)")
    ap.add_argument("--min-lr", type=float, default=1e-5)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit-eval", type=int, default=None, help="evaluate on the first N images only (tests)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    tag = f"cfvit {args.method} {args.sparsity:.0%} seed {args.seed}"
    bundle = load_ours(args.bundle)
    model, cfg = bundle.model, bundle.config
    torch.manual_seed(args.seed)
    sets = {"val": data.load("glyphs", "val"), "test": data.load("glyphs", "test")}
    before = summary(evaluate(model, sets, args.limit_eval))
    steps_per_epoch = math.ceil(args.steps / args.epochs)
    layers = masked_linears(model)
    sp = sparsity.Sparsifier(model, args.method, args.sparsity, args.epochs, steps_per_epoch, args.beta,
                             score_lr_ramp=False, score_init=args.score_init, modules=layers)
    weights = torch.optim.AdamW(weight_groups(model, sp, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    scores = torch.optim.SGD(sp.scores(), lr=args.score_lr, momentum=0.9) if args.method == "optg" else None
    warmup = 5 * steps_per_epoch
    train_set = data.load("glyphs", "train")
    y_train = torch.from_numpy(train_set.labels)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    args.out.mkdir(parents=True, exist_ok=True)
    state_path = args.out / "train_state.pt"
    start, elapsed = 0, 0.0
    if state_path.exists():
        st = torch.load(state_path, weights_only=True)  # our own file: tensors, dicts, numbers, strings
        model.load_state_dict(st["model"])
        weights.load_state_dict(st["weights"])
        if scores is not None:
            scores.load_state_dict(st["scores"])
        rng.bit_generator.state, start, elapsed = st["rng"], st["step"], st["elapsed"]
        gen.set_state(st["gen"])
        print(f"{tag}: resumed at step {start}/{args.steps}", flush=True)
    t0 = time.time()

    def save(step: int) -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "weights": weights.state_dict(),
                    "scores": None if scores is None else scores.state_dict(), "rng": rng.bit_generator.state,
                    "gen": gen.get_state(), "step": step, "elapsed": elapsed + time.time() - t0}, tmp)
        tmp.replace(state_path)

    model.train()
    for step in progress(range(start, args.steps), total=args.steps, initial=start, desc=tag, log_interval=30):
        for g in weights.param_groups:
            g["lr"] = lr_at(step, args.steps, warmup, args.lr, args.min_lr)
        if scores is not None:
            sp.before_step(step, scores)
        elif step % steps_per_epoch == 0:
            sp.reallocate(sp.sparsity_at(step // steps_per_epoch))
        idx = rng.integers(0, len(train_set.labels), size=args.batch)
        xb = data.augment(data.to_tensor(train_set.images[idx], cfg.mean, cfg.std), gen)
        coarse, fine = model.forward_all(xb, informative_selection=True)
        loss, _ = cfvit_loss(coarse, fine, y_train[torch.from_numpy(idx)], args.label_smoothing)
        weights.zero_grad(set_to_none=True)
        if scores is not None:
            scores.zero_grad(set_to_none=True)
        loss.backward()
        weights.step()
        if scores is not None:
            scores.step()
        if (step + 1) % args.save_every == 0:
            save(step + 1)
    seconds = elapsed + time.time() - t0
    sp.reallocate(args.sparsity)  # the exact target over the masked layers
    per_layer, sp_masked = sp.per_layer(), sp.sparsity()
    sp.export()
    model.eval()
    evaluation = evaluate(model, sets, args.limit_eval)
    after = summary(evaluation)
    print(f"{tag}: masked-layer sparsity {sp_masked:.4f}; test all-fine {100 * after['test']['all_fine']:.2f} %, "
          f"coarse-only {100 * after['test']['coarse_only']:.2f} % (at the start: "
          f"{100 * before['test']['all_fine']:.2f} / {100 * before['test']['coarse_only']:.2f} %)", flush=True)
    x = {b: data.to_tensor(sets["test"].images[:b], cfg.mean, cfg.std) for b in (1, 32)}
    speed = sparsity.dense_vs_csr_seconds(model, x)
    print(f"{tag}: CSR Linear kernels vs dense: {speed}", flush=True)
    manifest = {
        "method": args.method, "target_sparsity": args.sparsity, "masked_sparsity": round(sp_masked, 5),
        "sparsity_of_all_weights": round(sparsity.weight_sparsity(model), 5),
        "masked_layers": [n for n, m in model.named_modules() if any(m is k for k in layers)],
        "per_layer_sparsity": per_layer, "seed": args.seed, "source": {"bundle": str(args.bundle)},
        "accuracy_before": before, "accuracy": after,
        "storage_bytes_masked_linears": linear_storage_bytes(layers), "speed_1_thread": speed,
        "real_speed": speed["batch_32"]["csr_over_dense"] < 1.0,
        "schedule": {"epochs": args.epochs, "steps_per_epoch": steps_per_epoch, "beta": args.beta,
                     "score_init": args.score_init if args.method == "optg" else None,
                     "score_lr": args.score_lr if args.method == "optg" else None},
        "training": {"steps": args.steps, "batch": args.batch, "optimizer": "AdamW (weights)", "lr": args.lr,
                     "min_lr": args.min_lr, "warmup_steps": warmup, "weight_decay": args.weight_decay,
                     "label_smoothing": args.label_smoothing, "informative_selection": True,
                     "seconds": round(seconds, 1), "data": "glyph train split, the bundle's augmentation"},
        "command": command_line("models.cfvit.sparse", argv), "date": date.today().isoformat()}
    # The bundle keeps its format (it loads and serves like the dense one) with this network's
    # own evaluation, so its eta curve is measured, not inherited.
    save_ours(model, args.out, {**bundle.meta, "name": f"{bundle.meta.get('name', 'cfvit')}-{args.method}-"
                                f"{round(100 * args.sparsity)}", "evaluation": evaluation, "sparsity": manifest})
    (args.out / "sparse.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({k: manifest[k] for k in ("masked_sparsity", "accuracy", "real_speed")}, indent=2))
    return manifest


if __name__ == "__main__":
    main()
