"""ARM backbones (FSRCNN, CARN-M, SRResNet) as width-parameterised dense networks.

ARM's supernet slices every width-carrying tensor to its first k channels.  That is the
same as instantiating the backbone with ``nf = k`` and loading the prefix slice of every
full-width tensor into it (for CARN this includes the "first k of the *concatenated*
input" rule and the re-partition of grouped convolutions, because a dense ``nf = k``
network concatenates and groups exactly that way).  So there is one class per backbone,
parameterised by ``nf``; the full-width instance *is* the supernet, and a subnet is the
same class at a smaller ``nf`` with sliced weights.  Module attribute names follow the
official checkpoints so their state dicts load without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress.bf16 import Bf16Section
from models.common.fusion import FusedConv2d

SCALE = 4


class FSRCNN(nn.Module):
    """ClassSR/ARM FSRCNN: RGB in and out, shared-slope PReLUs, no activation between
    the four mapping convs, 9x9 stride-4 deconvolution (output exactly 4h x 4w)."""

    def __init__(self, nf: int = 56, s: int = 12, m: int = 4) -> None:
        super().__init__()
        self.head_conv = nn.Sequential(nn.Conv2d(3, nf, 5, padding=2), nn.PReLU())
        body: list[nn.Module] = [nn.Sequential(nn.Conv2d(nf, s, 1), nn.PReLU())]
        body += [nn.Conv2d(s, s, 3, padding=1) for _ in range(m)]
        body += [nn.PReLU(), nn.Sequential(nn.Conv2d(s, nf, 1), nn.PReLU())]
        self.body_conv = nn.Sequential(*body)
        self.tail_conv = nn.ConvTranspose2d(nf, 3, 9, stride=SCALE, padding=3, output_padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """Start every width at bilinear x4 upsampling: RGB passes through channels 0-2 of
        each layer (identity taps; PReLU is the identity on non-negative pixels) and the
        deconvolution holds the bilinear kernel, while the other channels get the FSRCNN
        paper's He-normal init and a near-zero deconvolution.  Channels 0-2 lie in every
        width's prefix, so all subnets begin at bilinear quality instead of a black image;
        from PyTorch's default init FSRCNN needs hundreds of thousands of steps to reach
        bicubic quality, which a CPU cannot afford.  The architecture is unchanged."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, (2.0 / (m.out_channels * m.weight[0, 0].numel())) ** 0.5)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.tail_conv.weight, 0.0, 1e-3)
        nn.init.zeros_(self.tail_conv.bias)
        convs = [self.head_conv[0], self.body_conv[0][0], *self.body_conv[1:5], self.body_conv[6][0]]
        with torch.no_grad():
            for conv in convs:
                k = conv.kernel_size[0] // 2
                conv.weight[:3] = 0
                for c in range(3):
                    conv.weight[c, c, k, k] = 1.0
            taps = 1 - (torch.arange(9, dtype=torch.float32) - 4.5).abs() / 4
            kernel = torch.outer(taps.clamp(min=0), taps.clamp(min=0))
            self.tail_conv.weight[:3] = 0
            for c in range(3):
                self.tail_conv.weight[c, c] = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail_conv(self.body_conv(self.head_conv(x)))


class _MeanShift(nn.Conv2d):
    """Frozen 1x1 conv adding or subtracting the DIV2K RGB mean (rgb_range 1, std 1)."""

    RGB_MEAN = (0.4488, 0.4371, 0.4040)

    def __init__(self, sign: int) -> None:
        super().__init__(3, 3, 1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * torch.tensor(self.RGB_MEAN))
        self.requires_grad_(False)


class _EResidualBlock(nn.Module):
    def __init__(self, nf: int, group: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(nf, nf, 3, padding=1, groups=group), nn.ReLU(inplace=True),
            nn.Conv2d(nf, nf, 3, padding=1, groups=group), nn.ReLU(inplace=True),
            nn.Conv2d(nf, nf, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + x)


def _fuse(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))


class _CascadeUnit(nn.Module):
    """Cascading concatenation shared by CARN's blocks and its model level:
    o_i = c_i(cat[x, y_1 .. y_i]) with y_i = step_i(o_{i-1})."""

    def _cascade(self, x: torch.Tensor, steps: list[nn.Module]) -> torch.Tensor:
        cat, out = x, x
        for step, fuse in zip(steps, (self.c1, self.c2, self.c3)):
            cat = torch.cat([cat, step(out)], dim=1)
            out = fuse(cat)
        return out


class _CarnBlock(_CascadeUnit):
    """One EResidualBlock applied three times with shared weights, cascaded."""

    def __init__(self, nf: int, group: int) -> None:
        super().__init__()
        self.b1 = _EResidualBlock(nf, group)
        self.c1, self.c2, self.c3 = _fuse(2 * nf, nf), _fuse(3 * nf, nf), _fuse(4 * nf, nf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._cascade(x, [self.b1, self.b1, self.b1])


class _Upsampler(nn.Module):
    def __init__(self, nf: int, group: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(2):
            layers += [nn.Conv2d(nf, 4 * nf, 3, padding=1, groups=group), nn.ReLU(inplace=True),
                       nn.PixelShuffle(2)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _UpsampleWrapper(nn.Module):
    """Keeps the official ``upsample.up.body.*`` key path."""

    def __init__(self, nf: int, group: int) -> None:
        super().__init__()
        self.up = _Upsampler(nf, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class CarnM(_CascadeUnit):
    """CARN-M (mobile): grouped efficient residual blocks, cascading at two levels."""

    def __init__(self, nf: int = 64, group: int = 4) -> None:
        super().__init__()
        self.sub_mean, self.add_mean = _MeanShift(-1), _MeanShift(+1)
        self.entry = nn.Conv2d(3, nf, 3, padding=1)
        self.b1, self.b2, self.b3 = (_CarnBlock(nf, group) for _ in range(3))
        self.c1, self.c2, self.c3 = _fuse(2 * nf, nf), _fuse(3 * nf, nf), _fuse(4 * nf, nf)
        self.upsample = _UpsampleWrapper(nf, group)
        self.exit = nn.Conv2d(nf, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(self.sub_mean(x))
        out = self._cascade(x, [self.b1, self.b2, self.b3])
        return self.add_mean(self.exit(self.upsample(out)))


class _ResidualBlockNoBN(nn.Module):
    def __init__(self, nf: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv2 = nn.Conv2d(nf, nf, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class SRResNet(nn.Module):
    """MSRResNet (BasicSR): 16 residual blocks without BN, pixel-shuffle x2 twice, and a
    bilinear global residual."""

    def __init__(self, nf: int = 64, nb: int = 16) -> None:
        super().__init__()
        self.conv_first = nn.Conv2d(3, nf, 3, padding=1)
        self.recon_trunk = nn.Sequential(*(_ResidualBlockNoBN(nf) for _ in range(nb)))
        self.upconv1 = nn.Conv2d(nf, 4 * nf, 3, padding=1)
        self.upconv2 = nn.Conv2d(nf, 4 * nf, 3, padding=1)
        self.HRconv = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv_last = nn.Conv2d(nf, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lrelu = lambda t: F.leaky_relu(t, 0.1)  # noqa: E731
        out = lrelu(self.conv_first(x))
        out = self.recon_trunk(out)
        out = lrelu(F.pixel_shuffle(self.upconv1(out), 2))
        out = lrelu(F.pixel_shuffle(self.upconv2(out), 2))
        out = self.conv_last(lrelu(self.HRconv(out)))
        return out + F.interpolate(x, scale_factor=SCALE, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class Backbone:
    """A supernet family: how to build it at width ``nf`` and which widths are rungs.

    ``widths`` excludes bicubic; rung 0 is always bicubic, rung i is ``widths[i-1]``.
    ``train_lr`` is the paper's Adam learning rate for this backbone.
    """

    name: str
    build: Callable[[int], nn.Module]
    widths: tuple[int, ...]
    train_lr: float

    @property
    def full_width(self) -> int:
        return self.widths[-1]


BACKBONES: dict[str, Backbone] = {
    "fsrcnn": Backbone("fsrcnn", lambda nf: FSRCNN(nf), (16, 36, 56), 1e-3),
    "carn": Backbone("carn", lambda nf: CarnM(nf), (36, 52, 64), 2e-4),
    "srresnet": Backbone("srresnet", lambda nf: SRResNet(nf), (36, 52, 64), 2e-4),
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown ARM backbone {name!r}; known: {sorted(BACKBONES)}") from None


def slice_tensor(full: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """First-k slice of ``full`` on every dimension down to ``shape`` (ARM's rule)."""
    if full.dim() != len(shape) or any(s > f for s, f in zip(shape, full.shape)):
        raise ValueError(f"cannot slice a tensor of shape {tuple(full.shape)} to {tuple(shape)}")
    return full[tuple(slice(0, s) for s in shape)]


def sliced_params(full: dict[str, torch.Tensor], template: nn.Module) -> dict[str, torch.Tensor]:
    """Prefix slices of the full-width tensors in the shapes of ``template``'s state dict."""
    return {k: slice_tensor(full[k], v.shape) for k, v in template.state_dict().items()}


class SubPixelDeconv(nn.Module):
    """A stride-s transposed convolution whose output is exactly s x the input, rewritten
    as an ordinary convolution on the input grid (s*s phases per output channel) followed
    by a pixel shuffle.  Same function (up to float summation order); FSRCNN's 9x9 stride-4
    deconvolution is most of its run time, and in this form it ran about 10-20% faster per
    subnet on our 2-core CPU, more with channels-last tensors (docs/BENCHMARKS.md).

    Output pixel o = s*q + r receives w[k] * x[q + j] for k = r + p - s*j, so phase r of
    the output is a correlation of the input with the taps k that fall inside the kernel.

    The conv's output channels are ordered (ry, rx, c), not PixelShuffle's (c, ry, rx): in
    channels-last memory each input pixel's s*c values of one output row are then already
    adjacent, so the shuffle is one strided copy of s*c-float runs into a channels-last
    output (2-3x faster than ``pixel_shuffle``; the output is what the stitching reads).
    ``clamp`` (lo, hi), when set, clips the output in that same copy, saving a pass; phases in
    bf16 (``compress.bf16``) are widened to float32 in it too."""

    def __init__(self, deconv: nn.ConvTranspose2d) -> None:
        super().__init__()
        s, k, p = deconv.stride[0], deconv.kernel_size[0], deconv.padding[0]
        op = deconv.output_padding[0]
        if deconv.groups != 1 or deconv.dilation[0] != 1 or -s - 2 * p + k + op != 0:
            raise ValueError("only ungrouped, undilated deconvolutions with output exactly s x input")
        w = deconv.weight.detach()  # (cin, cout, k, k)
        cin, cout = w.shape[:2]
        # Phase r needs the offsets j with 0 <= r + p - s*j < k: from ceil((r + p - k + 1) / s),
        # lowest at r = 0, to floor((r + p) / s), highest at r = s - 1.  (Rounding the lower end
        # down instead made FSRCNN's kernel 5x5 where 3x3 holds every tap: 2.8x the work.)
        reach = max((k - 1 - p) // s, (s - 1 + p) // s)  # |j| needed by any phase
        taps = 2 * reach + 1
        weight = torch.zeros(s, s, cout, cin, taps, taps, dtype=w.dtype)
        for ry in range(s):
            for jy in range(-reach, reach + 1):
                ky = ry + p - s * jy
                if not 0 <= ky < k:
                    continue
                for rx in range(s):
                    for jx in range(-reach, reach + 1):
                        kx = rx + p - s * jx
                        if 0 <= kx < k:
                            weight[ry, rx, :, :, jy + reach, jx + reach] = w[:, :, ky, kx].T
        self.scale, self.out_channels = s, cout
        self.clamp: tuple[float, float] | None = None
        self.conv = nn.Conv2d(cin, cout * s * s, taps, padding=reach)
        with torch.no_grad():
            self.conv.weight.copy_(weight.reshape(cout * s * s, cin, taps, taps))
            bias = deconv.bias.detach() if deconv.bias is not None else torch.zeros(cout)
            self.conv.bias.copy_(bias.repeat(s * s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sub_pixel_shuffle(self.conv(x), self.scale, self.out_channels, self.clamp)

    @property
    def clips(self) -> tuple[float, float] | None:
        """The range the output is clipped to, in the shuffle or in the convolution itself."""
        conv = self.conv.module if isinstance(self.conv, Bf16Section) else self.conv
        if isinstance(conv, FusedConv2d) and conv.attr == "hardtanh":
            return tuple(conv.scalars)
        return self.clamp

    def fuse_into_conv(self) -> int:
        """Move the clip into the convolution as its oneDNN post-op
        (``models.common.fusion``): one pass less over the output, which is 16x the input's
        size; 1 if it did."""
        if self.clamp is None or not FusedConv2d.accepts(self.conv):
            return 0
        self.conv, self.clamp = FusedConv2d(self.conv, "hardtanh", list(self.clamp)), None
        return 1


@torch.fx.wrap
def sub_pixel_shuffle(y: torch.Tensor, s: int, c: int, clamp: tuple[float, float] | None) -> torch.Tensor:
    """SubPixelDeconv's shuffle of its (n, s*s*c, h, w) phases, (ry, rx, c) ordered, into
    (n, c, s*h, s*w) channels-last, clipped to ``clamp`` in the same copy when given.

    A leaf for torch.fx (``torch.fx.wrap``), so graph-mode quantization sees a plain
    convolution followed by a float function: the int8 convolution's output is dequantized
    before it, which the shuffle's float buffer needs, or here (``_dequantized_within``)
    when the graph hands it the int8 tensor."""
    if y.is_quantized:
        y, clamp = _dequantized_within(y, clamp)
    n, _, h, w = y.shape
    # Reduced-precision phases (a bf16 section) come out float32, widened after the shuffle:
    # the strided shuffle copy moves half the bytes in bf16, and the widening is then one
    # contiguous pass (25 patches of w56: 1.0 ms for both, against 1.4-2.4 ms for a shuffle
    # that widened as it copied).
    dtype = torch.promote_types(y.dtype, torch.float32)
    if clamp is not None and dtype != y.dtype:
        y = y.clamp(*clamp)  # clamp's out= cannot widen; clipping the narrow input first is the cheaper pass
        clamp = None
    # (n, h, w, [ry, rx, c]) -> (n, h, ry, w, [rx, c]); a view whatever y's memory format.
    phases = y.permute(0, 2, 3, 1).unflatten(3, (s, s * c)).permute(0, 1, 3, 2, 4)
    out = torch.empty((n, h, s, w, s * c), dtype=y.dtype, device=y.device)
    if clamp is None:
        out.copy_(phases)
    else:
        torch.clamp(phases, *clamp, out=out)
    return out.to(dtype).view(n, s * h, s * w, c).permute(0, 3, 1, 2)


def _dequantized_within(y: torch.Tensor,
                        clamp: tuple[float, float] | None) -> tuple[torch.Tensor, tuple[float, float] | None]:
    """int8 phases (a quint8 tensor) as float32, and the clip still needed: none when the
    tensor's grid lies inside ``clamp`` (the image grid, scale 1/255 and zero point 0, that
    ``models.arm.quantize.output_on_image_grid`` gives the int8 widths' last layer), since
    quint8 saturated at the grid's ends already.  Shuffling the 8-bit codes instead and
    widening after was measured slower (32 patches of 48 phases, 1 thread: 2.7 ms against
    1.1 ms; reading the codes out of a quantized tensor alone costs more than dequantizing)."""
    scale, zero_point = y.q_scale(), y.q_zero_point()
    lowest, highest = -zero_point * scale, (255 - zero_point) * scale
    if clamp is not None and clamp[0] - 1e-6 <= lowest and highest <= clamp[1] + 1e-6:
        clamp = None
    return y.dequantize(), clamp


def to_serving_form(module: nn.Module) -> nn.Module:
    """Replace every transposed convolution that supports it by its SubPixelDeconv."""
    for name, child in module.named_children():
        if isinstance(child, nn.ConvTranspose2d):
            setattr(module, name, SubPixelDeconv(child))
        else:
            to_serving_form(child)
    return module


def extract_subnet(backbone: Backbone, full_state: dict[str, torch.Tensor], width: int,
                   serving_form: bool = True) -> nn.Module:
    """A dense network of width ``width`` holding contiguous copies of the sliced weights.

    Dense subnets are the serving form: no slicing at run time, plain conv kernels, and
    (``serving_form``) deconvolutions rewritten as sub-pixel convolutions."""
    sub = backbone.build(width)
    sub.load_state_dict({k: v.clone().contiguous() for k, v in sliced_params(full_state, sub).items()})
    if serving_form:
        to_serving_form(sub)
    return sub.eval().requires_grad_(False)


class Supernet(nn.Module):
    """The full-width network plus one weightless template per smaller width, so that a
    training step at any width runs the dense template on slices of the shared weights
    (gradients flow back into the full tensors)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.full = backbone.build(backbone.full_width)
        self._templates = {w: backbone.build(w).to("meta") for w in backbone.widths[:-1]}

    def forward(self, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        if width is None or width == self.backbone.full_width:
            return self.full(x)
        template = self._templates[width]
        params = sliced_params(dict(self.full.state_dict(keep_vars=True)), template)
        return torch.func.functional_call(template, params, (x,))


def official_flops(module: nn.Module, lr_hw: tuple[int, int] = (32, 32)) -> int:
    """FLOPs per LR patch in the official ARM/ClassSR convention.

    Sum over conv and deconv layers of 2*kh*kw*(Cin/groups)*Hout*Wout*Cout (the
    deconvolution counted on its *output* grid), plus one per PReLU slope; the frozen
    MeanShift convs are ignored.  This reproduces the official ``cost_list`` exactly."""
    total = 0

    def conv_hook(m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, _MeanShift):
            return
        if isinstance(m, nn.ConvTranspose2d):
            cin, cout = m.in_channels, m.out_channels
        else:
            cin, cout = m.in_channels // m.groups, m.out_channels
        kh, kw = m.kernel_size
        total += 2 * kh * kw * cin * out.shape[-2] * out.shape[-1] * cout

    def prelu_hook(m: nn.Module, _inp: tuple, _out: torch.Tensor) -> None:
        nonlocal total
        total += m.weight.numel()

    handles = []
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.PReLU):
            handles.append(m.register_forward_hook(prelu_hook))
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, *lr_hw))
    finally:
        for h in handles:
            h.remove()
    return total
