"""PSS-Net supernets: MobileNet-V1 and MobileNet-V2 with one width multiplier per stage.

A subnet is a resolution plus one multiplier per stage (the official ``model_cfg`` dict).
Its channel counts follow one rule (``make_divisible(base * mult)``, with MBV2's expand
width derived from the actual input), every layer keeps the *first k* output channels of
the shared full-size weights, depth-wise convolutions take as many groups as they receive
channels, and the network resizes its input to the subnet's resolution itself (bilinear,
``align_corners=True``), because the official data pipeline always feeds the largest size.

Two forms of the same module tree (attribute names follow the official checkpoint, so its
state dict loads without renaming):

* ``PssSupernet``: full-size tensors in slimmable layers that slice them at run time.  It is
  what training updates.  Its BatchNorm buffers are *shared by every subnet* (as in the
  official code), so they are meaningless for any particular subnet: never serve from them.
* ``DenseSubnet``: a plain network of one subnet's exact widths, made by ``extract_subnet``
  (sliced, contiguous copies), given its own BN statistics by recalibration
  (``models.pssnet.calibrate``) and then folded (``fold_bn``).  This is the serving form.

FLOPs follow the official convention (conv MACs + average pool + FC MACs, no FC bias,
divided by 1e6); ``subnet_flops`` reproduces the official FLOPs calculator's reference
points exactly (e.g. MBV1: 568.79 MFLOPs at 224 px with every multiplier 1.0, 106.78 at
128 px with every multiplier 0.75).
Everything is configurable (classes, base widths, strides, resolution and multiplier
ranges) so that a small demo of the *same* structure can be trained on a CPU.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

MODEL_NAMES = ("mobilenet_v1", "mobilenet_v2")
METRIC_TYPES = ("flops", "latency_gpu", "latency_cpu")


def make_divisible(v: float, divisor: int = 8) -> int:
    """The official width rule: round to the nearest multiple of ``divisor``
    (at least ``divisor``), and never go more than 10 % below ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


# ----------------------------------------------------------------------------------------
# Supernet specification and subnet configuration
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SupernetSpec:
    """Everything that fixes a supernet's shapes and its structure space.

    ``widths``/``strides`` are per block for MBV1 (13 dw/pw blocks) and per stage for MBV2
    (7 stages, with ``depths`` blocks and ``expand_ratios``).  ``resolutions`` is
    (lowest, highest, step); ``input_size`` is the side the data pipeline feeds (the
    official pipeline always feeds 224, the highest resolution)."""

    model_name: str
    num_classes: int = 1000
    stem_width: int = 32
    stem_stride: int = 2
    widths: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    depths: tuple[int, ...] = ()
    expand_ratios: tuple[int, ...] = ()
    tail_width: int = 0
    resolutions: tuple[int, int, int] = (128, 224, 8)
    mult_range: tuple[float, float] = (0.75, 1.0)
    input_size: int = 224
    divisor: int = 8

    def __post_init__(self) -> None:
        if self.model_name not in MODEL_NAMES:
            raise ValueError(f"model_name must be one of {MODEL_NAMES}, not {self.model_name!r}")
        if len(self.widths) != len(self.strides):
            raise ValueError("widths and strides need one entry per block (MBV1) or stage (MBV2)")
        if self.model_name == "mobilenet_v2" and not (len(self.depths) == len(self.expand_ratios) == len(self.widths)):
            raise ValueError("MBV2 needs depths and expand_ratios per stage")
        lo, hi, step = self.resolutions
        if not (0 < lo <= hi and step > 0 and (hi - lo) % step == 0):
            raise ValueError(f"bad resolution range {self.resolutions}")

    @property
    def num_mults(self) -> int:
        """MBV1: stem + 13 blocks = 14; MBV2: stem + 7 stages + the (inert) tail = 9."""
        return 1 + len(self.widths) + (1 if self.model_name == "mobilenet_v2" else 0)

    @property
    def resolution_choices(self) -> list[int]:
        lo, hi, step = self.resolutions
        return list(range(lo, hi + 1, step))

    def max_cfg(self) -> SubnetConfig:
        return SubnetConfig(self.model_name, self.resolutions[1], (1.0,) * self.num_mults).with_metric(self)

    def min_cfg(self) -> SubnetConfig:
        lo = self.mult_range[0]
        return SubnetConfig(self.model_name, self.resolutions[0], (lo,) * self.num_mults).with_metric(self)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SupernetSpec:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


MBV1_IMAGENET = SupernetSpec(
    "mobilenet_v1", widths=(64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024),
    strides=(1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1))
MBV2_IMAGENET = SupernetSpec(
    "mobilenet_v2", widths=(16, 24, 32, 64, 96, 160, 320), strides=(1, 2, 2, 2, 1, 2, 1),
    depths=(1, 2, 3, 4, 3, 3, 1), expand_ratios=(1, 6, 6, 6, 6, 6, 6), tail_width=1280)


def demo_spec(model_name: str, num_classes: int) -> SupernetSpec:
    """The CPU demo: the same structure at half the base widths, stem stride 1 (so a 32 px
    glyph still ends on a 2x2 grid rather than 1x1), resolutions 24..40 in steps of 4
    (the data feeds 32 px; larger subnets upsample) and multipliers 0.5..1.0, so that
    the smallest subnet costs well under 35 % of the largest.  The MBV2 tail stays at the
    real model's 1280: it is never sliced, exactly as in the real model."""
    base = MBV1_IMAGENET if model_name == "mobilenet_v1" else MBV2_IMAGENET
    return replace(base, num_classes=num_classes, stem_width=base.stem_width // 2, stem_stride=1,
                   widths=tuple(w // 2 for w in base.widths), resolutions=(24, 40, 4),
                   mult_range=(0.5, 1.0), input_size=32)


def official_spec(model_name: str, num_classes: int = 1000) -> SupernetSpec:
    base = {"mobilenet_v1": MBV1_IMAGENET, "mobilenet_v2": MBV2_IMAGENET}[model_name]
    return replace(base, num_classes=num_classes)


@dataclass(frozen=True)
class SubnetConfig:
    """One subnet, as the official ``model_cfg`` dict.

    ``infer_metric`` / ``infer_metric_target`` are bookkeeping (the metric value and its
    pool target); the structure is (model_name, resolution, stage_cout_mults)."""

    model_name: str
    resolution: int
    stage_cout_mults: tuple[float, ...]
    infer_metric_type: str = "flops"
    infer_metric: float | None = None
    infer_metric_target: int | float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_cout_mults", tuple(float(m) for m in self.stage_cout_mults))
        if self.model_name not in MODEL_NAMES:
            raise ValueError(f"unknown model_name {self.model_name!r}")

    @property
    def structure(self) -> tuple:
        return (self.model_name, self.resolution, self.stage_cout_mults)

    def to_dict(self) -> dict[str, Any]:
        """The official dict form (key order as in the official cfg strings)."""
        return {"model_name": self.model_name, "infer_metric_type": self.infer_metric_type,
                "resolution": self.resolution, "stage_cout_mults": list(self.stage_cout_mults),
                "infer_metric": self.infer_metric, "infer_metric_target": self.infer_metric_target}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SubnetConfig:
        missing = {"model_name", "resolution", "stage_cout_mults"} - set(d)
        if missing:
            raise ValueError(f"subnet cfg lacks {sorted(missing)}")
        return cls(model_name=str(d["model_name"]), resolution=int(d["resolution"]),
                   stage_cout_mults=tuple(float(m) for m in d["stage_cout_mults"]),
                   infer_metric_type=str(d.get("infer_metric_type", "flops")),
                   infer_metric=None if d.get("infer_metric") is None else float(d["infer_metric"]),
                   infer_metric_target=d.get("infer_metric_target"))

    def to_str(self) -> str:
        """``str(dict)``, the pool key format of the official checkpoints."""
        return str(self.to_dict())

    @classmethod
    def from_str(cls, s: str) -> SubnetConfig:
        """Parse an official cfg string with ``ast.literal_eval`` (never ``eval``)."""
        d = ast.literal_eval(s)
        if not isinstance(d, dict):
            raise ValueError(f"not a cfg dict: {s[:80]!r}")
        return cls.from_dict(d)

    def with_metric(self, spec: SupernetSpec, metric: float | None = None,
                    target: int | float | None = None) -> SubnetConfig:
        """A copy with ``infer_metric`` filled in (FLOPs in M unless ``metric`` is given)."""
        value = subnet_flops(spec, self) if metric is None else metric
        return replace(self, infer_metric=round(value, 4), infer_metric_target=target)


# ----------------------------------------------------------------------------------------
# Widths of a subnet
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockWidths:
    """One block: MBV1 dw/pw (``mid == cin``); MBV2 inverted residual (``mid`` = expand
    width, equal to ``cin`` when the expand ratio is 1 and there is no expand conv)."""

    cin: int
    mid: int
    cout: int
    stride: int
    expand: bool
    residual: bool


@dataclass(frozen=True)
class SubnetWidths:
    stem: int
    blocks: tuple[BlockWidths, ...]
    tail: int | None  # MBV2's last 1x1 conv; None for MBV1
    features: int  # the classifier's input


def subnet_widths(spec: SupernetSpec, cfg: SubnetConfig | None = None) -> SubnetWidths:
    """Channel counts of the subnet ``cfg`` (the supernet's own when ``cfg`` is None)."""
    if cfg is not None and cfg.model_name != spec.model_name:
        raise ValueError(f"cfg is for {cfg.model_name}, the supernet is {spec.model_name}")
    mults = cfg.stage_cout_mults if cfg is not None else (1.0,) * spec.num_mults
    if len(mults) != spec.num_mults:
        raise ValueError(f"{spec.model_name} needs {spec.num_mults} multipliers, got {len(mults)}")
    d = spec.divisor
    stem = make_divisible(spec.stem_width * mults[0], d)
    blocks: list[BlockWidths] = []
    c = stem
    if spec.model_name == "mobilenet_v1":
        for base, stride, m in zip(spec.widths, spec.strides, mults[1:]):
            out = make_divisible(base * m, d)
            blocks.append(BlockWidths(c, c, out, stride, expand=False, residual=False))
            c = out
        return SubnetWidths(stem, tuple(blocks), None, c)
    full_c = spec.stem_width
    for base, stride, depth, t, m in zip(spec.widths, spec.strides, spec.depths, spec.expand_ratios, mults[1:]):
        out = make_divisible(base * m, d)
        for i in range(depth):
            s = stride if i == 0 else 1
            # Residual is structural (decided on the supernet's widths), so a subnet whose
            # widths happen to coincide does not grow a skip the supernet does not have.
            residual = s == 1 and full_c == base
            mid = make_divisible(t * c, d) if t != 1 else c
            blocks.append(BlockWidths(c, mid, out, s, expand=t != 1, residual=residual))
            c, full_c = out, base
    # The 9th multiplier is inert: the official model's tail is always ``tail_width`` (so is its FLOPs count).
    return SubnetWidths(stem, tuple(blocks), spec.tail_width, spec.tail_width)


def _conv_out(size: int, stride: int, kernel: int = 3) -> int:
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def subnet_flops(spec: SupernetSpec, cfg: SubnetConfig | None = None) -> float:
    """MFLOPs as PSS-Net counts them: conv MACs + average-pool + FC MACs (no bias), / 1e6.

    Analytic, so the structure-space sampler can evaluate it hundreds of thousands of
    times; ``tests/test_pssnet_nets.py`` checks it against hooks on the real modules."""
    return widths_flops(spec, subnet_widths(spec, cfg), cfg.resolution if cfg is not None else spec.resolutions[1])


def widths_flops(spec: SupernetSpec, w: SubnetWidths, resolution: int) -> float:
    """``subnet_flops`` of any widths (a pruned network's per-layer widths need not come from
    stage multipliers)."""
    h = _conv_out(resolution, spec.stem_stride)
    macs = 9 * 3 * w.stem * h * h
    for b in w.blocks:
        if b.expand:
            macs += b.cin * b.mid * h * h
        h = _conv_out(h, b.stride)
        macs += 9 * b.mid * h * h + b.mid * b.cout * h * h
    if w.tail is not None:
        macs += w.blocks[-1].cout * w.tail * h * h
    macs += w.features * h * h + w.features * spec.num_classes  # pool + FC
    return macs / 1e6


# ----------------------------------------------------------------------------------------
# Slimmable layers (supernet) and the shared module tree
# ----------------------------------------------------------------------------------------


class SlimConv2d(nn.Conv2d):
    """A conv holding full-size weights that uses ``weight[:active_out, :in/groups]``.

    Depth-wise (``groups == in_channels``): groups and outputs follow the incoming tensor.
    Otherwise the input slice follows the incoming tensor and ``active_out`` (set by the
    supernet for the current subnet) picks the first output channels."""

    active_out: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cin = x.shape[1]
        if self.groups == self.in_channels and self.groups > 1:
            weight, groups = self.weight[:cin], cin
        else:
            cout = self.active_out or self.out_channels
            weight, groups = self.weight[:cout, :cin], 1
        bias = None if self.bias is None else self.bias[: weight.shape[0]]
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)


class SlimBatchNorm2d(nn.Module):
    """Shared full-width affine γ/β plus one inner ``BatchNorm2d(affine=False)`` (``.bn``)
    holding full-width running statistics, all sliced first-k to the incoming channels.
    The slices are views, so train-mode updates write into the first k entries of the
    shared buffers, as in the official code (no private BN per subnet)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        bn = self.bn
        factor = 0.0
        if self.training:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        return F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], self.weight[:c], self.bias[:c],
                            self.training, factor, bn.eps)


class SlimLinear(nn.Linear):
    """The classifier, sliced on its input only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[:, : x.shape[1]], self.bias)


class DenseBatchNorm2d(SlimBatchNorm2d):
    """The dense subnet's BN: the same parameter/buffer layout (``weight``, ``bias``,
    ``bn.running_*``), so a dense state dict reads like a slice of the supernet's; with as
    many channels as it receives, its first-k slices are the whole tensors.  ``fold_bn``
    removes it for serving."""


@dataclass(frozen=True)
class _Layers:
    conv: Callable[..., nn.Conv2d]
    bn: Callable[[int], nn.Module]
    linear: Callable[[int, int], nn.Linear]


_SLIM = _Layers(SlimConv2d, SlimBatchNorm2d, SlimLinear)
_DENSE = _Layers(nn.Conv2d, DenseBatchNorm2d, nn.Linear)


def _conv_bn(L: _Layers, cin: int, cout: int, k: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [L.conv(cin, cout, k, stride, k // 2, groups=groups, bias=False), L.bn(cout)]


class InvertedResidual(nn.Module):
    """MBV2 block: [1x1 expand, BN, ReLU6,] 3x3 dw, BN, ReLU6, 1x1 project, BN (+ input)."""

    def __init__(self, L: _Layers, b: BlockWidths) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if b.expand:
            layers += [*_conv_bn(L, b.cin, b.mid, 1, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(L, b.mid, b.mid, 3, b.stride, groups=b.mid), nn.ReLU6(inplace=True)]
        layers += _conv_bn(L, b.mid, b.cout, 1, 1)
        self.body = nn.Sequential(*layers)
        self.residual = b.residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def _build_tree(module: nn.Module, spec: SupernetSpec, w: SubnetWidths, L: _Layers) -> None:
    """Create ``features`` and ``classifier`` on ``module`` with the official names."""
    act: type[nn.Module] = nn.ReLU if spec.model_name == "mobilenet_v1" else nn.ReLU6
    feats: list[nn.Module] = [nn.Sequential(*_conv_bn(L, 3, w.stem, 3, spec.stem_stride), act(inplace=True))]
    for b in w.blocks:
        if spec.model_name == "mobilenet_v1":
            feats.append(nn.Sequential(*_conv_bn(L, b.cin, b.cin, 3, b.stride, groups=b.cin), act(inplace=True),
                                       *_conv_bn(L, b.cin, b.cout, 1, 1), act(inplace=True)))
        else:
            feats.append(InvertedResidual(L, b))
    if w.tail is not None:
        feats.append(nn.Sequential(*_conv_bn(L, w.blocks[-1].cout, w.tail, 1, 1), act(inplace=True)))
    module.features = nn.Sequential(*feats)
    module.classifier = nn.Sequential(L.linear(w.features, spec.num_classes))


def _init_weights(module: nn.Module) -> None:
    """The usual MobileNet init: He-normal (fan-out) convs, BN γ=1/β=0, FC N(0, 0.01)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, SlimBatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """The official in-model resize: bilinear, align_corners=True, only if needed."""
    if x.shape[-2] != resolution or x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=True)
    return x


def _head(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = module.features(x)
    return module.classifier(x.mean((2, 3)))


class PssSupernet(nn.Module):
    """The weight-sharing supernet.  ``forward(x, cfg)`` runs subnet ``cfg`` (the max net
    when None) on slices of the shared tensors.  Not thread-safe (the active widths are
    module state, as in US-Net); serving uses ``DenseSubnet`` instead."""

    def __init__(self, spec: SupernetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.full_widths = subnet_widths(spec)
        _build_tree(self, spec, self.full_widths, _SLIM)
        # The non-depth-wise convs in order: those whose output width a subnet chooses.
        self._width_convs = [m for m in self.features.modules()
                             if isinstance(m, SlimConv2d) and not (m.groups == m.in_channels and m.groups > 1)]
        _init_weights(self)

    def set_subnet(self, cfg: SubnetConfig | None) -> SubnetWidths:
        w = subnet_widths(self.spec, cfg)
        outs = [w.stem]
        for b in w.blocks:
            outs += [b.mid, b.cout] if b.expand else [b.cout]
        if w.tail is not None:
            outs.append(w.tail)
        assert len(outs) == len(self._width_convs)
        for conv, out in zip(self._width_convs, outs):
            conv.active_out = out
        return w

    def forward(self, x: torch.Tensor, cfg: SubnetConfig | None = None) -> torch.Tensor:
        self.set_subnet(cfg)
        return _head(self, _resize(x, cfg.resolution if cfg is not None else self.spec.resolutions[1]))


class DenseSubnet(nn.Module):
    """One subnet as a plain network of its own widths (the serving form once folded).
    It resizes its input to its resolution, like the supernet."""

    def __init__(self, spec: SupernetSpec, cfg: SubnetConfig, widths: SubnetWidths | None = None) -> None:
        """``widths``: per-layer widths other than ``cfg``'s (a pruned network; ``cfg`` then
        gives its resolution and the subnet it was cut from)."""
        super().__init__()
        self.spec, self.cfg = spec, cfg
        self.widths = widths or subnet_widths(spec, cfg)
        self.resolution = cfg.resolution
        self.folded = False
        _build_tree(self, spec, self.widths, _DENSE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _head(self, _resize(x, self.resolution))


class SubnetBody(nn.Module):
    """A subnet without its input resize: features, average pool, classifier.  The part
    that can be traced and quantized (the resize depends on the input's size)."""

    def __init__(self, net: DenseSubnet) -> None:
        super().__init__()
        self.features, self.classifier = net.features, net.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _head(self, x)


class ResizedBody(nn.Module):
    """``body`` (e.g. an int8 ``SubnetBody``) behind the subnet's float input resize."""

    def __init__(self, body: nn.Module, resolution: int) -> None:
        super().__init__()
        self.body, self.resolution = body, resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(_resize(x, self.resolution))


def supernet_key_shapes(spec: SupernetSpec) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of the supernet (the official layout without ``module.``)."""
    with torch.device("meta"):
        net = PssSupernet(spec)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def subnet_params(spec: SupernetSpec, cfg: SubnetConfig | None = None) -> int:
    """Parameters of the subnet as a dense network with BN (conv weights, BN γ/β, FC)."""
    with torch.device("meta"):
        if cfg is None:
            return count_params(PssSupernet(spec))
        return count_params(DenseSubnet(spec, cfg))


# ----------------------------------------------------------------------------------------
# Extraction and BN folding
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def extract_subnet(supernet: PssSupernet, cfg: SubnetConfig) -> DenseSubnet:
    """Materialise ``cfg`` as a ``DenseSubnet`` with contiguous first-k slices of every
    shared tensor (including the current running statistics, which are only meaningful
    after recalibration for this subnet: see ``models.pssnet.calibrate``)."""
    with torch.device("meta"):
        dense = DenseSubnet(supernet.spec, cfg)
    full = supernet.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, t in dense.state_dict().items():
        src = full[key]
        state[key] = src[tuple(slice(0, n) for n in t.shape)].clone() if t.dim() else src.clone()
    dense = dense.to_empty(device=next(supernet.parameters()).device)
    dense.load_state_dict(state)
    return dense.train(supernet.training)


@torch.no_grad()
def fold_bn(dense: DenseSubnet) -> DenseSubnet:
    """Fold every BN into the conv before it (eval statistics): ``w' = w·γ/σ`` and
    ``b' = β − μ·γ/σ``, with ``σ = sqrt(var + eps)``.  The BN becomes an ``Identity`` at
    the same index, so module names (and the conv keys) stay those of the official tree."""
    if dense.folded:
        return dense
    for seq in [m for m in dense.modules() if isinstance(m, nn.Sequential)]:
        for i in range(1, len(seq)):
            conv, bn = seq[i - 1], seq[i]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, DenseBatchNorm2d)):
                continue
            scale = bn.weight / torch.sqrt(bn.bn.running_var + bn.bn.eps)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              groups=conv.groups, bias=True, device=conv.weight.device)
            fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            fused.bias.copy_(bn.bias - bn.bn.running_mean * scale)
            seq[i - 1], seq[i] = fused, nn.Identity()
    dense.folded = True
    return dense.eval()


def folded_state(dense: DenseSubnet) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in dense.state_dict().items()}


def dense_from_folded_state(spec: SupernetSpec, cfg: SubnetConfig, state: dict[str, torch.Tensor]) -> DenseSubnet:
    """Rebuild a folded dense subnet from ``folded_state`` (for storing folded subnets)."""
    with torch.device("meta"):
        dense = DenseSubnet(spec, cfg)
        fold_bn_meta(dense)
    dense = dense.to_empty(device="cpu")
    dense.load_state_dict(state)
    return dense.eval()


def fold_bn_meta(dense: DenseSubnet) -> None:
    """The folded module structure without computing anything (for loading folded weights)."""
    for seq in [m for m in dense.modules() if isinstance(m, nn.Sequential)]:
        for i in range(1, len(seq)):
            conv, bn = seq[i - 1], seq[i]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, DenseBatchNorm2d):
                seq[i - 1] = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                       conv.padding, groups=conv.groups, bias=True)
                seq[i] = nn.Identity()
    dense.folded = True


def random_cfg(spec: SupernetSpec, rng: Any, metric_type: str = "flops") -> SubnetConfig:
    """A uniform random subnet: resolution uniform on the grid, multipliers uniform in the
    range with 3 decimals (how the official code seeds its structure-space sampler)."""
    lo, hi = spec.mult_range
    res = spec.resolution_choices[int(rng.integers(len(spec.resolution_choices)))]
    mults = tuple(round(float(rng.uniform(lo, hi)), 3) for _ in range(spec.num_mults))
    return SubnetConfig(spec.model_name, res, mults, infer_metric_type=metric_type)


def hooked_flops(module: nn.Module, x: torch.Tensor, forward: Callable[[torch.Tensor], Any] | None = None) -> float:
    """MFLOPs counted by forward hooks on the real modules (conv MACs, FC MACs without bias)
    plus the average pool over the final feature map: an independent check of
    ``subnet_flops``."""
    macs = [0]
    last_shape: list[Sequence[int]] = [()]

    def conv_hook(m: nn.Module, inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        groups = inp[0].shape[1] if (m.groups == m.in_channels and m.groups > 1) else 1
        macs[0] += out.shape[1] * (inp[0].shape[1] // groups) * math.prod(m.kernel_size) * out.shape[2] * out.shape[3]
        last_shape[0] = out.shape

    def fc_hook(m: nn.Module, inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        macs[0] += inp[0].shape[1] * out.shape[1]
        _, c, h, w = last_shape[0]
        macs[0] += c * h * w

    handles = [m.register_forward_hook(conv_hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(fc_hook) for m in module.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            (forward or module)(x[:1])
    finally:
        for h in handles:
            h.remove()
    return macs[0] / 1e6


__all__ = [
    "MBV1_IMAGENET", "MBV2_IMAGENET", "BlockWidths", "DenseSubnet", "PssSupernet", "SubnetConfig",
    "SubnetWidths", "SupernetSpec", "count_params", "demo_spec", "dense_from_folded_state", "extract_subnet",
    "fold_bn", "folded_state", "hooked_flops", "make_divisible", "official_spec", "random_cfg", "subnet_flops",
    "subnet_params", "subnet_widths", "supernet_key_shapes",
]
