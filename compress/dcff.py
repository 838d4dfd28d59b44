"""DCFF (dynamic-coded filter fusion): train a compact network whose filters are fused from a
full filter bank, then export it as a plain dense network.

A ``FusedConv2d`` holds the full bank of ``n`` filters but computes ``m < n`` outputs, so
the network trains at its compact width from the first step (its BN layers and the next
layer's inputs are already ``m`` wide). Its ``m`` filters are ``F = P_hat @ W`` (filters
flattened), where ``P_hat`` (m x n) is recomputed once per epoch (``refuse``) from the
filters alone:

* ``D_ij = ||w_i - w_j||`` and each filter's inter-similarity distribution
  ``P_i = softmax_j(-D_ij * T)``, at a temperature ``T(e)`` that rises from 1 at epoch 0
  towards 1e4 (``temperature``);
* a filter's importance is how distinct its distribution is from the others:
  ``score_i = sum_j KL(P_i || P_j) / n`` (``kl_scores``); the ``m`` highest keep their rows
  of ``P``, which become ``P_hat``.

Gradients reach all ``n`` filters through ``P_hat`` while it is soft. As ``T`` grows each
``P_i`` tends to one-hot on filter ``i`` and fusion becomes selection. With the schedule's
steepness ``k = 1``, ``T`` is already about 4,600 at epoch 1: in float32 every distance
above about 0.02 then underflows to a probability of exactly 0, ``0 * log 0`` makes the
KL scores non-finite, and, as the method's code does, the previous epoch's choice of filters
is kept (``P_hat`` still takes the new, near one-hot rows). In practice the filters chosen
at the end of epoch 0 stay, and from epoch 1 on each compact filter is its chosen filter.

``export_weight`` is ``P_hat @ W`` in the layer's shape: the plain convolution that computes
exactly what the fused layer computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

T_START, T_END, STEEPNESS = 1.0, 1e4, 1.0


def compact_width(n: int, keep: float) -> int:
    """DCFF's compact width ``m = floor(n (1 - r))`` of an ``n``-filter layer, with
    ``keep = 1 - r``; at least one filter."""
    return max(1, math.floor(keep * n))


def temperature(epoch: int, epochs: int, t_start: float = T_START, t_end: float = T_END,
                k: float = STEEPNESS) -> float:
    """``T(e) = A / (1 + exp(-k e)) + t_start - A / 2`` with
    ``A = 2 (t_end - t_start)(1 + exp(-k E)) / (1 - exp(-k E))``: ``t_start`` at epoch 0
    and ``t_end`` at epoch ``E``."""
    a = 2 * (t_end - t_start) * (1 + math.exp(-k * epochs)) / (1 - math.exp(-k * epochs))
    return a / (1 + math.exp(-k * epoch)) + t_start - a / 2


def similarity(weight: torch.Tensor, t: float) -> torch.Tensor:
    """Each filter's inter-similarity distribution ``P`` (n x n) at temperature ``t``."""
    flat = weight.detach().flatten(1).double()
    return torch.softmax(-torch.cdist(flat, flat) * t, dim=1)


def kl_scores(p: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``score_i = sum_j KL(P_i || P_j) / n`` with the method's ``P_j + eps`` in the
    denominator, in O(n^2) memory: ``sum_l P_il log P_il - (1/n) sum_l P_il sum_j log(P_jl + eps)``.
    Non-finite where some ``P_il`` is exactly 0 (``0 * log 0``), as in the method."""
    n = p.shape[0]
    return (p * torch.log(p)).sum(1) - (p * torch.log(p + eps).sum(0)).sum(1) / n


class FusedConv2d(nn.Conv2d):
    """A convolution with ``full_out`` filters in its bank and ``out_channels`` fused outputs."""

    def __init__(self, in_channels: int, out_channels: int, full_out: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = False) -> None:
        if not 0 < out_channels <= full_out:
            raise ValueError(f"need 0 < out_channels ({out_channels}) <= full_out ({full_out})")
        super().__init__(in_channels, full_out, kernel_size, stride, padding, bias=bias)
        self.compact_out = out_channels
        # The first m rows of the identity until the first refuse: the fused layer starts as a cut one.
        self.register_buffer("fusion", torch.eye(full_out)[:out_channels].clone())
        self.register_buffer("kept", torch.arange(out_channels))

    @torch.no_grad()
    def refuse(self, t: float) -> bool:
        """Recompute ``P_hat`` at temperature ``t``; returns whether the scores were finite
        (if not, the kept filters stay those of the last finite scores)."""
        p = similarity(self.weight, t)
        scores = kl_scores(p)
        finite = bool(torch.isfinite(scores).all())
        if finite:
            self.kept.copy_(torch.topk(scores, self.compact_out).indices.sort().values)
        self.fusion.copy_(p[self.kept].to(self.fusion.dtype))
        return finite

    def export_weight(self) -> torch.Tensor:
        w = self.weight
        return (self.fusion @ w.flatten(1)).view(self.compact_out, *w.shape[1:])

    def export_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.fusion @ self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.export_weight(), self.export_bias(), self.stride, self.padding, self.dilation)

    @torch.no_grad()
    def exported(self) -> nn.Conv2d:
        """The plain convolution computing the same function."""
        conv = nn.Conv2d(self.in_channels, self.compact_out, self.kernel_size, self.stride, self.padding,
                         bias=self.bias is not None, device=self.weight.device)
        conv.weight.copy_(self.export_weight())
        if self.bias is not None:
            conv.bias.copy_(self.export_bias())
        return conv


@torch.no_grad()
def exported_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (eval mode) with every ``FusedConv2d`` replaced by the plain
    convolution it computes: the compact dense network the method delivers."""
    import copy

    out = copy.deepcopy(module)
    for parent in list(out.modules()):
        for name, child in parent.named_children():
            if isinstance(child, FusedConv2d):
                setattr(parent, name, child.exported())
    return out.eval()


def refuse_all(module: nn.Module, epoch: int, epochs: int) -> dict[str, int]:
    """Re-fuse every ``FusedConv2d`` in ``module`` for ``epoch``; counts of layers whose scores
    were finite (re-chosen) and not (kept)."""
    t = temperature(epoch, epochs)
    counts = {"rechosen": 0, "kept": 0}
    for m in module.modules():
        if isinstance(m, FusedConv2d):
            counts["rechosen" if m.refuse(t) else "kept"] += 1
    return counts
