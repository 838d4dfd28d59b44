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
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.common.halves import run_both

try:  # ISA-L's deflate: about 4x faster than zlib's level 1 at the same size on SR outputs
    from isal import isal_zlib as _fast_deflate
except ImportError:  # pragma: no cover - isal is a dependency; zlib keeps PNG working without it
    _fast_deflate = None
# The PNG checksums (CRC-32 of each chunk, Adler-32 of the zlib stream), same values as zlib's:
# ISA-L's are about 20x and 6x faster (0.14 and 0.22 ms of a 512x512 answer with zlib's).
_checksums = _fast_deflate if _fast_deflate is not None else zlib

FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
# Not an image format: the SR canvas as raw (H, W, C) uint8 bytes, for protocols that carry tensors (OIP).
RAW_PIXELS = "application/x-raw-pixels"
PNG_COMPRESS_LEVEL = 1  # measured: as small as Pillow's level 1, 5-8x faster (docs/BENCHMARKS.md)
# A PNG at least this large (filtered bytes) is deflated in two halves at once (deflate releases
# the GIL): the largest fixed step of an SR answer, halved for a request served alone.  Below
# it the hop to the helper thread costs more than it saves.
PARALLEL_DEFLATE_BYTES = 128 * 1024
_DEFLATE_WINDOW = 32 * 1024  # deflate's history: the second half starts with the first's last 32 KiB as dictionary
_PNG_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> grey, grey+alpha, RGB, RGBA


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


def decode(body: bytes, max_pixels: int, check: Callable[[int, int], None] | None = None) -> Decoded:
    """Decode an image body under ``max_pixels``.  ``check(w, h)``, when given, is the
    caller's cost check (a model family's own limit): it runs on the header's size, before
    any pixel data is decoded, and refuses by raising (ImageError, or the service's
    ApiError).  The size is the stored one: an EXIF orientation may swap w and h later, so
    a check should not depend on which side is which."""
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
        if check is not None:
            check(w, h)
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


def _to_int(v: np.ndarray, peak: int, dtype: type) -> np.ndarray:
    """Round [0, 1] floats to ``dtype`` in C order (in place on one float temporary: the
    canvas is 16x the input, so every extra pass over it shows in the response time)."""
    x = np.multiply(v, peak, dtype=np.float32, order="C")
    np.rint(x, out=x)
    np.clip(x, 0, peak, out=x)
    return x.astype(dtype)


def encode(sr: np.ndarray, src: Decoded, media_type: str = "image/png", *,
           png_compress_level: int = PNG_COMPRESS_LEVEL, quality: int = 95) -> bytes:
    """Encode an SR float canvas (H, W, 3) in [0, 1] like the source image: grey stays
    grey, alpha is re-attached, 16-bit stays 16-bit (PNG only).  ``png_compress_level``
    is zlib's 0-9 (see ``png_bytes``); ``quality`` is JPEG's and WebP's."""
    h, w = sr.shape[:2]
    if media_type == RAW_PIXELS:  # (H, W, C) uint8, C as the source: 1 grey, 3 RGB, 4 RGBA
        pixels = _to_int(sr.mean(axis=2, keepdims=True) if src.grey else sr, 255, np.uint8)
        if src.alpha is not None:
            pixels = np.dstack([pixels, _to_int(_upscale_alpha(src.alpha, (w, h)), 255, np.uint8)])
        return np.ascontiguousarray(pixels).tobytes()
    fmt = FORMATS[media_type]
    if src.bits == 16 and fmt == "PNG":
        return png_bytes(_to_int(sr.mean(axis=2), 65535, np.uint16), png_compress_level)
    pixels = _to_int(sr.mean(axis=2) if src.grey else sr, 255, np.uint8)
    if src.alpha is not None and fmt != "JPEG":
        alpha = _to_int(_upscale_alpha(src.alpha, (w, h)), 255, np.uint8)
        pixels = np.dstack([pixels, alpha])
    if fmt == "PNG":
        return png_bytes(pixels, png_compress_level)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, quality=quality)  # mode from the shape: L, LA, RGB, RGBA
    return buf.getvalue()


def png_bytes(pixels: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """A PNG of ``pixels``: (H, W) or (H, W, C) uint8 or uint16, C = 1 grey, 2 grey+alpha,
    3 RGB, 4 RGBA.

    Written here rather than by Pillow because Pillow's PNG encoder is the most expensive
    step of a request: it tries several filters on every row in C and then runs zlib,
    which together cost more than the full-width network.  Every row gets the PNG "Up"
    filter instead (one vectorised subtraction; on our SR outputs it compresses as well as
    Pillow's per-row choice), and levels 1-3 use ISA-L's deflate, about 4x faster than
    zlib's level 1 at the same size.  Level 0 stores without compression; 4-9 (and every
    level if isal is missing) use zlib at that level."""
    if not 0 <= compress_level <= 9:
        raise ValueError(f"PNG compress level must be in 0..9, got {compress_level}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    h, w, c = pixels.shape
    if pixels.dtype not in (np.uint8, np.uint16) or c not in _PNG_COLOR_TYPE or not (h and w):
        raise ValueError(f"cannot write {pixels.dtype} pixels of shape {pixels.shape} as PNG")
    depth = 8 * pixels.dtype.itemsize
    rows = np.ascontiguousarray(pixels, dtype=">u2" if depth == 16 else np.uint8).view(np.uint8).reshape(h, -1)
    filtered = np.empty((h, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type Up: each byte minus the byte above it (mod 256)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    idat = zlib_stream(filtered.reshape(-1), compress_level)
    header = struct.pack(">IIBBBBB", w, h, depth, _PNG_COLOR_TYPE[c], 0, 0, 0)
    return b"".join([b"\x89PNG\r\n\x1a\n", *_png_chunk(b"IHDR", header), *_png_chunk(b"IDAT", idat),
                     *_png_chunk(b"IEND", b"")])


def _png_chunk(tag: bytes, data: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    return struct.pack(">I", len(data)), tag, data, struct.pack(">I", _checksums.crc32(data, _checksums.crc32(tag)))


def _deflate_module(level: int):
    return _fast_deflate if _fast_deflate is not None and 1 <= level <= 3 else zlib


def _raw_deflate(data: memoryview, level: int, final: bool, zdict: bytes | None = None) -> bytes:
    """Raw deflate (no zlib header or checksum) of ``data``; a non-final piece ends with a
    sync flush, so it stops on a byte boundary and the next piece's blocks can follow it."""
    mod = _deflate_module(level)
    kw = {"zdict": zdict} if zdict else {}
    comp = mod.compressobj(level, zlib.DEFLATED, -15, **kw)
    return comp.compress(data) + comp.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)


def zlib_stream(data: np.ndarray, level: int) -> bytes:
    """A zlib stream of ``data`` (1-D uint8) at ``level``, as ``zlib.compress`` makes one.

    From ``PARALLEL_DEFLATE_BYTES`` on it is made of two raw deflate pieces compressed at
    the same time (``models.common.halves``), the second with the first's last 32 KiB as its
    dictionary (so it compresses as if it had followed on), joined under one zlib header and
    the Adler-32 of the whole (pigz's layout: any inflater reads it as one stream).  It is
    larger than one piece by a sync flush and a block boundary (under 0.2 %)."""
    if level == 0 or data.nbytes < PARALLEL_DEFLATE_BYTES:
        return _deflate_module(level).compress(data, level)
    view = memoryview(data)
    half = data.nbytes // 2
    window = bytes(view[max(0, half - _DEFLATE_WINDOW):half])
    first, second = run_both(lambda: _raw_deflate(view[:half], level, False),
                             lambda: _raw_deflate(view[half:], level, True, window))
    header = zlib.compress(b"", level)[:2]  # the two bytes zlib writes for this level
    return b"".join([header, first, second, struct.pack(">I", _checksums.adler32(view))])
