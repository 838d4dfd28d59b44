"""Official PSS-Net checkpoints: a synthesised ``checkpoint_249.pt`` with the official
layout loads strictly into our supernet, pools yield their top-1 cfgs, and unsafe pickles
are refused."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from models.pssnet.checkpoint import load_official_checkpoint, restricted_load
from models.pssnet.nets import subnet_flops
from tests.pssnet_layout import LAYOUTS

NUM_MULTS = {"mobilenet_v1": 14, "mobilenet_v2": 9}


def _official_cfg_string(name: str, rng: np.random.Generator, target: int) -> str:
    """A cfg string as the official code writes it: ``str(dict)`` of the model_cfg."""
    mults = [round(float(rng.uniform(0.75, 1.0)), 3) for _ in range(NUM_MULTS[name])]
    d = {"model_name": name, "infer_metric_type": "flops", "resolution": int(rng.choice(range(128, 225, 8))),
         "stage_cout_mults": mults, "infer_metric": float(target) + 0.4, "infer_metric_target": target}
    return str(d)


def _synthesise(name: str, path: Path, seed: int = 0) -> dict:
    """A checkpoint with the official structure: DataParallel keys, optimiser/scheduler
    states, arch_pools with str(dict) keys, and the four RNG states (one numpy)."""
    g = torch.Generator().manual_seed(seed)
    model = {}
    for key, shape in LAYOUTS[name]().items():
        if key.endswith("num_batches_tracked"):
            t = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            t = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("running_mean"):
            t = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1 and not key.startswith("classifier"):
            t = torch.rand(shape, generator=g) * 0.5 + 0.5  # BN gamma / beta
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            t = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        model[f"module.{key}"] = t
    rng = np.random.default_rng(seed)
    targets = [560, 300, 120] if name == "mobilenet_v1" else [290, 150, 80]
    pools = {"flops": {t: {_official_cfg_string(name, rng, t): -float(rng.uniform(1, 3)) for _ in range(4)}
                       for t in targets}}
    np.random.seed(seed)
    random.seed(seed)
    ckpt = {
        "model": model,
        "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                      "param_groups": [{"lr": 0.0, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4,
                                        "params": [0]}]},
        "lr_scheduler": {"base_lrs": [0.3], "last_epoch": 312750, "_step_count": 312751},
        "last_epoch": 249,
        "arch_pools": {"max_size": 50, "infer_metric_target_list": {"flops": targets}, "pools": pools},
        "random_state": random.getstate(),
        "np_random_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "torch_cuda_rng_state": [],
    }
    torch.save(ckpt, path)
    return ckpt


@pytest.mark.parametrize("name, n_keys", [("mobilenet_v1", 164), ("mobilenet_v2", 314)])
def test_official_checkpoint_loads_strictly(tmp_path: Path, name: str, n_keys: int) -> None:
    path = tmp_path / "checkpoint_249.pt"
    written = _synthesise(name, path)
    assert len(written["model"]) == n_keys
    ckpt = load_official_checkpoint(path)
    assert ckpt.spec.model_name == name and ckpt.spec.num_classes == 1000 and ckpt.epoch == 249
    assert not any(k.startswith("module.") for k in ckpt.state_dict)
    net = ckpt.build_supernet()  # strict: no missing or unexpected keys, shapes equal
    missing, unexpected = net.load_state_dict(ckpt.state_dict, strict=False)
    assert missing == [] and unexpected == []

    retained = ckpt.retained_subnets()
    names = [r[0] for r in retained]
    assert names[:2] == ["max", "min"] and len(retained) == 2 + 3
    pools = written["arch_pools"]["pools"]["flops"]
    for rung, cfg, info in retained[2:]:
        best = max(pools[info["target"]].items(), key=lambda kv: kv[1])
        assert info["score"] == best[1] and cfg.to_dict()["stage_cout_mults"] == _mults_of(best[0])
        assert rung == f"f{info['target']}"
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        for _, cfg, _ in [retained[1], retained[2]]:
            out = net(x, cfg)
            assert out.shape == (2, 1000) and torch.isfinite(out).all()
            assert subnet_flops(ckpt.spec, cfg) > 0


def _mults_of(cfg_string: str) -> list[float]:
    import ast

    return ast.literal_eval(cfg_string)["stage_cout_mults"]


class _Evil:
    def __reduce__(self):  # noqa: D105
        import os

        return (os.system, (f"touch {_Evil.marker}",))

    marker = ""


@pytest.mark.parametrize("as_torch_zip", [True, False])
def test_malicious_pickle_is_refused(tmp_path: Path, as_torch_zip: bool) -> None:
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    path = tmp_path / "checkpoint_249.pt"
    payload = {"model": {"module.classifier.0.weight": torch.zeros(2, 2)}, "arch_pools": _Evil()}
    if as_torch_zip:
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        load_official_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        restricted_load(path)
    assert not marker.exists()


def test_numpy_rng_state_is_admitted_but_nothing_else_numpy(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save({"np_random_state": np.random.get_state()}, path)
    state = restricted_load(path)["np_random_state"]
    assert state[0] == "MT19937" and state[1].dtype == np.uint32
    torch.save({"x": np.random.default_rng(0)}, path)  # a Generator object: not on the allowlist
    with pytest.raises(pickle.UnpicklingError):
        restricted_load(path)
