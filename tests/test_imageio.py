"""Our PNG writer: valid files that decode to exactly the pixels given, for every kind of
output the service produces, at every level, with and without ISA-L."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from service import imageio


def _pixels(shape: tuple[int, ...], dtype: type, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(rng.integers(-3, 4, size=shape), axis=1)  # photo-like rows, plus wrap-around
    return (smooth % (np.iinfo(dtype).max + 1)).astype(dtype)


def _read(png: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(png))
    im.load()  # verifies every chunk's CRC and the zlib stream's checksum
    return np.asarray(im)


@pytest.mark.parametrize("shape,mode", [((37, 53), "L"), ((37, 53, 2), "LA"), ((37, 53, 3), "RGB"),
                                        ((37, 53, 4), "RGBA"), ((1, 1, 3), "RGB"), ((5, 1), "L")])
@pytest.mark.parametrize("level", [0, 1, 2, 3, 6, 9])
def test_png_round_trips_exactly(shape: tuple[int, ...], mode: str, level: int) -> None:
    px = _pixels(shape, np.uint8)
    png = imageio.png_bytes(px, level)
    assert Image.open(io.BytesIO(png)).mode == mode
    np.testing.assert_array_equal(_read(png), px)


def test_sixteen_bit_grey_round_trips() -> None:
    px = _pixels((29, 41), np.uint16)
    im = Image.open(io.BytesIO(imageio.png_bytes(px)))
    assert im.mode.startswith("I;16")
    np.testing.assert_array_equal(np.asarray(im).astype(np.uint16), px)


def test_zlib_fallback_without_isal(monkeypatch: pytest.MonkeyPatch) -> None:
    px = _pixels((64, 48, 3), np.uint8, seed=3)
    monkeypatch.setattr(imageio, "_fast_deflate", None)
    np.testing.assert_array_equal(_read(imageio.png_bytes(px, 1)), px)


@pytest.mark.parametrize("level", [1, 3, 6])
@pytest.mark.parametrize("isal", [True, False])
def test_large_png_deflated_in_two_pieces_is_one_valid_stream(monkeypatch: pytest.MonkeyPatch, level: int,
                                                               isal: bool) -> None:
    """Above PARALLEL_DEFLATE_BYTES the IDAT is two deflate pieces made at once: any
    inflater (zlib's, Pillow's) must read it as one stream with a correct Adler-32, and
    it must be no larger than one piece but for a sync flush and a block boundary."""
    if not isal:
        monkeypatch.setattr(imageio, "_fast_deflate", None)
    px = _pixels((300, 260, 3), np.uint8, seed=5)  # 234 KB of filtered rows
    assert px.nbytes >= imageio.PARALLEL_DEFLATE_BYTES
    png = imageio.png_bytes(px, level)
    np.testing.assert_array_equal(_read(png), px)
    data = np.ascontiguousarray(px).reshape(-1)
    pieces = imageio.zlib_stream(data, level)
    assert zlib.decompress(pieces) == data.tobytes()
    monkeypatch.setattr(imageio, "PARALLEL_DEFLATE_BYTES", 1 << 40)
    whole = imageio.zlib_stream(data, level)
    assert zlib.decompress(whole) == data.tobytes()
    assert len(pieces) <= 1.002 * len(whole) + 64


def test_non_contiguous_input_and_bad_arguments() -> None:
    planes = _pixels((3, 20, 30), np.uint8)
    np.testing.assert_array_equal(_read(imageio.png_bytes(planes.transpose(1, 2, 0))), planes.transpose(1, 2, 0))
    with pytest.raises(ValueError):
        imageio.png_bytes(planes.transpose(1, 2, 0), 10)
    with pytest.raises(ValueError):
        imageio.png_bytes(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        imageio.png_bytes(np.zeros((4, 4, 5), np.uint8))


def test_compression_is_real_and_levels_trade_size() -> None:
    px = np.ascontiguousarray(np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (128, 256, 3)))
    stored, fast = imageio.png_bytes(px, 0), imageio.png_bytes(px, 1)
    assert len(fast) < len(stored) / 20  # the Up filter turns a vertical gradient into zeros
    assert zlib.decompress(stored[stored.index(b"IDAT") + 4:-16])[:1] == b"\x02"  # row filter: Up


def _decoded(kind: str, h: int = 6, w: int = 5) -> imageio.Decoded:
    rgb = np.zeros((h, w, 3), np.float32)
    alpha = np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w) if kind in ("rgba", "la") else None
    return imageio.Decoded((rgb * 255).astype(np.uint8), rgb, alpha, kind in ("grey", "la", "grey16"),
                           16 if kind == "grey16" else 8)


@pytest.mark.parametrize("kind,mode", [("rgb", "RGB"), ("grey", "L"), ("rgba", "RGBA"), ("la", "LA"),
                                       ("grey16", "I;16")])
def test_encode_keeps_the_source_kind_and_rounds_like_before(kind: str, mode: str) -> None:
    """Pixel values are what the previous Pillow-based encoder wrote: rint(x * peak), clipped."""
    src = _decoded(kind)
    sr = np.random.default_rng(1).uniform(-0.1, 1.1, size=(24, 20, 3)).astype(np.float32)
    sr = np.ascontiguousarray(sr.transpose(2, 0, 1)).transpose(1, 2, 0)  # the canvas may be a view
    im = Image.open(io.BytesIO(imageio.encode(sr, src, "image/png")))
    assert im.mode.startswith(mode) and im.size == (20, 24)
    got = np.asarray(im)
    peak = 65535 if kind == "grey16" else 255
    value = sr.mean(axis=2) if src.grey else sr
    expect = np.clip(np.rint(value * peak), 0, peak)
    np.testing.assert_array_equal(got[..., :3] if kind == "rgba" else got[..., 0] if kind == "la" else got, expect)
    if src.alpha is not None:
        alpha = np.clip(np.rint(imageio._upscale_alpha(src.alpha, (20, 24)) * 255), 0, 255)
        np.testing.assert_array_equal(got[..., -1], alpha)


@pytest.mark.parametrize("media", ["image/jpeg", "image/webp"])
def test_other_formats_still_go_through_pillow(media: str) -> None:
    sr = np.full((16, 16, 3), 0.5, np.float32)
    im = Image.open(io.BytesIO(imageio.encode(sr, _decoded("rgba", 4, 4), media)))
    assert im.format == imageio.FORMATS[media] and im.size == (16, 16)
