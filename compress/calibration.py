"""Calibration batches for post-training quantization.

What the activation ranges are observed on decides the int8 network's quality, and a served
model may come without its training data (an official checkpoint).  These are the sources
that need nothing learnt: the real images (the baseline every synthetic source is compared
with) and Gaussian noise in the network's normalised input space (the naive data-free one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def batches_of(x: torch.Tensor, batch_size: int = 64) -> list[torch.Tensor]:
    """``x`` (N, ...) cut into batches along its first dimension."""
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def real_batches(images: Sequence[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
    """Preprocessed real images (each (C, H, W)) as calibration batches."""
    return batches_of(torch.stack(list(images)), batch_size)


def gaussian_batches(shape: tuple[int, ...], n: int, seed: int = 0, batch_size: int = 64) -> list[torch.Tensor]:
    """``n`` standard-normal inputs of ``shape`` (C, H, W): what a normalised image looks like
    to a network that has seen no data at all."""
    g = torch.Generator().manual_seed(seed)
    return batches_of(torch.randn((n, *shape), generator=g), batch_size)


BnLayer = tuple["torch.nn.Module", torch.Tensor, torch.Tensor]  # (module whose input BN sees, mean, var)


def bn_layers(model: torch.nn.Module) -> list[BnLayer]:
    """Every ``nn.BatchNorm2d`` of ``model`` with its running statistics (a model whose BN
    wrappers call ``F.batch_norm`` on a child's buffers passes its own list instead)."""
    from torch import nn

    return [(m, m.running_mean, m.running_var) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def bn_statistics_synthesis(model: torch.nn.Module, shape: tuple[int, ...], n: int, steps: int = 200,
                            lr: float = 0.1, seed: int = 0, batch_size: int = 64,
                            layers: list[BnLayer] | None = None, progress=None) -> torch.Tensor:
    """``n`` inputs of ``shape`` (C, H, W) synthesised from the network alone: starting from
    Gaussian noise, each batch is optimised so that every BatchNorm layer sees the mean and
    variance it stored in training (``model`` must still have its BN layers, in eval mode).
    The plain BN-statistics synthesis that data-free quantization builds on (ZeroQ; FDDA and
    IntraQ add their own terms): images whose activation ranges look like real data's."""
    bns = layers if layers is not None else bn_layers(model)
    if not bns:
        raise ValueError("the model has no BatchNorm layers to take statistics from")
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    seen: list[torch.Tensor] = []

    def hook_for(mean_ref: torch.Tensor, var_ref: torch.Tensor):
        def hook(_module, inputs: tuple[torch.Tensor]) -> None:
            x = inputs[0]
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            seen.append((mean - mean_ref).pow(2).sum() + (var.sqrt() - var_ref.sqrt()).pow(2).sum())
        return hook

    handles = [m.register_forward_pre_hook(hook_for(mean, var)) for m, mean, var in bns]
    g = torch.Generator().manual_seed(seed)
    out = []
    try:
        for start in range(0, n, batch_size):
            x = torch.randn((min(batch_size, n - start), *shape), generator=g).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            for step in range(steps):
                seen.clear()
                opt.zero_grad()
                with torch.enable_grad():
                    model(x)
                    loss = torch.stack(seen).sum()
                    loss.backward()
                opt.step()
            if progress is not None:
                progress(f"synthesised {start + len(x)}/{n} (BN loss {float(loss):.3f})")
            out.append(x.detach())
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out)


def one_per_class(labels: Sequence[int] | torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Indices of one randomly chosen sample of every class present in ``labels``, in class
    order: the labelled real data FDDA may use (one image per class), drawn by ``seed`` so
    that repeated runs see different images."""
    labels = torch.as_tensor(labels).long()
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        picks.append(int(members[torch.randint(len(members), (1,), generator=g)]))
    return torch.tensor(picks)
