"""Quantized convolutions keep one packing of their weights per input shape
(``compress.int8.one_primitive_per_input_shape``): same outputs, the right packing per shape."""

from __future__ import annotations

import torch
from torch import nn

from compress.int8 import one_primitive_per_input_shape, quantize_static


def _quantized_convnet() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.LeakyReLU(0.1),
                        nn.Conv2d(8, 4, 1))
    calibration = [torch.rand(4, 3, 12, 12) for _ in range(3)]
    return one_primitive_per_input_shape(quantize_static(net, calibration, calibration[0]))


def _convs(module: nn.Module) -> list[nn.Module]:
    import torch.ao.nn.quantized as nnq

    return [m for m in module.modules() if isinstance(m, nnq.Conv2d)]


SHAPES = [(1, 3, 12, 12), (5, 3, 12, 12), (1, 3, 12, 12), (2, 3, 20, 16), (5, 3, 12, 12)]


def test_each_input_shape_gets_its_own_packing_and_the_same_output() -> None:
    q = _quantized_convnet()
    convs = _convs(q)
    assert len(convs) == 3 and all(c._forward_pre_hooks for c in convs)
    torch.manual_seed(1)
    inputs = [torch.rand(s) for s in SHAPES]
    with torch.inference_mode():
        hooked, packings = [], []
        for x in inputs:
            hooked.append(q(x))
            packings.append([c._packed_params for c in convs])
        for c in convs:
            c._forward_pre_hooks.clear()  # every packing holds the same weights: one computes them all
        plain = [q(x) for x in inputs]
    for a, b in zip(hooked, plain):
        assert torch.equal(a.int_repr() if a.is_quantized else a, b.int_repr() if b.is_quantized else b)
    # The same shape finds its own packing again; another shape gets another one.
    assert all(p is r for p, r in zip(packings[0], packings[2]))
    assert all(p is r for p, r in zip(packings[1], packings[4]))
    assert all(p is not r for p, r in zip(packings[0], packings[1]))
    assert all(p is not r for p, r in zip(packings[0], packings[3]))


def test_only_the_most_recently_used_shapes_keep_a_packing() -> None:
    q = _quantized_convnet()
    for c in _convs(q):
        c._forward_pre_hooks.clear()
    one_primitive_per_input_shape(q, limit=2)
    with torch.inference_mode():
        q(torch.rand(SHAPES[0]))
        first = [c._packed_params for c in _convs(q)]
        q(torch.rand(SHAPES[1]))
        q(torch.rand(SHAPES[0]))  # used again: kept
        q(torch.rand(SHAPES[3]))  # a third shape evicts SHAPES[1]'s packing, not this one's
        q(torch.rand(SHAPES[0]))
        assert all(p is c._packed_params for p, c in zip(first, _convs(q)))
        q(torch.rand(SHAPES[1]))
        q(torch.rand(SHAPES[3]))  # evicts SHAPES[0]'s: it is packed anew
        q(torch.rand(SHAPES[0]))
        assert all(p is not c._packed_params for p, c in zip(first, _convs(q)))
