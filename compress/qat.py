"""Quantization-aware training that exports to real int8 kernels, with DDTB's trainable
activation bounds.

Post-training int8 fails on some networks no calibration set can rescue: FSRCNN's
pre-activations have long negative tails (its PReLU slopes are about 0.006, so values near
-20 matter only a little after the activation, but one 8-bit grid over [-20, 5] wipes out the
positive detail), and torch's int8 engines have no fused convolution + leaky ReLU to hide
them.  PTQ loses 1.6-2.3 dB on the official ARM-FSRCNN; the network has to learn to live on
the grid.

How: torch.ao's graph-mode QAT (``prepare_qat_fx``) places a fake quantizer at every point
where the int8 model will hold an 8-bit activation, and per-channel symmetric int8 weights.
The activation fake quantizer here is ``DualBoundFakeQuantize``: DDTB's asymmetric grid
between a trainable lower and upper bound (gradients to both through the clamp and the
scale, straight-through rounding).  Its ``calculate_qparams`` turns the bounds into the
(scale, zero point) ``convert_fx`` bakes into the int8 kernels, so the exported model computes
exactly what was trained (``scale = (upper - lower) / 255``, ``zero_point = round(-lower /
scale)``: the same grid, point for point).

Lifecycle of a network: ``prepare(float_net, example)`` -> ``calibrate`` (observers only:
the bounds start at the observed range, DDTB's first "calibration epoch") -> train with any
loss -> ``export`` (real int8, CPU).  ``save_state``/``load``: the prepared network's state is
float tensors (safetensors), and a fresh ``prepare`` of the same float architecture accepts it.

DDTB's per-image dynamic gate is not part of the exported int8 path (one static range per
layer); at 8 bits the static bounds already hold the range (docs/COMPRESSION.md); the gate is
studied at 2-4 bits in ``compress.fakequant``, simulated.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable

import torch
from torch import nn

from compress.fakequant import round_ste
from compress.int8 import ENGINE, _quiet_deprecation, one_primitive_per_input_shape, set_engine

QUANT_MIN, QUANT_MAX = 0, 255


class DualBoundFakeQuantize(torch.ao.quantization.FakeQuantizeBase):
    """An 8-bit activation fake quantizer whose range is two trainable bounds (DDTB).

    While its observer is enabled it only records the input's range (min / max) and passes
    the input through; ``start_from_observed`` then sets the bounds there.  With fake
    quantization enabled it rounds onto the grid between the bounds."""

    def __init__(self, **_ignored) -> None:
        super().__init__()
        self.lower = nn.Parameter(torch.tensor(-1.0))
        self.upper = nn.Parameter(torch.tensor(1.0))
        # torch.ao reads the dtype constraints from an observer here; it also records the range.
        self.activation_post_process = torch.ao.quantization.MinMaxObserver(
            quant_min=QUANT_MIN, quant_max=QUANT_MAX, dtype=torch.quint8)
        self.quant_min, self.quant_max = QUANT_MIN, QUANT_MAX
        self.dtype, self.qscheme, self.ch_axis = torch.quint8, torch.per_tensor_affine, -1
        self.is_dynamic = False
        # Slope of the leaky ReLU that consumes this tensor (None: none does); the starting
        # range is the one that serves the activation's output best.
        self.consumer_slope: float | None = None
        # The other addend of a sum a ReLU reads (``mark_consumers``): below minus its largest
        # value this tensor's values all end at 0, so the grid need not reach them.
        # (Held in a list: a module attribute would register it as a submodule, a cycle.)
        self.relu_sum_partner: list[DualBoundFakeQuantize] = []
        self._sample: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled[0]:
            with torch.no_grad():
                self.activation_post_process(x.detach())
                flat = x.detach().flatten()
                self._sample.append(flat[:: max(1, flat.numel() // SAMPLE_PER_BATCH)].clone())
            return x
        if not self.fake_quant_enabled[0]:
            return x
        lower, upper = self.lower, torch.maximum(self.upper, self.lower + 1e-4)
        s = (self.quant_max - self.quant_min) / (upper - lower)
        xc = torch.minimum(torch.maximum(x, lower), upper)
        return round_ste(s * xc) / s

    @torch.no_grad()
    def start_from_observed(self) -> None:
        """Bounds where the quantization error after the consumer's activation is least,
        searched between the observed extremes (which include 0: an affine int8 grid holds it).

        Before a leaky ReLU of slope 0.006 a pre-activation range of [-20, 5.7] is mostly
        negative tail that the activation shrinks 150-fold; spending the grid on it costs the
        positive detail 4x its resolution.  Measuring the error after the activation cuts the
        tail instead (the same search without a consumer is the usual MSE range search)."""
        seen_min, seen_max = self.activation_post_process.min_val, self.activation_post_process.max_val
        lo = float(seen_min.clamp(max=0.0)) if torch.isfinite(seen_min) else -1.0
        hi = float(seen_max.clamp(min=0.0)) if torch.isfinite(seen_max) else 1.0
        for partner in self.relu_sum_partner:
            if torch.isfinite(partner.activation_post_process.max_val):
                lo = max(lo, -float(partner.activation_post_process.max_val.clamp(min=0.0)))
        if hi - lo < 1e-4:
            hi = lo + 1e-4
        self._sample, sample = [], self._sample
        if sample:
            lo, hi = best_range(torch.cat(sample), lo, hi, self.consumer_slope, self.quant_max - self.quant_min)
        self.lower.fill_(lo)
        self.upper.fill_(hi)

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        # The grid is the multiples of s^-1 between the bounds; with lower <= 0 <= upper the
        # zero point lies on the integer range and the int8 kernels hold the same grid.
        lower = float(self.lower.detach().clamp(max=0.0))
        upper = max(float(self.upper.detach()), lower + 1e-4, 0.0)
        scale = (upper - lower) / (self.quant_max - self.quant_min)
        zero_point = min(max(round(-lower / scale), self.quant_min), self.quant_max)
        return torch.tensor([scale]), torch.tensor([zero_point], dtype=torch.int32)

    def extra_repr(self) -> str:
        return f"lower={float(self.lower):.4g}, upper={float(self.upper):.4g}"


SAMPLE_PER_BATCH = 20_000  # values kept per calibration batch for the range search


def best_range(x: torch.Tensor, lo: float, hi: float, slope: float | None, levels: int,
               steps: int = 24) -> tuple[float, float]:
    """(lower, upper) among shrunken versions of [lo, hi] with the least squared error of
    ``act(quantize(x))`` against ``act(x)``; ``act`` is the leaky ReLU of ``slope`` (identity
    when None)."""
    def act(t: torch.Tensor) -> torch.Tensor:
        return t if slope is None else torch.where(t >= 0, t, t * slope)

    target = act(x)
    best = (float("inf"), lo, hi)
    fractions = torch.linspace(0.02, 1.0, steps).tolist()
    for fl in fractions if lo < 0 else [0.0]:
        for fu in fractions if hi > 0 else [0.0]:
            lower, upper = lo * fl, hi * fu
            if upper - lower < 1e-6:
                continue
            s = levels / (upper - lower)
            q = torch.round(x.clamp(lower, upper) * s) / s
            err = float((act(q) - target).pow(2).mean())
            if err < best[0]:
                best = (err, lower, upper)
    return best[1], best[2]


def mark_consumers(prepared: nn.Module) -> None:
    """Tell each activation quantizer the slope of the leaky ReLU that reads its tensor (if
    one does), and each addend of a sum that a ReLU reads the other addend, so its range is
    chosen for what survives the activation."""
    modules = dict(prepared.named_modules())
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.LeakyReLU):
            continue
        source = node.args[0]
        if getattr(source, "op", None) == "call_module" and isinstance(modules.get(source.target), DualBoundFakeQuantize):
            modules[source.target].consumer_slope = float(modules[node.target].negative_slope)
    # relu(a + b) is 0 wherever a < -max(b): each addend's grid can stop there.
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target not in (operator.add, torch.add) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if not (user.op == "call_module" and isinstance(modules.get(user.target), nn.ReLU)):
            continue
        addends = [modules.get(a.target) if getattr(a, "op", None) == "call_module" else None for a in node.args[:2]]
        if len(addends) == 2 and all(isinstance(q, DualBoundFakeQuantize) for q in addends):
            addends[0].relu_sum_partner, addends[1].relu_sum_partner = [addends[1]], [addends[0]]


WEIGHT_GRIDS = ("narrow", "full")  # int8 weight codes [-127, 127] (default) or torch.ao's [-128, 127]


def qconfig_mapping(weight_grid: str = "narrow"):
    """DDTB bounds on every activation, per-channel symmetric int8 weights (oneDNN's layout).

    ``weight_grid``: "narrow" puts each output channel's largest weight exactly on code 127
    (scale = max|w| / 127). torch.ao's default ("full", codes [-128, 127]) sets scale =
    max|w| / 127.5, so that largest weight rounds to 128 and is clipped to 127: every channel's
    biggest tap shrinks by half a step. On a network that carries its input through identity
    taps layer after layer (the bundled ARM-FSRCNN) that gain error compounds: post-training
    int8 of w56 lost 1.23 dB with the full grid, 0.47 dB with the narrow one."""
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.fake_quantize import FakeQuantize, default_per_channel_weight_fake_quant
    from torch.ao.quantization.observer import MovingAveragePerChannelMinMaxObserver

    if weight_grid not in WEIGHT_GRIDS:
        raise ValueError(f"weight_grid must be one of {WEIGHT_GRIDS}, not {weight_grid!r}")
    weight = default_per_channel_weight_fake_quant if weight_grid == "full" else FakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric, ch_axis=0)
    return QConfigMapping().set_global(QConfig(activation=DualBoundFakeQuantize.with_args(), weight=weight))


def prepare(module: nn.Module, example: torch.Tensor, engine: str = ENGINE, weight_grid: str = "narrow") -> nn.Module:
    """A trainable fake-quantized copy of a float network (CPU, train mode, weights trainable)."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    set_engine(engine)
    ctx = _quiet_deprecation()
    try:
        float_copy = copy.deepcopy(module).cpu().train().requires_grad_(True)
        return prepare_qat_fx(float_copy, qconfig_mapping(weight_grid), example_inputs=(example,))
    finally:
        ctx.__exit__(None, None, None)


def fake_quantizers(prepared: nn.Module) -> list[torch.ao.quantization.FakeQuantizeBase]:
    return [m for m in prepared.modules() if isinstance(m, torch.ao.quantization.FakeQuantizeBase)]


def activation_bounds(prepared: nn.Module) -> list[DualBoundFakeQuantize]:
    return [m for m in prepared.modules() if isinstance(m, DualBoundFakeQuantize)]


@torch.no_grad()
def calibrate(prepared: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Observe activation and weight ranges on ``batches`` without fake quantization, then
    start every bound at its observed range and switch fake quantization on."""
    mark_consumers(prepared)
    for q in fake_quantizers(prepared):
        q.enable_observer()
        q.disable_fake_quant()
    for batch in batches:
        prepared(batch)
    for q in activation_bounds(prepared):
        q.start_from_observed()
    for q in fake_quantizers(prepared):
        q.enable_fake_quant()
        if isinstance(q, DualBoundFakeQuantize):
            q.disable_observer()  # its range is trained from now on; weight observers keep following the weights


def parameter_groups(prepared: nn.Module, lr: float, bound_lr: float) -> list[dict]:
    """DDTB trains the bounds with a much larger step (1e-2) than the weights (1e-4)."""
    bounds = [p for q in activation_bounds(prepared) for p in (q.lower, q.upper)]
    ids = {id(p) for p in bounds}
    weights = [p for p in prepared.parameters() if id(p) not in ids and p.requires_grad]
    return [{"params": weights, "lr": lr}, {"params": bounds, "lr": bound_lr}]


@torch.no_grad()
def settle_weight_ranges(prepared: nn.Module) -> None:
    """Set every weight grid from the weights as they are now and stop following them.

    torch.ao's weight observers average the range over training steps, so the grid the fake
    quantizer last used and the one ``convert_fx`` would compute lag the final weights by
    different amounts (a step apart on some weights). Settled, the fake-quantized network and
    its int8 export use the same grid."""
    for module in prepared.modules():
        fq = getattr(module, "weight_fake_quant", None)
        if fq is None or not hasattr(module, "weight"):
            continue
        observer = fq.activation_post_process
        observer.reset_min_max_vals()
        observer(module.weight.detach())
        scale, zero_point = observer.calculate_qparams()
        fq.scale.resize_(scale.shape).copy_(scale)
        fq.zero_point.resize_(zero_point.shape).copy_(zero_point)
        fq.disable_observer()


def export(prepared: nn.Module, engine: str = ENGINE) -> nn.Module:
    """The real int8 network (CPU, eval) with the trained ranges (weight grids settled on the
    final weights, ``settle_weight_ranges``)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    set_engine(engine)
    ctx = _quiet_deprecation()
    try:
        trained = copy.deepcopy(prepared).eval()
        settle_weight_ranges(trained)
        for q in fake_quantizers(trained):
            q.disable_observer()
        return one_primitive_per_input_shape(convert_fx(trained).eval())
    finally:
        ctx.__exit__(None, None, None)


def state(prepared: nn.Module) -> dict[str, torch.Tensor]:
    """The prepared network's tensors (float weights, bounds, weight observers' ranges),
    contiguous, for safetensors."""
    return {k: v.detach().contiguous().clone() for k, v in prepared.state_dict().items()}


def load(module: nn.Module, example: torch.Tensor, tensors: dict[str, torch.Tensor],
         engine: str = ENGINE, weight_grid: str = "narrow") -> nn.Module:
    """Rebuild a trained network: ``prepare`` the float architecture (with the weight grid it
    was trained on), load ``tensors`` and export to int8."""
    prepared = prepare(module, example, engine, weight_grid)
    prepared.load_state_dict(tensors)
    for q in fake_quantizers(prepared):
        q.enable_fake_quant()
        q.disable_observer()
    return export(prepared, engine)
