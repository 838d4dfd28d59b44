"""PSS-Net checkpoints: the official ``checkpoint_*.pt`` and our own bundle.

Official files (``checkpoint_{epoch}.pt``, written by the authors' training script) are
``torch.save`` dicts holding the DataParallel state dict (``module.`` prefixes), the
optimiser and scheduler states, ``arch_pools`` and RNG states,
one of which (``np_random_state``) is a numpy array.  We read them with torch's restricted
``weights_only`` unpickler and an allowlist of exactly the numpy reconstruction functions
and dtypes such a state needs, so a malicious pickle is refused instead of run.  Pool keys
are ``str(dict)`` cfgs, parsed with ``ast.literal_eval`` (never ``eval``).

Our bundle is a folder: ``model.safetensors`` (the supernet's shared tensors, official key
names without ``module.``), ``bn_stats.safetensors`` (the recalibrated BN statistics of
every retained subnet, keyed ``<rung>:<key>``) and ``manifest.json`` (spec, rungs, metrics,
training record).  The supernet's own BN buffers are stored only for completeness: they
hold the statistics of the last subnet trained and are never used for serving.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.pssnet.nets import PssSupernet, SubnetConfig, SupernetSpec, official_spec
from models.pssnet.pools import top1_per_pool


def _numpy_allowlist() -> list:
    """The globals a pickled numpy RNG state (a uint32 array, ints and a float) or numpy
    scalar refers to, and nothing else; each reconstruction function under both its numpy 2
    name and the numpy 1.x name (``numpy.core.multiarray``) that older files use."""
    from numpy._core import multiarray

    allowed: list = [np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in ("uint32", "float64", "float32", "int64", "int32", "bool", "uint8")]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        allowed += [fn, (fn, f"numpy.core.multiarray.{fn.__name__}")]
    return allowed


def restricted_load(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True`` plus the numpy allowlist: tensors, plain
    containers and numpy arrays only.  Anything else (``os.system``, arbitrary classes)
    raises ``pickle.UnpicklingError``."""
    with torch.serialization.safe_globals(_numpy_allowlist()):
        return torch.load(Path(path), map_location="cpu", weights_only=True)


def strip_module(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in sd.items()}


def infer_spec(sd: dict[str, torch.Tensor]) -> SupernetSpec:
    """The official spec the state dict belongs to (MBV2 has ``.body.`` blocks), with the
    number of classes read from the classifier."""
    name = "mobilenet_v2" if any(".body." in k for k in sd) else "mobilenet_v1"
    return official_spec(name, num_classes=int(sd["classifier.0.weight"].shape[0]))


@dataclass
class OfficialCheckpoint:
    spec: SupernetSpec
    state_dict: dict[str, torch.Tensor]
    arch_pools: dict | None
    epoch: int | None

    def build_supernet(self) -> PssSupernet:
        """The supernet with the checkpoint's tensors; strict, so a key or shape mismatch fails."""
        net = PssSupernet(self.spec)
        net.load_state_dict(self.state_dict, strict=True)
        return net.eval()

    def retained_subnets(self) -> list[tuple[str, SubnetConfig, dict]]:
        """(rung name, cfg, pool info) for each pool's top-1 cfg, plus max_net and min_net."""
        out: list[tuple[str, SubnetConfig, dict]] = [
            ("max", self.spec.max_cfg(), {"type": "max_net"}),
            ("min", self.spec.min_cfg(), {"type": "min_net"})]
        if self.arch_pools:
            prefix = {"flops": "f", "latency_gpu": "g", "latency_cpu": "c"}
            for kind, target, cfg, score in top1_per_pool(self.arch_pools):
                if cfg.model_name != self.spec.model_name:
                    raise ValueError(f"pool cfg for {cfg.model_name} in a {self.spec.model_name} checkpoint")
                out.append((f"{prefix.get(kind, kind)}{target}", cfg,
                            {"type": kind, "target": target, "score": score}))
        return out


def load_official_checkpoint(path: str | Path) -> OfficialCheckpoint:
    """Read an official PSS-Net ``checkpoint_*.pt`` (or a bare state dict) safely."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    obj = restricted_load(path)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        sd, pools, epoch = obj["model"], obj.get("arch_pools"), obj.get("last_epoch")
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, pools, epoch = obj, None, None
    else:
        raise ValueError(f"{path} is neither a PSS-Net checkpoint nor a state dict")
    sd = strip_module(sd)
    if "classifier.0.weight" not in sd:
        raise ValueError(f"{path}: no classifier.0.weight, not a PSS-Net MobileNet state dict")
    return OfficialCheckpoint(infer_spec(sd), sd, pools, None if epoch is None else int(epoch))


# ----------------------------------------------------------------------------------------
# Our bundle
# ----------------------------------------------------------------------------------------

BUNDLE_WEIGHTS, BUNDLE_BN, BUNDLE_MANIFEST = "model.safetensors", "bn_stats.safetensors", "manifest.json"


def save_bundle(out_dir: str | Path, supernet: PssSupernet, bn_stats: dict[str, dict[str, torch.Tensor]],
                manifest: dict) -> Path:
    """Write the three files; ``manifest['rungs']`` must name every key of ``bn_stats``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    missing = {r["name"] for r in manifest["rungs"]} ^ set(bn_stats)
    if missing:
        raise ValueError(f"rungs and BN statistics differ: {sorted(missing)}")
    save_file({k: v.detach().contiguous().cpu() for k, v in supernet.state_dict().items()},
              str(out / BUNDLE_WEIGHTS), metadata={"format": "pssnet-supernet"})
    flat = {f"{rung}:{k}": v.contiguous().cpu() for rung, stats in bn_stats.items() for k, v in stats.items()}
    save_file(flat, str(out / BUNDLE_BN), metadata={"format": "pssnet-bn-stats"})
    manifest = {**manifest, "weights": BUNDLE_WEIGHTS, "bn_stats": BUNDLE_BN}
    (out / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out / BUNDLE_MANIFEST


@dataclass
class Bundle:
    spec: SupernetSpec
    supernet: PssSupernet
    bn_stats: dict[str, dict[str, torch.Tensor]]
    manifest: dict


def load_bundle(path: str | Path) -> Bundle:
    """Load our bundle from its folder, its ``manifest.json`` or its ``model.safetensors``."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    manifest = json.loads((folder / BUNDLE_MANIFEST).read_text())
    spec = SupernetSpec.from_dict(manifest["spec"])
    net = PssSupernet(spec)
    net.load_state_dict(load_file(str(folder / manifest.get("weights", BUNDLE_WEIGHTS))), strict=True)
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(folder / manifest.get("bn_stats", BUNDLE_BN))).items():
        rung, _, k = key.partition(":")
        stats.setdefault(rung, {})[k] = t
    return Bundle(spec, net.eval(), stats, manifest)
