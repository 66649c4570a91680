"""load_image: every input kind becomes RGB uint8 (H, W, 3); bad files and arrays raise ImageError naming them."""

from __future__ import annotations

import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ssp_sam.errors import ImageError
from ssp_sam.image_io import load_image


def _rgb(pixels) -> np.ndarray:
    return np.asarray(pixels, dtype=np.uint8)


def test_rgb_array_passes_through_unchanged():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    out = load_image(rgb)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 1)])
def test_grayscale_array_is_replicated(shape):
    gray = np.array([[0, 10, 20], [30, 40, 255]], dtype=np.uint8).reshape(shape)
    out = load_image(gray)
    assert out.shape == (2, 3, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray.reshape(2, 3))


def test_grayscale_png_is_replicated(tmp_path):
    gray = np.array([[0, 77], [128, 255]], dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(load_image(tmp_path / "gray.png"), np.repeat(gray[:, :, None], 3, axis=2))


def test_rgba_is_composited_onto_black(tmp_path):
    rgba = np.array([[[200, 100, 50, 128], [10, 20, 30, 255], [90, 90, 90, 0]]], dtype=np.uint8)
    # 200 * 128/255 = 100.39 -> 100, 100 * 128/255 = 50.20 -> 50, 50 * 128/255 = 25.10 -> 25;
    # opaque pixels are kept, transparent ones become black.
    expected = _rgb([[[100, 50, 25], [10, 20, 30], [0, 0, 0]]])
    np.testing.assert_array_equal(load_image(rgba), expected)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), expected)
    np.testing.assert_array_equal(load_image(Image.fromarray(rgba, "RGBA")), expected)


def test_gray_with_alpha_pil_image():
    la = Image.fromarray(np.array([[[200, 128], [60, 255]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(load_image(la), _rgb([[[100, 100, 100], [60, 60, 60]]]))


def test_16_bit_png_is_scaled_by_257(tmp_path):
    values = np.array([[0, 128, 200, 257], [1000, 32896, 65000, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    image.save(tmp_path / "deep.png")
    # x / 257 rounded: 0, 0.498 -> 0, 0.778 -> 1, 1; 3.89 -> 4, 128, 252.9 -> 253, 255
    expected_gray = np.array([[0, 0, 1, 1], [4, 128, 253, 255]], dtype=np.uint8)
    out = load_image(tmp_path / "deep.png")
    np.testing.assert_array_equal(out, np.repeat(expected_gray[:, :, None], 3, axis=2))


def test_dark_16_bit_png_is_still_16_bit(tmp_path):
    """A 16-bit picture whose values all happen to be <= 255 is very dark, not an 8-bit picture."""
    Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint16)).save(tmp_path / "dark.png")
    np.testing.assert_array_equal(load_image(tmp_path / "dark.png")[:, :, 0], [[0, 0, 1]])


def test_same_picture_at_8_and_16_bits_gives_the_same_array():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(rgb.astype(np.uint16) * 257), rgb)


def test_float_arrays_in_unit_range():
    values = np.array([[0.0, 0.25, 1.0], [0.2, 0.6, 0.004]], dtype=np.float32)
    # x * 255 rounded: 0, 63.75 -> 64, 255; 51, 153, 1.02 -> 1
    expected = np.array([[0, 64, 255], [51, 153, 1]], dtype=np.uint8)
    out = load_image(values)
    np.testing.assert_array_equal(out[:, :, 0], expected)
    np.testing.assert_array_equal(load_image(np.stack([values] * 3, axis=-1).astype(np.float64)), out)


def test_bool_array_is_black_and_white():
    mask = np.array([[True, False], [False, True]])
    np.testing.assert_array_equal(load_image(mask)[:, :, 1], [[255, 0], [0, 255]])


def test_result_is_writable(tmp_path):
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    assert load_image(tmp_path / "rgb.png").flags.writeable


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere.png"
    with pytest.raises(ImageError, match=re.escape(str(path)) + ".*not found"):
        load_image(path)


def test_directory_is_called_a_directory_not_a_missing_file(tmp_path):
    (tmp_path / "photos.png").mkdir()
    with pytest.raises(ImageError, match=re.escape(str(tmp_path / "photos.png")) + ": is a directory, not an image file"):
        load_image(tmp_path / "photos.png")


def test_zero_byte_file_is_named(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=re.escape(str(path)) + ".*empty"):
        load_image(str(path))


def test_text_file_named_png_is_named(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels\n")
    with pytest.raises(ImageError, match=re.escape(str(path)) + ".*not a readable image"):
        load_image(path)


def test_truncated_png_is_named(tmp_path):
    path = tmp_path / "cut.png"
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=re.escape(str(path)) + ".*truncated"):
        load_image(path)


def test_name_argument_is_used_in_messages():
    with pytest.raises(ImageError, match="^frame 7: "):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8), name="frame 7")


@pytest.mark.parametrize(
    "shape, message",
    [
        ((4, 4, 2), "got shape"),
        ((4, 4, 5), "got shape"),
        ((2, 4, 4, 3), "got shape"),
        ((16,), "got shape"),
        ((0, 4, 3), "zero size"),
        ((4, 0), "zero size"),
    ],
)
def test_bad_array_shapes(shape, message):
    with pytest.raises(ImageError, match="array image: .*" + message):
        load_image(np.zeros(shape, dtype=np.uint8))


def test_bad_array_values_and_types():
    with pytest.raises(ImageError, match="negative"):
        load_image(np.array([[-1, 5]], dtype=np.int32))
    with pytest.raises(ImageError, match="NaN or Inf"):
        load_image(np.array([[0.5, np.nan]]))
    with pytest.raises(ImageError, match="complex"):
        load_image(np.zeros((2, 2), dtype=np.complex64))
    with pytest.raises(ImageError, match="list"):
        load_image([[0, 1], [2, 3]])


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG that announces width x height RGB pixels (its data is cut short): enough for Image.open."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_naming_the_file(tmp_path):
    _png_header_only(tmp_path / "huge.png", 14000, 14000)  # 196 M pixels, over PIL's 179 M limit
    with pytest.raises(ImageError, match=r"huge.png: too large to decode safely \(.*196000000 pixels"):
        load_image(tmp_path / "huge.png")


def test_exif_orientation_only_when_asked(tmp_path):
    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    np.testing.assert_array_equal(load_image(tmp_path / "photo.png"), stored)  # datasets: as stored
    shown = np.rot90(stored, k=-1)
    np.testing.assert_array_equal(load_image(tmp_path / "photo.png", exif_orientation=True), shown)
    np.testing.assert_array_equal(load_image(Image.open(tmp_path / "photo.png"), exif_orientation=True), shown)
