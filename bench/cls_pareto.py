"""One accuracy-versus-time table for /classify across methods: PSS-Net's subnets, the pruned
and compact networks (CLR-RNF, DCFF and their baselines), their int8 versions, and sparse
networks (OptG, magnitude pruning) on dense and on CSR kernels.

    python -m bench.cls_pareto --png docs/img/cls_pareto.png
    python -m bench.cls_pareto --runs runs/compact runs/sparse runs/prune --rounds 7
    python -m bench.cls_pareto --engine auto --runs runs/clr8 --rounds 7

Rows: every rung of the bundled PSS-Net model as served (fp32 subnets and variants, and
the int8 rungs it builds at start-up), plus every variant folder found under ``--runs``
(written by ``models.pssnet.prune``, ``compact`` or ``sparse``; not served, e.g. the other
seeds and the baselines). For each: top-1 on the 5,000 held-out test glyphs (measured
here), MFLOPs (multiply-accumulates; a sparse network's counted at its nonzero weights,
which no dense kernel skips), and the median ms per forward at batch 1 and 32, all rows
timed interleaved in one run on ``--threads`` threads. ``front``: no other row is at least
as accurate on test and faster at batch 32. ``planner``: for the served rows, what the
planner does with these times: fastest first, a rung is kept only if its *validation*
accuracy beats every faster one (the rest are ``dominated``, as /v1/models lists them from
the times it measures at start-up); an fp32 subnet that a cheaper one matches on validation
accuracy is off the ladder altogether.

``--engine torch`` (the default) times every row on torch. ``--engine auto`` first does what
the server does at start-up with its default ``ANYTIME_PSSNET_ENGINE=auto``: each dense fp32
row (every subnet and variant, served or not) is measured on torch, ONNX Runtime and OpenVINO
(those installed) and then timed on the fastest at each batch size, and each int8 rung of the
ladder on the faster of torch.ao and OpenVINO's int8 kernels; the table names the engine
chosen at batch 32. Why: the same network can be 2.5x apart on two engines (ONNX Runtime's
blocked kernels and channel counts that are not multiples of 8), and a user's question is how
fast a rung is where it is served.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench import plots
from bench.quant import timings
from compress.artifact import top1
from service.bundled import bundled


def variant_folders(roots: list[Path]) -> list[Path]:
    """Folders holding a dense variant (``manifest.json`` with the variant format) under ``roots``."""
    out = []
    for root in roots:
        for manifest in sorted(root.rglob("manifest.json")):
            try:
                if json.loads(manifest.read_text()).get("format") == "pssnet-dense-variant":
                    out.append(manifest.parent)
            except (OSError, ValueError):
                continue
    return out


def nonzero_mflops(net: torch.nn.Module, dense_mflops: float, size: int) -> float:
    """``dense_mflops`` less the multiply-accumulates of zero weights (each weight of a
    convolution is used once per output position, of a linear layer once)."""
    skipped = 0.0

    def count(m: torch.nn.Module, _inp, out: torch.Tensor) -> None:
        nonlocal skipped
        per_weight = out.shape[2] * out.shape[3] if out.dim() == 4 else 1
        skipped += float((m.weight == 0).sum()) * per_weight

    handles = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.inference_mode():
        net(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return dense_mflops - skipped / 1e6


def as_served(net: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``net`` run as the server runs a dense rung on torch (``PssNetModel._torch_forward``):
    channels-last weights and input.  Why: the served rows are timed that way, and an unserved
    variant timed in NCHW beside them was 1.7-1.9x slower at batch 32 than the same network
    served (CLR's networks, 24 against 13-14 ms), which made the comparison about layouts."""
    net = net.to(memory_format=torch.channels_last)
    return lambda batch: net(batch.contiguous(memory_format=torch.channels_last))


CHOICE_SIZES = (1, 8, 32)  # where --engine auto measures each engine (the timed batch sizes)


def served_runner(net: torch.nn.Module, engine: str, example: torch.Tensor) -> tuple[Callable, str]:
    """An unserved variant's runner as the server would serve it, and the engine it runs a
    batch of 32 on: channels-last torch (``as_served``) for ``engine="torch"``, else the
    fastest of torch and the installed engines measured at ``CHOICE_SIZES`` on ``example``
    (``serve_faster``, the server's own choice; an engine whose output strays from torch's is
    left out). Converts ``net`` to channels-last in place."""
    if engine == "torch":
        return as_served(net), "torch"
    from models.common.engines import serve_faster

    contiguous = copy.deepcopy(net).eval()  # exporters take the contiguous layout
    run, choice = serve_faster(contiguous, as_served(net), example, CHOICE_SIZES, engine)
    return run, choice.engine(32) if choice else "torch"


def rows_for(bundle: Path, runs: list[Path], progress: Callable[[str], None],
             engine: str = "torch") -> tuple[list[dict], dict, torch.Tensor]:
    from models.glyphs.data import load_split
    from models.pssnet.dense_train import load_variant
    from models.pssnet.nets import fold_bn
    from models.pssnet.serving import PssNetModel

    progress("loading the bundle (its variants and int8 rungs)")
    model = PssNetModel.from_checkpoint(bundle)
    test = load_split("test")
    x = torch.stack([model.preprocess(img) for img in test.images])
    y = torch.from_numpy(test.labels)
    rows, runs_of = [], {}
    if engine != "torch":
        progress(f"engine={engine}: measuring every rung on each engine, as the server's start-up does")
        model.choose_engines(engine, sizes=CHOICE_SIZES, rungs=[r.index for r in model.rungs])
    ladder = {r.name for r in model.ladder}  # fp32 rungs the planner considers (with every int8 rung)
    for r in model.rungs:
        fp32 = (lambda i: lambda b: model.forward(i, b))(r.index)
        choice = model.engine_choices.get(r.index)
        variants = [("fp32", fp32, r.val_accuracy, choice.engine(32) if choice else "torch")]
        if r.index in model.int8_rungs:
            q = (lambda i: lambda b: model.int8_forward(i, b))(r.index)
            choice = model.int8_engine_choices.get(r.index)  # its quality is the serving engine's
            variants.append(("int8", q, model.int8_quality(r.index).get("val_accuracy"),
                             choice.engine(32) if choice else "torch.ao"))
        for precision, run, val, engine_b32 in variants:
            key = f"{r.name}/{precision}"
            rows.append({"name": key, "method": r.method, "precision": precision, "seed": (r.variant or {}).get("seed"),
                         "mflops": r.flops, "served": precision == "int8" or r.name in ladder, "listed": True,
                         "val": val, "kernel": "dense", "engine": engine_b32})
            runs_of[key] = run
    for folder in variant_folders(runs):
        net, m = load_variant(folder, model.spec)
        net = fold_bn(net)
        tag = folder.name
        sparse = "sparsity" in m
        kernels = []
        if sparse:  # the CSR copy from the NCHW network, before as_served converts it in place
            from compress.sparsity import with_csr_kernels

            kernels.append(("csr", with_csr_kernels(copy.deepcopy(net))))
        run, engine_b32 = served_runner(net, engine, x[:max(CHOICE_SIZES)])
        kernels.insert(0, ("dense", run))
        for kernel, run in kernels:
            key = f"{tag}/{kernel}" if sparse else tag
            rows.append({"name": key, "method": m["method"], "precision": "fp32", "seed": m.get("seed"),
                         "mflops": nonzero_mflops(net, m["mflops"], model.input_size) if sparse else m["mflops"],
                         "served": False, "listed": False, "val": m["accuracy"].get("val"), "kernel": kernel,
                         "sparsity": m.get("sparsity"), "engine": engine_b32 if kernel == "dense" else "torch"})
            runs_of[key] = run
    for row in rows:
        progress(f"{row['name']}: test top-1")
        row["top1"] = 100 * top1(runs_of[row["name"]], x, y)
    return rows, runs_of, x


def mark_front(rows: list[dict]) -> None:
    """``front`` on test accuracy; ``planner`` ("kept" / "dominated") for served rows, as the
    planner judges: by time at batch 32, then validation accuracy."""
    for r in rows:
        r["front"] = not any(o is not r and o["top1"] >= r["top1"] and o["ms_b32"] < r["ms_b32"] for o in rows)
    best = -1.0
    for r in sorted((r for r in rows if r["served"]), key=lambda r: r["ms_b32"]):
        val = r["val"] if r["val"] is not None else -1.0
        r["planner"] = "kept" if val > best else "dominated"
        best = max(best, val)


COLOURS = {"pss-net": "tab:blue", "clr-l1": "tab:green", "clr-random": "olive", "clr-rnf": "tab:brown",
           "dcff": "tab:purple", "plain-compact": "tab:pink", "optg": "tab:orange", "gmp": "tab:gray"}


def plot(rows: list[dict], path: Path) -> bool:
    plt = plots.pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    for method in sorted({r["method"] for r in rows}):
        for precision, kernel, marker in (("fp32", "dense", "o"), ("int8", "dense", "s"), ("fp32", "csr", "^")):
            pts = [r for r in rows if r["method"] == method and r["precision"] == precision and r["kernel"] == kernel]
            if not pts:
                continue
            label = f"{method} {precision}" + (" CSR" if kernel == "csr" else "")
            ax.scatter([r["ms_b32"] for r in pts], [r["top1"] for r in pts], marker=marker,
                       c=COLOURS.get(method, "black"), label=label, alpha=0.85,
                       edgecolors="black", linewidths=[1.2 if r["served"] else 0.0 for r in pts])
            for r in pts:
                if r["served"] or r["front"]:
                    ax.annotate(r["name"], (r["ms_b32"], r["top1"]), fontsize=6, xytext=(3, 2),
                                textcoords="offset points")
    front = sorted((r for r in rows if r["front"]), key=lambda r: r["ms_b32"])
    ax.step([r["ms_b32"] for r in front], [r["top1"] for r in front], "k--", lw=0.8, where="post", label="front")
    ax.set(xlabel="ms per forward of 32 images (1 thread)", ylabel="top-1 % on 5,000 held-out test glyphs",
           title="/classify rungs across methods (black edge: served)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    plots.save(fig, path)
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="default: the bundled PSS-Net")
    ap.add_argument("--runs", type=Path, nargs="*", default=[], help="folders searched for unserved variants")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engine", choices=("torch", "auto"), default="torch",
                    help="auto: every dense row on its fastest installed engine, as the server serves it")
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(0)

    def progress(msg: str) -> None:
        print(f"[cls_pareto] {msg}", file=sys.stderr, flush=True)

    rows, runs_of, x = rows_for(args.bundle or bundled("pssnet"), args.runs, progress, args.engine)
    progress(f"timing {len(runs_of)} rows at batch 1, 8 and 32, {args.rounds} rounds, interleaved")
    ms = timings(runs_of, x, args.rounds)
    for row in rows:
        row.update(ms_b1=ms[row["name"]][1], ms_b32=ms[row["name"]][32])
    mark_front(rows)
    rows.sort(key=lambda r: r["ms_b32"])
    print(f"torch {torch.__version__}, {args.threads} thread(s), engine={args.engine}; top-1 on the 5,000 held-out "
          f"test glyphs; ms: median per forward, all rows interleaved\n")
    print("| rung | method | precision / kernel | engine b32 | seed | MFLOPs | top-1 % | ms b1 | ms b32 | "
          "served: planner | front |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        served = r.get("planner", "") if r["served"] else ("off the FLOPs ladder" if r["listed"] else "")
        kind = r["precision"] + ("" if r["kernel"] == "dense" else f" / {r['kernel']}")
        print(f"| {r['name']} | {r['method']} | {kind} | {r['engine']} | {'-' if r['seed'] is None else r['seed']} | "
              f"{r['mflops']:.2f} | {r['top1']:.2f} | {r['ms_b1']:.3f} | {r['ms_b32']:.2f} | {served} | "
              f"{'yes' if r['front'] else ''} |")
    plots.write_outputs(rows, args.png, args.json, plot)


if __name__ == "__main__":
    main()
