"""Loading ARM weights and lookup tables: official releases and our own files.

Official ``arm-*.pth`` files are plain state dicts and load with ``weights_only=True``.
The official ``arm-*.state`` training states hold the lookup table as numpy arrays in a
pickle; we open them with torch's restricted ``weights_only`` unpickler, allowing only the
numpy reconstruction functions and dtypes that such a file needs, so a malicious pickle
cannot run code.  Our own weights are safetensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def _strip_module(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_full_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Full-width supernet weights from ``.safetensors`` or an official ``.pth``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return _strip_module(sd)


def _numpy_safe_globals() -> list:
    """The globals a pickled numpy array or scalar refers to, and nothing else.

    Files written under numpy 1.x name ``numpy.core.multiarray``; numpy 2 moved it to
    ``numpy._core``, so each function is allowed under both names."""
    from numpy._core import multiarray

    allowed: list = [np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool", "uint8")]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        allowed += [fn, (fn, f"numpy.core.multiarray.{fn.__name__}")]
    return allowed


def load_official_state_table(path: str | Path) -> dict:
    """The ``hmap`` dict (the Edge->PSNR table) from an official ``arm-*.state`` file,
    read with the restricted unpickler (no arbitrary code)."""
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "hmap" not in state:
        raise ValueError(f"{path} has no 'hmap' lookup table")
    return state["hmap"]
