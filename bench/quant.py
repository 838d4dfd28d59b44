"""Quantized rungs against their float ones: held-out quality, time per batch, the Pareto front.

    python -m bench.quant                                 # ARM, PSS-Net and CF-ViT, bundled models
    python -m bench.quant --family pssnet --rounds 7 --png docs/img/quant_front.png --json out.json
    python -m bench.quant --family arm --arm-checkpoint arm-fsrcnn.pth --arm-int8-dir runs/arm-official-int8
    python -m bench.quant --family cfvit --cfvit-sparse runs/cfvit-sparse/optg-90-s1 runs/cfvit-sparse/gmp-90-s1

PSS-Net: every ladder rung in fp32 and as the server builds its int8 rung (from the bundle's
stored calibration, ``python -m models.pssnet.quantize``; oneDNN kernels), plus the same rung
calibrated on Gaussian noise (the naive data-free baseline).  CF-ViT: fp32 and the bundle's
int8 version (dynamic int8 linears), at eta 0 (coarse only) and eta 1.01 (all fine), and
any sparse CF-ViT bundles given (``--cfvit-sparse``) on dense and on CSR kernels.
ARM: bicubic, every width in fp32, as the int8 rung ``models.arm.quantize`` trained (DDTB
8-bit QAT, oneDNN kernels) and as the bf16 rung the server builds where the CPU has native bf16
(``models.arm.bf16``: expand + upsampler in bf16); quality is RGB PSNR on the 8 test photos (whole images at one rung),
time is per forward of n 32x32 LR patches cut from them.
Classifier quality is top-1 on the 5,000 held-out test images of the glyph set.  Time: median ms per
forward at batch 1, 8 and 32, every variant timed in each round in a shuffled order, so that
the shared machine's drift spreads over all rows (compare ratios within one run).  A rung is
on the Pareto front when no other rung of its model is at least as good and faster at
batch 32.  The glyph test split is rendered from Debian's fonts (``make data``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench import plots
from compress.artifact import top1
from service.bundled import bundled

SIZES = (1, 8, 32)


def timings(variants: dict[str, Callable[[torch.Tensor], object]], x: torch.Tensor, rounds: int) -> dict:
    """Median ms per forward of every variant at each batch size, interleaved."""
    out: dict[str, dict[int, list[float]]] = {k: {n: [] for n in SIZES} for k in variants}
    order = list(variants)
    with torch.inference_mode():
        for k in order:  # warm-up
            for n in SIZES:
                variants[k](x[:n])
        for _ in range(rounds):
            random.shuffle(order)
            for k in order:
                for n in SIZES:
                    reps = max(1, 32 // n)
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        variants[k](x[:n])
                    out[k][n].append(1000 * (time.perf_counter() - t0) / reps)
    return {k: {n: statistics.median(v) for n, v in per.items()} for k, per in out.items()}


def pssnet_ladder_bench(doc: str, argv: list[str] | None):
    """What ``bench.memory_format`` and ``bench.engines`` start from: their arguments
    (``--rounds``, ``--threads``, ``--images``), torch's thread count set, the bundled PSS-Net
    without int8 rungs, and a batch of its held-out test glyphs, preprocessed."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=256, help="held-out test images the batches are cut from")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from models.glyphs.data import load_split
    from models.pssnet.serving import PssNetModel

    model = PssNetModel.from_checkpoint(bundled("pssnet"), int8=False)
    x = torch.stack([model.preprocess(img) for img in load_split("test", n=args.images).images])
    return args, model, x


def rung_pairs(rungs: list, pair: Callable[[object], tuple[Callable, Callable]], labels: tuple[str, str],
               x: torch.Tensor, rounds: int, title: str) -> None:
    """Print, for every rung, two ways of running it (``pair(rung)`` -> (first, second)) timed
    interleaved at each batch size (``timings``), the first's time over the second's, and the
    largest difference of their outputs on ``x``: the table of ``bench.memory_format`` and
    ``bench.engines``."""
    variants, diffs = {}, {}
    for r in rungs:
        first, second = pair(r)
        variants[f"{r.name}/0"], variants[f"{r.name}/1"] = first, second
        with torch.inference_mode():
            diffs[r.name] = float((first(x) - second(x)).abs().max())
    print(f"[bench] timing {len(variants)} variants x {len(SIZES)} batch sizes x {rounds} rounds",
          file=sys.stderr, flush=True)
    ms = timings(variants, x, rounds)
    print(f"{title}, median ms per forward of {rounds} interleaved rounds\n")
    a, b = labels
    print("| rung | " + " | ".join(f"{a} b{n} | {b} b{n} | speed-up b{n}" for n in SIZES) + " | max logit diff |")
    print("|---|" + "---|---|---|" * len(SIZES) + "---|")
    for r in rungs:
        t0, t1 = ms[f"{r.name}/0"], ms[f"{r.name}/1"]
        cells = " | ".join(f"{t0[n]:.2f} | {t1[n]:.2f} | {t0[n] / t1[n]:.2f}x" for n in SIZES)
        print(f"| {r.name} | {cells} | {diffs[r.name]:.1e} |")


def timed(rows: list[dict], variants: dict[str, Callable[[torch.Tensor], object]], x: torch.Tensor, rounds: int,
          progress: Callable[[str], None]) -> list[dict]:
    """``rows`` with the ms of their variant (``timings``) at every batch size."""
    progress(f"timing {len(variants)} variants x {len(SIZES)} batch sizes x {rounds} rounds")
    ms = timings(variants, x, rounds)
    for row in rows:
        row.update({f"ms_b{n}": ms[row["variant"]][n] for n in SIZES})
    return rows


def pssnet_rows(rounds: int, calibration_n: int, progress: Callable[[str], None], engine: str = "auto") -> list[dict]:
    from compress.calibration import gaussian_batches
    from models.glyphs.data import load_split
    from models.pssnet.serving import PssNetModel

    progress("loading the bundle and building its int8 rungs")
    model = PssNetModel.from_checkpoint(bundled("pssnet"))
    if not model.int8_rungs:
        raise SystemExit("the bundled PSS-Net has no int8 rungs: python -m models.pssnet.quantize BUNDLE")
    test = load_split("test")
    x = torch.stack([model.preprocess(img) for img in test.images])
    y = torch.from_numpy(test.labels)
    noise = gaussian_batches(tuple(x.shape[1:]), calibration_n, seed=0)
    progress(f"choosing engines as the server does (engine={engine})")
    model.choose_engines(engine)  # fp32 and int8 rungs timed as served
    rows, variants = [], {}
    for r in model.ladder:
        progress(f"{r.name}: held-out top-1 (fp32, int8, int8 calibrated on noise)")
        fp32 = (lambda i: lambda b: model.forward(i, b))(r.index)
        entry = model.int8_rungs[r.index][1]
        q_served = (lambda i: lambda b: model.int8_forward(i, b))(r.index)
        q_noise = model.int8(r.index, noise)
        served = entry["calibration"]["source"]
        for precision, calib, run in (("fp32", None, fp32), ("int8", served, q_served), ("int8", "noise", q_noise)):
            name = f"{r.name}/{precision}" + (f"/{calib}" if calib == "noise" else "")
            rows.append({"model": model.name, "rung": r.name, "precision": precision, "calibration": calib,
                         "flops": 2e6 * r.flops, "quality": 100 * top1(run, x, y), "metric": "top-1 %",
                         "variant": name})
            if calib != "noise":  # timed once per precision: calibration does not change the kernels
                variants[name] = run
    progress(f"timing {len(variants)} variants x {len(SIZES)} batch sizes x {rounds} rounds")
    ms = timings(variants, x, rounds)
    for row in rows:
        timed = ms.get(row["variant"]) or ms[f"{row['rung']}/int8"]
        row.update({f"ms_b{n}": timed[n] for n in SIZES})
    return rows


def cfvit_rows(rounds: int, progress: Callable[[str], None], sparse: list[Path] = (),
               engine: str = "auto") -> list[dict]:
    """The bundled CF-ViT in fp32, int8 and, where this CPU multiplies bf16 natively, bf16, as
    the server serves them (each stage on the engine ``engine`` chooses here); the same stages
    on torch alone (fp32, and torch.ao's int8) as "(torch)" rows; each ``sparse`` bundle
    (``models.cfvit.sparse``, not served) adds its network on dense kernels and with its
    sparse Linear layers on CSR kernels, timed in the same interleaved rounds."""
    import contextlib
    import copy

    from compress.sparsity import with_csr_kernels
    from models.cfvit.bf16 import run_bf16
    from models.cfvit.checkpoint import load_ours
    from models.cfvit.serving import CfVitModel
    from models.glyphs.data import load_split

    model = CfVitModel.from_checkpoint(bundled("cfvit"))
    test = load_split("test")
    x = torch.stack([model.preprocess(img) for img in test.images])
    y = torch.from_numpy(test.labels)
    int8 = model.int8_net
    if int8 is None:
        raise SystemExit("the bundled CF-ViT has no int8 version: python -m models.cfvit.quantize BUNDLE")
    progress(f"choosing engines as the server does (engine={engine})")
    model.choose_engines(engine)
    rows, variants = [], {}

    def add(net: torch.nn.Module | None, stage: str, eta: float, rung: str, precision: str, name: str) -> None:
        """One row: ``net`` exiting at ``eta`` (0: coarse only, 1.01: all fine), measured here;
        precision bf16: ``model.bf16_net`` under its autocast, as ``CfVitModel.forward`` runs it;
        ``net`` None: the model as served (``CfVitModel.forward``, its engines)."""
        def run(b: torch.Tensor) -> torch.Tensor:
            if net is None:
                return model.forward(b, torch.full((len(b),), eta), int8=precision == "int8",
                                     bf16=precision == "bf16")[0]
            with run_bf16() if precision == "bf16" else contextlib.nullcontext():
                return net.forward_exit(b, torch.full((len(b),), eta)).logits.float()

        progress(f"CF-ViT {name}: held-out top-1")
        rows.append({"model": model.name, "rung": rung, "precision": precision, "calibration": None,
                     "flops": 2.0 * (model.flops_coarse if stage == "coarse" else model.flops_full),
                     "quality": 100 * top1(run, x, y), "metric": "top-1 %", "variant": name})
        variants[name] = run

    stages = (("coarse", 0.0), ("fine", 1.01))
    for stage, eta in stages:
        for precision, net in (("fp32", model.net), ("int8", int8), ("bf16", model.bf16_net)):
            if net is not None:
                add(None, stage, eta, stage, precision, f"{stage}/{precision}")
        if model.runners:  # some stage runs on another engine: torch alone, for reference
            for precision, net in (("fp32", model.net), ("int8", int8)):
                add(net, stage, eta, f"{stage} (torch)", precision, f"{stage}/{precision}/torch")
    for folder in sparse:
        net = load_ours(folder).model.eval()
        for kernel, k_net in (("dense", net), ("csr", with_csr_kernels(copy.deepcopy(net)))):
            for stage, eta in stages:
                add(k_net, stage, eta, f"{stage} {folder.name} {kernel}", "fp32", f"{stage}/{folder.name}/{kernel}")
    return timed(rows, variants, x, rounds, progress)


def arm_rows(rounds: int, checkpoint: Path | None, int8_dir: Path | None,
             progress: Callable[[str], None]) -> list[dict]:
    from models.arm import data, tiling
    from models.arm.pipeline import ArmSR
    from models.arm.quantize import held_out_psnr

    progress("loading the ARM model, its int8 rungs and its bf16 rungs")
    model = ArmSR.from_checkpoint(checkpoint or bundled("arm"), int8=int8_dir or True, bf16=True)
    if not model.compressed:
        raise SystemExit("the ARM model has no int8 rungs: python -m models.arm.quantize CHECKPOINT")
    test = data.load_split("test")
    patches = [tiling.extract(lr, tiling.positions(*lr.shape[:2])) for _n, _hr, lr in test]
    x = torch.from_numpy(np.concatenate(patches)[:64].transpose(0, 3, 1, 2).astype(np.float32) / 255)
    rows, variants = [], {}
    for r in model.rungs:
        run = (lambda i: lambda b: model.run_patches(i, b))(r.index)
        progress(f"{r.name}: PSNR on the test photos")
        name = r.name
        rows.append({"model": model.name, "rung": r.name.removesuffix(f"-{r.precision}"), "precision": r.precision,
                     "calibration": None, "flops": float(r.flops_per_patch), "quality": held_out_psnr(run, test),
                     "metric": "PSNR dB", "variant": name})
        variants[name] = run
    return timed(rows, variants, x, rounds, progress)


def mark_front(rows: list[dict]) -> None:
    """``front``: no other timed rung of the same model is at least as good and faster at 32."""
    timed = [r for r in rows if r["calibration"] != "noise"]
    for r in rows:
        r["front"] = r in timed and not any(
            o is not r and o["model"] == r["model"] and o["quality"] >= r["quality"] and o["ms_b32"] < r["ms_b32"]
            for o in timed)


def plot(rows: list[dict], path: Path) -> bool:
    plt = plots.pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len({r["model"] for r in rows}), figsize=(5.5 * len({r["model"] for r in rows}), 4.2),
                             squeeze=False)
    for ax, name in zip(axes[0], sorted({r["model"] for r in rows})):
        for precision, colour in (("fp32", "tab:blue"), ("int8", "tab:red"), ("bf16", "tab:green")):
            pts = [r for r in rows if r["model"] == name and r["precision"] == precision and r["calibration"] != "noise"]
            ax.scatter([r["ms_b32"] for r in pts], [r["quality"] for r in pts], c=colour, label=precision)
            for r in pts:
                ax.annotate(r["rung"], (r["ms_b32"], r["quality"]), fontsize=7, xytext=(3, 2),
                            textcoords="offset points")
        front = sorted((r for r in rows if r["model"] == name and r["front"]), key=lambda r: r["ms_b32"])
        ax.plot([r["ms_b32"] for r in front], [r["quality"] for r in front], "k--", lw=0.8, label="Pareto front")
        metric = next(r["metric"] for r in rows if r["model"] == name)
        unit = "32x32 patches" if metric.startswith("PSNR") else "images"
        ax.set(title=name, xlabel=f"ms per forward of 32 {unit} (1 thread)", ylabel=f"held-out {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    plots.save(fig, path)
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["arm", "pssnet", "cfvit", "all"], default="all")
    ap.add_argument("--arm-checkpoint", type=Path, default=None, help="default: the bundled ARM-FSRCNN")
    ap.add_argument("--arm-int8-dir", type=Path, default=None, help="its int8 rungs (default: beside it)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calibration-n", type=int, default=512, help="noise inputs of the noise-calibrated baseline")
    ap.add_argument("--pssnet-engine", default="auto", help="PSS-Net's engines, as the server's ANYTIME_PSSNET_ENGINE "
                    "(auto: each rung on the engine the server would choose here)")
    ap.add_argument("--cfvit-engine", default="auto", help="CF-ViT's engines, as the server's ANYTIME_CFVIT_ENGINE")
    ap.add_argument("--png", type=Path, default=None, help="write the accuracy-vs-time front here")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cfvit-sparse", type=Path, nargs="*", default=[],
                    help="sparse CF-ViT bundles (models.cfvit.sparse) to time on dense and CSR kernels")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(0)

    def progress(msg: str) -> None:
        print(f"[quant] {msg}", file=sys.stderr, flush=True)

    rows = []
    if args.family in ("arm", "all"):
        rows += arm_rows(args.rounds, args.arm_checkpoint, args.arm_int8_dir, progress)
    if args.family in ("pssnet", "all"):
        rows += pssnet_rows(args.rounds, args.calibration_n, progress, args.pssnet_engine)
    if args.family in ("cfvit", "all"):
        rows += cfvit_rows(args.rounds, progress, args.cfvit_sparse, args.cfvit_engine)
    mark_front(rows)
    print(f"torch {torch.__version__}, {args.threads} thread(s), quantized engine "
          f"{torch.backends.quantized.engine}; quality: RGB PSNR on the 8 ARM test photos, top-1 on 5,000 held-out "
          f"glyph test images; ms: median per forward (ARM: of n 32x32 LR patches)\n")
    print("| model | rung | precision | calibration | GFLOPs | quality | ms b1 | ms b8 | ms b32 | fp32/this at b32 | front |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fp32_ms = {(r["model"], r["rung"]): r["ms_b32"] for r in rows if r["precision"] == "fp32"}
    for r in rows:
        ratio = fp32_ms[(r["model"], r["rung"])] / r["ms_b32"] if r["precision"] != "fp32" else None
        print(f"| {r['model']} | {r['rung']} | {r['precision']} | {r['calibration'] or '-'} | {r['flops'] / 1e9:.3f} | "
              f"{r['quality']:.2f} {r['metric'].split()[-1]} | {r['ms_b1']:.2f} | {r['ms_b8']:.2f} | {r['ms_b32']:.2f} | "
              f"{f'{ratio:.2f}x' if ratio else '-'} | {'yes' if r['front'] else ''} |")
    plots.write_outputs(rows, args.png, args.json, plot)


if __name__ == "__main__":
    main()
