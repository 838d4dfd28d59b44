"""Backbones: widths, per-patch FLOPs and parameter counts of the official subnets, slicing rules."""

from __future__ import annotations

import pytest
import torch

from models.arm.nets import BACKBONES, SubPixelDeconv, Supernet, extract_subnet, get_backbone, official_flops

# (width, FLOPs per 32x32 LR patch, active params): the official ``cost_list`` values (the
# counting convention of the ARM code) and the official subnets' parameter counts.
EXPECTED = {
    "fsrcnn": [(16, 141_262_852, 10_755), (36, 304_570_372, 17_635), (56, 467_877_892, 24_515)],
    "carn": [(36, 380_215_296, 94_395), (52, 771_563_520, 195_003), (64, 1_154_875_392, 294_147)],
    "srresnet": [(36, 1_658_216_448, 481_683), (52, 3_438_010_368, 1_002_771), (64, 5_193_990_144, 1_517_571)],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_widths_flops_and_params(name: str) -> None:
    bb = get_backbone(name)
    assert bb.widths == tuple(w for w, _, _ in EXPECTED[name])
    for width, flops, params in EXPECTED[name]:
        net = bb.build(width)
        assert official_flops(net) == flops
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        assert trainable == params


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_dense_subnet_equals_sliced_supernet(name: str) -> None:
    torch.manual_seed(0)
    sn = Supernet(get_backbone(name)).eval()
    x = torch.rand(2, 3, 32, 32)
    full_state = sn.full.state_dict()
    for w in sn.backbone.widths:
        with torch.no_grad():
            sliced = sn(x, w)
            dense = extract_subnet(sn.backbone, full_state, w, serving_form=False)(x)
            serving = extract_subnet(sn.backbone, full_state, w)(x)
        assert sliced.shape == (2, 3, 128, 128)
        assert torch.equal(sliced, dense)
        torch.testing.assert_close(serving, dense, rtol=0, atol=1e-5)


@pytest.mark.parametrize("h,w", [(1, 1), (5, 9), (32, 32)])
def test_subpixel_form_of_the_deconvolution_is_the_same_function(h: int, w: int) -> None:
    torch.manual_seed(1)
    deconv = torch.nn.ConvTranspose2d(7, 3, 9, stride=4, padding=3, output_padding=1)
    x = torch.randn(2, 7, h, w)
    with torch.no_grad():
        torch.testing.assert_close(SubPixelDeconv(deconv)(x), deconv(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        SubPixelDeconv(torch.nn.ConvTranspose2d(3, 3, 9, stride=4, padding=3))  # output is not 4x


@pytest.mark.parametrize("k,s,p,op", [(9, 4, 3, 1), (4, 2, 1, 0), (8, 4, 2, 0), (6, 2, 2, 0), (5, 3, 1, 0),
                                      (3, 1, 1, 0)])
def test_subpixel_kernel_is_the_smallest_that_holds_every_tap(k: int, s: int, p: int, op: int) -> None:
    """Same function for other kernel/stride/padding combinations, and no all-zero border
    in the rewritten kernel (FSRCNN's 9x9 stride 4 once became 5x5 where 3x3 suffices)."""
    torch.manual_seed(2)
    deconv = torch.nn.ConvTranspose2d(5, 2, k, stride=s, padding=p, output_padding=op)
    sub = SubPixelDeconv(deconv)
    x = torch.randn(2, 5, 6, 7)
    with torch.no_grad():
        torch.testing.assert_close(sub(x), deconv(x), rtol=0, atol=1e-5)
    w = sub.conv.weight.abs().sum(dim=(0, 1))  # (taps, taps)
    assert w[0].sum() > 0 or w[-1].sum() > 0, "a zero top and bottom row: the kernel is larger than needed"
    assert w[:, 0].sum() > 0 or w[:, -1].sum() > 0
    if (k, s, p) == (9, 4, 3):
        assert sub.conv.kernel_size == (3, 3)


def test_carn_concat_slice_takes_first_k_of_concatenation() -> None:
    """At width w, c1 sees cat[c0 (w), b1 (w)] and must use weight[:w, :2w] of the
    (64, 128) full weight, not [0:w] + [64:64+w]."""
    bb = get_backbone("carn")
    full = bb.build(64).state_dict()
    sub = extract_subnet(bb, full, 36).state_dict()
    assert torch.equal(sub["c1.0.weight"], full["c1.0.weight"][:36, :72])
    assert torch.equal(sub["b1.b1.body.0.weight"], full["b1.b1.body.0.weight"][:36, :9])
    assert torch.equal(sub["upsample.up.body.0.weight"], full["upsample.up.body.0.weight"][:144, :9])


def test_training_step_updates_shared_weights_only_in_the_prefix() -> None:
    sn = Supernet(get_backbone("fsrcnn"))
    before = sn.full.head_conv[0].weight.detach().clone()
    opt = torch.optim.SGD(sn.full.parameters(), lr=0.1)
    sn(torch.rand(2, 3, 32, 32), 16).abs().mean().backward()
    opt.step()
    after = sn.full.head_conv[0].weight.detach()
    assert not torch.equal(after[:16], before[:16])
    assert torch.equal(after[16:], before[16:])


def test_fsrcnn_output_is_exactly_four_times_any_size() -> None:
    net = get_backbone("fsrcnn").build(16)
    for h, w in [(1, 1), (7, 13), (32, 32)]:
        assert net(torch.rand(1, 3, h, w)).shape[-2:] == (4 * h, 4 * w)


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="known"):
        get_backbone("edsr")
