"""Fake quantizers for low-bit quantization-aware training of super-resolution networks:
DDTB's dynamic dual trainable bounds and a PAMS-like symmetric bound as its baseline.

Everything here is *simulated*: tensors stay float, rounded onto a k-bit grid with a
straight-through estimator, so a network trained with these quantizers shows the accuracy
of k-bit inference, not its speed (stock CPU kernels have no 2-4 bit convolutions).

DDTB (Zhong et al., ECCV 2022, "Dynamic Dual Trainable Bounds for Ultra-low Precision
Super-Resolution Networks"), as its code does it:

* activations: two trainable bounds per quantizer, ``alpha_u`` and ``alpha_l`` (initialised
  to +10 / -10; at 2 bits re-initialised from the 99th / 1st percentile of one training
  batch), an asymmetric grid between them, gradients to both bounds through the clamp and
  through scale and zero point;
* a dynamic gate on the layers whose activation range varies most between inputs ("dynamic
  intensity": the variance over calibration batches of the per-batch max plus that of the
  min): from the detached input's channel means, two 1x1 convolutions with 2-bit weights
  and 2-bit activations give per-image factors beta in (0, 2) that scale both bounds;
* weights: per tensor, asymmetric, clipped to the 1st-99th percentile.

One choice differs from the released code, on purpose: there the gate's first convolution
never receives a gradient (its 2-bit input quantizer is computed from a detached tensor), so
it stays at its random initialisation; here the straight-through estimator lets gradients
reach it, as the paper describes a trainable gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def quantize_weight_asym(w: torch.Tensor, bits: int, percentiles: tuple[float, float] = (1.0, 99.0)) -> torch.Tensor:
    """Per-tensor asymmetric k-bit weights clipped to the given percentiles (DDTB's
    ``quant_weight_asym99``), straight-through."""
    flat = w.detach().flatten().float()
    lo, hi = torch.quantile(flat, percentiles[0] / 100), torch.quantile(flat, percentiles[1] / 100)
    if hi <= lo:
        return w
    wc = torch.maximum(torch.minimum(w, hi), lo)
    s = (2 ** bits - 1) / (hi - lo)
    z = torch.round(s * lo) + 2 ** (bits - 1)
    return (round_ste(s * wc - z) + z) / s


def quantize_symmetric_max(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric k-bit grid over [-max|x|, max|x|], straight-through (the gate's weights)."""
    m = x.detach().abs().max().clamp_min(1e-8)
    levels = 2 ** (bits - 1) - 1
    return round_ste(x / m * levels) * m / levels


def quantize_minmax(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric k-bit grid over the tensor's own [min, max], straight-through (the gate's
    activations)."""
    lo, hi = x.detach().min(), x.detach().max()
    if hi <= lo:
        return x
    s = (2 ** bits - 1) / (hi - lo)
    return round_ste((x - lo) * s) / s + lo


class DynamicGate(nn.Module):
    """Per-image factors (beta_u, beta_l) in (0, 2) for a quantizer's bounds, from the
    channel means of its (detached) input: 2-bit 1x1 convolutions C -> 32 -> 2."""

    def __init__(self, channels: int, hidden: int = 32, bits: int = 2) -> None:
        super().__init__()
        self.bits = bits
        self.conv1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, 2, 1, bias=False)
        self.last_logits: torch.Tensor | None = None  # pre-sigmoid output: the regulariser pulls it to 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = quantize_minmax(x.detach().mean((2, 3), keepdim=True), self.bits)
        h = F.conv2d(c, quantize_symmetric_max(self.conv1.weight, self.bits))
        h = quantize_minmax(F.relu(self.bn(h)), self.bits)
        g = F.conv2d(h, quantize_symmetric_max(self.conv2.weight, self.bits)).flatten(1)  # (N, 2)
        self.last_logits = g
        beta = 2 * torch.sigmoid(g)
        return beta[:, 0], beta[:, 1]


class DualBoundQuant(nn.Module):
    """DDTB's activation quantizer: trainable upper and lower bounds, an asymmetric k-bit
    grid between them, optionally scaled per image by a ``DynamicGate``.

    Modes: ``calibrating`` passes inputs through in float and records each batch's max and
    min (for ``dynamic_intensity``); ``gated`` switches the dynamic bounds on."""

    def __init__(self, bits: int, channels: int | None = None, init: float = 10.0) -> None:
        super().__init__()
        self.bits = bits
        self.alpha_u = nn.Parameter(torch.tensor(float(init)))
        self.alpha_l = nn.Parameter(torch.tensor(-float(init)))
        self.gate = DynamicGate(channels) if channels is not None else None
        self.gated = False
        self.calibrating = False
        self.seen_max: list[float] = []
        self.seen_min: list[float] = []

    @torch.no_grad()
    def init_from_percentiles(self, x: torch.Tensor, low: float = 1.0, high: float = 99.0) -> None:
        """Bounds at the given percentiles of ``x`` (DDTB does this at 2 bits, on one batch)."""
        flat = x.detach().flatten().float()
        if flat.numel() > 1_000_000:  # torch.quantile's input limit; a strided sample suffices
            flat = flat[:: flat.numel() // 1_000_000 + 1]
        self.alpha_l.copy_(torch.quantile(flat, low / 100))
        self.alpha_u.copy_(torch.quantile(flat, high / 100))

    def dynamic_intensity(self) -> float:
        """Variance over calibration batches of the per-batch max, plus that of the min."""
        if len(self.seen_max) < 2:
            return 0.0
        return float(torch.tensor(self.seen_max).var() + torch.tensor(self.seen_min).var())

    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(upper, lower), each broadcastable to ``x`` (per image when gated)."""
        if self.gated and self.gate is not None:
            beta_u, beta_l = self.gate(x)
            shape = (-1,) + (1,) * (x.dim() - 1)
            return (beta_u * self.alpha_u).view(shape), (beta_l * self.alpha_l).view(shape)
        return self.alpha_u, self.alpha_l

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.seen_max.append(float(x.detach().max()))
            self.seen_min.append(float(x.detach().min()))
            return x
        if self.gate is not None and not self.gated and self.training:
            self.gate(x)  # static phase: the gate runs only for its regulariser (beta -> 1)
        upper, lower = self.bounds(x)
        xc = torch.minimum(torch.maximum(x, lower), upper)
        s = (2 ** self.bits - 1) / (upper - lower).clamp_min(1e-8)
        z = round_ste(s * lower) + 2 ** (self.bits - 1)
        return (round_ste(s * xc - z) + z) / s


class SymmetricBoundQuant(nn.Module):
    """The PAMS-like baseline: one trainable bound alpha, a symmetric k-bit grid over
    [-alpha, alpha]."""

    def __init__(self, bits: int, init: float = 10.0) -> None:
        super().__init__()
        self.bits = bits
        self.alpha = nn.Parameter(torch.tensor(float(init)))

    @torch.no_grad()
    def init_from_percentiles(self, x: torch.Tensor, high: float = 99.0) -> None:
        flat = x.detach().abs().flatten().float()
        if flat.numel() > 1_000_000:
            flat = flat[:: flat.numel() // 1_000_000 + 1]
        self.alpha.copy_(torch.quantile(flat, high / 100))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha.abs().clamp_min(1e-8)
        xc = torch.minimum(torch.maximum(x, -a), a)
        levels = 2 ** (self.bits - 1) - 1
        return round_ste(xc / a * levels) * a / levels


def select_dynamic(quantizers: list[DualBoundQuant], ratio: float) -> list[DualBoundQuant]:
    """The ``ratio`` share of quantizers with the highest dynamic intensity (at least one when
    ratio > 0): those get their gate switched on."""
    if ratio <= 0 or not quantizers:
        return []
    k = max(1, round(ratio * len(quantizers)))
    return sorted(quantizers, key=lambda q: q.dynamic_intensity(), reverse=True)[:k]


def attention_transfer_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """DDTB's distillation term: the squared difference of the normalised spatial attention
    maps (channel mean of squares) of the quantized and the float network's features."""
    def attention(f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)

    return (attention(student) - attention(teacher.detach())).pow(2).mean()


def gate_regulariser(quantizers: list[DualBoundQuant]) -> torch.Tensor:
    """Mean squared pre-sigmoid gate output (pulls beta to 1) while the bounds are static."""
    terms = [q.gate.last_logits.pow(2).mean() for q in quantizers if q.gate is not None and
             q.gate.last_logits is not None]
    return torch.stack(terms).mean() if terms else torch.zeros(())
