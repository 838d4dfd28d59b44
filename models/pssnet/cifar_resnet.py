"""The CIFAR ResNet (He et al. 2016, section 4.2) that the filter-pruning papers use as their
workhorse, with a compact inner width per block: ResNet-56 by default.

Why it is here: DCFF is checked on our MobileNetV1 (``models.pssnet.compact``), and the
method's own CIFAR results are on ResNet-56; this is that network on the glyph set (32x32
images, like CIFAR), so the comparison with plain training can be repeated on the
architecture the paper reports. It is not served (about 60 million multiply-accumulates per
image at half inner width, four times the largest /classify rung).

Layout: a 3x3 stem to 16 channels, three stages of ``(depth - 2) / 6`` basic blocks at 16,
32 and 64 channels (the first block of stages 2 and 3 strides by 2), global average pooling
and one linear layer. A block is ``conv3x3 -> BN -> ReLU -> conv3x3 -> BN``, added to its
input, then ReLU; where the shape changes, the shortcut is the paper's option A (every
second pixel, zero channels appended), so it has no weights. As in the pruning papers'
compact ResNets, only a block's *inner* width (the first convolution's outputs) is
compact: the residual path keeps the stage width, so every block's output can still be
added to its input.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress.dcff import compact_width

STAGE_WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, inner: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad_channels = stride, cout - cin

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.pad_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad_channels))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """``inner[i]``: the inner width of block ``i`` (``None``: every block at its stage width)."""

    input_size = 32

    def __init__(self, depth: int = 56, num_classes: int = 10, inner: list[int] | None = None) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2, not {depth}")
        per_stage = (depth - 2) // 6
        full = block_widths(depth)
        inner = full if inner is None else list(inner)
        if len(inner) != len(full) or any(not 0 < m <= n for m, n in zip(inner, full)):
            raise ValueError(f"inner widths must be {len(full)} values, each in 1..its stage width")
        self.depth, self.inner = depth, inner
        self.stem = nn.Sequential(nn.Conv2d(3, STAGE_WIDTHS[0], 3, 1, 1, bias=False), nn.BatchNorm2d(STAGE_WIDTHS[0]),
                                  nn.ReLU(inplace=True))
        blocks, cin = [], STAGE_WIDTHS[0]
        for i, width in enumerate(full):
            stride = 2 if i % per_stage == 0 and i >= per_stage else 1
            blocks.append(BasicBlock(cin, inner[i], width, stride))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def block_widths(depth: int = 56) -> list[int]:
    """Every block's stage width (its inner width when nothing is pruned)."""
    per_stage = (depth - 2) // 6
    return [w for w in STAGE_WIDTHS for _ in range(per_stage)]


def compact_inner(depth: int, keep: float) -> list[int]:
    """``floor(keep * n)`` (at least 1) of every block's inner width."""
    return [compact_width(n, keep) for n in block_widths(depth)]


def init_weights(net: nn.Module) -> None:
    """He-normal convolutions (fan-out), BN at 1 / 0, the linear layer as PyTorch's default."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def zero_last_bn(net: nn.Module) -> None:
    """Each block's second BN scale to 0 (Goyal et al. 2017), so that every block starts as
    its shortcut.  Not what the pruning papers' ResNet-56 does; offered because with the
    papers' initialisation it sits at chance for the first 750-2,000 steps on the glyphs
    (docs/COMPRESSION.md)."""
    for m in net.modules():
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)


FORMAT = "cifar-resnet"


def save(out: Path, net: CifarResNet, manifest: dict) -> dict:
    """Write ``net`` (BN not folded) as ``model.safetensors`` and ``manifest`` (completed with
    what ``load`` needs: depth, inner widths, classes count, and the network's MACs) into ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    from compress.artifact import macs

    manifest = {**manifest, "format": FORMAT, "depth": net.depth, "inner_widths": net.inner,
                "num_classes": net.fc.out_features, "mflops": round(macs(net) / 1e6, 3),
                "params": sum(p.numel() for p in net.parameters())}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load(folder: Path) -> tuple[CifarResNet, dict]:
    """A network written by ``save`` (eval mode) and its manifest."""
    from safetensors.torch import load_file

    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder}: not a {FORMAT} network (format {manifest.get('format')!r})")
    net = CifarResNet(manifest["depth"], manifest["num_classes"], manifest["inner_widths"])
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    return net.eval(), manifest
