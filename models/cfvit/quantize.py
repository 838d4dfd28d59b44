"""A real int8 version of a CF-ViT bundle, measured on held-out data.

    python -m models.cfvit.quantize models/cfvit/weights/cf-tiny-glyphs

Two int8 forms, one per kind of layer:

* every linear layer gets int8 weights with its input quantized per batch at run time
  (``compress.int8.quantize_dynamic_linear``): a transformer's time is mostly in its linears,
  and token activations vary too much between inputs for one static range; nothing to
  calibrate.
* the patch embedding's convolutions (LV-ViT's conv stem, or DeiT's one projection) run as
  one static int8 graph, their BN and ReLU folded in (``compress.int8.quantize_static``). On a
  small ViT the stem is about a seventh of the int8 network's time, and the dynamic form
  alone stops at about 1.4x; with the stem in int8 too it reaches about 1.7x at batch 32
  (docs/BENCHMARKS.md). Its activation ranges are observed on 512 training images at both
  input sizes (the fine image and the coarse one) and kept in the bundle as
  ``int8_stem.safetensors``, so the server rebuilds the same network at start-up without data.

Measures the coarse-only and all-fine top-1 and the eta curve on the held-out val and test
splits, next to the fp32 network's, and writes them into the bundle as ``int8.json`` (a
``compress.artifact.RungArtifact`` per stage, plus the int8 val curve the planner uses).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compress.artifact import RungArtifact, bundle_dir, command_line, write
from models.cfvit.model import CfVisionTransformer, ConvStem

INT8_MANIFEST, STEM_RANGES = "int8.json", "int8_stem.safetensors"
CALIBRATION_IMAGES = 512


def stem_convolutions(stem: nn.Module) -> nn.Sequential:
    """The patch embedding without its token reshape: the part that runs as one int8 graph
    (the reshape between convolution and tokens would cost a requantization there)."""
    if isinstance(stem, ConvStem):
        return nn.Sequential(stem.conv1, stem.bn1, nn.ReLU(), stem.conv2, stem.bn2, nn.ReLU(),
                             stem.conv3, stem.bn3, nn.ReLU(), stem.proj)
    return nn.Sequential(stem.proj)


class Int8Stem(nn.Module):
    """A static int8 patch embedding: int8 convolutions, then [B, C, h, w] -> [B, h*w, C] in float."""

    def __init__(self, convolutions: nn.Module) -> None:
        super().__init__()
        self.convolutions = convolutions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolutions(x).flatten(2).transpose(1, 2)


def stem_inputs(model: CfVisionTransformer, images: torch.Tensor, batch: int = 64) -> list[torch.Tensor]:
    """What the patch embedding sees for ``images`` (normalised): the fine image and the coarse one."""
    chunks = [images[i:i + batch] for i in range(0, len(images), batch)]
    with torch.inference_mode():
        return [t for c in chunks for t in (c, model.coarse_input(c))]


def int8_network(model: CfVisionTransformer, stem_ranges: dict[str, torch.Tensor] | None) -> CfVisionTransformer:
    """The int8 network: dynamic int8 linears, and the patch embedding in static int8 when its
    activation ranges are given (``observe_stem``)."""
    from compress.int8 import quantize_dynamic_linear, quantize_static

    int8 = quantize_dynamic_linear(model)
    if stem_ranges is not None:
        size = model.cfg.img_size
        int8.patch_embed = Int8Stem(quantize_static(stem_convolutions(model.patch_embed), stem_ranges,
                                                    torch.zeros(1, 3, size, size)))
    return int8


def observe_stem(model: CfVisionTransformer, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stem's activation ranges on ``images`` (normalised), for ``int8_network``."""
    from compress.int8 import observe_static

    size = model.cfg.img_size
    return observe_static(stem_convolutions(model.patch_embed), stem_inputs(model, images),
                          torch.zeros(1, 3, size, size))


def load_stem_ranges(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The bundle's stored stem ranges (None without them: the stem stays in float)."""
    file = bundle_dir(path) / STEM_RANGES
    return load_file(file) if file.exists() else None


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
    from models.cfvit import data
    from models.cfvit.checkpoint import load_ours
    from models.cfvit.evaluate import evaluate_split

    folder = bundle_dir(args.bundle)
    ck = load_ours(folder / "model.safetensors")
    dataset = ck.meta["data"]["dataset"]
    train = data.load(dataset, "train")
    calibration = data.to_tensor(train.images[:CALIBRATION_IMAGES], ck.config.mean, ck.config.std)
    print(f"[int8] stem ranges from {len(calibration)} training images", file=sys.stderr, flush=True)
    stem_ranges = observe_stem(ck.model, calibration)
    int8 = int8_network(ck.model, stem_ranges)
    evaluation = {}
    for split in ("val", "test"):
        print(f"[int8] {split}: fp32 and int8", file=sys.stderr, flush=True)
        s = data.load(dataset, split)
        evaluation[split] = {"fp32": evaluate_split(ck.model, s), "int8": evaluate_split(int8, s)}
    test, val = evaluation["test"], evaluation["val"]
    artifacts = [RungArtifact(
        stage, "ptq-dynamic-linear+static-stem", {"weights": 8, "activations": 8},
        "torch.ao onednn (linears: dynamic activations; stem: static)", True,
        {"test_accuracy": test["int8"][key], "test_accuracy_fp32": test["fp32"][key],
         "val_accuracy": val["int8"][key], "val_accuracy_fp32": val["fp32"][key]},
        {"linears": "none: activations are quantized per batch at run time",
         "stem": f"ranges observed on the first {len(calibration)} {dataset} training images, fine and coarse size "
                 f"({STEM_RANGES})"},
        command_line("models.cfvit.quantize", argv))
        for stage, key in (("coarse", "accuracy_coarse_only"), ("fine", "accuracy_all_fine"))]
    for a in artifacts:
        q = a.quality
        print(f"[int8] {a.rung}: int8 test {q['test_accuracy']:.4f} vs fp32 {q['test_accuracy_fp32']:.4f}",
              file=sys.stderr)
    if not args.dry_run:
        save_file(stem_ranges, str(folder / STEM_RANGES))
        write(folder / INT8_MANIFEST, artifacts, model=ck.meta.get("name"),
              eta_curve=val["int8"]["eta_curve"], eta_curve_dense=val["int8"]["eta_curve_dense"],
              note="real int8: dynamic linears, static conv stem; curves on the held-out val split, stage quality on val and test")
        print(f"[int8] wrote {folder / INT8_MANIFEST}", file=sys.stderr)


if __name__ == "__main__":
    main()
