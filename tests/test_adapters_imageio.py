"""sites/imageio.py: pixel values of every conversion, unreadable files, and path safety."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chestfed.sites.adapters.base import BadImageError, SiteDataError
from chestfed.sites.imageio import read_grayscale, safe_join
from chestfed.sites.pixels import array_to_gray8, scale_to_uint8


def save(arr: np.ndarray, path: Path, mode: str | None = None) -> Path:
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def test_8bit_png_unchanged(tmp_path):
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = read_grayscale(save(arr, tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (16, 16)
    np.testing.assert_array_equal(out, arr)


def test_16bit_png_full_range_is_scaled_by_65535(tmp_path):
    arr = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "full16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    out = read_grayscale(path)
    # round(v * 255 / 65535): 257 -> 1, 32768 -> 127.5 -> 128
    np.testing.assert_array_equal(out, [[0, 1, 128, 255]])


def test_16bit_png_holding_12bit_data_is_scaled_by_4095(tmp_path):
    arr = np.array([[0, 16, 2048, 4095]], dtype=np.uint16)
    path = tmp_path / "twelve.png"
    Image.fromarray(arr).save(path)
    out = read_grayscale(path)
    # round(v * 255 / 4095): 16 -> 0.996 -> 1, 2048 -> 127.53 -> 128; not min-max stretched
    np.testing.assert_array_equal(out, [[0, 1, 128, 255]])


def test_16bit_dark_image_stays_dark_and_bits_floor_applies(tmp_path):
    arr = np.array([[0, 1000, 2047]], dtype=np.uint16)  # needs 11 bits
    path = tmp_path / "dark.png"
    Image.fromarray(arr).save(path)
    np.testing.assert_array_equal(read_grayscale(path), [[0, 125, 255]])  # 11-bit scale
    # A 12-bit image (PadChest's BitsStored) whose brightest pixel is 2047 is half-bright.
    np.testing.assert_array_equal(read_grayscale(path, bits=12), [[0, 62, 127]])
    # The floor never clips: values above 2**bits raise the depth.
    np.testing.assert_array_equal(read_grayscale(path, bits=8), [[0, 125, 255]])


def test_16bit_png_with_8bit_values_is_not_changed(tmp_path):
    arr = np.array([[0, 100, 255]], dtype=np.uint16)
    path = tmp_path / "eight_in_16.png"
    Image.fromarray(arr).save(path)
    np.testing.assert_array_equal(read_grayscale(path), [[0, 100, 255]])


def test_rgb_to_luminance_itu_601(tmp_path):
    rgb = np.zeros((1, 5, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[0, 3] = (255, 255, 255)
    rgb[0, 4] = (100, 100, 100)
    out = read_grayscale(save(rgb, tmp_path / "rgb.png"))
    np.testing.assert_array_equal(out, [[76, 150, 29, 255, 100]])
    jpg = read_grayscale(save(np.full((8, 8, 3), (90, 90, 90), np.uint8), tmp_path / "g.jpg"))
    assert abs(int(jpg.mean()) - 90) <= 1


def test_rgba_composited_on_black(tmp_path):
    rgba = np.zeros((1, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 255, 255, 255)
    rgba[0, 1] = (255, 255, 255, 0)
    rgba[0, 2] = (255, 255, 255, 128)
    rgba[0, 3] = (255, 0, 0, 255)
    out = read_grayscale(save(rgba, tmp_path / "rgba.png"))
    np.testing.assert_array_equal(out, [[255, 0, 128, 76]])


def test_la_and_palette_and_bilevel(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (200, 255))
    la.putpixel((1, 0), (200, 51))
    la.save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_grayscale(tmp_path / "la.png"), [[200, 40]])
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_grayscale(tmp_path / "p.png"), [[0, 150]])
    bw = Image.new("1", (2, 1))
    bw.putpixel((1, 0), 1)
    bw.save(tmp_path / "bw.png")
    np.testing.assert_array_equal(read_grayscale(tmp_path / "bw.png"), [[0, 255]])


def _on_black(im: Image.Image) -> Image.Image:
    """The standard way to drop alpha: composite onto an opaque black background."""
    return Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))


# mode -> (how to make it from random RGBA bytes, the standard 8-bit gray reference)
_MODES = {
    "L": (lambda rgba: Image.fromarray(rgba[..., 0]), lambda im: im.convert("L")),
    "RGB": (lambda rgba: Image.fromarray(rgba[..., :3]), lambda im: im.convert("L")),
    "RGBA": (lambda rgba: Image.fromarray(rgba), lambda im: _on_black(im).convert("L")),
    "LA": (lambda rgba: Image.fromarray(rgba[..., [0, 3]], "LA"),
           lambda im: _on_black(im).convert("L")),
    "P": (lambda rgba: Image.fromarray(rgba[..., :3]).quantize(64),
          lambda im: im.convert("RGB").convert("L")),
    "P+transparency": (lambda rgba: _transparent_palette(rgba),
                       lambda im: _on_black(im).convert("L")),
    "1": (lambda rgba: Image.fromarray(rgba[..., 0] > 127), lambda im: im.convert("L")),
    # 16-bit: the standard 16 -> 8 bit reduction keeps the high byte (v >> 8).
    "I;16": (lambda rgba: Image.fromarray(rgba[..., 0].astype(np.uint16) * 257 + rgba[..., 1] % 2),
             lambda im: Image.fromarray((np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8))),
}


def _transparent_palette(rgba: np.ndarray) -> Image.Image:
    im = Image.fromarray(rgba[..., :3]).quantize(16)
    im.info["transparency"] = 3
    return im


@pytest.mark.parametrize("mode", list(_MODES))
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (129, 40), (2, 600)])
def test_every_png_mode_and_size_matches_the_standard_gray_conversion(tmp_path, mode, shape):
    rgba = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 4), dtype=np.uint8)
    im = _MODES[mode][0](rgba)
    path = tmp_path / "x.png"
    im.save(path)
    with Image.open(path) as back:
        back.load()
        reference = np.asarray(_MODES[mode][1](back), dtype=np.int16)
    out = read_grayscale(path)
    assert out.dtype == np.uint8 and out.shape == shape
    assert np.abs(out.astype(np.int16) - reference).max() <= 1, mode


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_jpeg_modes_match_the_standard_gray_conversion(tmp_path, mode):
    rgba = np.random.default_rng(7).integers(0, 256, (33, 50, 4), dtype=np.uint8)
    im = {"L": Image.fromarray(rgba[..., 0]), "RGB": Image.fromarray(rgba[..., :3]),
          "CMYK": Image.fromarray(rgba, "RGBA").convert("CMYK")}[mode]
    path = tmp_path / "x.jpg"
    im.save(path, quality=90)
    with Image.open(path) as back:
        back.load()
        assert back.mode == mode
        reference = np.asarray(back.convert("RGB").convert("L"), dtype=np.int16)
    out = read_grayscale(path)
    assert out.shape == (33, 50) and np.abs(out.astype(np.int16) - reference).max() <= 1


def test_arrays_and_float_minmax():
    np.testing.assert_array_equal(array_to_gray8(np.array([[0, 128]], np.uint8)), [[0, 128]])
    np.testing.assert_array_equal(array_to_gray8(np.array([[[255, 0, 0]]], np.uint8)), [[76]])
    np.testing.assert_array_equal(array_to_gray8(np.array([[0.5, 1.0, 1.5]])), [[0, 128, 255]])
    np.testing.assert_array_equal(scale_to_uint8(np.array([[-10, 0, 10]])), [[0, 128, 255]])
    np.testing.assert_array_equal(array_to_gray8(np.array([[3.0, 3.0]])), [[0, 0]])
    with pytest.raises(BadImageError):
        array_to_gray8(np.zeros((2, 2, 2, 2)))


def test_truncated_png_is_a_bad_image_naming_path_and_reason(tmp_path):
    path = save(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8),
                tmp_path / "trunc.png")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError) as info:
        read_grayscale(path)
    msg = str(info.value)
    assert "trunc.png" in msg and "cannot be decoded" in msg


def test_truncated_jpeg_and_non_image_and_missing(tmp_path):
    path = save(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8),
                tmp_path / "t.jpg")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(BadImageError, match="t.jpg"):
        read_grayscale(path)
    junk = tmp_path / "junk.png"
    junk.write_text("this is not a PNG")
    with pytest.raises(BadImageError, match="not an image file"):
        read_grayscale(junk)
    with pytest.raises(BadImageError, match="file not found"):
        read_grayscale(tmp_path / "nope.png")
    with pytest.raises(BadImageError, match="directory"):
        read_grayscale(tmp_path)


def test_jpeg_draft_keeps_at_least_the_requested_size(tmp_path):
    arr = np.random.default_rng(1).integers(0, 255, (512, 400), dtype=np.uint8)
    path = save(arr, tmp_path / "big.jpg")
    out = read_grayscale(path, min_size=64)
    assert min(out.shape) >= 64 and out.shape[0] < 512
    assert read_grayscale(path).shape == (512, 400)


# --- safe_join -----------------------------------------------------------------------------

def test_safe_join_inside(tmp_path):
    (tmp_path / "a").mkdir()
    assert safe_join(tmp_path, "a/x.png") == (tmp_path / "a" / "x.png").resolve()
    assert safe_join(tmp_path, "a/../b.png") == (tmp_path / "b.png").resolve()


@pytest.mark.parametrize("rel", ["../x.png", "a/../../x.png", "/etc/passwd", "C:\\x.png",
                                 "\\\\server\\share\\x.png"])
def test_safe_join_refuses_escapes(tmp_path, rel):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(SiteDataError) as info:
        safe_join(root, rel)
    assert rel in str(info.value)


def test_safe_join_refuses_symlink_out_but_allows_symlink_in(tmp_path):
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    os.symlink(outside, root / "link.png")
    os.symlink(tmp_path, root / "dirlink")
    os.symlink(root / "real", root / "inner")
    with pytest.raises(SiteDataError, match="symlink"):
        safe_join(root, "link.png")
    with pytest.raises(SiteDataError, match="outside"):
        safe_join(root, "dirlink/secret.png")
    assert safe_join(root, "inner/x.png") == (root / "real" / "x.png").resolve()


def test_safe_join_empty(tmp_path):
    with pytest.raises(SiteDataError, match="empty"):
        safe_join(tmp_path, "  ")
