"""Convolutions with their activation (or output clip) fused into one oneDNN kernel, for
eval-mode networks on the CPU.

Why: on our small super-resolution networks a PReLU after a convolution is a separate pass
over the convolution's output, as long as a copy of it: on ARM-FSRCNN at 32 patches of 32x32
the four PReLUs and the output clip took about 15 % of w56's float32 time and 20 % of its bf16
rung's (torch profiler, docs/BENCHMARKS.md 1.4).  oneDNN applies such an element-wise
function as a post-op while the convolution's output is still in registers; torch exposes
that kernel as ``torch.ops.mkldnn._convolution_pointwise``, the op its own compiler
(inductor) emits for a convolution followed by an activation on x86 CPUs.  Using it here
gives eager networks the same kernel without compiling them (``torch.compile`` costs tens of
seconds per network at start-up).

The op is torch's internal API: ``fuse_conv_activations`` checks it on the network itself
(present, and the fused network's output equal to the plain one's to float rounding) and
leaves the network unchanged where it is missing or disagrees, so a torch without it serves
the plain kernels.  CPU only; float32 and bf16 (a ``compress.bf16`` section converts the
fused module's weights like any other).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from compress.int8 import prelu_as_leaky_relu

log = logging.getLogger(__name__)

# the largest difference from the plain network allowed, relative to its output's scale: the
# fused kernel sums in another order, nothing more
AGREEMENT = 1e-4


def _kernel():
    """``torch.ops.mkldnn._convolution_pointwise``, or None where this torch has no such op."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None


class FusedConv2d(nn.Module):
    """``conv`` followed by ``attr`` ("leaky_relu" with its slope, "relu", "hardtanh" with
    its bounds) as one oneDNN kernel.  Holds the convolution's weight and bias as its own
    parameters, so ``.to(dtype)`` converts them."""

    def __init__(self, conv: nn.Conv2d, attr: str, scalars: list[float]) -> None:
        super().__init__()
        if not self.accepts(conv):
            raise ValueError("only a plain nn.Conv2d with explicit zero padding")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False) if conv.bias is not None else None
        self.padding, self.stride, self.dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
        self.groups, self.attr, self.scalars = conv.groups, attr, list(scalars)
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        """Whether ``module`` is a convolution this kernel computes: a plain ``nn.Conv2d``
        (not a subclass with a forward of its own) with explicit zero padding."""
        return type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, self.padding, self.stride,
                                                       self.dilation, self.groups, self.attr, self.scalars, "")

    def extra_repr(self) -> str:
        then = "" if self.attr == "none" else f", then {self.attr}{self.scalars}"
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}{then}"


def activation_attr(module: nn.Module) -> tuple[str, list[float]] | None:
    """The oneDNN post-op computing ``module`` exactly, or None.  Single-slope PReLUs reach
    here as the leaky ReLUs they equal (``prelu_as_leaky_relu``); per-channel slopes have no
    post-op."""
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", [float(module.negative_slope)]
    if isinstance(module, nn.ReLU):
        return "relu", []
    return None


def _fuse_in_place(module: nn.Module) -> int:
    """Fuse every (Conv2d, activation) pair that follows each other in an ``nn.Sequential``
    below ``module``: the convolution becomes a FusedConv2d, the activation an Identity.  A
    module that applies a function of its own to a convolution's output fuses it through its
    ``fuse_into_conv()`` (returning how many it fused).  Returns how many it fused in all."""
    fused = 0
    for child in module.children():
        fused += _fuse_in_place(child)
    if hasattr(module, "fuse_into_conv"):
        fused += module.fuse_into_conv()
    if isinstance(module, nn.Sequential):
        items = list(module)
        for i in range(len(items) - 1):
            conv, act = items[i], items[i + 1]
            attr = activation_attr(act) if FusedConv2d.accepts(conv) else None
            if attr is not None:
                module[i], module[i + 1] = FusedConv2d(conv, *attr), nn.Identity()
                fused += 1
    return fused


def _lone_convs_to_onednn(module: nn.Module) -> int:
    """Every plain 2-D convolution left below ``module`` becomes a FusedConv2d with no
    post-op; returns how many.

    Why: for a batch of one, torch's convolution dispatch (one thread) leaves oneDNN for its
    im2col path (``_slow_conv2d_forward``): on FSRCNN's three 12-channel 3x3 mapping
    convolutions (no activation between them) that is about 0.12 ms each, and a one-patch
    pass of ARM-FSRCNN took 1.15-1.53 ms against 0.83-1.06 ms with them on oneDNN (the
    official checkpoint's six rungs, 1 thread, interleaved).  From two items on, both paths
    run oneDNN at the same speed."""
    count = 0
    for name, child in module.named_children():
        if FusedConv2d.accepts(child):
            setattr(module, name, FusedConv2d(child, "none", []))
            count += 1
        else:
            count += _lone_convs_to_onednn(child)
    return count


def fuse_conv_activations(net: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of the eval-mode CPU network ``net`` with each convolution that an activation
    follows (in an ``nn.Sequential``) fused with it, and every other convolution on the
    same oneDNN kernel with no post-op (``_lone_convs_to_onednn``), after checking the copy computes what
    ``net`` computes on ``example``; ``net`` itself where nothing fuses, the op is missing,
    or the outputs differ (logged).  Keeps ``net``'s memory format."""
    if _kernel() is None or example.device.type != "cpu":
        return net
    candidate = prelu_as_leaky_relu(copy.deepcopy(net))
    if _fuse_in_place(candidate) + _lone_convs_to_onednn(candidate) == 0:
        return net
    try:
        with torch.inference_mode():
            want, got = net(example), candidate(example)
        scale = float(want.abs().max()) or 1.0
        difference = float((want.float() - got.float()).abs().max())
    except RuntimeError as exc:  # the op refused these shapes or this dtype
        log.warning("fused convolutions not used: %s", exc)
        return net
    if not difference <= AGREEMENT * scale:
        log.warning("fused convolutions not used: output differs by %.3g (scale %.3g)", difference, scale)
        return net
    return candidate
