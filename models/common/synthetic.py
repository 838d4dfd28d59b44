"""A deterministic synthetic photo: flat areas, gradients, hard edges and noise, so that
its tiles land in many edge-score bins.  Used to warm up and calibrate the server (its
encode cost resembles a photo's more than noise's or a flat image's) and by the tests."""

from __future__ import annotations

import numpy as np


def synthetic_photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 RGB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([128 + 60 * np.sin(x / 9.0), 100 + 0.3 * y % 120, 90 + 50 * np.cos((x + y) / 17.0)], axis=-1)
    img[(x // 16 + y // 16) % 2 == 0] += 40  # hard edges
    noise_region = (x > w / 2) & (y > h / 2)
    img[noise_region] += rng.normal(0, 25, size=(int(noise_region.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)
