"""Per-family cost checks on an image's size, run from its header before decoding.

``max_input_pixels`` bounds every request's pixels, but what a request costs depends on
the family: ARM cuts the image into 32x32 LR patches (a 1 x 1,000,000 image, within the
pixel limit, makes 35,713 mostly padded patches and needed 21 GB), and a classifier's
resize can make an intermediate far larger than its input.  Each check here is a
``check(w, h)`` for ``imageio.decode``; it raises ApiError 413 saying what the image would
cost and what is accepted.  The checks are symmetric in w and h (EXIF rotation may swap
them after the header is read).
"""

from __future__ import annotations

from collections.abc import Callable

from models.arm import tiling as arm_tiling
from service.errors import ApiError

Check = Callable[[int, int], None]


def sr_patches(max_patches: int, tiling: str) -> Check:
    """/superresolve: at most ``max_patches`` 32x32 LR patches (setting ``max_sr_patches``)."""
    def check(w: int, h: int) -> None:
        n = arm_tiling.count(h, w, tiling)  # type: ignore[arg-type]
        if n > max_patches:
            raise ApiError(413, f"image of {w}x{h} pixels makes {n} LR patches of 32x32 (tiling={tiling}); "
                                f"the limit is {max_patches} (max_sr_patches)",
                           f"images that make at most {max_patches} patches: about {max_patches * 784:,} pixels "
                           "with neither side under 32 px (1000x1000 makes 1296), or a strip of at most "
                           f"{(max_patches - 1) * 28 + 32} px by up to 32 px")
    return check


def resize_pixels(max_pixels: int, model) -> Check | None:
    """/classify: the model's pre-processing intermediate at most ``max_pixels`` (setting
    ``max_resize_pixels``); None for a model that cannot say (no ``preprocess_pixels``)."""
    size_of = getattr(model, "preprocess_pixels", None)
    if size_of is None:
        return None

    def check(w: int, h: int) -> None:
        n = size_of(w, h)
        if n > max_pixels:
            raise ApiError(413, f"image of {w}x{h} pixels would be resized to an intermediate of {n} pixels "
                                f"before the centre crop; the limit is {max_pixels} (max_resize_pixels)",
                           f"images whose pre-processing needs at most {max_pixels} pixels")
    return check
