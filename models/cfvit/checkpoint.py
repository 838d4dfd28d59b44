"""Loading CF-ViT weights: the official ``.pth`` releases and our own safetensors.

Official files (the authors' released ``.pth``) are dicts with ``model`` (the state dict),
``flop`` ([coarse, coarse+fine] GFLOPs, i.e. GMACs), ``anytime_classification`` ([coarse top-1, fine top-1])
and ``budgeted_batch_classification`` ([100 GFLOPs values, 100 accuracies] for eta =
0.00 ... 0.99).  They hold only tensors, lists and numbers and load with
``torch.load(weights_only=True)``; the state dict is loaded strictly, as the official
``dynamic_inference.py`` does.  The variant (DeiT-S or LV-ViT-S, 7x7 or 9x9) is read from
the tensors: ``aux_head`` / ``patch_embed.conv1`` mean LV-ViT, the coarse positional
embedding's length gives the grid.

Our own weights are ``model.safetensors`` with a ``manifest.json`` beside it whose
``config`` entry is a :class:`CfVitConfig`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.cfvit.model import CONFIGS, CfVisionTransformer, CfVitConfig, count_macs

OFFICIAL_KEYS = ("model", "flop", "anytime_classification", "budgeted_batch_classification")


@dataclass
class LoadedCheckpoint:
    model: CfVisionTransformer
    config: CfVitConfig
    source: str  # "official" or "ours"
    meta: dict = field(default_factory=dict)  # official: flop/anytime/budgeted; ours: the manifest


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in sd.items()}


def config_from_official_state(sd: dict[str, torch.Tensor]) -> CfVitConfig:
    """The official variant that matches a state dict's names and shapes."""
    if "pos_embed_list.0" not in sd or "head.weight" not in sd:
        raise ValueError("not a CF-ViT state dict (no pos_embed_list.0 / head.weight)")
    family = "cf_lvvit_small" if ("aux_head.weight" in sd or "patch_embed.conv1.weight" in sd) else "cf_deit_small"
    n_coarse = sd["pos_embed_list.0"].shape[1] - 1
    grid = math.isqrt(n_coarse)
    if grid * grid != n_coarse:
        raise ValueError(f"coarse positional embedding has {n_coarse} patch positions, not a square grid")
    name = f"{family}_{grid}"
    base = CONFIGS.get(name)
    if base is None:
        base = replace(CONFIGS[f"{family}_7"], name=name, img_size=32 * grid)
    num_classes = sd["head.weight"].shape[0]
    return replace(base, num_classes=num_classes) if num_classes != base.num_classes else base


def _official_meta(ckpt: dict) -> dict:
    meta = {k: ckpt[k] for k in OFFICIAL_KEYS[1:] if k in ckpt}
    for k, v in list(meta.items()):
        if isinstance(v, torch.Tensor):
            meta[k] = v.tolist()
    return meta


def load_official(path: str | Path) -> LoadedCheckpoint:
    """An official CF-ViT ``.pth`` (or a bare state dict with the official names)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint dict")
    sd = ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: 'model' is not a state dict of tensors")
    sd = _strip_prefix(sd)
    cfg = config_from_official_state(sd)
    model = CfVisionTransformer(cfg, init_weights=False)
    model.load_state_dict(sd, strict=True)
    return LoadedCheckpoint(model.eval(), cfg, "official", _official_meta(ckpt))


def official_curve(meta: dict, cfg: CfVitConfig) -> list[dict]:
    """The authors' ImageNet-val eta curve from ``budgeted_batch_classification`` (eta =
    0.00 ... 0.99) as {eta, exit_rate, expected_flops (MACs), accuracy (0..1)}.  The exit rate
    is recovered from the cost: (C_full - C(eta)) / C_fine_increment with the file's ``flop``
    pair.  A point at eta = 1.01 (all fine) is appended from ``anytime_classification``."""
    bb = meta.get("budgeted_batch_classification")
    if not bb or len(bb) != 2:
        return []
    flops, accs = bb
    if "flop" in meta:
        c0, c1 = (float(v) * 1e9 for v in meta["flop"])
    else:
        m = count_macs(cfg)
        c0, c1 = float(m.coarse), float(m.full)
    scale = 100.0 if max(accs) > 1.0 else 1.0
    curve = []
    for i, (g, a) in enumerate(zip(flops, accs)):
        e = float(g) * 1e9
        p = min(max((c1 - e) / (c1 - c0), 0.0), 1.0) if c1 > c0 else 0.0
        curve.append({"eta": round(i / 100, 2), "exit_rate": p, "expected_flops": e, "accuracy": float(a) / scale})
    anytime = meta.get("anytime_classification")
    if anytime and len(anytime) == 2:
        curve.append({"eta": 1.01, "exit_rate": 0.0, "expected_flops": c1, "accuracy": float(anytime[1]) / scale})
    return curve


def save_ours(model: CfVisionTransformer, out_dir: str | Path, manifest: dict) -> Path:
    """``out_dir/model.safetensors`` + ``out_dir/manifest.json`` (config written into it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"))
    manifest = {**manifest, "config": model.cfg.to_dict(), "weights": "model.safetensors"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out / "model.safetensors"


def load_ours(path: str | Path) -> LoadedCheckpoint:
    """Our ``model.safetensors``; its configuration comes from the ``manifest.json`` beside it."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    man_path = path.with_name("manifest.json")
    if not man_path.exists():
        raise FileNotFoundError(f"{man_path} (the configuration of {path.name}) does not exist")
    manifest = json.loads(man_path.read_text())
    cfg = CfVitConfig.from_dict(manifest["config"])
    model = CfVisionTransformer(cfg, init_weights=False)
    model.load_state_dict(load_file(str(path)), strict=True)
    return LoadedCheckpoint(model.eval(), cfg, "ours", manifest)


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Dispatch on the file: ``.safetensors`` (or a directory holding one) is ours, anything
    else is treated as an official ``.pth``."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".safetensors":
        return load_ours(p)
    return load_official(p)
