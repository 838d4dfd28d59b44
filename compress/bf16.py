"""bf16 sections of a float network: real speed where the hardware has bf16 dot products.

A CPU with AVX512-BF16 or AMX (and any recent GPU) multiplies bfloat16 matrices at about
twice the float32 rate, accumulating in float32 inside each kernel.  What bf16 costs is the
rounding of weights and of the tensors *between* layers to 8 significant bits, and how much
that matters depends on the layer: on ARM-FSRCNN the whole network in bf16 loses
0.15-0.18 dB, while its last two layers alone, which hold about 70 % of its
multiply-accumulates, lose 0.02-0.03 dB (docs/COMPRESSION.md).  So precision is chosen per
section: ``Bf16Section`` wraps one submodule, runs it on a bf16 copy of its weights and
hands back bf16 (the next section reads it without a conversion) or float32.

No calibration data and no training: a bf16 rung can be built at start-up for any
checkpoint.  Where the hardware emulates bf16 it is slower than float32, so callers check
``native_bf16`` first (the serving cost model would also time such a rung out of use).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` multiplies bf16 natively: CUDA's own check, or oneDNN's on the CPU
    (AVX512-BF16 / AMX; without them oneDNN converts to float32 and is slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


class Bf16Section(nn.Module):
    """``module`` computed in bf16: its input is cast to bf16 (a no-op after another bf16
    section), its weights are converted to bf16 (in place: the section owns the module it is
    given; ``with_bf16_sections`` hands it a copy), and its output stays bf16 unless
    ``float_out``."""

    def __init__(self, module: nn.Module, float_out: bool) -> None:
        super().__init__()
        self.module = module.to(torch.bfloat16)
        self.float_out = float_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x.to(torch.bfloat16))
        return y.float() if self.float_out else y


def with_bf16_sections(net: nn.Module, sections: Iterable[str], float_out: Iterable[str] = ()) -> nn.Module:
    """A copy of ``net`` whose submodules named in ``sections`` (dotted paths) run in bf16;
    those named in ``float_out`` hand back float32, the others bf16 (so only name a section
    there whose consumer reads bf16: another section, or a function that converts)."""
    out = copy.deepcopy(net)
    float_out = set(float_out)
    for path in sections:
        parent_path, _, name = path.rpartition(".")
        parent = out.get_submodule(parent_path) if parent_path else out
        setattr(parent, name, Bf16Section(getattr(parent, name), path in float_out))
    return out
