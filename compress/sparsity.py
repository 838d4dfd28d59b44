"""Unstructured sparsity: OptG (supermask scores coupled with weight gradients) and gradual
magnitude pruning (GMP) as its baseline, on one schedule; CSR kernels for the layers where
sparsity can be real speed on a CPU.

Both methods mask every convolution and linear weight ``W`` (``W_eff = W * M``, through
``torch.nn.utils.parametrize``) and re-choose the masks once per epoch, globally: one
threshold over all layers keeps the top ``1 - p_t`` share of a criterion, so each layer's
sparsity follows from the ranking. The sparsity rises on a sigmoid,
``p_t = p * sigmoid(beta * (e - E / 2))`` (0 for the first ~45 % of E epochs, ``p`` after
~55 %). They differ only in the criterion:

* **OptG**: a real-valued score ``S`` per weight, initialised to 0 (or to ``|W|``, see
  ``Sparsifier``), trained by SGD
  (momentum 0.9, no weight decay) with the mask straight-through, so
  ``dL/dS = (dL/dW_eff) * W``: every step adds the first-order saliency ``-lr g W`` of kept
  *and* pruned weights (a pruned weight still has a gradient at ``W_eff = 0``, so it can
  come back). In the method's code the scores' learning rate is the weights' times
  ``sigmoid(beta (e - E/2))`` (``score_lr_ramp=True``): they hardly move until the sparsity
  ramp begins, so each re-allocation ranks by roughly the last 1 % of training's gradients.
  On ImageNet that is about one epoch, 1.3 million images; in a run of a few thousand steps it
  is a few dozen batches, the ranking is noise, the masks churn at every re-allocation and the
  network never recovers (measured: chance accuracy at 90 %). ``score_lr_ramp=False`` keeps
  the weights' rate for the scores, so they accumulate the criterion over the whole run.
  Pruned weights get no task gradient but keep their weight decay.
* **GMP**: ``|W|``; pruned weights are set to zero when masked, so they stay pruned.

``Sparsifier`` holds the masks and the schedule; ``before_step`` plugs it into a training
loop. ``export`` leaves a plain network whose pruned weights are exact zeros.
``CsrPointwise`` and ``CsrLinear`` run 1x1 convolutions and linear layers as CSR sparse
matrix products (``torch.sparse.mm``): the only layers where a stock CPU sparse kernel
exists (there is none for 3x3 or depth-wise convolutions).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

METHODS = ("optg", "gmp")
SCORE_INITS = ("zero", "magnitude")


class Masked(nn.Module):
    """``W -> W * M``; with scores, ``M`` is straight-through to them."""

    def __init__(self, weight: torch.Tensor, scores: bool) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones_like(weight))
        self.scores = nn.Parameter(torch.zeros_like(weight)) if scores else None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.scores is None:
            return w * self.mask
        return w * (self.mask + self.scores - self.scores.detach())


def add_arguments(ap: argparse.ArgumentParser, score_init: str) -> None:
    """The command-line options every sparsity command shares (method, target, seed, output,
    run length and schedule, OptG's score start); ``score_init`` is the command's default."""
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--epochs", type=int, default=100, help="mask re-allocations (and schedule units) per run")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--score-init", choices=SCORE_INITS, default=score_init,
                    help="OptG: the scores start at 0 (the method) or at |W| ('magnitude': the first masks are "
                    "magnitude pruning's, then the accumulated saliency moves them)")


def to_csr(weight: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and measured here
        warnings.simplefilter("ignore", UserWarning)
        return weight.detach().to_sparse_csr()


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0


class Sparsifier:
    """Masks on every Conv2d and Linear weight of ``net`` (registered in place), the schedule
    of ``method`` towards ``target`` sparsity over ``epochs`` epochs of ``steps_per_epoch``."""

    def __init__(self, net: nn.Module, method: str, target: float, epochs: int, steps_per_epoch: int,
                 beta: float = 1.0, score_lr_ramp: bool = True, dense_ends: bool = False,
                 score_init: str = "zero", modules: list[nn.Module] | None = None) -> None:
        """``score_init``: OptG's scores start at 0 (the method, from scratch) or at ``|W|``
        ("magnitude"): from a trained network magnitude is already a strong ranking, and
        scores starting at 0 must learn a better one in the run's few thousand steps; from
        ``|W|`` the first masks are magnitude pruning's and the accumulated saliency
        ``-lr g W`` (in the same units: weight x step) moves weights across the threshold.
        ``modules``: the layers to mask (default: every Conv2d and Linear of ``net``).
        ``dense_ends``: leave the first and the last masked layer dense (the method's
        ``--first-layer-dense`` and ``--last-layer-dense``). From scratch they matter: the
        classifier starts at N(0, 0.01), far below the convolutions' He init, so one global
        magnitude threshold removes it whole and the network is left at chance."""
        if method not in METHODS:
            raise ValueError(f"method {method!r}: use one of {METHODS}")
        if not 0 <= target < 1:
            raise ValueError("target sparsity must be in [0, 1)")
        self.method, self.target, self.epochs, self.steps_per_epoch, self.beta = (
            method, target, epochs, steps_per_epoch, beta)
        if score_init not in SCORE_INITS:
            raise ValueError(f"score_init {score_init!r}: use one of {SCORE_INITS}")
        self.score_lr_ramp = score_lr_ramp
        self.layers: list[tuple[nn.Module, Masked]] = []
        candidates = [m for m in (net.modules() if modules is None else modules)
                      if isinstance(m, (nn.Conv2d, nn.Linear)) and not parametrize.is_parametrized(m)]
        for module in candidates[1:-1] if dense_ends else candidates:
            masked = Masked(module.weight, scores=method == "optg")
            parametrize.register_parametrization(module, "weight", masked)
            if masked.scores is not None and score_init == "magnitude":
                with torch.no_grad():
                    masked.scores.copy_(self.original(module).abs())
            self.layers.append((module, masked))

    @staticmethod
    def original(module: nn.Module) -> torch.Tensor:
        return module.parametrizations.weight.original

    def scores(self) -> list[nn.Parameter]:
        return [m.scores for _, m in self.layers if m.scores is not None]

    def score_group(self, lr: float) -> dict:
        """OptG's scores as an optimiser group: no weight decay."""
        return {"params": self.scores(), "lr": lr, "weight_decay": 0.0, "scores": True}

    def sparsity_at(self, epoch: int) -> float:
        return self.target * sigmoid(self.beta * (epoch - self.epochs / 2))

    def criterion(self, module: nn.Module, masked: Masked) -> torch.Tensor:
        return masked.scores.detach() if masked.scores is not None else self.original(module).detach().abs()

    @torch.no_grad()
    def reallocate(self, sparsity: float) -> None:
        """Global threshold: the ``sparsity`` share of all weights lowest by the criterion is masked."""
        crit = torch.cat([self.criterion(m, k).flatten() for m, k in self.layers])
        n_pruned = int(round(sparsity * crit.numel()))
        keep = torch.ones(crit.numel(), dtype=torch.bool)
        if n_pruned:
            keep[torch.argsort(crit, stable=True)[:n_pruned]] = False
        offset = 0
        for module, masked in self.layers:
            n = masked.mask.numel()
            masked.mask.copy_(keep[offset:offset + n].view_as(masked.mask).to(masked.mask.dtype))
            offset += n
            if masked.scores is None:  # GMP: a pruned weight is gone
                self.original(module).mul_(masked.mask)

    def before_step(self, step: int, opt: torch.optim.Optimizer) -> None:
        """Re-mask at each epoch's first step; OptG's score learning rate follows the ramp
        (with ``score_lr_ramp``)."""
        epoch = step // self.steps_per_epoch
        if step % self.steps_per_epoch == 0:
            self.reallocate(self.sparsity_at(epoch))
        for g in opt.param_groups:
            if g.get("scores") and self.score_lr_ramp:
                g["lr"] *= sigmoid(self.beta * (epoch - self.epochs / 2))

    def sparsity(self) -> float:
        masks = [k.mask for _, k in self.layers]
        return 1.0 - float(sum(m.sum() for m in masks)) / sum(m.numel() for m in masks)

    def per_layer(self) -> list[float]:
        return [round(1.0 - float(k.mask.mean()), 4) for _, k in self.layers]

    @torch.no_grad()
    def export(self) -> None:
        """Remove the parametrizations: each weight becomes ``W * M`` with exact zeros."""
        for module, _ in self.layers:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        self.layers = []


def weight_sparsity(net: nn.Module) -> float:
    """Share of exact zeros over all Conv2d and Linear weights (dense ends included)."""
    ws = [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return float(sum((w == 0).sum() for w in ws)) / sum(w.numel() for w in ws)


def storage_bytes(net: nn.Module) -> dict[str, int]:
    """Bytes of the Conv2d and Linear weights: dense float32, and CSR (float32 values, int32
    column indices and row pointers, one row per output filter)."""
    dense = csr = 0
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach().flatten(1)
            dense += 4 * w.numel()
            csr += 8 * int((w != 0).sum()) + 4 * (w.shape[0] + 1)
    return {"dense_float32": dense, "csr_float32_int32": csr}


class CsrPointwise(nn.Module):
    """A 1x1 convolution (stride 1, groups 1) as one CSR sparse matrix product."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
            raise ValueError("CsrPointwise needs a 1x1, stride 1, groups 1 convolution")
        self.weight = to_csr(conv.weight.flatten(1))
        self.bias = None if conv.bias is None else conv.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = torch.sparse.mm(self.weight, x.permute(1, 0, 2, 3).reshape(c, n * h * w))
        y = y.view(-1, n, h, w).permute(1, 0, 2, 3)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


class CsrLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = to_csr(linear.weight)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sparse.mm(self.weight, x.reshape(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def dense_vs_csr_seconds(net: nn.Module, inputs: dict[int, torch.Tensor], rounds: int = 7) -> dict:
    """Median seconds per batch of ``net`` (in eval mode, unchanged) against a copy of it with
    CSR 1x1/Linear kernels, for each ``{batch: input}``, interleaved round by round so that a
    noisy host slows both alike; the two must compute the same function. Threads: the caller's."""
    csr = with_csr_kernels(copy.deepcopy(net))
    out = {}
    with torch.inference_mode():
        for batch, x in inputs.items():
            torch.testing.assert_close(csr(x), net(x), atol=1e-3, rtol=1e-3)
            times: dict[str, list[float]] = {"dense": [], "csr": []}
            reps = 20 if batch == 1 else 3
            for _ in range(rounds):
                for name, m in (("dense", net), ("csr", csr)):
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        m(x)
                    times[name].append((time.perf_counter() - t0) / reps)
            d, c = statistics.median(times["dense"]), statistics.median(times["csr"])
            out[f"batch_{batch}"] = {"dense_ms": round(1e3 * d, 3), "csr_ms": round(1e3 * c, 3),
                                     "csr_over_dense": round(c / d, 3)}
    return out


def with_csr_kernels(net: nn.Module, min_sparsity: float = 0.5) -> nn.Module:
    """``net`` (in place) with every 1x1 convolution and linear layer that is at least
    ``min_sparsity`` zeros on CSR kernels.  The layers left dense (the ends a sparsity method
    keeps dense) would only be slower on CSR: it stores an index per value, and a sparse
    product beats a dense one on this CPU only from about 90 % zeros."""
    def sparse_enough(layer: nn.Module) -> bool:
        return float((layer.weight == 0).float().mean()) >= min_sparsity

    for module in list(net.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1) and child.groups == 1 \
                    and child.stride == (1, 1) and sparse_enough(child):
                setattr(module, child_name, CsrPointwise(child))
            elif isinstance(child, nn.Linear) and sparse_enough(child):
                setattr(module, child_name, CsrLinear(child))
    return net


__all__ = ["CsrLinear", "CsrPointwise", "METHODS", "SCORE_INITS", "add_arguments", "dense_vs_csr_seconds", "Masked", "Sparsifier", "storage_bytes", "weight_sparsity",
           "with_csr_kernels"]
