"""Post-training int8 on real CPU kernels (torch.ao's quantized ops).

Two forms, chosen by what a network is made of:

* ``quantize_static``: convolutions and linears with int8 weights *and* activations, the
  activation ranges observed on calibration batches (FX graph mode).  For convolutional
  networks (PSS-Net's MobileNets).  The engine is pinned to oneDNN: ``fbgemm`` with the full
  8-bit activation range overflows on AVX-512 hosts (a MobileNet fell to 2.7 % top-1) and
  ``x86`` is half-broken there; oneDNN's full range is right.
* ``quantize_dynamic_linear``: int8 weights, activations quantized per batch at run time, on
  every ``nn.Linear``.  For transformers (CF-ViT), whose time is in their linears and whose
  activations vary too much between inputs for one static range.

torch.ao's FX quantization is deprecated in torch 2.13 (PT2E moved to torchao and needs
``torch.compile``, which costs 10-200 s per network at start-up); it still converts in
seconds and runs real int8 kernels, so it is used here with its deprecation warning silenced
in one place.  Quantized modules run on the CPU only.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

ENGINE = "onednn"


def _quiet_deprecation():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.ao")
    warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*")
    warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
    return ctx


def set_engine(engine: str = ENGINE) -> None:
    """Select the quantized kernels' engine (process-wide, as torch has it)."""
    if engine not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"quantized engine {engine!r} is not available in this torch build "
                           f"(available: {', '.join(torch.backends.quantized.supported_engines)})")
    torch.backends.quantized.engine = engine


def _prepare_static(module: nn.Module, example: torch.Tensor, keep_float: tuple[str, ...]) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    mapping = get_default_qconfig_mapping(ENGINE)
    for name in keep_float:
        mapping = mapping.set_module_name(name, None)
    return prepare_fx(copy.deepcopy(module).cpu().eval(), mapping, example_inputs=(example,))


def observe_static(module: nn.Module, calibration: Iterable[torch.Tensor], example: torch.Tensor,
                   keep_float: tuple[str, ...] = (), engine: str = ENGINE) -> dict[str, torch.Tensor]:
    """The activation observers' state after ``calibration``: all ``quantize_static`` needs
    to rebuild the same int8 network later without the data (plain tensors, so a bundle can
    keep them in safetensors)."""
    set_engine(engine)
    ctx = _quiet_deprecation()
    try:
        prepared = _prepare_static(module, example, keep_float)
        with torch.inference_mode():
            for batch in calibration:
                prepared(batch)
        return {k: v.detach().clone().contiguous() for k, v in prepared.state_dict().items()
                if "activation_post_process" in k}
    finally:
        ctx.__exit__(None, None, None)


def quantize_static(module: nn.Module, calibration: Iterable[torch.Tensor] | dict[str, torch.Tensor],
                    example: torch.Tensor, keep_float: tuple[str, ...] = (), engine: str = ENGINE) -> nn.Module:
    """An int8 copy of ``module`` (eval mode, CPU): activation ranges observed on every
    ``calibration`` batch (or taken from an earlier ``observe_static``), weights per channel.
    ``example`` is one input for tracing; ``keep_float`` names submodules left in float (a
    network's first layer, whose three input channels carry the most information per weight,
    is the usual one)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    set_engine(engine)
    ctx = _quiet_deprecation()
    try:
        prepared = _prepare_static(module, example, keep_float)
        if isinstance(calibration, dict):
            missing = prepared.load_state_dict(calibration, strict=False).missing_keys
            if any("activation_post_process" in k for k in missing):
                raise ValueError(f"the stored observer ranges do not fit this network (missing {missing[:3]})")
        else:
            with torch.inference_mode():
                for batch in calibration:
                    prepared(batch)
        return convert_fx(prepared).eval()
    finally:
        ctx.__exit__(None, None, None)


# Input shapes a quantized convolution keeps a packing of its weights for, the most recently
# used ones.  Each holds oneDNN's primitive for its shape (its own generated code), 60-100 KB:
# 256 per layer cost ARM's three int8 widths 370 MiB over batches of 1-128 patches, and 8 per
# layer on PSS-Net's eight int8 rungs 110 MiB; 8 per layer is about 20 MiB for ARM's.
SHAPES_PER_CONVOLUTION = 8


def one_primitive_per_input_shape(module: nn.Module, limit: int = SHAPES_PER_CONVOLUTION) -> nn.Module:
    """Give every quantized convolution of ``module`` its own packed weights per input shape,
    for its ``limit`` most recently used shapes (in place; returns ``module``).

    Why: torch's oneDNN quantized convolution keeps one ready primitive in its packed weights,
    made for the *first* input shape it ever sees; every call with another shape builds the
    primitive again (descriptor, scales, weight layout check), 20-50 us per layer.  A served
    rung meets many batch sizes, and whichever came first (at start-up, a calibration pass)
    was the only fast one.  On the bundled ARM int8 widths (8-9 convolutions, 1 thread, the
    sizes interleaved) it took w36's pass of one patch from 1.63 to 1.18 ms and of 32 from
    8.8 to 8.4 ms, with bit-identical outputs (docs/COMPRESSION.md).  A forward pre-hook swaps
    in the packing made for the input's shape (packed on first sight by the same
    ``quantized::conv2d_prepack`` torch.ao uses; a shape evicted from the ``limit`` kept is
    packed again when it returns, which costs what a call on another shape's packing does).
    A race between two threads can only hand a call another shape's packing, which computes
    the same result uncached.  Used on ARM's int8 widths (``compress.qat.export``), where it was
    measured; PSS-Net's and CF-ViT's torch.ao rungs do without (not measured, and their
    many layers would hold more memory)."""
    import torch.ao.nn.quantized as nnq

    for conv in module.modules():
        if not isinstance(conv, nnq.Conv2d) or conv.padding_mode != "zeros":  # the fused ConvReLU2d is one too
            continue
        packs: OrderedDict[tuple[int, ...], object] = OrderedDict()

        def use_packing_for_shape(layer: nn.Module, args: tuple, packs: OrderedDict = packs) -> None:
            shape = tuple(args[0].shape)
            packed = packs.get(shape)
            if packed is None:
                weight, bias = layer._weight_bias()
                packed = packs[shape] = torch.ops.quantized.conv2d_prepack(
                    weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
                while len(packs) > limit:
                    packs.popitem(last=False)
            else:
                packs.move_to_end(shape)
            layer._packed_params = packed

        conv.register_forward_pre_hook(use_packing_for_shape)
    return module


def quantize_dynamic_linear(module: nn.Module, engine: str = ENGINE) -> nn.Module:
    """An int8-weight copy of ``module`` whose ``nn.Linear`` layers quantize their input per
    batch at run time (no calibration data needed)."""
    from torch.ao.quantization import quantize_dynamic

    set_engine(engine)
    ctx = _quiet_deprecation()
    try:
        return quantize_dynamic(copy.deepcopy(module).cpu().eval(), {nn.Linear}, dtype=torch.qint8)
    finally:
        ctx.__exit__(None, None, None)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` holds real int8 kernels (not fake-quantized float ones)."""
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in module.modules())


def prelu_as_leaky_relu(module: nn.Module) -> nn.Module:
    """Replace every single-slope ``nn.PReLU`` by the ``nn.LeakyReLU`` it equals (in place).

    torch's ``quantized::prelu`` is wrong when the quantized slope's zero point is 0 (it
    multiplies positive inputs by the slope too); the quantized leaky ReLU is right.  The
    slope stops being trainable, which quantization-aware fine-tuning can afford."""
    for name, child in module.named_children():
        if isinstance(child, nn.PReLU) and child.weight.numel() == 1:
            setattr(module, name, nn.LeakyReLU(float(child.weight.detach())))
        else:
            prelu_as_leaky_relu(child)
    return module
