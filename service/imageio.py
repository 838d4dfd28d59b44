"""Decoding request images and encoding responses, with limits checked before decoding.

Models see 8-bit RGB for planning (the edge score is defined on 8-bit pixels) and float
RGB in [0, 1] for inference.  Other inputs are mapped onto that and back:
grey -> RGB -> grey (channel mean), alpha upscaled separately with bicubic and
re-attached, 16-bit grey kept at 16 bits end to end (only the plan uses 8 bits),
palette images expanded.  Pixel limits are checked from the header, before the pixel
data is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}


class ImageError(ValueError):
    """A client-side problem with the image; ``status`` is the HTTP code to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Decoded:
    rgb_u8: np.ndarray  # (H, W, 3) uint8, for planning
    rgb: np.ndarray  # (H, W, 3) float32 in [0, 1], for inference
    alpha: np.ndarray | None  # (H, W) float32 in [0, 1]
    grey: bool
    bits: int  # 8 or 16

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]


def decode(body: bytes, max_pixels: int) -> Decoded:
    if not body:
        raise ImageError(400, "empty request body: send the image bytes (PNG, JPEG or WebP)")
    try:
        im = Image.open(io.BytesIO(body))
        fmt = im.format
        w, h = im.size
        if fmt not in FORMATS.values():
            raise ImageError(415, f"unsupported image format {fmt}; accepted: PNG, JPEG, WebP")
        if w * h > max_pixels:
            raise ImageError(413, f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
        im.load()
        im = ImageOps.exif_transpose(im)  # phone JPEGs: respect the orientation tag
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(413, f"image rejected as a decompression bomb: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(400, f"could not decode the image ({type(exc).__name__}: {exc}); "
                              "send a complete PNG, JPEG or WebP file") from None
    return _to_arrays(im)


def _to_arrays(im: Image.Image) -> Decoded:
    alpha = None
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        v = np.asarray(im, dtype=np.float64)
        bits = 16 if im.mode.startswith("I;16") or v.max(initial=0) > 255 else 8
        grey = (np.clip(v, 0, 65535) / 65535.0) if bits == 16 else np.clip(v, 0, 255) / 255.0
        rgb = np.repeat(grey[:, :, None], 3, axis=2).astype(np.float32)
        return Decoded(np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8), rgb, None, True, bits)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    grey = im.mode in ("L", "LA", "1")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        alpha = np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0
    rgb_u8 = np.asarray(im.convert("RGB"))
    return Decoded(rgb_u8, rgb_u8.astype(np.float32) / 255.0, alpha, grey, 8)


def _upscale_alpha(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    a = Image.fromarray(alpha.astype(np.float32), mode="F").resize(size, Image.Resampling.BICUBIC)
    return np.clip(np.asarray(a), 0, 1)


def encode(sr: np.ndarray, src: Decoded, media_type: str = "image/png") -> bytes:
    """Encode an SR float canvas (H, W, 3) in [0, 1] like the source image: grey stays
    grey, alpha is re-attached, 16-bit stays 16-bit (PNG only)."""
    fmt = FORMATS[media_type]
    h, w = sr.shape[:2]
    if src.bits == 16 and fmt == "PNG":
        v = np.clip(np.rint(sr.mean(axis=2) * 65535), 0, 65535).astype(np.uint16)
        im = Image.fromarray(v)
    else:
        u8 = np.clip(np.rint(sr * 255), 0, 255).astype(np.uint8)
        im = Image.fromarray(np.clip(np.rint(sr.mean(axis=2) * 255), 0, 255).astype(np.uint8), "L") \
            if src.grey else Image.fromarray(u8, "RGB")
        if src.alpha is not None and fmt != "JPEG":
            a = Image.fromarray(np.clip(np.rint(_upscale_alpha(src.alpha, (w, h)) * 255), 0, 255).astype(np.uint8), "L")
            im.putalpha(a)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {"quality": 95}))
    return buf.getvalue()
