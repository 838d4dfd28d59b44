"""Real int8 rungs for an ARM model: DDTB 8-bit quantization-aware training, exported to
oneDNN int8 kernels.

    python -m models.arm.quantize models/arm/weights/arm-fsrcnn/model.safetensors
    python -m models.arm.quantize checkpoints/arm-fsrcnn.pth --out runs/arm-official-int8

Per width: the dense fp32 subnet is the teacher; its copy with fake quantizers at every
point the int8 network holds an 8-bit tensor (DDTB's trainable dual bounds on activations,
per-channel int8 weights on the narrow grid) is fine-tuned on random 32x32 patches of the
training photos with DDTB's loss form, an L1 term plus 1000 x the attention-transfer distance
of the body features to the teacher's.  Post-training int8 loses 1.6-2.3 dB on FSRCNN (long
negative pre-activation tails share one grid with the detail); QAT learns to live on the grid.

Defaults (measured on the bundled w36, docs/COMPRESSION.md): the L1 term pulls to the fp32
width's output rather than DDTB's HR patch, the weights move at 2e-5 rather than DDTB's 1e-4,
for 1,500 steps. Fine-tuning a trained network on 16-patch batches drifts: at 5e-4 with the
HR target the student's float weights alone lost 0.49 dB, all of its int8 drop; pulling to the
teacher at a small step keeps it near the fp32 width.

``--form skip`` (the bundled w36 and w56): a network that carries its input image through
every layer, as ours does, loses most of its int8 accuracy to rounding that image again in
each layer; the skip form (``SkipFSRCNN``) adds the image at the tail through one int8
convolution of the input instead, and is trained longer as the different network it is:

    python -m models.arm.quantize models/arm/weights/arm-fsrcnn/model.safetensors \
        --widths 36,56 --form skip --lr 2e-4 --steps 6000 --at-weight 0 --select-every 500

An official ARM-FSRCNN checkpoint (no identity taps, so plain form) does better with the
longer recipe too: ``--lr 2e-4 --steps 6000 --at-weight 0`` took its int8 widths from 0.59 /
0.83 / 0.89 dB below fp32 to 0.48 / 0.59 / 0.63 dB (both with the correction below), at about
15-25 minutes per width on one core.

After training, each width gets a least-squares gain and offset per tail output channel that
map its int8 output onto the fp32 width's on training patches, folded into the tail's weights
and bias (``fit_output_correction``; no int8 weight code changes, nothing costs time). It took
the bundled widths from 0.21 / 0.26 / 0.26 dB below fp32 to 0.16 / 0.21 / 0.21 dB. For rungs
trained before it:

    python -m models.arm.quantize models/arm/weights/arm-fsrcnn/model.safetensors --correct-only

``--flat-relu``: the leaky ReLUs flatter than ``RELU_BELOW`` (ours: the head's, -0.004, and the
expanding layer's, 0.0001) run as ReLUs fused into their int8 convolutions, 5-15 % faster at
about 0.005 dB.  Trained rungs move to that form without training (the bundled ones did):

    python -m models.arm.quantize models/arm/weights/arm-fsrcnn/model.safetensors --measure-only --flat-relu

Writes into ``--out`` (default: the checkpoint's folder): ``int8_qat.safetensors`` (the
trained fake-quantized tensors of every width, rebuilt into int8 at start-up in about 0.5 s
each once torch.ao is imported) and ``int8.json`` (per width: method, bits, backend,
``real_speed``, held-out PSNR of the int8 and fp32 width on the test photos, the exact command,
and the table row: per edge bin of the checkpoint's own table, the int8 width's mean patch MSE
over its fp32 width's on the validation photos).  The ARM family serves the int8 widths as
extra rungs (``ANYTIME_ARM_INT8``, ``ANYTIME_ARM_INT8_DIR``).  Progress is printed every
``--log-every`` steps; the three FSRCNN widths take about 10 minutes on a quiet 2-core CPU.
"""

from __future__ import annotations

import argparse
import copy
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from compress import artifact, qat
from compress.fakequant import attention_transfer_loss
from compress.int8 import ENGINE, prelu_as_leaky_relu
from models.arm import data
from models.arm.metrics import psnr_rgb
from models.arm.nets import SCALE, FSRCNN, Backbone, SubPixelDeconv, extract_subnet, sub_pixel_shuffle

# A leaf for graph-mode quantization here too (``torch.fx.wrap`` acts on the calling module's
# globals): SkipTail calls the shuffle from this module.
torch.fx.wrap("sub_pixel_shuffle")

QAT_FILE, MANIFEST_FILE = "int8_qat.safetensors", "int8.json"
# The body features DDTB distils (the output of the last layer before the upsampler): the
# expanding layer's activation, or the convolution int8 fused it into (a ReLU in the carry form).
FEATURE_LAYER = {"fsrcnn": ("body_conv.6.1", "body_conv.6.0")}
AT_WEIGHT = 1000.0  # DDTB's weight of the attention-transfer term


FORMS = ("plain", "carry", "skip")  # how a width's float network is laid out for int8 (``float_form``)
CARRY_CHANNELS = 3  # FSRCNN's pass-through: RGB in channels 0-2 of every layer (``nets.FSRCNN._init_weights``)
RELU_BELOW = 0.005  # leaky ReLUs flatter than this become ReLUs (``flat_leaky_as_relu``), fused into their conv


class CarryConv(nn.Module):
    """A convolution split in two that computes the same thing: ``carry`` (1x1) holds the
    centre pass-through taps, ``main`` every other weight.

    Why: int8 weights share one grid per output channel, scaled to that channel's largest
    weight.  In our FSRCNN every layer carries RGB through channels 0-2 on an identity tap of
    about 1.06, so those channels' other weights got a grid 10-100x coarser than they need:
    weights alone cost w56 1.23 dB after post-training int8, 0.15 dB with the head and the
    mapping layers split.  The price is a 1x1 convolution and an int8 add per split layer,
    and two more 8-bit tensors per layer (docs/COMPRESSION.md)."""

    def __init__(self, conv: nn.Conv2d, taps: torch.Tensor) -> None:
        super().__init__()
        w = conv.weight.detach()
        self.main = copy.deepcopy(conv)
        # 1x1 over every input channel (zeros but the taps): slicing the first k channels off
        # an int8 tensor would dequantize, slice and quantize again, a pass over the whole input.
        self.carry = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=False)
        centre = (w.shape[2] // 2, w.shape[3] // 2)
        with torch.no_grad():
            self.main.weight.copy_(w * ~taps)
            self.carry.weight.copy_((w * taps)[:, :, centre[0]:centre[0] + 1, centre[1]:centre[1] + 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.carry(x)


def carry_taps(conv: nn.Conv2d, k: int = CARRY_CHANNELS) -> torch.Tensor | None:
    """The pass-through taps of ``conv`` (a boolean mask of its weight: output channel c < k's
    centre tap on input c), or None when it has none.  Present when each such tap is its
    channel's largest weight, as our identity initialisation leaves it (an official
    checkpoint has none)."""
    w = conv.weight.detach()
    if min(w.shape[:2]) < k:
        return None
    mask = torch.zeros_like(w, dtype=torch.bool)
    centre = (w.shape[2] // 2, w.shape[3] // 2)
    for c in range(k):
        mask[c, c, centre[0], centre[1]] = True
    peak = w[:k].abs().flatten(1).amax(1)
    held = identity_taps(conv, k).abs()
    return mask if bool(torch.all(held >= peak)) and bool(torch.all(held > 0.25)) else None


def identity_taps(conv: nn.Conv2d, k: int = CARRY_CHANNELS) -> torch.Tensor:
    """``conv``'s weight from input c to output c at the kernel's centre, for c < k: the
    factor by which each pass-through channel carries itself (about 1.06 in our FSRCNN)."""
    w = conv.weight.detach()
    c = torch.arange(k)
    return w[c, c, w.shape[2] // 2, w.shape[3] // 2]


def carried_layers(net: FSRCNN) -> list[tuple[nn.Module, str]]:
    """(parent, name) of the convolutions ``to_carry_form`` splits: the head and the four
    mapping layers.  Measured on w56 after post-training int8 (docs/COMPRESSION.md): these
    hold most of the weight error, and splitting them took the whole network from -1.52 to
    -0.70 dB; splitting the shrinking and expanding 1x1 layers too cost more at their new
    8-bit tensors than it saved, and the upsampler's taps span its 3x3 kernel (a carry as
    large as the layer)."""
    return [(net.head_conv, "0"), *((net.body_conv, str(i)) for i in range(1, 5))]


def to_carry_form(net: nn.Module) -> bool:
    """Split every FSRCNN convolution that has pass-through taps into a ``CarryConv`` and turn
    the leaky ReLUs flatter than ``RELU_BELOW`` into ReLUs (which int8 fuses into the
    convolution before them, so their long negative inputs are never put on a grid).  In
    place; False when the network has no pass-through to split (then it is unchanged)."""
    if not isinstance(net, FSRCNN) or carry_taps(net.head_conv[0]) is None:
        return False
    for parent, name in carried_layers(net):
        conv = getattr(parent, name)
        taps = carry_taps(conv)
        if taps is not None:
            setattr(parent, name, CarryConv(conv, taps))
    flat_leaky_as_relu(net)
    return True


def flat_leaky_as_relu(net: nn.Module) -> int:
    """Turn the leaky ReLUs flatter than ``RELU_BELOW`` into ReLUs, in place; returns how many.

    Why: torch's int8 engine fuses a ReLU into the convolution before it (one kernel, and the
    pre-activation is never put on a grid of its own), while a leaky ReLU is a separate
    quantized pass.  Our FSRCNN's head and expanding layers have slopes of -0.004 and 0.0001:
    as ReLUs they cost 0.002 dB in float, and the int8 widths run 5-15 % faster
    (docs/COMPRESSION.md).  The official checkpoint's flattest slopes are 0.006, which matter
    (as ReLUs: about 1 dB), so it has none this flat."""
    flat = [(parent, name) for parent in net.modules() for name, child in parent.named_children()
            if isinstance(child, nn.LeakyReLU) and abs(child.negative_slope) < RELU_BELOW]
    for parent, name in flat:
        setattr(parent, name, nn.ReLU())
    return len(flat)


class SkipTail(nn.Module):
    """FSRCNN's sub-pixel tail that takes the pass-through image from the network's input
    instead of from the body: ``shuffle(conv(body) + skip(x))``.

    Why: the bundled FSRCNN carries its RGB input through channels 0-2 of every layer, and
    in int8 each layer puts that image back on an 8-bit grid of about 1.6 levels (the
    carried image sets the tensor's range).  Ten such roundings are most of the int8 widths'
    added error (simulated on w36: the tail reading a float carry cut the deviation from
    fp32 3x).  Here the image reaches the output through one int8 convolution of the input,
    which is exact in 8 bits, and the expanding layer no longer carries it."""

    def __init__(self, tail: SubPixelDeconv, gain: torch.Tensor, k: int = CARRY_CHANNELS) -> None:
        super().__init__()
        self.conv = copy.deepcopy(tail.conv)
        self.skip = nn.Conv2d(k, tail.conv.out_channels, tail.conv.kernel_size, padding=tail.conv.padding)
        self.scale, self.out_channels, self.clamp = tail.scale, tail.out_channels, tail.clamp
        with torch.no_grad():
            self.skip.weight.copy_(tail.conv.weight[:, :k] * gain.view(1, k, 1, 1))
            self.skip.bias.zero_()
            self.conv.weight[:, :k] = 0.0

    def forward(self, body: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return sub_pixel_shuffle(self.conv(body) + self.skip(x), self.scale, self.out_channels, self.clamp)


class SkipFSRCNN(nn.Module):
    """An FSRCNN width whose output gets the input image through ``SkipTail``."""

    def __init__(self, net: FSRCNN) -> None:
        super().__init__()
        self.head_conv, self.body_conv = net.head_conv, net.body_conv
        convs = [m for m in [*net.head_conv.modules(), *net.body_conv.modules()] if isinstance(m, nn.Conv2d)]
        # The carried image's gain on the way to the tail: the product of the identity taps.
        gain = torch.stack([identity_taps(conv) for conv in convs]).prod(dim=0)
        self.tail_conv = SkipTail(net.tail_conv, gain)
        expand = convs[-1]
        with torch.no_grad():  # the expanding layer's carry rows are now unused: zero, they stay zero
            expand.weight[:CARRY_CHANNELS] = 0.0
            expand.bias[:CARRY_CHANNELS] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail_conv(self.body_conv(self.head_conv(x)), x)


def float_form(backbone: Backbone, full_state: dict[str, torch.Tensor], width: int,
               clamp: bool = False, form: str = "plain", flat_relu: bool = False) -> nn.Module:
    """The fp32 serving-form subnet a width's int8 rung is made from (PReLU as leaky ReLU).
    ``clamp``: clip the output to [0, 1] inside the last layer's shuffle (the served form:
    it saves the int8 rung a separate pass over its output, about 9 % of w16's time).
    ``form``: "carry" splits the pass-through taps out (``to_carry_form``; a network without
    them stays plain).  ``flat_relu``: the flattest leaky ReLUs as ReLUs (``flat_leaky_as_relu``)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    net = prelu_as_leaky_relu(extract_subnet(backbone, full_state, width))
    if form == "carry":
        to_carry_form(net)
    if form == "skip" and isinstance(net, FSRCNN) and carry_taps(net.head_conv[0]) is not None:
        net = SkipFSRCNN(net)
    if flat_relu:
        flat_leaky_as_relu(net)
    if clamp and isinstance(getattr(net, "tail_conv", None), (SubPixelDeconv, SkipTail)):
        net.tail_conv.clamp = (0.0, 1.0)
    return net


def _activation_quantizers(prepared: nn.Module) -> list[tuple[str, bool]]:
    """(name, feeds a leaky ReLU flatter than ``RELU_BELOW``) of each activation quantizer
    of a prepared network, in graph order."""
    modules = dict(prepared.named_modules())
    found = []
    for node in prepared.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], qat.DualBoundFakeQuantize):
            users = [modules.get(u.target) for u in node.users if u.op == "call_module"]
            flat = any(isinstance(u, nn.LeakyReLU) and abs(u.negative_slope) < RELU_BELOW for u in users)
            found.append((node.target, flat))
    return found


def state_with_flat_relu(trained: nn.Module, fused: nn.Module) -> dict[str, torch.Tensor]:
    """A trained prepared network's tensors (``trained``: leaky ReLUs) for the same network
    with its flat leaky ReLUs as ReLUs (``fused``, prepared from ``float_form(...,
    flat_relu=True)``): every tensor as trained, less the quantizers of the flat activations'
    inputs, which the fused convolution does not have (its output quantizer is the one that
    followed the activation).  The weights and every remaining grid are unchanged; the
    int8 network then skips one rounding and zeroes the activations' tiny negative side."""
    old, new = _activation_quantizers(trained), _activation_quantizers(fused)
    kept = [name for name, flat in old if not flat]
    if len(kept) != len(new) or any(flat for _n, flat in new):
        raise ValueError(f"the networks do not match: {len(kept)} quantizers kept of {len(old)}, {len(new)} expected")
    rename = {n: o for (n, _f), o in zip(new, kept)}
    source = trained.state_dict()
    state = {}
    for key in fused.state_dict():
        head, _, rest = key.partition(".")
        state[key] = source[f"{rename[head]}.{rest}" if head in rename else key].detach().clone()
    return state


def example_input() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32)


def _capture(module: nn.Module, names: tuple[str, ...] | None) -> tuple[list[torch.Tensor], object | None]:
    """Record the output of the first of ``names`` that ``module`` has."""
    store: list[torch.Tensor] = []
    if names is None:
        return store, None
    present = dict(module.named_modules())
    name = next(n for n in names if n in present)
    handle = present[name].register_forward_hook(lambda _m, _i, out: store.append(out))
    return store, handle


def train_width(teacher: nn.Module, sampler: data.PatchSampler, *, steps: int, batch: int, lr: float,
                bound_lr: float, feature_layer: tuple[str, ...] | None, log_every: int, label: str,
                target: str = "teacher", weight_grid: str = "narrow", loss_fn: str = "l1",
                select_on: list[tuple[str, np.ndarray, np.ndarray]] | None = None, select_every: int = 100,
                student_init: nn.Module | None = None, at_weight: float = AT_WEIGHT,
                feature_from: int = 0) -> tuple[nn.Module, dict]:
    """DDTB 8-bit QAT of one width; returns the trained prepared (fake-quantized) network and
    the step it kept and its validation PSNR (empty without ``select_on``).

    ``target``: what the L1 term pulls the output to: ``hr``, DDTB's choice, or ``teacher``,
    the fp32 width's own output (plain output distillation; better at a small weight step,
    worse at DDTB's, docs/COMPRESSION.md).

    ``select_on``: validation photos.  Every ``select_every`` steps (and once after
    calibration) the network is exported to int8 and its PSNR measured on them; the state
    with the best one is returned.  Why: fine-tuning a trained network on 16-patch batches
    wanders by about 0.1 dB between checkpoints and runs, so where training stops is a draw;
    choosing on held-out photos that are not the test photos makes it a measurement (of
    those photos: ours are smooth wallpapers, and on the plain w36 the chosen step did worse on
    the test photos than another run of the same recipe, docs/COMPRESSION.md).

    ``student_init``: the float network the student starts from, when it is not the teacher
    (the skip form).  ``feature_from``: the first channel the attention-transfer term
    compares (the skip form's carry channels are zero where the teacher's hold the image)."""
    teacher = teacher.eval().requires_grad_(False)
    student = qat.prepare(teacher if student_init is None else student_init, example_input(), weight_grid=weight_grid)
    qat.calibrate(student, [torch.from_numpy(sampler.batch(32)[0]) for _ in range(8)])
    opt = torch.optim.Adam(qat.parameter_groups(student, lr, bound_lr), betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.01)
    t_feat, t_hook = _capture(teacher, feature_layer)
    s_feat, s_hook = _capture(student, feature_layer)
    best: dict = {}

    def select(step: int) -> None:
        db = held_out_psnr(qat.export(student), select_on)
        if not best or db > best["psnr"]:
            best.update(step=step, psnr=db, state=qat.state(student))
        print(f"[{label}] step {step}: validation PSNR {db:.3f} dB (best {best['psnr']:.3f} at step {best['step']})",
              flush=True)

    if select_on:
        select(0)
    start, running = time.time(), []
    for step in range(1, steps + 1):
        lr_np, hr_np = sampler.batch(batch)
        x, hr = torch.from_numpy(lr_np), torch.from_numpy(hr_np)
        t_feat.clear()
        s_feat.clear()
        with torch.no_grad():
            fp32_out = teacher(x)  # also fills the teacher's features for attention transfer
        out, goal = student(x), fp32_out if target == "teacher" else hr
        # MSE times 255: the same order as L1 on these outputs, so the attention term keeps its share.
        loss = F.l1_loss(out, goal) if loss_fn == "l1" else 255 * F.mse_loss(out, goal)
        if feature_layer is not None and at_weight > 0:
            loss = loss + at_weight * attention_transfer_loss(s_feat[-1][:, feature_from:], t_feat[-1][:, feature_from:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running.append(float(loss.detach()))
        if step % log_every == 0 or step == steps:
            rate = step / (time.time() - start)
            print(f"[{label}] step {step}/{steps}  loss {np.mean(running[-log_every:]):.5f}  "
                  f"{rate:.1f} steps/s  eta {(steps - step) / rate / 60:.1f} min", flush=True)
        if select_on and (step % select_every == 0 or step == steps):
            select(step)
    for handle in (t_hook, s_hook):
        if handle is not None:
            handle.remove()
    if best:
        student.load_state_dict(best.pop("state"))
    return student.eval(), best


CORRECTION_BATCHES = 40  # 32-patch batches the output correction is fitted on (1,280 patches, 21 M pixels)


def output_phases(out: torch.Tensor, s: int) -> torch.Tensor:
    """A super-resolved batch (n, c, s*h, s*w) as (s*s*c, pixels): one row per tail output
    channel, in the tail's (ry, rx, c) order (``sub_pixel_shuffle``)."""
    n, c, hs, ws = out.shape
    return out.reshape(n, c, hs // s, s, ws // s, s).permute(3, 5, 1, 0, 2, 4).reshape(s * s * c, -1)


def fit_output_correction(fp32: nn.Module, int8: nn.Module, batches: list[torch.Tensor],
                          scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares gain and offset per tail output channel that map the int8 network's
    (unclipped) output onto the fp32 width's, on training patches.

    Why: after QAT each int8 width still has a small systematic error per sub-pixel phase and
    colour (on the bundled widths gains 0.988-1.010, offsets -1.1 to +0.4 output levels):
    each of the tail's 48 output channels rounds its bias and weights on its own grid, and the
    student ends a little off its teacher. An affine map per channel is bias correction
    (Nagel et al., data-free quantization) with a gain; folded into the tail
    (``fold_output_correction``) it costs nothing at run time."""
    sums = torch.zeros(5, 1, dtype=torch.float64)  # per channel: sums of y, t, y*y, y*t, and the count
    with torch.inference_mode():
        for x in batches:
            y = output_phases(int8(x.contiguous(memory_format=torch.channels_last)).double(), scale)
            t = output_phases(fp32(x).double(), scale)
            sums = sums + torch.stack([y.sum(1), t.sum(1), (y * y).sum(1), (y * t).sum(1),
                                       torch.full((y.shape[0],), float(y.shape[1]), dtype=torch.float64)])
    sy, st, syy, syt, n = sums
    gain = (syt - sy * st / n) / (syy - sy * sy / n)
    offset = (st - gain * sy) / n
    return gain.float(), offset.float()


def fold_output_correction(own: dict[str, torch.Tensor], gain: torch.Tensor,
                           offset: torch.Tensor) -> dict[str, torch.Tensor]:
    """``gain * tail(...) + offset`` folded into a trained width's tensors: each tail
    convolution's output channel (the skip form's skip convolution too) scaled by its gain,
    the offset added to the tail's bias. Exact for the int8 codes: the weights are quantized
    per output channel, so a channel's grid scales with it and its codes stay the same."""
    if bool((gain <= 0).any()):
        raise ValueError("an output correction gain is not positive; the int8 network is broken, not miscalibrated")
    out = dict(own)
    for conv in ("tail_conv.conv", "tail_conv.skip"):
        if f"{conv}.weight" not in own:
            continue
        out[f"{conv}.weight"] = own[f"{conv}.weight"] * gain.view(-1, 1, 1, 1)
        bias = own[f"{conv}.bias"] * gain
        out[f"{conv}.bias"] = bias + offset if conv == "tail_conv.conv" else bias
        for stat in ("scale", "activation_post_process.min_val", "activation_post_process.max_val"):
            key = f"{conv}.weight_fake_quant.{stat}"
            if key in own and own[key].shape == gain.shape:
                out[key] = own[key] * gain
    return out


def held_out_psnr(net: nn.Module, images: list[tuple[str, np.ndarray, np.ndarray]]) -> float:
    """Mean RGB PSNR (4 px crop) of ``net`` applied to whole LR test images (padded to a
    multiple of 4 pixels): the fixed-width number ``models.arm.evaluate`` reports."""
    values = []
    with torch.inference_mode():
        for _name, hr, lr in images:
            x = torch.from_numpy(lr.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
            sr = net(x.contiguous(memory_format=torch.channels_last)).clamp(0, 1)[0].permute(1, 2, 0).numpy()
            sr8 = np.clip(np.rint(sr * 255), 0, 255).astype(np.uint8)
            values.append(psnr_rgb(sr8[: hr.shape[0], : hr.shape[1]], hr))
    return float(np.mean(values))


def load_int8(backbone: Backbone, full_state: dict[str, torch.Tensor],
              folder: Path) -> tuple[dict[int, nn.Module], dict[int, np.ndarray], dict[str, dict]]:
    """The int8 network of every width trained into ``folder``, its table row's per-bin MSE
    ratio to the fp32 width, and its manifest entry by rung name (all empty when the folder
    has none)."""
    path, manifest_path = folder / QAT_FILE, folder / MANIFEST_FILE
    if not path.exists() or not manifest_path.exists():
        return {}, {}, {}
    manifest = artifact.read(manifest_path)
    ratios = {int(w): np.asarray(v, dtype=np.float64) for w, v in manifest.get("table_mse_ratio", {}).items()}
    entries = {r["rung"]: r for r in manifest.get("rungs", [])}
    tensors = load_file(path)
    nets: dict[int, nn.Module] = {}
    for width in backbone.widths:
        prefix = f"w{width}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if own and width in ratios:
            entry = entries.get(f"w{width}-int8")
            nets[width] = int8_width(backbone, full_state, width, own, form(entry), weight_grid(entry), clamp=True,
                                     flat_relu=uses_flat_relu(entry))
    return nets, ratios, entries


def int8_width(backbone: Backbone, full_state: dict[str, torch.Tensor], width: int, own: dict[str, torch.Tensor],
               layout: str, grid: str, clamp: bool = False, flat_relu: bool = False) -> nn.Module:
    """The real int8 network of one width from its trained fake-quantized tensors ``own``,
    in the float ``layout`` and on the weight ``grid`` it was trained with.  ``clamp``: the
    served form, its output clipped to [0, 1] and written on the 8-bit image grid
    (``output_on_image_grid``)."""
    net = qat.load(float_form(backbone, full_state, width, clamp=clamp, form=layout, flat_relu=flat_relu),
                   example_input(), own, weight_grid=grid)
    if clamp:
        output_on_image_grid(net)
    return net


IMAGE_GRID = (1.0 / 255.0, 0)  # (scale, zero point): quint8 codes 0-255 are the 8-bit image's levels in [0, 1]


def output_on_image_grid(net: torch.fx.GraphModule) -> bool:
    """Have an int8 width's last layer write its output on the 8-bit image grid, and hand
    the int8 tensor to the shuffle (in place; True if the graph had that shape).

    Why: the served output is clipped to [0, 1] and ends as an 8-bit image.  On the trained
    output grid it is rounded once there, clipped, and rounded to 1/255 again when encoded.
    Requantized straight onto the image's own levels (scale 1/255, zero point 0) it is rounded
    once, and quint8's saturation is the clip, so the shuffle's clip pass goes
    (``nets._dequantized_within``).  What the network computes before that last rounding is
    unchanged; the bundled w16-int8 gained 0.03 dB on the test photos (w36, w56: 0.001-0.003)."""
    import torch.ao.nn.quantized as nnq

    scale, zero_point = IMAGE_GRID
    for node in net.graph.nodes:
        if not (node.op == "call_function" and node.target is sub_pixel_shuffle and node.args[3] == (0.0, 1.0)):
            continue
        dequantize = node.args[0]
        if not (dequantize.op == "call_method" and dequantize.target == "dequantize" and len(dequantize.users) == 1):
            return False
        producer = dequantize.args[0]
        if producer.op == "call_module" and isinstance(net.get_submodule(producer.target), nnq.Conv2d):
            conv = net.get_submodule(producer.target)
            conv.scale, conv.zero_point = scale, zero_point
        elif producer.op == "call_function" and producer.target is torch.ops.quantized.add:
            for attr, value in zip(producer.args[2:4], (scale, zero_point)):
                getattr(net, attr.target).fill_(value)
        else:
            return False
        node.replace_input_with(dequantize, producer)
        net.graph.erase_node(dequantize)
        net.recompile()
        return True
    return False


def _recorded(entry: dict | None, key: str, before_recorded: object) -> object:
    """What a rung's manifest entry records under ``calibration.key``, or what rungs made
    before it was recorded had (``before_recorded``)."""
    return ((entry or {}).get("calibration") or {}).get(key, before_recorded)


def form(entry: dict | None) -> str:
    """The float layout a rung was trained in (rungs trained before the choice: plain)."""
    return _recorded(entry, "form", "plain")


def uses_flat_relu(entry: dict | None) -> bool:
    """Whether a rung's flat leaky ReLUs run as ReLUs fused into their convolutions (rungs
    made before the choice: no)."""
    return bool(_recorded(entry, "flat_relu", False))


def weight_grid(entry: dict | None) -> str:
    """The int8 weight grid a rung was trained on (rungs trained before the choice was
    recorded used torch.ao's full grid)."""
    return _recorded(entry, "weight_grid", "full")


def table_mse_ratio(table, fp32: nn.Module, int8: nn.Module, images: list[tuple[str, np.ndarray, np.ndarray]],
                    step: int = 8) -> np.ndarray:
    """Per bin of ``table``, the int8 network's mean patch MSE over the fp32 network's, on the
    validation patches (bins without a patch take the median ratio)."""
    from models.arm.build_table import patch_errors

    scores, mse = patch_errors([fp32, int8], images, step)
    idx, a, b = table.bins(scores), mse[:, 0], mse[:, 1]
    n = len(table.x_centers)
    counts = np.bincount(idx, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.bincount(idx, weights=b, minlength=n) / np.bincount(idx, weights=a, minlength=n)
    ratio[counts == 0] = np.nan
    ratio[~np.isfinite(ratio)] = np.nanmedian(ratio)
    return ratio


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="bundle folder (default: the checkpoint's)")
    ap.add_argument("--widths", default="all", help="comma-separated widths, or all")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-5, help="weights (DDTB: 1e-4)")
    ap.add_argument("--bound-lr", type=float, default=1e-2, help="activation bounds (DDTB: 1e-2)")
    ap.add_argument("--measure-only", action="store_true",
                    help="train nothing: measure the int8 widths already in --out again (quality, table rows)")
    ap.add_argument("--correct-only", action="store_true",
                    help="train nothing: fit the output correction of the int8 widths already in --out, fold it "
                         "into their tails and measure them again")
    ap.add_argument("--no-output-correction", dest="output_correction", action="store_false",
                    help="after training, do not fit and fold the per-channel output gain and offset "
                         "(fit_output_correction)")
    ap.add_argument("--split", default="train-ext", help="training photos")
    ap.add_argument("--target", choices=["hr", "teacher"], default="teacher",
                    help="the L1 term's target: the fp32 width's output (default) or the HR patch (DDTB)")
    ap.add_argument("--weight-grid", choices=list(qat.WEIGHT_GRIDS), default="narrow",
                    help="int8 weight codes [-127, 127] (narrow: each channel's largest weight exact) or [-128, 127]")
    ap.add_argument("--form", choices=list(FORMS), default="plain",
                    help="plain: the network as it is; carry: split the pass-through taps into their own "
                         "convolution and fuse flat leaky ReLUs as ReLUs (a network without pass-through taps stays "
                         "plain). carry halves post-training int8's loss but after QAT ends where plain does. "
                         "skip: add the input image at the tail through an int8 convolution of its own instead of "
                         "carrying it through every layer (the bundled w36 and w56: 0.26 dB lost instead of "
                         "0.33-0.36 before the output correction, about 12 %% slower; docs/COMPRESSION.md)")
    ap.add_argument("--flat-relu", action="store_true",
                    help=f"run the leaky ReLUs flatter than {RELU_BELOW:g} as ReLUs fused into their convolutions "
                         "(ours: the head's and the expanding layer's; 5-15 %% faster int8, about 0.005 dB). With "
                         "training the student is trained that way; with --measure-only or --correct-only the widths "
                         "already in --out are moved to it first, their trained tensors kept (state_with_flat_relu)")
    ap.add_argument("--loss", choices=["l1", "mse"], default="l1", help="the pixel term (DDTB: L1)")
    ap.add_argument("--at-weight", type=float, default=AT_WEIGHT,
                    help=f"weight of the attention-transfer term (DDTB: {AT_WEIGHT:g}; 0: none)")
    ap.add_argument("--select-every", type=int, default=0,
                    help="export and measure on the validation photos every N steps and keep the best step "
                         "(default 0: keep the last; the validation photos are smooth wallpapers, so this favours "
                         "flat regions: docs/COMPRESSION.md)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from models.arm.pipeline import ArmSR  # the loader of both checkpoint kinds

    model = ArmSR.from_checkpoint(args.checkpoint, int8=False)
    backbone, full_state = model.backbone, model.full_state
    widths = backbone.widths if args.widths == "all" else tuple(int(w) for w in args.widths.split(","))
    out = args.out or artifact.bundle_dir(args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    sampler = data.PatchSampler([(hr, lr) for _n, hr, lr in data.load_split(args.split)], seed=args.seed)
    test, val = data.load_split("test"), data.load_split("val")
    command = artifact.command_line("models.arm.quantize", argv)

    tensors = load_file(out / QAT_FILE) if (out / QAT_FILE).exists() else {}
    manifest_path = out / MANIFEST_FILE
    old = artifact.read(manifest_path) if manifest_path.exists() else {}
    previous = {r["rung"]: r for r in old.get("rungs", [])}
    ratios = dict(old.get("table_mse_ratio", {}))
    for width in widths:
        prefix = f"w{width}."
        entry = previous.get(f"w{width}-int8")
        if args.measure_only or args.correct_only:
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not own or entry is None:
                raise SystemExit(f"no trained int8 w{width} in {out / QAT_FILE}")
            width_form, grid, relu = form(entry), weight_grid(entry), uses_flat_relu(entry)
            if args.flat_relu and not relu:
                trained = qat.prepare(float_form(backbone, full_state, width, form=width_form), example_input(),
                                      weight_grid=grid)
                trained.load_state_dict(own)
                fused = qat.prepare(float_form(backbone, full_state, width, form=width_form, flat_relu=True),
                                    example_input(), weight_grid=grid)
                own, relu = state_with_flat_relu(trained, fused), True
                entry["calibration"].update(flat_relu=True, flat_relu_command=command)
        else:
            # The skip form is a different network (it learns to do without the carried image):
            # it starts from the fp32 width and learns from it, attention transfer on the body
            # features but the carry channels (zero in the student, the image in the teacher).
            skip, relu = args.form == "skip", args.flat_relu
            teacher = float_form(backbone, full_state, width, form="plain" if skip else args.form)
            student = (float_form(backbone, full_state, width, form=args.form, flat_relu=relu)
                       if skip or relu else None)
            prepared, selection = train_width(
                teacher, sampler, steps=args.steps, batch=args.batch, lr=args.lr, bound_lr=args.bound_lr,
                feature_layer=FEATURE_LAYER.get(backbone.name), log_every=args.log_every,
                at_weight=args.at_weight, feature_from=CARRY_CHANNELS if skip else 0,
                label=f"w{width}", student_init=student,
                target=args.target, loss_fn=args.loss, weight_grid=args.weight_grid,
                select_on=val if args.select_every > 0 else None, select_every=args.select_every)
            own, width_form, grid = qat.state(prepared), args.form, args.weight_grid
        served_fp32 = float_form(backbone, full_state, width)  # the fp32 rung, whatever form the teacher had
        correction = None
        if args.correct_only or (not args.measure_only and args.output_correction):
            unclipped = int8_width(backbone, full_state, width, own, width_form, grid, flat_relu=relu)
            batches = [torch.from_numpy(sampler.batch(32)[0]) for _ in range(CORRECTION_BATCHES)]
            gain, offset = fit_output_correction(served_fp32, unclipped, batches, SCALE)
            own = fold_output_correction(own, gain, offset)
            correction = {"fit_on": f"{args.split}, {CORRECTION_BATCHES * 32} random 32x32 patches",
                          "to": "the fp32 width's output, least squares per tail output channel",
                          "gain": [round(float(gain.min()), 5), round(float(gain.max()), 5)],
                          "offset_levels": [round(float(offset.min()) * 255, 4), round(float(offset.max()) * 255, 4)],
                          "command": command}
            print(f"w{width}: output correction gains {correction['gain']}, offsets {correction['offset_levels']} "
                  f"levels (folded into the tail)", flush=True)
        tensors = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
        tensors.update({prefix + k: v for k, v in own.items()})
        int8 = int8_width(backbone, full_state, width, own, width_form, grid, clamp=True, flat_relu=relu)  # as served
        fp32_db, int8_db = held_out_psnr(served_fp32, test), held_out_psnr(int8, test)
        print(f"w{width}: test PSNR fp32 {fp32_db:.3f} dB, int8 {int8_db:.3f} dB ({int8_db - fp32_db:+.3f})", flush=True)
        ratios[str(width)] = [round(float(v), 5) for v in table_mse_ratio(model.table, served_fp32, int8, val)]
        rung = f"w{width}-int8"
        quality = {"psnr_rgb": round(int8_db, 4), "fp32_psnr_rgb": round(fp32_db, 4),
                   "drop_db": round(fp32_db - int8_db, 4)}
        if args.measure_only or args.correct_only:
            previous[rung]["quality"] = {**quality, "measured_by": command}
            if correction is not None:
                previous[rung]["calibration"]["output_correction"] = correction
        else:
            previous[rung] = artifact.RungArtifact(
                rung=rung, method="qat-ddtb-8bit", bits={"weights": 8, "activations": 8},
                backend=f"torch.ao {ENGINE}", real_speed=True, quality=quality,
                calibration={"split": args.split, "steps": args.steps, "batch": args.batch, "lr": args.lr,
                             "bound_lr": args.bound_lr, "seed": args.seed, "weight_grid": args.weight_grid,
                             "form": args.form, "flat_relu": relu, "at_weight": args.at_weight,
                             "selected": ({"on": "val split, int8 PSNR", "step": selection["step"],
                                           "psnr_rgb": round(selection["psnr"], 4), "every": args.select_every}
                                          if selection else "the last step"),
                             "loss": f"{args.loss.upper()} to the {'fp32 output' if args.target == 'teacher' else 'HR patch'} + "
                                     f"{args.at_weight:g} x attention transfer",
                             "output_correction": correction or "none"},
                command=command)
        save_file(tensors, str(out / QAT_FILE))
        artifact.write(manifest_path, list(previous.values()), date=date.today().isoformat(),
                       test_images="test split: " + ", ".join(p.name for p in data.split("test")),
                       table_rows="per width, per bin of the checkpoint's table: the int8 rung's mean patch MSE "
                                  "over its fp32 width's on the val split",
                       table_mse_ratio=ratios)
    print(f"int8 rungs written to {out / QAT_FILE} and {manifest_path}")


if __name__ == "__main__":
    main()
