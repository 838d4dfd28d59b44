"""A bf16 version of a CF-ViT bundle, measured on held-out data.

    python -m models.cfvit.bf16 models/cfvit/weights/cf-tiny-glyphs

The network with its linear and convolution weights in bf16, under torch's bf16 autocast:
the matrix products (accumulating in float32), attention, GELU and the conv stem's batch norms
run in bf16; the residual stream, the layer norms and the early-exit confidence stay float32.
No calibration and no training.  On a CPU that multiplies
bf16 natively (AMX, AVX512-BF16) this is the faster reduced precision for a small ViT: on an
Intel Xeon with AMX, all fine at batch 32, 44 ms against 67 ms in float32 and 50 ms with
dynamic int8 linears, whose attention, GELU and layer norms stay float32 (docs/BENCHMARKS.md
3.1).  Elsewhere bf16 is emulated and slower, so the server serves it only where
``compress.bf16.native_bf16`` holds.

Measures the coarse-only and all-fine top-1 and the eta curve on the held-out val and test
splits next to float32's, and writes them into the bundle as ``bf16.json`` (a
``compress.artifact.RungArtifact`` per stage, plus the bf16 val curve the planner uses).
Where OpenVINO is installed and the CPU multiplies bf16 natively, also the same measurements
of the network's float graphs computed in bf16 by OpenVINO (``models.cfvit.engines``: about
twice torch's bf16 speed on an Intel Xeon with AMX), as ``engine_quality.openvino``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

from compress.artifact import bundle_dir, command_line

BF16_MANIFEST = "bf16.json"


def bf16_network(net: nn.Module) -> nn.Module:
    """A copy of ``net`` whose linear and convolution weights are bf16, to run under bf16
    autocast (``run_bf16``).  The same logits as autocast of the float network, which casts
    those weights again on every call: about 1 ms of a one-image pass (8.7 -> 7.7 ms all fine,
    1 thread).  Norms and everything else keep their float32 parameters."""
    out = copy.deepcopy(net).eval()
    for module in out.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.to(torch.bfloat16)
    return out


def run_bf16(device: torch.device | str = "cpu") -> torch.autocast:
    """The autocast a ``bf16_network`` runs under (what runs in which precision: the module's
    docstring)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def load_bf16(path: str | Path) -> dict | None:
    """The bundle's ``bf16.json`` (None without one)."""
    manifest = bundle_dir(path) / BF16_MANIFEST
    return json.loads(manifest.read_text()) if manifest.exists() else None


def main(argv: list[str] | None = None) -> None:
    from compress.bf16 import native_bf16
    from models.cfvit.evaluate import evaluate_versions, version_command, write_version

    args, folder, ck = version_command(__doc__, argv)
    if not native_bf16("cpu"):
        print("[bf16] this CPU emulates bf16: the quality measured here holds, the speed does not",
              file=sys.stderr, flush=True)
    dataset = ck.meta["data"]["dataset"]
    evaluation = evaluate_versions(dataset, {"fp32": (ck.model, contextlib.nullcontext),
                                             "bf16": (bf16_network(ck.model), run_bf16)}, "bf16")
    engine_quality = None
    from models.common.engines import OPENVINO, available

    if available(OPENVINO) and native_bf16("cpu"):  # what engine=auto may serve the bf16 version on
        from models.cfvit import data
        from models.cfvit.engines import OPENVINO_IMAGES, openvino_quality

        images = data.to_tensor(data.load(dataset, "train").images[:OPENVINO_IMAGES], ck.config.mean, ck.config.std)
        engine_quality = openvino_quality(ck.model, "bf16", images, dataset, command_line("models.cfvit.bf16", argv),
                                          "OpenVINO's CPU plugin computes the float graphs in bf16 (AMX / AVX512-BF16)")
    write_version(folder / BF16_MANIFEST, evaluation, "bf16", method="bf16-autocast",
                  bits={"weights": 16, "activations": 16},
                  backend="torch autocast bf16, bf16 weights (oneDNN: AMX / AVX512-BF16); residual stream, layer "
                          "norms and the exit confidence in float32",
                  calibration={"data": "none: bf16 rounds weights and activations, nothing is calibrated"},
                  command=command_line("models.cfvit.bf16", argv), model_name=ck.meta.get("name"),
                  note="bf16 autocast of the float network; served only where the device multiplies bf16 natively; "
                       "curves on the held-out val split, stage quality on val and test",
                  tag="bf16", dry_run=args.dry_run,
                  extra={"engine_quality": engine_quality} if engine_quality else None)


if __name__ == "__main__":
    main()
