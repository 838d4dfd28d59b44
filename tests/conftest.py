"""Shared test fixtures.  Official checkpoints live beside the repository in
``../shared/fixtures`` (never in it); tests that need them skip when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = Path(os.environ.get("ANYTIME_OFFICIAL_FIXTURES", REPO.parent / "shared" / "fixtures" / "arm-official"))
BUNDLED_ARM = REPO / "models" / "arm" / "weights" / "arm-fsrcnn" / "model.safetensors"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def official() -> Path:
    if not (OFFICIAL / "arm-fsrcnn.pth").exists():
        pytest.skip(f"official ARM fixtures not found at {OFFICIAL}")
    return OFFICIAL


@pytest.fixture(scope="session")
def golden(official: Path) -> dict:
    import json

    g = official / "golden"
    return {"json": json.loads((g / "ladybird_golden.json").read_text()),
            "inputs": dict(np.load(g / "ladybird_inputs.npz")),
            "fsrcnn": dict(np.load(g / "ladybird_fsrcnn.npz")),
            "carn": dict(np.load(g / "ladybird_carn.npz"))}


@pytest.fixture(scope="session")
def bundled_model():
    from models.arm.pipeline import ArmSR

    return ArmSR.from_checkpoint(BUNDLED_ARM)


def synthetic_photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 RGB image with flat areas, gradients, edges and texture, so
    that tiles land in many edge-score bins."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([128 + 60 * np.sin(x / 9.0), 100 + 0.3 * y % 120, 90 + 50 * np.cos((x + y) / 17.0)], axis=-1)
    img[(x // 16 + y // 16) % 2 == 0] += 40  # hard edges
    noise_region = (x > w / 2) & (y > h / 2)
    img[noise_region] += rng.normal(0, 25, size=(int(noise_region.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)
