"""Train a PSS-Net supernet with prioritised subnet sampling (the official algorithm), scaled to a CPU.

Per iteration, on one batch:

1. the max net gets cross-entropy with the labels; its logits, detached, are the teacher;
2. a constraint type is drawn (weighted by its number of pools; the demo has one, FLOPs)
   and a target uniformly from its grid;
3. with probability p_e, or while that pool holds fewer than ``--pool-size`` entries, a new
   cfg comes from the structure-space sampler; otherwise one is drawn from the pool with
   probability softmax(score / T_e);
4. the candidate's score is -CE on this batch (BN in train mode): inserted, or EMA-updated
   (0.9 old + 0.1 new); the pool evicts its lowest score when over capacity.  (The official
   code scores with a separate no-grad forward; the candidate's training forward below
   gives the identical value on the same weights and batch, so we reuse it.)
5. the candidate and the min net each get KL(log_softmax(out) || softmax(teacher)),
   'batchmean', (in-place distillation);
6. one SGD step (Nesterov 0.9; weight decay only on non-depth-wise conv weights and the FC
   weight), cosine learning rate per iteration, no warm-up.

p_e and T_e decay per epoch e of E as 1.0 * 0.01 ** (e / E).

At the end every pool's top-1 cfg (plus max and min net) is kept, each gets its own BN
statistics (as the official evaluation does: reset, cumulative average over
``--calib-batches`` augmented training batches), is evaluated on the held-out val and test
splits, and the bundle is written: ``model.safetensors`` (shared supernet weights),
``bn_stats.safetensors`` (statistics per retained subnet) and ``manifest.json``.

    python -m models.pssnet.train --model mobilenet_v1 --out runs/pssnet-mbv1-demo

Resumable: ``--out/train_state.pt`` is written every ``--save-every`` iterations (and when
pausing); rerunning the same command continues.  While ``/tmp/anytime-quiet`` exists (a
benchmark is measuring on this host) training pauses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.common.progress import progress
from models.common.quiet import QUIET_FILE, pause_while
from models.pssnet.calibrate import bn_stats, recalibrate_bn
from models.pssnet.checkpoint import save_bundle
from models.pssnet.data import Augment, DemoSplit, batches, calibration_batches, load_demo_split, normalise
from models.pssnet.nets import (
    PssSupernet, SubnetConfig, SupernetSpec, demo_spec, extract_subnet, subnet_flops, subnet_params,
)
from models.pssnet.pools import DEMO_GRIDS, Pools, StructureSampler, TargetGrid, flops_metric, schedule



def param_groups(net: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the non-depth-wise conv weights and the FC weight only (the official
    recipe), for the supernet and for any dense network (a pruned one, or one whose weights
    are parametrized, e.g. masked: then the decay goes to the underlying weight)."""
    from torch.nn.utils import parametrize

    decay: dict[int, torch.nn.Parameter] = {}
    for module in net.modules():
        if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        is_dw = isinstance(module, torch.nn.Conv2d) and module.groups == module.in_channels and module.groups > 1
        if not is_dw:
            w = (module.parametrizations.weight.original if parametrize.is_parametrized(module, "weight")
                 else module.weight)
            decay[id(w)] = w
    no_decay = [p for p in net.parameters() if id(p) not in decay]
    return [{"params": list(decay.values()), "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(dense: torch.nn.Module, split: DemoSplit, batch: int = 500) -> float:
    dense.eval()
    correct = 0
    for x, y in batches(split.images, split.labels, batch):
        correct += int((dense(normalise(x)).argmax(1) == y).sum())
    return correct / len(split.labels)


def calibrated(net: PssSupernet, cfg: SubnetConfig, calib: list[torch.Tensor]) -> torch.nn.Module:
    """A dense copy of ``cfg`` with its own recalibrated BN statistics (unfolded)."""
    dense = extract_subnet(net, cfg)
    recalibrate_bn(dense, calib)
    return dense


@dataclass
class Rung:
    name: str
    cfg: SubnetConfig
    pool: dict


def retained(net: PssSupernet, pools: Pools) -> list[Rung]:
    spec = net.spec
    rungs = [Rung("max", spec.max_cfg(), {"type": "max_net"}), Rung("min", spec.min_cfg(), {"type": "min_net"})]
    for kind, grid in pools.grids.items():
        for target in grid.targets:
            top = pools.top(kind, target, 1)
            if top:
                cfg, score = top[0]
                rungs.append(Rung(f"{kind[0]}{target}", cfg, {"type": kind, "target": target, "score": score,
                                                              "pool_entries": len(pools.pools[kind][target])}))
    return sorted(rungs, key=lambda r: subnet_flops(spec, r.cfg))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v1", choices=["mobilenet_v1", "mobilenet_v2"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1, help="official: 0.3 at batch 1024")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--pool-size", type=int, default=20, help="pool capacity (official: 50)")
    ap.add_argument("--grid", type=int, nargs=3, default=None, metavar=("START", "STOP", "STEP"),
                    help="FLOPs target grid in M (default: the demo grid of the model)")
    ap.add_argument("--gen-map-num", type=int, default=100_000, help="random subnets behind the sampler")
    ap.add_argument("--calib-batches", type=int, default=9)
    ap.add_argument("--calib-batch-size", type=int, default=256)
    ap.add_argument("--data", default="glyphs", choices=["glyphs", "synthetic"],
                    help="demo data: models.glyphs, or synthetic shapes (smoke tests only)")
    ap.add_argument("--max-train", type=int, default=0, help="use only the first N training images (0: all)")
    ap.add_argument("--max-eval", type=int, default=0, help="evaluate on the first N val/test images (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--log-every", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=1000, help="val accuracy of max/min net (0: never)")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from these supernet weights (a bundle folder or its model.safetensors)")
    ap.add_argument("--name", default=None, help="bundle name in the manifest (default: the --out folder name)")
    args = ap.parse_args(argv)
    command = "python -m models.pssnet.train " + shlex.join(sys.argv[1:] if argv is None else argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    state_path = args.out / "train_state.pt"

    train_set, val_set, test_set = (load_demo_split(s, args.data) for s in ("train", "val", "test"))
    if args.max_train:
        train_set = DemoSplit(train_set.images[: args.max_train], train_set.labels[: args.max_train],
                              train_set.classes, train_set.source)
    if args.max_eval:
        val_set, test_set = (DemoSplit(d.images[: args.max_eval], d.labels[: args.max_eval], d.classes, d.source)
                             for d in (val_set, test_set))
    classes = train_set.classes
    spec: SupernetSpec = demo_spec(args.model, len(classes))
    grid = TargetGrid("flops", *args.grid) if args.grid else DEMO_GRIDS[args.model]
    augment = Augment.demo(spec.input_size)
    net = PssSupernet(spec)
    init_record = None
    if args.init:
        from safetensors.torch import load_file

        init_dir = args.init if args.init.is_dir() else args.init.parent
        net.load_state_dict(load_file(str(init_dir / "model.safetensors")), strict=True)
        earlier = init_dir / "manifest.json"
        init_record = {"weights": str(args.init),
                       "training": json.loads(earlier.read_text()).get("training") if earlier.exists() else None}
        print(f"initialised from {args.init}", flush=True)
    opt = torch.optim.SGD(param_groups(net, args.weight_decay), lr=args.lr, momentum=0.9, nesterov=True)
    iters_per_epoch = len(train_set.labels) // args.batch
    total = iters_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.0)
    t_build = time.time()
    sampler = StructureSampler(spec, grid, flops_metric(spec), n_draws=args.gen_map_num, seed=args.seed)
    print(f"structure-space sampler: {args.gen_map_num} draws in {time.time() - t_build:.1f}s, "
          f"support per target {dict(zip(sampler.targets, sampler.support.astype(int).tolist()))}", flush=True)
    pools = Pools([grid], max_size=args.pool_size)
    rng = np.random.default_rng(args.seed + 1)
    max_cfg, min_cfg = spec.max_cfg(), spec.min_cfg()
    start, train_seconds = 0, 0.0
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)  # our own file; tensors and dicts
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        pools.load_official(st["arch_pools"])
        rng.bit_generator.state = st["rng"]
        start, train_seconds = st["iter"], st["train_seconds"]
        print(f"resumed at iteration {start}/{total}", flush=True)

    t_seg = time.time()

    def save_state(it: int) -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "arch_pools": pools.to_official(), "rng": rng.bit_generator.state, "iter": it,
                    "train_seconds": train_seconds + time.time() - t_seg}, tmp)
        tmp.replace(state_path)

    print(f"PSS-Net {args.model} demo: {len(classes)} classes, {len(train_set.labels)} train images, "
          f"{iters_per_epoch} it/epoch x {args.epochs} epochs = {total} iterations of batch {args.batch}; "
          f"max {max_cfg.infer_metric:.2f} / min {min_cfg.infer_metric:.2f} MFLOPs; "
          f"{len(grid.targets)} pools {grid.targets}", flush=True)
    logs: dict[str, list[float]] = {"ce_max": [], "kl_cand": [], "kl_min": [], "acc_max": [], "new": []}
    net.train()
    it = start
    for it in progress(range(start, total), total=total, initial=start, desc="train", log_interval=300):
        if QUIET_FILE.exists():
            train_seconds += time.time() - t_seg
            t_seg = time.time()
            pause_while(QUIET_FILE, before=lambda: save_state(it))
            t_seg = time.time()
        epoch = it // iters_per_epoch
        p_e, t_e = schedule(epoch, args.epochs), schedule(epoch, args.epochs)
        order = np.random.default_rng((args.seed, epoch)).permutation(len(train_set.labels))
        idx = order[(it % iters_per_epoch) * args.batch:(it % iters_per_epoch + 1) * args.batch]
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + it)
        x = augment(torch.from_numpy(train_set.images[idx]), g)
        y = torch.from_numpy(train_set.labels[idx])

        opt.zero_grad(set_to_none=True)
        out_max = net(x, max_cfg)
        loss = F.cross_entropy(out_max, y)
        loss.backward()
        teacher = F.softmax(out_max.detach(), dim=1)
        logs["ce_max"].append(loss.item())
        logs["acc_max"].append(float((out_max.argmax(1) == y).float().mean()))

        kind, target = pools.choose_target(rng)
        explore = rng.random() < p_e or not pools.is_full(kind, target)
        cfg = sampler.sample(target, rng) if explore else pools.sample(kind, target, t_e, rng)
        logs["new"].append(float(explore))
        out = net(x, cfg)
        pools.update(kind, target, cfg, -F.cross_entropy(out.detach(), y).item())
        kl = F.kl_div(F.log_softmax(out, dim=1), teacher, reduction="batchmean")
        kl.backward()
        logs["kl_cand"].append(kl.item())
        out_min = net(x, min_cfg)
        kl_min = F.kl_div(F.log_softmax(out_min, dim=1), teacher, reduction="batchmean")
        kl_min.backward()
        logs["kl_min"].append(kl_min.item())
        opt.step()
        sched.step()

        done = it + 1
        if done % args.log_every == 0 or done == total:
            fill = sum(len(p) for p in pools.pools[grid.metric_type].values())
            print(f"iter {done}/{total} epoch {epoch}: " + " ".join(f"{k} {np.mean(v):.3f}" for k, v in logs.items())
                  + f" p_e {p_e:.3f} T_e {t_e:.3f} lr {sched.get_last_lr()[0]:.4f} pools {fill} entries "
                  f"({(train_seconds + time.time() - t_seg):.0f}s)", flush=True)
            for v in logs.values():
                v.clear()
        if args.eval_every and (done % args.eval_every == 0):
            calib = calibration_batches(train_set.images, augment, 3, args.calib_batch_size, seed=done)
            accs = {n: evaluate(calibrated(net, c, calib), val_set) for n, c in (("max", max_cfg), ("min", min_cfg))}
            net.train()
            print(f"iter {done}: val accuracy max {accs['max']:.4f} min {accs['min']:.4f}", flush=True)
        if done % args.save_every == 0 or done == total:
            save_state(done)
    train_seconds += time.time() - t_seg

    # ---- retained subnets: own BN statistics, held-out accuracy, bundle ----
    t_final = time.time()
    net.eval()
    calib = calibration_batches(train_set.images, augment, args.calib_batches, args.calib_batch_size,
                                seed=args.seed + 7)
    rungs_out, stats = [], {}
    for rung in retained(net, pools):
        dense = calibrated(net, rung.cfg, calib)
        stats[rung.name] = bn_stats(dense)
        acc_val, acc_test = evaluate(dense, val_set), evaluate(dense, test_set)
        cfg = rung.cfg.with_metric(spec, target=rung.pool.get("target"))
        rungs_out.append({"name": rung.name, "cfg": cfg.to_dict(), "flops": round(subnet_flops(spec, cfg), 4),
                          "params": subnet_params(spec, cfg), "accuracy": {"val": acc_val, "test": acc_test},
                          "pool": rung.pool})
        print(f"{rung.name:>5}: {rungs_out[-1]['flops']:7.3f} MFLOPs, res {cfg.resolution}, "
              f"val {acc_val:.4f} test {acc_test:.4f}", flush=True)
    final_seconds = time.time() - t_final
    name = args.name or args.out.name
    manifest = {
        "family": "pssnet",
        "name": name,
        "spec": spec.to_dict(),
        "classes": classes,
        "preprocess": {"kind": "demo", "resize": spec.input_size, "crop": spec.input_size,
                       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "grids": [{"metric_type": grid.metric_type, "start": grid.start, "stop": grid.stop, "step": grid.step,
                   "targets": grid.targets}],
        "rungs": rungs_out,
        "bn": {"note": "per-rung statistics recalibrated after training (every subnet writes into the same BN "
                       "running buffers during training); the supernet's own BN buffers are shared by all "
                       "subnets and are not used",
               "calibration": {"batches": args.calib_batches, "batch_size": args.calib_batch_size,
                               "augmentation": "training (Augment.demo)", "seed": args.seed + 7}},
        "arch_pools": pools.to_official(),
        "training": {
            "command": command,
            "epochs": args.epochs, "iterations": total, "batch": args.batch, "lr": args.lr,
            "weight_decay": args.weight_decay, "pool_size": args.pool_size, "gen_map_num": args.gen_map_num,
            "seed": args.seed, "threads": args.threads,
            "data": {"source": {"train": train_set.source, "val": val_set.source, "test": test_set.source},
                     "train": len(train_set.labels), "val": len(val_set.labels),
                     "test": len(test_set.labels), "split": ("models.glyphs.data.load_split: train / val / test by font family"
                               if args.data == "glyphs" else "synthetic shapes, splits by seed")},
            "wall_clock_s": {"train": round(train_seconds, 1), "calibrate_and_evaluate": round(final_seconds, 1)},
            "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "date": time.strftime("%Y-%m-%d"),
            "init_from": init_record,
        },
    }
    path = save_bundle(args.out, net, stats, manifest)
    print(f"wrote {path.parent}: {len(rungs_out)} rungs; training {train_seconds / 60:.1f} min, "
          f"calibration + evaluation {final_seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
