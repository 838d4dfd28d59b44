"""Resize-then-centre-crop at a cost bounded by the input, for every classifier.

A classifier's evaluation transform resizes the short side to ``resize`` and then crops the
centre ``crop`` x ``crop``.  For an extreme aspect ratio the resize alone is enormous (1 x
150,000 px at 256 makes a 256 x 38,400,000 intermediate).  Then the crop's box is computed in
the original's coordinates and only that box is resized to crop x crop: PIL samples the same
positions with the same filter, so the result is the resize-then-crop one up to rounding of
the box (a level or two on a few pixels), and the intermediate never exceeds the crop.
Ordinary images take the plain path, bit for bit as before.

Each family keeps its own rules for the resized size and the crop offsets (they follow each
family's official recipe); this module holds what the two have in common.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def crops_first(w: int, h: int, resized_w: int, resized_h: int, resize: int, crop: int) -> bool:
    """Crop before resizing when the plain resize would be larger than both the input and
    4 x resize^2 and the crop lies inside it."""
    return resized_w * resized_h > max(w * h, 4 * resize * resize) and crop <= min(resized_w, resized_h)


def intermediate_pixels(w: int, h: int, resized_w: int, resized_h: int, resize: int, crop: int) -> int:
    """Pixels of the largest image the transform makes for a w x h input: what a server
    checks from the image header, before decoding."""
    if crops_first(w, h, resized_w, resized_h, resize, crop):
        return crop * crop
    return max(resized_w * resized_h, crop * crop)


def crop_of_resized(img: Image.Image, resized_w: int, resized_h: int, left: int, top: int, crop: int,
                    resample: Image.Resampling) -> np.ndarray:
    """The crop x crop window at (left, top) of ``img`` resized to resized_w x resized_h,
    computed from that window's box in the original only."""
    sx, sy = img.width / resized_w, img.height / resized_h
    box = (left * sx, top * sy, min(img.width, (left + crop) * sx), min(img.height, (top + crop) * sy))
    return np.asarray(img.resize((crop, crop), resample, box=box))
