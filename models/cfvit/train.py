"""Train the tiny CF-ViT demo (the official training recipe, scaled down to one CPU core).

Every step runs both stages on the whole batch (during training eta is effectively 1):

    loss = CE(fine_logits, y; label smoothing) + KL(softmax(fine_logits).detach() || coarse)

(KLDiv, 'batchmean', between log_softmax(coarse) and softmax(fine).detach(): the fine stage
teaches the coarse one; there is no separate CE on the coarse stage).  AdamW, linear warm-up
then cosine decay, light augmentation (small translations, contrast/brightness; no flips).
Informative selection is off at first (the fine stage sees all Gf^2 fine tokens plus the
reuse features) and switched on for the last part of training (``--selection-from``; the
official runs switch it on after epoch 200 of 300).

    python -m models.cfvit.train --steps 8000 --name cf-tiny-glyphs

Resumable: ``--out`` (default ``runs/<name>``) holds ``train_state.pt`` (weights, optimiser,
step, RNG states, elapsed time), written every ``--save-every`` steps; rerunning the same
command continues.  At the end the weights go to ``<weights-dir>/<name>/model.safetensors``
with a ``manifest.json``: configuration, MACs, the held-out evaluation (coarse-only and
all-fine accuracy, the eta curve on val and on test), the exact command, data and wall-clock.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from models.cfvit import data
from models.cfvit.checkpoint import load_ours, save_ours
from models.cfvit.evaluate import best_saving, evaluate_split, predict
from models.cfvit.model import CONFIGS, CfVisionTransformer, count_macs
from models.common.progress import progress
from models.common.quiet import add_pause_argument, pause_while

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def cfvit_loss(coarse: torch.Tensor, fine: torch.Tensor, y: torch.Tensor, smoothing: float,
               kl_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    ce = F.cross_entropy(fine, y, label_smoothing=smoothing)
    kl = F.kl_div(F.log_softmax(coarse, dim=-1), F.softmax(fine.detach(), dim=-1), reduction="batchmean")
    return ce + kl_weight * kl, {"ce": ce.item(), "kl": kl.item()}


def param_groups(model: CfVisionTransformer, wd: float) -> list[dict]:
    """No weight decay on biases, norms, the cls token and positional embeddings (as timm/DeiT)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or n.startswith(("cls_token", "pos_embed_list")) else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="glyphs", choices=data.DATASETS,
                    help="glyphs (models.glyphs) or the synthetic-shapes FALLBACK")
    ap.add_argument("--config", default="cf_tiny_glyphs", choices=sorted(CONFIGS))
    ap.add_argument("--name", default="cf-tiny-glyphs")
    ap.add_argument("--embed-dim", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--mlp-ratio", type=float, default=None)
    ap.add_argument("--drop-path", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--min-lr", type=float, default=1e-5)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5%% of --steps)")
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--kl-weight", type=float, default=1.0)
    ap.add_argument("--selection-from", type=float, default=0.5,
                    help="fraction of the steps after which informative selection is on")
    ap.add_argument("--max-shift", type=int, default=2)
    ap.add_argument("--jitter", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="training state (default runs/<name>)")
    ap.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--eval-every", type=int, default=1000, help="quick val accuracy every N steps (0: never)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--limit-eval", type=int, default=None, help="evaluate on the first N images only (tests)")
    add_pause_argument(ap)
    ap.add_argument("--stop-after", type=int, default=None, help="stop (state saved) after this step (tests)")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from the weights of this bundle (a fresh optimiser and schedule: a second "
                         "training phase; its configuration must match)")
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / args.name
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "train_state.pt"

    train_set = data.load(args.data, "train")
    val_set = data.load(args.data, "val")
    overrides = {k: v for k, v in {"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.heads,
                                   "mlp_ratio": args.mlp_ratio}.items() if v is not None}
    cfg = replace(CONFIGS[args.config], name=args.name, num_classes=len(train_set.classes),
                  drop_path_rate=args.drop_path, **overrides)
    if args.mlp_ratio is not None:
        cfg = replace(cfg, reuse_mlp_ratio=args.mlp_ratio)
    h, w = train_set.images.shape[1:3]
    if (h, w) != (cfg.img_size, cfg.img_size):
        raise SystemExit(f"training images are {h}x{w}; the config expects {cfg.img_size}")

    torch.manual_seed(args.seed)
    model = CfVisionTransformer(cfg)
    init_record = None
    if args.init is not None:
        earlier = load_ours(args.init)
        if earlier.config.to_dict() != cfg.to_dict():
            raise SystemExit(f"--init {args.init}: its configuration differs from this run's")
        model.load_state_dict(earlier.model.state_dict())
        init_record = {"bundle": str(args.init), "training": earlier.meta.get("training"),
                       "evaluation_test": {k: earlier.meta.get("evaluation", {}).get("test", {}).get(k)
                                           for k in ("accuracy_coarse_only", "accuracy_all_fine")}}
        print(f"initialised from {args.init}", flush=True)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    sel_step = int(round(args.selection_from * args.steps))
    x_train = train_set.images  # uint8; normalised per batch
    y_train = torch.from_numpy(train_set.labels)
    x_val = data.to_tensor(val_set.images[:1000], cfg.mean, cfg.std)
    y_val = val_set.labels[:1000]
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    start, elapsed, resumed_from, log, paused_total, cpu_before = 0, 0.0, [], [], 0.0, 0.0
    if state_path.exists():
        st = torch.load(state_path, weights_only=True)  # our own file: tensors, dicts, numbers, strings
        if st["argv"] != argv:
            print(f"note: resuming a run started as {shlex.join(st['argv'])!r}", file=sys.stderr)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        rng.bit_generator.state = st["rng"]
        gen.set_state(st["gen"])
        start, elapsed, resumed_from, log = st["step"], st["elapsed"], st["resumed_from"], st["log"]
        paused_total, cpu_before = st.get("paused", 0.0), st.get("cpu", 0.0)
        if start < args.steps:
            resumed_from = resumed_from + [start]
            print(f"resumed at step {start}", flush=True)

    def save_state(step: int) -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "argv": argv,
                    "rng": rng.bit_generator.state, "gen": gen.get_state(),
                    "elapsed": elapsed + time.time() - t0 - paused, "paused": paused_total + paused,
                    "cpu": cpu_before + time.process_time() - c0, "resumed_from": resumed_from, "log": log}, tmp)
        tmp.replace(state_path)

    macs = count_macs(cfg)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"CF-ViT {cfg.name}: {nparams:,} parameters, {cfg.img_size}px, patch {cfg.patch_size}, grids "
          f"{cfg.coarse_grid}x{cfg.coarse_grid}/{cfg.fine_grid}x{cfg.fine_grid}, tokens {cfg.num_coarse + 1}/"
          f"{cfg.fine_seq_len}, MACs {macs.coarse / 1e6:.1f}M coarse + {macs.fine_increment / 1e6:.1f}M fine; "
          f"data {args.data} ({len(x_train)} train, {len(val_set.labels)} val); selection from step {sel_step}",
          flush=True)
    t0, c0 = time.time(), time.process_time()
    model.train()
    run = {"loss": [], "ce": [], "kl": [], "acc_c": [], "acc_f": []}
    last = start
    paused = 0.0
    for step in progress(range(start, args.steps), total=args.steps, initial=start, desc="train"):
        paused += pause_while(args.pause_file)
        lr = lr_at(step, args.steps, warmup, args.lr, args.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.from_numpy(rng.integers(0, len(x_train), size=args.batch))
        xb = data.augment(data.to_tensor(x_train[idx.numpy()], cfg.mean, cfg.std), gen, args.max_shift, args.jitter)
        yb = y_train[idx]
        selection = step >= sel_step
        coarse, fine = model.forward_all(xb, informative_selection=selection)
        loss, parts = cfvit_loss(coarse, fine, yb, args.label_smoothing, args.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run["loss"].append(loss.item())
        run["ce"].append(parts["ce"])
        run["kl"].append(parts["kl"])
        run["acc_c"].append((coarse.argmax(-1) == yb).float().mean().item())
        run["acc_f"].append((fine.argmax(-1) == yb).float().mean().item())
        done = last = step + 1
        if done % args.log_every == 0 or done == args.steps:
            entry = {"step": done, "lr": lr, "selection": selection, **{k: float(np.mean(v)) for k, v in run.items()}}
            if args.eval_every and (done % args.eval_every == 0 or done == args.steps):
                pv = predict(model, x_val)
                entry["val_coarse"] = float((pv["coarse"] == y_val).mean())
                entry["val_fine"] = float((pv["fine"] == y_val).mean())
            log.append(entry)
            extra = f" val coarse {entry['val_coarse']:.3f} fine {entry['val_fine']:.3f}" if "val_fine" in entry else ""
            print(f"step {done}: loss {entry['loss']:.3f} (ce {entry['ce']:.3f} kl {entry['kl']:.3f}) train acc "
                  f"coarse {entry['acc_c']:.3f} fine {entry['acc_f']:.3f} lr {lr:.2e}"
                  f"{' sel' if selection else ''}{extra} ({elapsed + time.time() - t0 - paused:.0f}s)", flush=True)
            for v in run.values():
                v.clear()
        if done % args.save_every == 0 or done == args.steps or done == args.stop_after:
            save_state(done)
        if args.stop_after is not None and done >= args.stop_after:
            print(f"stopped after step {done} (state in {state_path})", flush=True)
            return
    train_seconds = elapsed + (time.time() - t0 - paused if last > start else 0.0)
    cpu_seconds = cpu_before + (time.process_time() - c0 if last > start else 0.0)
    if last > start:
        save_state(last)

    print("evaluating on val and test ...", flush=True)
    t1 = time.time()
    test_set = data.load(args.data, "test")
    evaluation = {s: evaluate_split(model, ds, args.limit_eval) for s, ds in (("val", val_set), ("test", test_set))}
    eval_seconds = time.time() - t1
    for s, e in evaluation.items():
        b = best_saving(e["eta_curve"], e["accuracy_all_fine"])
        tail = (f"; cheapest eta within 0.5 pt of all-fine: {b['eta']} ({b['flops_fraction']:.3f} of full MACs, "
                f"acc {b['accuracy']:.4f}, exit {b['exit_rate']:.3f})") if b else ""
        print(f"{s}: coarse-only {e['accuracy_coarse_only']:.4f}, all-fine {e['accuracy_all_fine']:.4f}{tail}",
              flush=True)
    manifest = {
        "family": "cfvit",
        "name": args.name,
        "classes": list(train_set.classes),
        "parameters": nparams,
        "flops": {"convention": "MACs per image (CF-ViT/fvcore 'FLOPs'; torch.utils.flop_counter / 2)",
                  "coarse": macs.coarse, "fine_increment": macs.fine_increment, "full": macs.full,
                  "fine_increment_without_selection": macs.fine_increment_no_selection,
                  "tokens": {"coarse": cfg.num_coarse + 1, "fine": cfg.fine_seq_len}},
        "data": {"dataset": args.data, "train": {"n": int(len(train_set.labels)), "source": train_set.source},
                 "val": {"n": int(len(val_set.labels)), "source": val_set.source},
                 "test": {"n": int(len(test_set.labels)), "source": test_set.source},
                 "split_rule": "by font family (models.glyphs)" if args.data == "glyphs" else
                 "FALLBACK synthetic shapes, independent seeds per split",
                 "normalisation": {"mean": list(cfg.mean), "std": list(cfg.std)}},
        "training": {
            "command": "python -m models.cfvit.train " + shlex.join(argv),
            "steps": args.steps, "batch": args.batch, "lr": args.lr, "min_lr": args.min_lr,
            "weight_decay": args.weight_decay, "warmup": warmup, "label_smoothing": args.label_smoothing,
            "kl_weight": args.kl_weight, "selection_from_step": sel_step, "augmentation":
                {"max_shift": args.max_shift, "jitter": args.jitter, "flips": False},
            "drop_path": args.drop_path, "seed": args.seed, "threads": args.threads,
            "resumed_from": resumed_from,
            "init_from": init_record,
            "wall_clock_s": round(train_seconds, 1), "paused_for_benchmarks_s": round(paused_total + paused, 1),
            "cpu_time_s": round(cpu_seconds, 1),
            "eval_wall_clock_s": round(eval_seconds, 1),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", torch {torch.__version__}, "
                       f"{args.threads} thread(s), shared 2-core host",
            "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "log": log,
        },
        "evaluation": evaluation,
    }
    path = save_ours(model, args.weights_dir / args.name, manifest)
    print(f"wrote {path} and {path.with_name('manifest.json')}", flush=True)


if __name__ == "__main__":
    main()
