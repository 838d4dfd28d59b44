"""Post-hoc BatchNorm recalibration per subnet, as the official evaluation does.

All PSS-Net subnets share one set of BN running buffers during training, so after training
they hold the statistics of whichever subnet ran last.  Every subnet that is evaluated or
served needs its own: reset the statistics, run a few *training* batches (with the
training augmentation, no gradients) in train mode with momentum ``1/(t+1)`` at batch t
(PyTorch's ``momentum=None``: an exact cumulative average), then switch back to eval.
We do this on the extracted dense subnet, so the supernet's shared buffers are never
touched and no subnet can ever see another's statistics.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from models.pssnet.nets import DenseSubnet, PssSupernet, SlimBatchNorm2d, SubnetConfig


def _bns(module: nn.Module) -> list[SlimBatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, SlimBatchNorm2d)]


@torch.no_grad()
def recalibrate_bn(module: DenseSubnet | PssSupernet, batches: Iterable[torch.Tensor],
                   cfg: SubnetConfig | None = None) -> int:
    """Recompute the BN running statistics of ``module`` as the exact average over
    ``batches`` (already augmented and normalised, N x 3 x S x S).  For a supernet, ``cfg``
    is the subnet to calibrate (its first-k slices of the shared buffers are rewritten).
    Returns the number of batches used; the module is left in eval mode."""
    if isinstance(module, DenseSubnet) and module.folded:
        raise ValueError("recalibrate before folding: a folded subnet has no BN left")
    bns = _bns(module)
    saved = [bn.bn.momentum for bn in bns]
    for bn in bns:
        bn.bn.reset_running_stats()
        bn.bn.momentum = None  # cumulative average: factor 1/(t+1) at batch t
    module.train()
    n = 0
    try:
        for x in batches:
            module(x, cfg) if isinstance(module, PssSupernet) else module(x)
            n += 1
    finally:
        for bn, m in zip(bns, saved):
            bn.bn.momentum = m
        module.eval()
    if n == 0:
        raise ValueError("no calibration batches")
    return n


def bn_stats(dense: DenseSubnet) -> dict[str, torch.Tensor]:
    """The running statistics of a (recalibrated, unfolded) dense subnet, by state-dict key."""
    return {k: v.detach().clone() for k, v in dense.state_dict().items()
            if k.endswith(("bn.running_mean", "bn.running_var"))}


def load_bn_stats(dense: DenseSubnet, stats: dict[str, torch.Tensor]) -> None:
    """Put stored per-subnet statistics into a freshly extracted dense subnet; every BN must
    be covered, so a subnet can never run on stale statistics by accident."""
    own = dense.state_dict()
    wanted = {k for k in own if k.endswith(("bn.running_mean", "bn.running_var"))}
    if set(stats) != wanted:
        raise ValueError(f"BN statistics do not match the subnet: missing {sorted(wanted - set(stats))[:3]}, "
                         f"unexpected {sorted(set(stats) - wanted)[:3]}")
    with torch.no_grad():
        for k in wanted:
            if own[k].shape != stats[k].shape:
                raise ValueError(f"{k}: stored {tuple(stats[k].shape)}, subnet {tuple(own[k].shape)}")
            own[k].copy_(stats[k])
