"""Training and writing one dense MobileNetV1 variant of a PSS-Net bundle: the loop and the
file format that CLR-RNF fine-tuning (``models.pssnet.prune``), DCFF and its plain baseline
(``models.pssnet.compact``), and OptG and magnitude pruning (``models.pssnet.sparse``) share.

One loop, so that a method and its baseline differ only in what the method changes (a hook
before each step, extra parameter groups, the model's own modules), never in data order,
augmentation, optimiser or schedule:

* data: the glyph training split, in a permutation per epoch fixed by ``(seed, epoch)``,
  the glyph training augmentation seeded per step, so an interrupted run resumes on the
  very batches it would have seen;
* SGD with momentum 0.9 (Nesterov), weight decay on convolution and classifier weights
  but not depth-wise ones (``pssnet.train.param_groups``), cosine learning rate over the
  run with an optional linear warm-up, cross-entropy with optional label smoothing;
* a state file every ``save_every`` steps (model, optimiser, scheduler, step): rerunning
  the same command continues from it.

A variant is written as ``model.safetensors`` (a ``DenseSubnet`` with its BN layers, not
folded) and ``manifest.json``; ``PssNetModel`` serves the variants found under a bundle's
``variants/`` folder as rungs of the same /classify ladder (see ``load_variant``).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from models.pssnet.nets import BlockWidths, DenseSubnet, SubnetConfig, SubnetWidths, SupernetSpec, widths_flops

REPORT_EVERY = 250  # steps between lines of training loss and accuracy
VARIANTS = "variants"  # a bundle's sub-folder of served dense variants, one folder each


@dataclass
class TrainConfig:
    steps: int
    batch: int = 64
    lr: float = 0.01
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    seed: int = 0
    save_every: int = 500
    bf16_autocast: bool = False  # forward and backward products in bf16, weights and optimiser in float32

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def say(tag: str, msg: str) -> None:
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def train(net: nn.Module, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, *,
          state_path: Path | None = None, extra_groups: list[dict] | None = None,
          before_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
          desc: str = "train", input_size: int | None = None, channels_last: bool = False) -> nn.Module:
    """Train ``net`` in place for ``cfg.steps`` steps (train-mode BN), resumable from
    ``state_path``. ``extra_groups``: parameter groups beyond the network's weights (e.g.
    OptG's scores), each with its own settings; ``before_step(step, optimiser)`` runs before
    every step's forward pass (a method's schedule: re-fusing, re-masking, a group's lr).
    The cosine schedule sets every group's ``lr`` from its ``initial_lr``; a hook that wants
    another rate sets it after. ``input_size``: the training crop (default: the network's
    ``spec.input_size``); ``channels_last``: feed the batches in that memory layout (oneDNN's
    convolutions train about 1.25x faster so on a CPU; the same arithmetic, summed in
    another order). ``cfg.bf16_autocast``: products in bf16 under ``torch.autocast``
    (about 1.9x faster training of the half-width ResNet-56 on a CPU with AMX; the loss,
    the weights and the optimiser stay float32), for long comparisons both sides run alike."""
    from models.common.progress import progress
    from models.pssnet.data import Augment
    from models.pssnet.train import param_groups

    augment = Augment.demo(input_size or net.spec.input_size)
    device_type = next(net.parameters()).device.type
    if cfg.bf16_autocast:
        from compress.bf16 import native_bf16

        if not native_bf16(device_type):
            say(desc, "bf16 autocast on a device without native bf16 products: expect it slower than float32")
    ids = {id(p) for g in (extra_groups or []) for p in g["params"]}
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]}
              for g in param_groups(net, cfg.weight_decay)] + list(extra_groups or [])
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * t))

    start = 0
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)  # our own file: tensors and dicts
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        say(desc, f"resumed at step {start}/{cfg.steps}")

    def save(step: int) -> None:
        if state_path is not None:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step}, tmp)
            tmp.replace(state_path)

    net.train()
    per_epoch = len(labels) // cfg.batch
    seen = {"loss": 0.0, "correct": 0, "n": 0}  # since the last report: a run that stalls shows it
    for step in progress(range(start, cfg.steps), total=cfg.steps, initial=start, desc=desc, log_interval=30):
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(step)
        if before_step is not None:
            before_step(step, opt)
        order = np.random.default_rng((cfg.seed, step // per_epoch)).permutation(len(labels))
        idx = order[(step % per_epoch) * cfg.batch:(step % per_epoch + 1) * cfg.batch]
        x = augment(torch.from_numpy(images[idx]), torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(labels[idx])
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            logits = net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen["loss"] += float(loss.detach()) * len(y)
        seen["correct"] += int((logits.detach().argmax(1) == y).sum())
        seen["n"] += len(y)
        if (step + 1) % REPORT_EVERY == 0 or step + 1 == cfg.steps:
            say(desc, f"step {step + 1}: training loss {seen['loss'] / seen['n']:.3f}, "
                      f"batch top-1 {100 * seen['correct'] / seen['n']:.1f} % (last {seen['n']} images), "
                      f"lr {opt.param_groups[0]['lr']:.4f}")
            seen = {"loss": 0.0, "correct": 0, "n": 0}
        if (step + 1) % cfg.save_every == 0:
            save(step + 1)
    save(cfg.steps)
    return net.eval()


def training_split() -> tuple[np.ndarray, np.ndarray]:
    from models.glyphs.data import load_split

    s = load_split("train")
    return np.ascontiguousarray(s.images), np.asarray(s.labels, dtype=np.int64)


def held_out(preprocess: Callable[[np.ndarray], torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The glyph set's val and test splits, preprocessed as the served model does."""
    from models.glyphs.data import load_split

    out = {}
    for split in ("val", "test"):
        s = load_split(split)
        out[split] = (torch.stack([preprocess(i) for i in s.images]), torch.from_numpy(s.labels))
    return out


def accuracy(net: Callable[[torch.Tensor], torch.Tensor], sets: dict) -> dict[str, float]:
    from compress.artifact import top1

    if isinstance(net, nn.Module):
        net.eval()
    return {split: round(top1(net, x, y), 4) for split, (x, y) in sets.items()}


def layer_widths(widths: SubnetWidths) -> list[int]:
    """MobileNetV1 widths as one list: the stem's, then every block's output."""
    return [widths.stem] + [b.cout for b in widths.blocks]


def mobilenet_widths(like: SubnetWidths, keep: list[int]) -> SubnetWidths:
    """MobileNetV1 widths with ``keep[0]`` stem filters and ``keep[i]`` outputs in block i
    (strides from ``like``)."""
    from dataclasses import replace

    blocks = []
    for b, cin, cout in zip(like.blocks, keep[:-1], keep[1:]):
        blocks.append(BlockWidths(cin, cin, cout, b.stride, expand=False, residual=False))
    return replace(like, stem=keep[0], blocks=tuple(blocks), features=keep[-1])


def write_variant(out: Path, net: DenseSubnet, manifest: dict) -> dict:
    """Write ``net`` (with its BN layers) and ``manifest`` (completed with what a loader
    needs: the cfg it was built on, its widths and FLOPs) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    manifest = {**manifest, "format": "pssnet-dense-variant", "cfg": net.cfg.to_dict(),
                "widths": layer_widths(net.widths), "resolution": net.resolution,
                "mflops": round(widths_flops(net.spec, net.widths, net.resolution), 4)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_variant(folder: Path, spec: SupernetSpec) -> tuple[DenseSubnet, dict]:
    """A variant written by ``write_variant``: the network (eval mode, BN not folded) and its manifest."""
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("format") != "pssnet-dense-variant":
        raise ValueError(f"{folder}: not a PSS-Net dense variant (format {manifest.get('format')!r})")
    cfg = SubnetConfig.from_dict(manifest["cfg"])
    from models.pssnet.nets import subnet_widths

    widths = mobilenet_widths(subnet_widths(spec, cfg), manifest["widths"])
    net = DenseSubnet(spec, cfg, widths)
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    return net.eval(), manifest
