"""Train an ARM supernet on the offline photos (ARM's recipe, scaled to one CPU).

Per iteration one width is drawn for the whole batch with probability proportional to
its FLOPs squared (the paper's rule: wide subnets get most of the updates, narrow ones
still learn to share the prefix channels), the subnet runs on slices of the shared
weights, and the L1 loss updates them.  Adam (0.9, 0.99) with cosine annealing to 1e-7.

    python -m models.arm.train --backbone fsrcnn --iters 60000 --out runs/arm-fsrcnn

Resumable: ``--out`` holds ``train_state.pt`` (weights, optimiser, schedule, sampler
RNG), written every ``--save-every`` iterations; rerunning the same command continues.
While ``--pause-file`` exists (someone is benchmarking) training sleeps between iterations.
At the end the full-width weights are written as ``model.safetensors`` with a
``manifest.json`` that records the exact command and data split; ``build_table`` and
``evaluate`` then add the lookup table and the held-out metrics to it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from models.arm import data
from models.arm.metrics import mse_to_db
from models.arm.nets import Supernet, get_backbone, official_flops
from models.common.progress import progress
from models.common.quiet import add_pause_argument, pause_while


def width_probabilities(backbone_name: str) -> np.ndarray:
    bb = get_backbone(backbone_name)
    cost = np.array([official_flops(bb.build(w)) for w in bb.widths], dtype=np.float64)
    return cost**2 / (cost**2).sum()


def param_groups(net: Supernet, lr: float, deconv_scale: float) -> list[dict]:
    """FSRCNN's deconvolution writes the output directly: with Adam every one of its weights
    moves by about the learning rate per step, which at 1e-3 adds noise to every output
    pixel.  ``deconv_scale`` < 1 gives it a smaller rate, as the FSRCNN paper does."""
    tail = [p for n, p in net.full.named_parameters() if n.startswith("tail_conv.")]
    rest = [p for n, p in net.full.named_parameters() if not n.startswith("tail_conv.") and p.requires_grad]
    groups = [{"params": rest, "lr": lr}]
    if tail:
        groups.append({"params": tail, "lr": lr * deconv_scale})
    return groups


def psnr_rgb(sr: torch.Tensor, hr: torch.Tensor, crop: int = 4) -> float:
    """RGB PSNR (all channels) on [0,1] tensors after rounding to 8 bits, border cropped."""
    sr8 = (sr.clamp(0, 1) * 255).round()
    hr8 = (hr * 255).round()
    if crop:
        sr8, hr8 = sr8[..., crop:-crop, crop:-crop], hr8[..., crop:-crop, crop:-crop]
    return mse_to_db(float(((sr8 - hr8) ** 2).mean()))


def validate(net: Supernet, batch: tuple[np.ndarray, np.ndarray]) -> dict[int, float]:
    lr, hr = (torch.from_numpy(a) for a in batch)
    net.eval()
    with torch.no_grad():
        out = {w: psnr_rgb(net(lr, w), hr) for w in net.backbone.widths}
    net.train()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="fsrcnn", choices=["fsrcnn", "carn", "srresnet"])
    ap.add_argument("--iters", type=int, default=60000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None, help="default: the paper's rate for the backbone")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=2000)
    ap.add_argument("--log-every", type=int, default=500)
    ap.add_argument("--deconv-lr-scale", type=float, default=1.0,
                    help="learning-rate factor for FSRCNN's output deconvolution (ARM: 1; the FSRCNN paper: 0.1)")
    ap.add_argument("--init", type=Path, default=None, help="start from these full-width weights")
    ap.add_argument("--train-split", default="train", choices=["train", "train-ext"],
                    help="our training split (models/arm/data.py): the 19 wallpapers, or those plus 15 Lomiri photos")
    ap.add_argument("--train-images", type=Path, default=None, help="HR image folder (instead of --train-split)")
    ap.add_argument("--val-images", type=Path, default=None, help="HR image folder (default: our val split)")
    add_pause_argument(ap)
    ap.add_argument("--stop-after", type=int, default=None, help="stop (state saved) after this iteration")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bb = get_backbone(args.backbone)
    lr0 = args.lr if args.lr is not None else bb.train_lr
    args.out.mkdir(parents=True, exist_ok=True)
    state_path = args.out / "train_state.pt"

    net = Supernet(bb)
    if args.init:
        from models.arm.checkpoint import load_full_state

        net.full.load_state_dict(load_full_state(args.init))
    opt = torch.optim.Adam(param_groups(net, lr0, args.deconv_lr_scale), lr=lr0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.iters, eta_min=1e-7)
    train_set = data.load_folder(args.train_images) if args.train_images else data.load_split(args.train_split)
    val_set = data.load_folder(args.val_images) if args.val_images else data.load_split("val")
    sampler = data.PatchSampler([(hr, lr) for _, hr, lr in train_set], seed=args.seed)
    val_sampler = data.PatchSampler([(hr, lr) for _, hr, lr in val_set], seed=1234)
    val_batch = val_sampler.batch(256)
    probs = width_probabilities(args.backbone)
    width_rng = np.random.default_rng(args.seed + 1)
    start, elapsed, paused_total = 0, 0.0, 0.0
    if state_path.exists():
        st = torch.load(state_path, weights_only=True)  # our own file: tensors, dicts, numbers, strings
        net.full.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        sampler.rng.bit_generator.state = st["sampler_rng"]
        width_rng.bit_generator.state = st["width_rng"]
        start = st["iter"]
        elapsed, paused_total = st.get("elapsed", 0.0), st.get("paused", 0.0)
        print(f"resumed at iteration {start}", flush=True)

    def save_state(it: int) -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": net.full.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "iter": it,
                    "elapsed": elapsed + time.time() - t0 - paused, "paused": paused_total + paused,
                    "sampler_rng": sampler.rng.bit_generator.state,
                    "width_rng": width_rng.bit_generator.state}, tmp)
        tmp.replace(state_path)

    print(f"training ARM-{args.backbone}: widths {bb.widths}, width probabilities "
          f"{np.round(probs, 3).tolist()}, {args.iters} iterations of batch {args.batch}", flush=True)
    losses: list[float] = []
    t0, paused = time.time(), 0.0
    stop = min(args.iters, args.stop_after) if args.stop_after else args.iters
    net.train()
    for it in progress(range(start, stop), total=args.iters, initial=start, desc="train"):
        paused += pause_while(args.pause_file)
        width = bb.widths[width_rng.choice(len(bb.widths), p=probs)]
        lr_b, hr_b = (torch.from_numpy(a) for a in sampler.batch(args.batch))
        loss = F.l1_loss(net(lr_b, width), hr_b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        done = it + 1
        if done % args.log_every == 0 or done == args.iters:
            val = validate(net, val_batch)
            print(f"iter {done}: l1 {np.mean(losses):.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"val PSNR {' / '.join(f'w{w} {p:.2f}' for w, p in val.items())} "
                  f"({elapsed + time.time() - t0 - paused:.0f}s)", flush=True)
            losses.clear()
        if done % args.save_every == 0 or done == stop:
            save_state(done)
    if stop < args.iters:
        print(f"stopped at iteration {max(stop, start)} of {args.iters} (state saved; rerun without "
              f"--stop-after to continue)", flush=True)
        return
    train_seconds = elapsed + time.time() - t0 - paused

    weights = args.out / "model.safetensors"
    save_file({k: v.detach().contiguous() for k, v in net.full.state_dict().items()}, str(weights))
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update({
        "family": "arm",
        "backbone": args.backbone,
        "weights": weights.name,
        "widths": list(bb.widths),
        "training": {
            "command": "python -m models.arm.train " + shlex.join(sys.argv[1:] if argv is None else argv),
            "iterations": args.iters, "batch": args.batch, "lr": lr0, "seed": args.seed,
            "deconv_lr_scale": args.deconv_lr_scale,
            "wall_clock_s": round(train_seconds, 1), "paused_for_benchmarks_s": round(paused_total + paused, 1),
            "threads": args.threads,
            "width_probabilities": probs.tolist(),
            "data": {"train": [name for name, _, _ in train_set],
                     "val": [name for name, _, _ in val_set],
                     "recipe": "wallpaper JPEGs halved by MATLAB bicubic, mod-4 crop, LR = MATLAB bicubic x1/4"},
            "final_val_psnr_rgb_patches": {str(w): p for w, p in validate(net, val_batch).items()},
        },
    })
    if args.init:  # a second stage: keep the first stage's recipe so the chain can be rerun
        init_manifest = args.init.with_name("manifest.json")
        earlier = json.loads(init_manifest.read_text()).get("training") if init_manifest.exists() else None
        manifest["training"]["init_from"] = {"weights": str(args.init), "training": earlier}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {weights} and {manifest_path}", flush=True)


if __name__ == "__main__":
    main()
