"""Filter pruning by CLR-RNF: how many filters each layer keeps, and which ones.

* **CLR (cross-layer ranking)** sets the widths. Every weight of every prunable layer gets a
  computation-aware score ``|w| / c_l ** lam`` (``c_l``: the layer's cost coefficient, ``lam``
  how much cost counts); one threshold over all scores keeps the top ``1 - P`` of them, and
  layer ``l`` keeps ``floor(n_l * (1 - p_l))`` of its ``n_l`` filters, ``p_l`` being the share
  of its own weights under the threshold. Costly layers lose more. ``clr_for_flops`` searches
  ``P`` for a FLOPs target instead of a weight share; its ``align`` option rounds every width
  to a multiple of 8 (say) for the kernels that run the result, a departure from the method.
* **RNF (k-reciprocal nearest filters)** picks which ``m`` filters stay in a layer. Each filter
  names its ``k`` nearest filters (itself first); the kept set is what *every* filter names,
  with ``k`` grown from ``m`` until that intersection holds ``m`` (when a step of ``k`` adds
  too many, the earlier intersection is kept and the rest filled at random from the new
  ones). The kept filters are copied, not averaged. The method's nearness is the row-wise
  normalised ``exp(-||W_i - W_j||^2)``; normalising a row does not reorder it, so neighbours
  are ranked here by the squared distance itself, which ranks the same and does not
  underflow for far-apart filters.
* Baselines at the same widths: ``l1_select`` (largest L1 norms) and ``random_select``.

Both steps learn nothing; fine-tuning follows. Which tensors follow a filter (its BN, the
next layer's input channels) depends on the architecture, so channel surgery lives with
each network, not here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Selector = Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor]


def clr_ranking(weights: Sequence[torch.Tensor], coefficients: Sequence[float],
                lam: float) -> Callable[[float], list[int]]:
    """CLR's ranking of every weight across layers by ``|w| / c_l ** lam``, sorted once, as a
    function from a prune ratio to the filters kept per layer (``clr_keep_counts``). Why: the
    FLOPs search asks for 40 ratios, and sorting a MobileNet's weights again for each one was
    3 s of the search; from sorted scores a ratio costs one lookup and a binary search per layer."""
    if len(weights) != len(coefficients):
        raise ValueError(f"{len(weights)} layers but {len(coefficients)} coefficients")
    scores = [w.detach().abs().flatten().double() / float(c) ** lam for w, c in zip(weights, coefficients)]
    ascending = [torch.sort(s).values for s in scores]
    everything = torch.sort(torch.cat(scores), descending=True).values
    filters = [w.shape[0] for w in weights]

    def keep_counts(prune_ratio: float) -> list[int]:
        if not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
        keep_n = math.ceil((1.0 - prune_ratio) * everything.numel())
        threshold = everything[keep_n - 1]  # the smallest score kept
        counts = []
        for n, s in zip(filters, ascending):
            pruned_share = int(torch.searchsorted(s, threshold, side="left")) / s.numel()  # share below it
            counts.append(max(1, math.floor(n * (1.0 - pruned_share))))
        return counts

    return keep_counts


def clr_keep_counts(weights: Sequence[torch.Tensor], coefficients: Sequence[float], lam: float,
                    prune_ratio: float) -> list[int]:
    """Filters kept per layer when the share ``prune_ratio`` of all weights, ranked across
    layers by ``|w| / c_l ** lam``, is pruned: layer l keeps ``floor(n_l * (1 - p_l))`` of its
    ``n_l`` filters, ``p_l`` the share of its weights scoring below the smallest kept score.
    ``weights[l]``: layer l's weight with its filters on dim 0. Every layer keeps at least one
    filter."""
    return clr_ranking(weights, coefficients, lam)(prune_ratio)


def aligned(counts: Sequence[int], full: Sequence[int], align: int) -> list[int]:
    """``counts`` rounded to the nearest multiple of ``align``, at least ``align`` and at most
    the layer's full width rounded down to one (or the full width, where that is below
    ``align``). Why: blocked convolution kernels (ONNX Runtime's, oneDNN's) run channel counts
    that are multiples of 8 at full speed and odd ones up to 2.5x slower on the same FLOPs, so
    the method's exact counts are rounded for the kernels that will run them. Rounding to the
    nearest never decreases as a count grows, so FLOPs still fall as pruning grows."""
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    out = []
    for c, n in zip(counts, full):
        top = n if n < align else n // align * align
        out.append(min(top, max(align, int(math.floor(c / align + 0.5)) * align)))
    return out


def clr_for_flops(weights: Sequence[torch.Tensor], coefficients: Sequence[float], lam: float,
                  flops_of: Callable[[list[int]], float], target_flops: float,
                  steps: int = 40, align: int = 1) -> tuple[list[int], float]:
    """The widest CLR widths whose ``flops_of(widths)`` is at most ``target_flops``, and the
    prune ratio that gives them (bisection: more pruning never adds FLOPs). With ``align`` > 1
    every width is rounded by ``aligned`` before it is costed, so the target holds for the
    rounded network."""
    full = [w.shape[0] for w in weights]
    if flops_of(full) <= target_flops:
        return full, 0.0

    ranking = clr_ranking(weights, coefficients, lam)

    def counts_at(ratio: float) -> list[int]:
        return aligned(ranking(ratio), full, align)  # align 1: unchanged

    lo, hi = 0.0, 1.0 - 1e-9  # lo: over the target, hi: within it (or as small as CLR goes)
    best = counts_at(hi)
    if flops_of(best) > target_flops:
        raise ValueError(f"even the narrowest CLR network has {flops_of(best):.4g} FLOPs > {target_flops:.4g}")
    for _ in range(steps):
        mid = (lo + hi) / 2
        counts = counts_at(mid)
        if flops_of(counts) <= target_flops:
            hi, best = mid, counts
        else:
            lo = mid
    return best, hi


def rnf_select(weight: torch.Tensor, keep: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (sorted) of the ``keep`` filters of ``weight`` (filters on dim 0) that RNF keeps."""
    n = weight.shape[0]
    _check(n, keep)
    w = weight.detach().flatten(1).double()
    dist = torch.cdist(w, w).pow(2)
    dist.fill_diagonal_(-1.0)  # each filter is its own nearest, whatever the ties
    # rank[i, j]: place of filter j in filter i's list of neighbours (0: i itself)
    order = torch.argsort(dist, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n).expand(n, n).contiguous())
    # j is in N_k(i) iff rank[i, j] < k, so j is in every N_k(i) iff worst[j] < k
    worst = rank.max(dim=0).values
    k = keep
    while int((worst < k).sum()) < keep:
        k += 1
    inside = torch.nonzero(worst < k).flatten()
    if len(inside) == keep:
        return inside.sort().values
    sure = torch.nonzero(worst < k - 1).flatten()
    new = torch.nonzero(worst == k - 1).flatten()
    fill = new[torch.randperm(len(new), generator=generator)[: keep - len(sure)]]
    return torch.cat([sure, fill]).sort().values


def l1_select(weight: torch.Tensor, keep: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (sorted) of the ``keep`` filters with the largest L1 norm (the usual baseline)."""
    _check(weight.shape[0], keep)
    return torch.topk(weight.detach().abs().flatten(1).sum(1), keep).indices.sort().values


def random_select(weight: torch.Tensor, keep: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``keep`` filter indices (sorted) drawn uniformly without replacement."""
    _check(weight.shape[0], keep)
    return torch.randperm(weight.shape[0], generator=generator)[:keep].sort().values


SELECTORS: dict[str, Selector] = {"rnf": rnf_select, "l1": l1_select, "random": random_select}


def _check(n: int, keep: int) -> None:
    if not 1 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} filters")
