"""A real int8 version of a CF-ViT bundle, measured on held-out data.

    python -m models.cfvit.quantize models/cfvit/weights/cf-tiny-glyphs

Quantizes every linear layer to int8 weights with activations quantized per batch at run
time (``compress.int8.quantize_dynamic_linear``: a transformer's time is in its linears, and
its activations vary too much between inputs for one static range; nothing to calibrate,
so the server rebuilds the same network at start-up in a fraction of a second).  Measures
its coarse-only and all-fine top-1 and its eta curve on the held-out val and test splits,
next to the fp32 network's, and writes them into the bundle as ``int8.json`` (a
``compress.artifact.RungArtifact`` per stage, plus the int8 val curve the planner uses).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from compress.artifact import RungArtifact, bundle_dir, command_line, write

INT8_MANIFEST = "int8.json"


def load_int8(path: str | Path) -> dict | None:
    """The bundle's ``int8.json`` (None without one)."""
    manifest = bundle_dir(path) / INT8_MANIFEST
    return json.loads(manifest.read_text()) if manifest.exists() else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from compress.int8 import quantize_dynamic_linear
    from models.cfvit import data
    from models.cfvit.checkpoint import load_ours
    from models.cfvit.evaluate import evaluate_split

    folder = bundle_dir(args.bundle)
    ck = load_ours(folder / "model.safetensors")
    dataset = ck.meta["data"]["dataset"]
    int8 = quantize_dynamic_linear(ck.model)
    evaluation = {}
    for split in ("val", "test"):
        print(f"[int8] {split}: fp32 and int8", file=sys.stderr, flush=True)
        s = data.load(dataset, split)
        evaluation[split] = {"fp32": evaluate_split(ck.model, s), "int8": evaluate_split(int8, s)}
    test, val = evaluation["test"], evaluation["val"]
    artifacts = [RungArtifact(
        stage, "ptq-dynamic-linear", {"weights": 8, "activations": 8}, "torch.ao onednn (dynamic activations)", True,
        {"test_accuracy": test["int8"][key], "test_accuracy_fp32": test["fp32"][key],
         "val_accuracy": val["int8"][key], "val_accuracy_fp32": val["fp32"][key]},
        {"source": "none: activations are quantized per batch at run time"}, command_line("models.cfvit.quantize", argv))
        for stage, key in (("coarse", "accuracy_coarse_only"), ("fine", "accuracy_all_fine"))]
    for a in artifacts:
        q = a.quality
        print(f"[int8] {a.rung}: int8 test {q['test_accuracy']:.4f} vs fp32 {q['test_accuracy_fp32']:.4f}",
              file=sys.stderr)
    if not args.dry_run:
        write(folder / INT8_MANIFEST, artifacts, model=ck.meta.get("name"),
              eta_curve=val["int8"]["eta_curve"], eta_curve_dense=val["int8"]["eta_curve_dense"],
              note="real int8 (dynamic) linears; curves on the held-out val split, stage quality on val and test")
        print(f"[int8] wrote {folder / INT8_MANIFEST}", file=sys.stderr)


if __name__ == "__main__":
    main()
