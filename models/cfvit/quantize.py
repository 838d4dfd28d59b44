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

Where OpenVINO is installed, also the same measurements of the int8 graphs the server makes
for OpenVINO's int8 kernels (``models.cfvit.engines``; faster than torch.ao's int8 on a CPU),
as ``engine_quality.openvino`` (per stage, and its own val curves), and the calibration
images those graphs are quantized from (``int8_calibration.safetensors``: 128 training
images, float16, 0.8 MB), so the server rebuilds exactly what was measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compress.artifact import RungArtifact, bundle_dir, command_line
from models.cfvit.model import CfVisionTransformer, ConvStem

INT8_MANIFEST, STEM_RANGES = "int8.json", "int8_stem.safetensors"
ENGINE_CALIBRATION = "int8_calibration.safetensors"  # {"images": float16}: what OpenVINO's int8 graphs come from
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


def load_engine_calibration(path: str | Path) -> torch.Tensor | None:
    """The bundle's stored calibration images of OpenVINO's int8 graphs (None without them)."""
    file = bundle_dir(path) / ENGINE_CALIBRATION
    return load_file(file)["images"] if file.exists() else None


def load_int8(path: str | Path) -> dict | None:
    """The bundle's ``int8.json`` (None without one)."""
    manifest = bundle_dir(path) / INT8_MANIFEST
    return json.loads(manifest.read_text()) if manifest.exists() else None


PROBE_IMAGES = 32  # images of the start-up estimate for checkpoints without a measured int8 version


def probe_images(preprocess, n: int = PROBE_IMAGES, seed: int = 0) -> torch.Tensor:
    """Inputs for a ground-truth-free estimate, needing no data set: crops of synthetic photos
    (gradients, edges, noise) at random positions and scales, channels in a random order,
    through the model's own ``preprocess``."""
    import numpy as np

    from models.common.synthetic import synthetic_photo

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = synthetic_photo(192, 192, seed=seed + i)[..., rng.permutation(3)]
        side = int(rng.integers(48, 193))
        y, x = (int(v) for v in rng.integers(0, 192 - side + 1, size=2))
        out.append(preprocess(np.ascontiguousarray(photo[y:y + side, x:x + side])))
    return torch.stack(out)


def disagreement(fp32: CfVisionTransformer, int8: CfVisionTransformer, x: torch.Tensor) -> dict[str, float]:
    """Per stage, the share of ``x`` whose top-1 class differs between the two networks: on
    the same images, no accuracy drop can exceed it."""
    with torch.inference_mode():
        a, b = fp32.forward_all(x), int8.forward_all(x)  # (coarse logits, fine logits) each
    return {stage: float((a[i].argmax(1) != b[i].argmax(1)).float().mean())
            for i, stage in enumerate(("coarse", "fine"))}


def estimated_manifest(fp32: CfVisionTransformer, int8: CfVisionTransformer, curve: list[dict],
                       images: torch.Tensor) -> dict:
    """An ``int8.json``-shaped manifest for an int8 version built at start-up (an official
    checkpoint has no measured one): each stage's accuracy drop estimated by its top-1
    disagreement with fp32 on ``images``, and the int8 eta curve the fp32 curve lowered by the
    larger of the two, so the planner prefers fp32 whenever it fits."""
    drop = {stage: round(d, 4) for stage, d in disagreement(fp32, int8, images).items()}
    worst = max(drop.values())
    how = f"top-1 disagreement with fp32 on {len(images)} synthetic images (probe_images), an upper bound on " \
          "the accuracy drop on those images and an estimate of it elsewhere"
    rungs = [RungArtifact(stage, "ptq-dynamic-linear", {"weights": 8, "activations": 8},
                          "torch.ao onednn (dynamic activations)", True,
                          {"accuracy_drop_estimate": d, "estimate": how},
                          {"linears": "none: activations are quantized per batch at run time"},
                          "built at start-up (no int8.json in the checkpoint's folder)").to_dict()
             for stage, d in drop.items()]
    lowered = [{**p, "accuracy": max(0.0, p["accuracy"] - worst)} for p in curve]
    return {"rungs": rungs, "eta_curve": lowered, "estimated": True,
            "note": "int8 built at start-up; quality estimated, not measured"}


def main(argv: list[str] | None = None) -> None:
    import contextlib

    from models.cfvit import data
    from models.cfvit.evaluate import evaluate_versions, version_command, write_version

    args, folder, ck = version_command(__doc__, argv)
    dataset = ck.meta["data"]["dataset"]
    train = data.load(dataset, "train")
    calibration = data.to_tensor(train.images[:CALIBRATION_IMAGES], ck.config.mean, ck.config.std)
    print(f"[int8] stem ranges from {len(calibration)} training images", file=sys.stderr, flush=True)
    stem_ranges = observe_stem(ck.model, calibration)
    int8 = int8_network(ck.model, stem_ranges)
    evaluation = evaluate_versions(dataset, {"fp32": (ck.model, contextlib.nullcontext),
                                             "int8": (int8, contextlib.nullcontext)}, "int8")
    if not args.dry_run:
        save_file(stem_ranges, str(folder / STEM_RANGES))
    engine_quality = None
    from models.common.engines import OPENVINO, available

    if available(OPENVINO):  # what engine=auto may serve the int8 version on, from images stored in the bundle
        from models.cfvit.engines import OPENVINO_IMAGES, openvino_quality

        images = calibration[:OPENVINO_IMAGES].half().contiguous()
        engine_quality = openvino_quality(ck.model, "int8", images, dataset, command_line("models.cfvit.quantize", argv),
                                          f"quantized from the first {OPENVINO_IMAGES} of those training images "
                                          f"({ENGINE_CALIBRATION})")
        if not args.dry_run:
            save_file({"images": images}, str(folder / ENGINE_CALIBRATION))
    write_version(folder / INT8_MANIFEST, evaluation, "int8", method="ptq-dynamic-linear+static-stem",
                  bits={"weights": 8, "activations": 8},
                  backend="torch.ao onednn (linears: dynamic activations; stem: static)",
                  calibration={"linears": "none: activations are quantized per batch at run time",
                               "stem": f"ranges observed on the first {len(calibration)} {dataset} training images, "
                                       f"fine and coarse size ({STEM_RANGES})"},
                  command=command_line("models.cfvit.quantize", argv), model_name=ck.meta.get("name"),
                  note="real int8: dynamic linears, static conv stem; curves on the held-out val split, stage "
                       "quality on val and test", tag="int8", dry_run=args.dry_run,
                  extra={"engine_quality": engine_quality} if engine_quality else None)



if __name__ == "__main__":
    main()
