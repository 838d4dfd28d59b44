"""bf16 rungs of an ARM model, built at start-up for any checkpoint (official ones included).

Which layers: FSRCNN's expanding 1x1 convolution and its upsampler (the 9x9 deconvolution in
its sub-pixel form) hold about 70 % of the multiply-accumulates and tolerate bf16: in bf16
they lose 0.02-0.03 dB on the test photos and cut w56's time per 32 patches to about 0.72
of float32 on an AVX512-BF16 CPU.  The first three layers do not tolerate it (the head
alone loses 0.06 dB, the shrinking layer 0.07, the whole network 0.15-0.18 dB), so they stay
float32.  Measured per layer, docs/COMPRESSION.md.  Other backbones get no bf16 rung yet.

The last two of the four 12-channel mapping convolutions are added where a checkpoint
tolerates them (``BF16_WIDE``).  They are compute-bound in float32 (about 0.7 ms each per
25 patches, 0.3 in bf16), so they take w56-bf16 from about 0.60 to 0.53 of w56's time; what
they cost depends on the checkpoint: the official ARM-FSRCNN loses 0.040 dB in all (0.026
without them), our bundled model 0.09-0.10 dB (0.019 without).  Each width's rung therefore
takes them only where they at most double the error bf16 adds to its output on the shipped
calibration photos (``MAX_ADDED_ERROR_GROWTH``; 1.02-1.09x for the official checkpoint,
3.5x for ours).  The criterion is relative because the added error is about the same on any content
while the PSNR it costs is not: on smooth photos, whose float32 error is small, the same
added error costs more dB than on the textured calibration photos, so an estimate in dB
from those photos read 0.002 dB where the test photos lose 0.04.

Quality without the user's data or an HR image: bf16 adds a rounding error to the float32
output that is small and unrelated to the float32 error against the truth, so a patch's MSE
at the bf16 rung is its float32 MSE plus the mean squared difference between the two
outputs.  That difference is measured at start-up on LR patches cut from scikit-image photos
that are not in the test split, per edge bin of the table, and the rung's table row is its
float32 row plus it: the dispatch weighs bf16 against the other rungs like any measured rung.
The estimate is checked against the added MSE measured on the test photos in the tests.

Held-out quality (whole test photos at the rung, PSNR; the added MSE against the HR) is a
command, as for every compressed rung; the server reads its manifest when it is there:

    python -m models.arm.bf16 models/arm/weights/arm-fsrcnn/model.safetensors
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress import artifact
from compress.bf16 import native_bf16, with_bf16_sections
from models.arm import tiling
from models.arm.edge import edge_scores
from models.arm.metrics import patch_mse
from models.arm.table import EdgeTable
from models.common.matlab_resize import downscale_x4_uint8

# Per backbone: the submodules every bf16 rung runs in bf16, in order (the upsampler's shuffle
# widens to float32); and the wider set a rung runs where its checkpoint tolerates it.
BF16_SECTIONS: dict[str, tuple[str, ...]] = {"fsrcnn": ("body_conv.6", "tail_conv.conv")}
BF16_WIDE: dict[str, tuple[str, ...]] = {"fsrcnn": ("body_conv.3", "body_conv.4", "body_conv.6", "tail_conv.conv")}
# A rung runs the wider set where it at most multiplies the error bf16 adds to its float32
# output (on the calibration patches) by this: the official ARM-FSRCNN 1.02-1.09x, ours 3.5x.
MAX_ADDED_ERROR_GROWTH = 2.0
# Calibration photos, shipped as their x4-downscaled LR (``CALIBRATION_DIR``, about 100 KB):
# scikit-image photos that are not in models.arm.data's test split and carry no copyright
# restriction (CC0 or public domain; sources in the folder's README).  Shipping them keeps the
# server free of scikit-image, which only the data and dev extras install.
CALIBRATION_PHOTOS = ("brick.png", "grass.png", "gravel.png", "camera.png", "coins.png", "text.png", "horse.png")
CALIBRATION_DIR = Path(__file__).parent / "calibration"
METHOD = "bf16 sections ({}), float32 elsewhere"
SECTION_NAMES = {"body_conv.3": "mapping 3", "body_conv.4": "mapping 4", "body_conv.6": "expand",
                 "tail_conv.conv": "upsampler"}


def section_label(sections: tuple[str, ...]) -> str:
    """A section set in words ("expand + upsampler"), as manifests and /v1/models name it."""
    return " + ".join(SECTION_NAMES.get(s, s) for s in sections)


def describe(sections: tuple[str, ...]) -> str:
    """The method of a rung with these sections, in words."""
    return METHOD.format(section_label(sections))


def bf16_form(backbone: str, net: nn.Module, sections: tuple[str, ...] | None = None) -> nn.Module | None:
    """The bf16 rung of a float32 serving-form subnet with ``sections`` in bf16 (default: the
    backbone's sections every rung has), or None where the backbone has none."""
    sections = sections or BF16_SECTIONS.get(backbone)
    return None if sections is None else with_bf16_sections(net, sections)


def section_choices(backbone: str) -> list[tuple[str, ...]]:
    """The bf16 section sets a rung of ``backbone`` may run, widest first (the last one,
    the sections every rung has, always qualifies)."""
    base = BF16_SECTIONS.get(backbone)
    if base is None:
        return []
    return [BF16_WIDE[backbone], base] if backbone in BF16_WIDE else [base]


def available(backbone: str, device: torch.device | str) -> bool:
    """Whether bf16 rungs exist for the backbone and run natively on the device."""
    return backbone in BF16_SECTIONS and native_bf16(device)


def calibration_patches(max_patches: int = 256, seed: int = 0) -> np.ndarray:
    """(N, 32, 32, 3) uint8 LR patches of the shipped calibration photos, at stride 16, then a
    random subset."""
    from models.arm.data import load_rgb

    patches = []
    for name in CALIBRATION_PHOTOS:
        path = CALIBRATION_DIR / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: python -m models.arm.bf16 --write-calibration")
        lr = load_rgb(path)
        patches.append(tiling.extract(lr, tiling.positions(lr.shape[0], lr.shape[1], "full", step=16)))
    every = np.concatenate(patches)
    pick = np.random.default_rng(seed).permutation(len(every))[:max_patches]
    return np.ascontiguousarray(every[np.sort(pick)])


def write_calibration() -> None:
    """Write the calibration photos' LR (MATLAB bicubic x1/4 of the mod-4 crop, as the model
    sees LR) from scikit-image's copies (needs the data or dev extra)."""
    import skimage
    from PIL import Image

    from models.arm.data import load_rgb, modcrop

    CALIBRATION_DIR.mkdir(exist_ok=True)
    root = Path(skimage.__file__).parent / "data"
    for name in CALIBRATION_PHOTOS:
        lr = downscale_x4_uint8(modcrop(load_rgb(root / name), 4))
        Image.fromarray(lr).save(CALIBRATION_DIR / name, optimize=True)
        print(f"{CALIBRATION_DIR / name}: {lr.shape[1]}x{lr.shape[0]}")


@torch.inference_mode()
def output_difference(fp32: nn.Module, bf16: nn.Module, patches_u8: np.ndarray, batch: int = 64) -> np.ndarray:
    """Per patch, the mean squared difference (8-bit levels, 4 px border cropped as the table
    measures) between the two networks' clamped outputs."""
    x = torch.from_numpy(np.ascontiguousarray(patches_u8.transpose(0, 3, 1, 2), dtype=np.float32) / 255)
    device = next(fp32.parameters()).device
    out = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].to(device).contiguous(memory_format=torch.channels_last)
        a = fp32(xb).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255
        b = bf16(xb).float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255
        out.append(patch_mse(b, a))
    return np.concatenate(out)


def mse_ratio(table: EdgeTable, row: int, scores: np.ndarray, difference: np.ndarray) -> np.ndarray:
    """Per bin of ``table``: (float32 MSE + mean output difference) / float32 MSE, the float32
    MSE being the table's row ``row``; bins without a calibration patch take the median."""
    base = table.mse[row] if table.mse is not None else table.predict_mse(table.x_centers)[:, row]
    bins = table.bins(scores)
    n = len(table.x_centers)
    counts = np.bincount(bins, minlength=n)
    extra = np.bincount(bins, weights=difference, minlength=n) / np.maximum(counts, 1)
    ratio = 1.0 + extra / np.maximum(base, 1e-10)
    if (counts > 0).any():
        ratio[counts == 0] = np.median(ratio[counts > 0])
    else:
        ratio[:] = 1.0 + float(np.mean(difference)) / float(np.mean(base))
    return ratio


MANIFEST_FILE = "bf16.json"


def build(model, patches_u8: np.ndarray | None = None) -> tuple[dict[int, nn.Module], dict[int, np.ndarray],
                                                                 dict[str, dict]]:
    """The bf16 rung of every width of ``model`` (an ArmSR with a table), each one's table row
    as a per-bin MSE ratio to its float32 width, and its manifest entry by rung name (the
    held-out measurement of ``bf16.json`` beside the checkpoint when it measured the same
    sections, with the start-up estimate added).  Each width takes the widest section set
    that adds at most ``MAX_ADDED_ERROR_GROWTH`` times the error of the sections every rung
    has (those alone always qualify)."""
    patches = calibration_patches() if patches_u8 is None else patches_u8
    scores = edge_scores(patches)
    manifest = model.source.parent / MANIFEST_FILE if model.source is not None else None
    measured = {}
    if manifest is not None and manifest.exists():
        stored = artifact.read(manifest)
        for r in stored.get("rungs", []):
            measured[r["rung"]] = (tuple(r.get("sections", stored.get("sections", ()))), r)
    nets, ratios, entries = {}, {}, {}
    choices = section_choices(model.backbone.name)
    if not choices:
        return nets, ratios, entries
    for i, width in enumerate(model.backbone.widths):
        fp32 = model.subnets[i]
        tried = [(sections, bf16_form(model.backbone.name, fp32, sections)) for sections in choices]
        added = {sections: output_difference(fp32, net, patches) for sections, net in tried}
        base = added[choices[-1]]  # the sections every rung has
        sections, net = next((s, n) for s, n in tried
                             if float(np.mean(added[s])) <= MAX_ADDED_ERROR_GROWTH * float(np.mean(base)))
        name = f"w{width}-bf16"
        nets[width] = net.to(memory_format=torch.channels_last)
        ratios[width] = mse_ratio(model.table, i + 1, scores, added[sections])
        stored_sections, stored_entry = measured.get(name, ((), None))
        entry = dict(stored_entry) if stored_sections == sections else rung_entry(name, model.device, sections)
        entry["quality"] = {**entry.get("quality", {}), "mse_added_estimate": round(float(np.mean(added[sections])), 4),
                            "mse_added_estimate_by_sections": {section_label(s): round(float(np.mean(a)), 4)
                                                               for s, a in added.items()},
                            "estimated_on": f"{len(patches)} LR patches of the shipped calibration photos "
                                        f"({', '.join(Path(p).stem for p in CALIBRATION_PHOTOS)})"}
        entries[name] = entry
    return nets, ratios, entries


def rung_entry(name: str, device: torch.device, sections: tuple[str, ...], **measured) -> dict:
    """The manifest entry of a bf16 rung with these sections (``measured``: quality,
    calibration, command)."""
    backend = "oneDNN bf16" if device.type == "cpu" else f"{device.type} bf16"
    return {**artifact.RungArtifact(rung=name, method=describe(sections), bits={"weights": 16, "activations": 16},
                                    backend=backend, real_speed=True, **measured).to_dict(),
            "sections": list(sections)}


def main(argv: list[str] | None = None) -> None:
    """Measure the bf16 rungs of a checkpoint on the test photos and write ``bf16.json``."""
    import argparse
    from datetime import date

    from models.arm import data
    from models.arm.build_table import patch_errors
    from models.arm.pipeline import ArmSR
    from models.arm.quantize import held_out_psnr

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, nargs="?")
    ap.add_argument("--out", type=Path, default=None, help="folder of bf16.json (default: the checkpoint's)")
    ap.add_argument("--write-calibration", action="store_true",
                    help="write the shipped calibration photos' LR from scikit-image and stop")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.write_calibration:
        write_calibration()
        return
    if args.checkpoint is None:
        ap.error("a checkpoint is needed (or --write-calibration)")
    torch.set_num_threads(args.threads)
    if not native_bf16("cpu"):
        raise SystemExit("this CPU has no native bf16 (AVX512-BF16 or AMX): a bf16 rung would be slower than float32")
    model = ArmSR.from_checkpoint(args.checkpoint, int8=False)
    test = data.load_split("test")
    calibration = calibration_patches()
    nets, _ratios, estimates = build(model, calibration)
    if not nets:
        raise SystemExit(f"backbone {model.backbone.name} has no bf16 sections (known: {sorted(BF16_SECTIONS)})")
    bins_seen = len(np.unique(model.table.bins(edge_scores(calibration))))
    rungs = []
    for i, width in enumerate(model.backbone.widths):
        fp32, net, name = model.subnets[i], nets[width], f"w{width}-bf16"
        sections = tuple(estimates[name]["sections"])
        fp32_db, bf16_db = held_out_psnr(fp32, test), held_out_psnr(net, test)
        _scores, mse = patch_errors([fp32, net], test, tiling.PATCH)
        added = float(mse[:, 1].mean() - mse[:, 0].mean())
        estimate = estimates[name]["quality"]
        print(f"w{width} ({describe(sections)}): test PSNR fp32 {fp32_db:.3f} dB, bf16 {bf16_db:.3f} dB "
              f"({bf16_db - fp32_db:+.3f}); added MSE on the test patches {added:.4f}, estimated from the "
              f"calibration patches {estimate['mse_added_estimate']:.4f} "
              f"(by section set: {estimate['mse_added_estimate_by_sections']})", flush=True)
        rungs.append(rung_entry(
            name, model.device, sections,
            quality={"psnr_rgb": round(bf16_db, 4), "fp32_psnr_rgb": round(fp32_db, 4),
                     "drop_db": round(fp32_db - bf16_db, 4), "mse_added": round(added, 4)},
            calibration={"none": "bf16 needs no calibration; the table row is estimated at start-up",
                         "estimate_check": {"mse_added_estimate": estimate["mse_added_estimate"],
                                            "calibration_bins_seen": bins_seen},
                         "sections_chosen_by": estimate["mse_added_estimate_by_sections"]},
            command=artifact.command_line("models.arm.bf16", argv)))
    out = args.out or artifact.bundle_dir(args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    path = artifact.write(out / MANIFEST_FILE, rungs, date=date.today().isoformat(),
                          test_images="test split: " + ", ".join(p.name for p in data.split("test")),
                          max_added_error_growth=MAX_ADDED_ERROR_GROWTH)
    print(f"bf16 rungs measured into {path}")


if __name__ == "__main__":
    main()
