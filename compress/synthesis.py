"""Synthetic calibration data with class structure: FDDA and IntraQ, re-implemented from
their papers' formulas (FDDA: Zhong et al., ECCV 2022; IntraQ: Zhong et al., CVPR 2022).

Plain BN-statistics synthesis (``compress.calibration.bn_statistics_synthesis``) makes every
image of a batch match the statistics the network stored over *all* its training data, so
the images it makes look alike: one average "class".  Both methods here add class
structure, because a quantized network's ranges and, when it is fine-tuned, its decision
boundaries, are learnt from what the calibration set spans.

* **FDDA** (Zhong et al., "Fine-grained Data Distribution Alignment for Post-Training
  Quantization", ECCV 2022) may look at ONE real labelled image per class.  From it, the
  class's *BNS centre*: the per-channel spatial mean and biased variance of every BN layer's
  input, the image run alone through the float network (its evaluation transform: the
  caller preprocesses as for inference).  Synthetic images of class c are pulled toward
  c's centre (*centralised* BNS loss) and toward the centre plus fresh Gaussian noise every
  step (*distorted* BNS loss: deep-layer statistics of real images scatter around their
  class's, the "intra-class incohesion"), on the deep half of the BN layers only, plus
  cross-entropy to c and the global BNS loss.
* **IntraQ** (Zhong et al., "IntraQ: Learning Synthetic Images with Intra-Class
  Heterogeneity for Zero-Shot Network Quantization", CVPR 2022) sees no image.  Besides the
  BNS loss: *local object reinforcement* (half of the steps see a random resized crop of
  every image, so the class evidence must hold at several scales and positions), a *soft
  inception loss* (the target-class probability is pulled to a soft value in
  [targetPro, 1] for half of the images, not always to 1) and a *marginal distance
  constraint* (the cosine distance of an image's penultimate feature to its class's
  centre, the mean feature of the images synthesised before, kept within [m_low, m_up]).

Both optimise the pixels directly (Adam, ReduceLROnPlateau on the total loss), as IntraQ's
code does.  FDDA's code trains a GDFQ-style conditional generator instead, jointly with a
quantized student over 80k steps; that generator is replaced here by the same direct pixel
optimisation (see ``fdda_synthesis``): the product wanted is a fixed calibration set, the
whole CPU budget then goes into the images that are kept, and FDDA, IntraQ and plain BNS
synthesis differ only in their losses (a generator was not tried).  Everything that is
scaled down (steps, number of images) is said where it happens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compress.calibration import BnLayer, bn_layers

Progress = Callable[[str], None] | None


@dataclass
class SyntheticSet:
    """A calibration set: ``inputs`` (n, C, H, W) in the network's normalised input space,
    ``labels`` (n,) where the method assigns classes (None otherwise), and ``info``: the
    method, its settings and final losses, for a manifest."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Shared pieces: BN-input recording, statistics, losses, the crop
# ---------------------------------------------------------------------------------------


class _Recorder:
    """Records, during a forward, the input of every BN layer in ``layers`` (pre-hooks: what
    BN normalises) and the input of ``feature_layer`` (the penultimate feature)."""

    def __init__(self, layers: Sequence[BnLayer], feature_layer: nn.Module | None = None) -> None:
        self.layers, self.feature_layer = list(layers), feature_layer
        self.inputs: list[torch.Tensor] = []
        self.feature: torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> _Recorder:
        def bn_hook(_m, args):
            self.inputs.append(args[0])

        def feature_hook(_m, args):
            self.feature = args[0]

        self._handles = [m.register_forward_pre_hook(bn_hook) for m, _, _ in self.layers]
        if self.feature_layer is not None:
            self._handles.append(self.feature_layer.register_forward_pre_hook(feature_hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def clear(self) -> None:
        self.inputs.clear()
        self.feature = None


def _per_image_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel, the spatial mean of x and of x^2: (B, C) each.  Any grouping's
    mean and biased variance follow from these by averaging rows, in one matrix product."""
    return x.mean((2, 3)), x.pow(2).mean((2, 3))


def _grouped_stats(m1: torch.Tensor, m2: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per group: ``weights`` (G, B) has rows that average the
    group's images (1/size on its members, 0 elsewhere)."""
    mean = weights @ m1
    return mean, (weights @ m2 - mean.pow(2)).clamp_min(0)


def _group_weights(groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(G, B) averaging matrix for group index ``groups`` (B,) in 0..G-1."""
    w = F.one_hot(groups, n_groups).T.float()
    return w / w.sum(1, keepdim=True).clamp_min(1)


def bns_mse_loss(inputs: Sequence[torch.Tensor], layers: Sequence[BnLayer], start: int = 0) -> torch.Tensor:
    """The BNS loss both papers' code use: mean over BN layers l >= start of
    MSE(mu_l(x), running mean) + MSE(sigma^2_l(x), running var), batch statistics of the BN
    input with the biased variance, MSE averaged over channels.  (The plain synthesis in
    ``compress.calibration`` matches standard deviations and sums over layers instead.)"""
    terms = []
    for x, (_, mean_ref, var_ref) in list(zip(inputs, layers))[start:]:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        terms.append(F.mse_loss(mean, mean_ref) + F.mse_loss(var, var_ref))
    return torch.stack(terms).mean()


def random_resized_crop(x: torch.Tensor, scale: tuple[float, float], generator: torch.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = False) -> torch.Tensor:
    """Every image of ``x`` (B, C, H, W) replaced by a random crop of area fraction in
    ``scale`` and aspect in ``ratio``, resized back to (H, W) bilinearly; optionally
    mirrored with probability 1/2.  Differentiable in ``x`` (an affine resampling grid), so
    a synthesis loss on the crop reaches the pixels of the whole image."""
    n = x.shape[0]

    def u() -> torch.Tensor:
        return torch.rand(n, generator=generator)

    area = scale[0] + (scale[1] - scale[0]) * u()
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u()
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (u() * 2 - 1) * (1 - w)  # the crop stays inside the image
    cy = (u() * 2 - 1) * (1 - h)
    sx = torch.where(u() < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sx, cx, h, cy
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


def _frozen_eval(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _synthesis_setup(model: nn.Module, layers: list | None, n: int, steps: int) -> tuple[nn.Module, list]:
    """Check a synthesis request and freeze the network: (the model in eval mode without
    gradients, its BN layers with their statistics)."""
    if steps < 1 or n < 1:
        raise ValueError("need at least one image and one step")
    bns = layers if layers is not None else bn_layers(model)
    if not bns:
        raise ValueError("the model has no BatchNorm layers to take statistics from")
    return _frozen_eval(model), bns


def _last_linear(model: nn.Module) -> nn.Module:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("no nn.Linear classifier to take the penultimate feature from: pass feature_layer")
    return linears[-1]


def _plateau(opt: torch.optim.Optimizer, patience: int) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """IntraQ's schedule: the learning rate x0.1 after ``patience`` steps without a new best
    total loss, down to 1e-4.  Its patience (50) is kept in steps, not scaled down with the
    step count: the loss is noisy (half of the steps see crops), and a patience of 15 in a
    300-step run cut the rate to its floor within 150 steps, leaving the BNS loss 2-4x
    higher than with 50 (measured on the smallest glyph rung)."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=patience, min_lr=1e-4)


# ---------------------------------------------------------------------------------------
# FDDA
# ---------------------------------------------------------------------------------------


@dataclass
class BnsCentres:
    """FDDA's per-class BNS centres: for each class with a real image, per BN layer, the
    channel means and biased variances of the BN input on that one image (``means[l]`` and
    ``variances[l]`` are (K, C_l), row k for class ``classes[k]``); ``correct[k]``: whether
    the float network classifies that image as its class."""

    classes: torch.Tensor
    means: list[torch.Tensor]
    variances: list[torch.Tensor]
    correct: torch.Tensor

    def row(self, label: int) -> int:
        hits = (self.classes == label).nonzero()
        if len(hits) == 0:
            raise KeyError(f"no BNS centre for class {label}")
        return int(hits[0])


@torch.no_grad()
def fdda_centres(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 layers: list[BnLayer] | None = None) -> BnsCentres:
    """The BNS centre of every class from its ONE real image (``images`` (K, C, H, W),
    preprocessed as for inference, ``labels`` (K,) distinct).  Each image runs alone (batch
    1, as FDDA's ``BNScenters.py``), so the centre is that image's spatial statistics."""
    labels = torch.as_tensor(labels).long()
    if len(labels.unique()) != len(labels):
        raise ValueError("FDDA takes exactly one real image per class; some class has several")
    bns = layers if layers is not None else bn_layers(model)
    if not bns:
        raise ValueError("the model has no BatchNorm layers to take statistics from")
    model = _frozen_eval(model)
    means: list[list[torch.Tensor]] = [[] for _ in bns]
    variances: list[list[torch.Tensor]] = [[] for _ in bns]
    correct = []
    with _Recorder(bns) as rec:
        for img, y in zip(images, labels):
            rec.clear()
            out = model(img.unsqueeze(0))
            correct.append(bool(out.argmax(1).item() == int(y)))
            for k, x in enumerate(rec.inputs):
                means[k].append(x.mean((0, 2, 3)))
                variances[k].append(x.var((0, 2, 3), unbiased=False))
    return BnsCentres(labels, [torch.stack(m) for m in means], [torch.stack(v) for v in variances],
                      torch.tensor(correct))


def fdda_start_layer(n_layers: int) -> int:
    """First BN layer of FDDA's class-conditional losses: floor((L + 1) / 2) - 2, the deep
    half, where class statistics separate (MobileNet-V1's 27 BN layers: 12)."""
    return max(0, (n_layers + 1) // 2 - 2)


def fdda_synthesis(model: nn.Module, shape: tuple[int, ...], centres: BnsCentres, n: int, steps: int = 200,
                   lr: float = 0.5, batch_size: int = 64, seed: int = 0, layers: list[BnLayer] | None = None,
                   ce_weight: float = 0.5, bns_weight: float = 0.2, class_ce_weight: float = 0.5,
                   c_bns_weight: float = 0.01, d_bns_weight: float = 0.9, mean_noise: float = 0.5,
                   var_noise: float = 1.0, patience: int = 50, progress: Progress = None) -> SyntheticSet:
    """``n`` labelled images of ``shape`` (C, H, W), balanced over the classes of
    ``centres``, synthesised with FDDA's losses.  For a batch x holding images of several
    classes (label y, class groups g), per step:

        L = ce_weight * CE(f(x), y) + bns_weight * L_BNS(x)                    (global part)
          + mean over groups g of class c whose real image f classifies correctly:
              class_ce_weight * CE(f(x_g), c)
            + c_bns_weight * 1/(L-s) sum_{l>=s} MSE(mu_l(x_g), mu_l^c) + MSE(var_l(x_g), var_l^c)
            + d_bns_weight * 1/(L-s) sum_{l>=s} MSE(mu_l(x_g), mu_l^c + N(0, mean_noise^2))
                                                + MSE(var_l(x_g), var_l^c + N(0, var_noise^2))

    with s = ``fdda_start_layer(L)``, statistics of the group's BN inputs (biased variance),
    the noise drawn afresh every step, and L_BNS the global ``bns_mse_loss`` against the
    running statistics.  Weights and noise are FDDA's ImageNet configuration (0.5 CE,
    0.2 BNS, 0.5 class CE, 0.01 C-BNS, 0.9 D-BNS; noise std 0.5 on means, 1.0 on variances),
    kept as they are although our network's deep BN-input variances are about 0.3-1.5: the
    distorted targets are often negative variances, and in expectation the D-BNS gradient
    is the C-BNS one, so it acts as a stronger, noisy pull to the centre.

    Choices the method leaves open for pixel optimisation (FDDA's code trains a conditional
    generator; each of its steps sees one random-label batch for the global part and one
    single-class batch for the class part):

    * one batch carries both: its classes are contiguous groups of about n/K images (two
      per class at n = 2K; a group cut by a batch boundary is two groups), the global
      terms see the whole batch, the class terms each group; a group of one image is
      matched to its centre just as the centre was made (one image);
    * a class whose real image the network misclassifies gets only the global terms: after
      its warm-up FDDA never draws such a class for the class-conditional batch (in the
      first 5 epochs it instead pulls all layers to N(0, 1) targets, a generator warm-up
      left out here);
    * the optimiser is IntraQ's pixel recipe from the same authors (Adam at ``lr``,
      ReduceLROnPlateau with patience 50), at far fewer steps than its 1000.
    """
    model, bns = _synthesis_setup(model, layers, n, steps)
    L = len(bns)
    s = fdda_start_layer(L)
    k = len(centres.classes)
    g = torch.Generator().manual_seed(seed)
    order = centres.classes[torch.randperm(k, generator=g)]
    counts = torch.full((k,), n // k)
    counts[: n % k] += 1  # as balanced as n allows; the classes that get one more are drawn by the seed
    labels = order.repeat_interleave(counts)
    rows = torch.tensor([centres.row(int(c)) for c in labels])
    out, t0 = [], time.perf_counter()
    last: dict[str, float] = {}
    per_batch: list[dict[str, float]] = []  # total loss at the first and the last step of every batch
    with _Recorder(bns) as rec:
        for start in range(0, n, batch_size):
            y = labels[start:start + batch_size]
            r = rows[start:start + batch_size]
            uniq, groups = torch.unique_consecutive(r, return_inverse=True)
            weights = _group_weights(groups, len(uniq))
            active = centres.correct[uniq]  # class terms only where the real image is classified right
            x = torch.randn((len(y), *shape), generator=g).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            sched = _plateau(opt, patience)
            for step in range(steps):
                rec.clear()
                opt.zero_grad()
                with torch.enable_grad():
                    logits = model(x)
                    loss_ce = F.cross_entropy(logits, y)
                    loss_bns = bns_mse_loss(rec.inputs, bns)
                    loss = ce_weight * loss_ce + bns_weight * loss_bns
                    c_terms, d_terms = [], []
                    if active.any():
                        for l in range(s, L):
                            m1, m2 = _per_image_moments(rec.inputs[l])
                            gm, gv = _grouped_stats(m1, m2, weights)
                            gm, gv = gm[active], gv[active]
                            cm = centres.means[l][uniq[active]]
                            cv = centres.variances[l][uniq[active]]
                            c_terms.append(((gm - cm).pow(2).mean(1) + (gv - cv).pow(2).mean(1)))
                            nm = cm + mean_noise * torch.randn(cm.shape, generator=g)
                            nv = cv + var_noise * torch.randn(cv.shape, generator=g)
                            d_terms.append(((gm - nm).pow(2).mean(1) + (gv - nv).pow(2).mean(1)))
                        loss_c = torch.stack(c_terms).mean(0).mean()  # over layers l >= s, then groups
                        loss_d = torch.stack(d_terms).mean(0).mean()
                        in_active = active[groups]
                        loss_cls = F.cross_entropy(logits[in_active], y[in_active])
                        loss = loss + class_ce_weight * loss_cls + c_bns_weight * loss_c + d_bns_weight * loss_d
                        last.update(c_bns=_f(loss_c), d_bns=_f(loss_d))
                    loss.backward()
                if step == 0:
                    first = _f(loss)
                opt.step()
                sched.step(_f(loss))
            per_batch.append({"first": round(first, 5), "last": round(_f(loss), 5)})
            last.update(total=_f(loss), ce=_f(loss_ce), bns=_f(loss_bns),
                        accuracy=float((logits.argmax(1) == y).float().mean()))
            out.append(x.detach())
            if progress is not None:
                progress(f"FDDA: synthesised {start + len(y)}/{n} ({time.perf_counter() - t0:.0f} s; loss "
                         f"{last['total']:.3f}, BNS {last['bns']:.3f}, C-BNS {last.get('c_bns', float('nan')):.3f}, "
                         f"teacher agrees on {last['accuracy']:.0%})")
    info = {"method": "fdda", "n": n, "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
            "images_per_class": [int(counts.min()), int(counts.max())], "real_images": k, "start_layer": s,
            "bn_layers": L,
            "classes_with_class_terms": int(centres.correct.sum()),
            "weights": {"ce": ce_weight, "bns": bns_weight, "class_ce": class_ce_weight, "c_bns": c_bns_weight,
                        "d_bns": d_bns_weight}, "noise": {"mean": mean_noise, "var": var_noise},
            "optimiser": "direct pixel optimisation (Adam + ReduceLROnPlateau), in place of FDDA's generator",
            "final_losses": last, "per_batch": per_batch, "seconds": round(time.perf_counter() - t0, 1)}
    return SyntheticSet(torch.cat(out), labels, info)


# ---------------------------------------------------------------------------------------
# IntraQ
# ---------------------------------------------------------------------------------------


def soft_targets(n: int, target_pro: float, generator: torch.Generator) -> torch.Tensor:
    """IntraQ's soft inception targets: for each image, with probability 1/2 a value drawn
    uniformly in [target_pro, 1], else 1."""
    soft = target_pro + (1 - target_pro) * torch.rand(n, generator=generator)
    return torch.where(torch.rand(n, generator=generator) < 0.5, soft, torch.ones(n))


def marginal_distance_loss(features: torch.Tensor, centres: torch.Tensor, has_centre: torch.Tensor,
                           m_low: float, m_up: float) -> torch.Tensor:
    """IntraQ's marginal distance constraint: with d = 1 - cos(feature, its class centre),
    mean over images with a centre of max(0, m_low - d), plus that of max(0, d - m_up)
    (each a sum over those images divided by their count, as the code does)."""
    if not bool(has_centre.any()):
        return features.sum() * 0
    d = 1 - F.cosine_similarity(features, centres, dim=1, eps=1e-6)
    mask = has_centre.float()
    count = mask.sum() + 1e-6
    return ((m_low - d).clamp_min(0) * mask).sum() / count + ((d - m_up).clamp_min(0) * mask).sum() / count


def intraq_synthesis(model: nn.Module, shape: tuple[int, ...], num_classes: int, n: int, steps: int = 200,
                     lr: float = 0.5, batch_size: int = 64, seed: int = 0, target_pro: float = 0.95,
                     m_low: float = 0.05, m_up: float = 0.8, aug_margin: float = 0.5, lor_probability: float = 0.5,
                     flip: bool = False, patience: int = 50, layers: list[BnLayer] | None = None,
                     feature_layer: nn.Module | None = None, progress: Progress = None) -> SyntheticSet:
    """``n`` images of ``shape`` (C, H, W), zero-shot, with IntraQ's losses, in batches of
    ``batch_size`` (labels uniform at random, as IntraQ's code draws them).  Per step on a
    batch x with labels y:

        x' = random_resized_crop(x, scale=(aug_margin, 1)) with probability lor_probability,
             else x                                         (local object reinforcement)
        L  = L_BNS(x')                                       (``bns_mse_loss``, all BN layers)
           + mean_i (softmax(f(x'_i))_{y_i} - t_i)^2         (soft inception loss; t: ``soft_targets``)
           + ``marginal_distance_loss``(feature(x'), c_y)    (c_y: mean penultimate feature of the
                                                              images of class y synthesised in
                                                              earlier batches; none in the first)

    unweighted, Adam at ``lr`` with ReduceLROnPlateau on L (min lr 1e-4).  The penultimate
    feature is the input of ``feature_layer`` (default: the last ``nn.Linear``, i.e. the
    globally pooled feature).  After each batch, its images (uncropped) join the class
    centres.

    Defaults are the CIFAR-10 script's (target_pro 0.95, m_low 0.05, m_up 0.8,
    aug_margin 0.5): the shipped ImageNet script sets target_pro 1, m_low 0, m_up 2, which
    switches the soft label and both margins off (cosine distance lies in [0, 2]), i.e. it
    would not be IntraQ.  Scaled down: ``steps`` instead of 1000 (the plateau keeps its
    patience of 50 steps), ``n`` images instead of 5,120.  Left open by the papers and chosen here:
    ``flip`` defaults to False, unlike IntraQ's RandomHorizontalFlip, because the crop is a
    prior of what the network saw in training and ours was trained without mirroring (b/d,
    p/q are different glyph classes); pass ``flip=True`` for a flip-trained network.
    """
    model, bns = _synthesis_setup(model, layers, n, steps)
    feature_layer = feature_layer if feature_layer is not None else _last_linear(model)
    g = torch.Generator().manual_seed(seed)
    feature_sum: torch.Tensor | None = None
    feature_count = torch.zeros(num_classes)
    out, out_labels, t0 = [], [], time.perf_counter()
    last: dict[str, float] = {}
    per_batch: list[dict[str, float]] = []  # total loss at the first and the last step, MDC active or not
    with _Recorder(bns, feature_layer) as rec:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            y = torch.randint(0, num_classes, (b,), generator=g)
            target = soft_targets(b, target_pro, g)
            has_centre = feature_count[y] > 0
            centres = (feature_sum[y] / feature_count[y].clamp_min(1).unsqueeze(1)) if feature_sum is not None else None
            x = torch.randn((b, *shape), generator=g).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            sched = _plateau(opt, patience)
            for step in range(steps):
                rec.clear()
                opt.zero_grad()
                with torch.enable_grad():
                    lor = float(torch.rand(1, generator=g)) < lor_probability
                    xin = random_resized_crop(x, (aug_margin, 1.0), g, flip=flip) if lor else x
                    logits = model(xin)
                    loss_bns = bns_mse_loss(rec.inputs, bns)
                    p = logits.softmax(1).gather(1, y.unsqueeze(1)).squeeze(1)
                    loss_soft = (p - target).pow(2).mean()
                    feats = rec.feature.flatten(1)
                    loss_mdc = (marginal_distance_loss(feats, centres, has_centre, m_low, m_up)
                                if centres is not None else feats.sum() * 0)
                    loss = loss_bns + loss_soft + loss_mdc
                    loss.backward()
                if step == 0:
                    first = _f(loss)
                opt.step()
                sched.step(_f(loss))
            per_batch.append({"first": round(first, 5), "last": round(_f(loss), 5),
                              "with_centre": int(has_centre.sum()) if centres is not None else 0})
            with torch.no_grad():  # the finished batch joins the class centres (uncropped, as IntraQ)
                rec.clear()
                logits = model(x)
                feats = rec.feature.flatten(1)
                if feature_sum is None:
                    feature_sum = torch.zeros(num_classes, feats.shape[1])
                feature_sum.index_add_(0, y, feats)
                feature_count.index_add_(0, y, torch.ones(b))
            last = {"total": _f(loss), "bns": _f(loss_bns), "soft": _f(loss_soft), "mdc": _f(loss_mdc),
                    "accuracy": float((logits.argmax(1) == y).float().mean())}
            out.append(x.detach())
            out_labels.append(y)
            if progress is not None:
                progress(f"IntraQ: synthesised {start + b}/{n} ({time.perf_counter() - t0:.0f} s; loss "
                         f"{last['total']:.3f}, BNS {last['bns']:.3f}, soft {last['soft']:.3f}, "
                         f"MDC {last['mdc']:.3f}, teacher agrees on {last['accuracy']:.0%})")
    info = {"method": "intraq", "n": n, "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
            "target_pro": target_pro, "m_low": m_low, "m_up": m_up, "aug_margin": aug_margin,
            "lor_probability": lor_probability, "flip": flip, "final_losses": last, "per_batch": per_batch,
            "seconds": round(time.perf_counter() - t0, 1)}
    return SyntheticSet(torch.cat(out), torch.cat(out_labels), info)
