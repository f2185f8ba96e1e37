"""Tests of onenip.images: decoding every image mode, masks, resizing and read_sample."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onenip.data import Sample, images, read_mvtec
from onenip.data.images import (
    TooManyPixelsError,
    UnacceptedFormatError,
    load_batch,
    load_image,
    load_mask,
    read_sample,
    resize_image,
    resize_mask,
)
from onenip.errors import DatasetError

W, H = 32, 24


def save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def gradient(dtype: type = np.uint8, high: int = 255) -> np.ndarray:
    """An (H, W) ramp from 0 to `high`."""
    return np.linspace(0, high, H * W).reshape(H, W).round().astype(dtype)


# --------------------------------------------------------------------------------------------------------------------
# load_image
# --------------------------------------------------------------------------------------------------------------------


def test_rgb_image_round_trips(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    img = load_image(save(Image.fromarray(pixels), tmp_path / "rgb.png"))
    assert img.mode == "RGB" and img.size == (W, H)
    np.testing.assert_array_equal(np.asarray(img), pixels)


def test_greyscale_becomes_rgb(tmp_path: Path) -> None:
    grey = gradient()
    img = load_image(save(Image.fromarray(grey), tmp_path / "grey.png"))
    assert img.mode == "RGB"
    rgb = np.asarray(img)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], grey)


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    pixels = np.zeros((H, W, 4), dtype=np.uint8)
    pixels[..., :3] = (200, 100, 50)
    pixels[..., 3] = 0  # fully transparent: colour must survive, not be composited onto black or white
    img = load_image(save(Image.fromarray(pixels, "RGBA"), tmp_path / "rgba.png"))
    assert img.mode == "RGB"
    assert np.all(np.asarray(img) == (200, 100, 50))


def test_la_image(tmp_path: Path) -> None:
    pixels = np.stack([gradient(), np.full((H, W), 7, np.uint8)], axis=-1)
    img = load_image(save(Image.fromarray(pixels, "LA"), tmp_path / "la.png"))
    np.testing.assert_array_equal(np.asarray(img)[..., 1], gradient())


def test_sixteen_bit_png_is_scaled(tmp_path: Path) -> None:
    values = np.zeros((H, W), dtype=np.uint16)
    values[0, :6] = [0, 128, 129, 257, 1000, 65535]
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(load_image(path))
    assert rgb.dtype == np.uint8
    assert rgb[0, :6, 0].tolist() == [0, 0, 1, 1, 4, 255]
    assert np.all(rgb[..., 0] == rgb[..., 2])


def test_sixteen_bit_big_endian_tiff(tmp_path: Path) -> None:
    values = np.full((H, W), 51400, dtype=">u2")  # 51400 / 257 = 200
    img = Image.fromarray(values)
    assert img.mode == "I;16B"
    path = save(img, tmp_path / "be.tif")
    assert np.all(np.asarray(load_image(path)) == 200)


def test_int32_image_small_values_are_kept_large_ones_scaled(tmp_path: Path) -> None:
    small = save(Image.fromarray(gradient(np.int32, 200)), tmp_path / "small.tif")
    assert Image.open(small).mode == "I"
    np.testing.assert_array_equal(np.asarray(load_image(small))[..., 0], gradient(np.uint8, 200))
    large = gradient(np.int32, 65535)
    out = np.asarray(load_image(save(Image.fromarray(large), tmp_path / "large.tif")))[..., 0]
    np.testing.assert_array_equal(out, np.rint(large / 257).astype(np.uint8))


def test_float_image(tmp_path: Path) -> None:
    values = np.linspace(0.0, 1.0, H * W, dtype=np.float32).reshape(H, W)
    out = np.asarray(load_image(save(Image.fromarray(values), tmp_path / "float.tif")))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_palette_image(tmp_path: Path) -> None:
    img = Image.new("P", (W, H))
    img.putpalette([0, 0, 0, 250, 10, 20])
    img.putdata([1 if x >= W // 2 else 0 for _ in range(H) for x in range(W)])
    rgb = np.asarray(load_image(save(img, tmp_path / "palette.png")))
    assert rgb[0, 0].tolist() == [0, 0, 0]
    assert rgb[0, -1].tolist() == [250, 10, 20]


def test_cmyk_image(tmp_path: Path) -> None:
    img = load_image(save(Image.new("CMYK", (W, H), (0, 0, 0, 0)), tmp_path / "cmyk.jpg"))
    assert img.mode == "RGB" and img.size == (W, H)
    assert np.asarray(img).min() > 240  # no ink is white


def test_truncated_file(tmp_path: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DatasetError, match=r"cannot read image file .*truncated\.png: .*truncated"):
        load_image(path)


def test_truncated_jpeg(tmp_path: Path) -> None:
    noise = np.random.default_rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[:800])
    with pytest.raises(DatasetError, match=r"cut\.jpg"):
        load_image(path)


def test_zero_byte_and_text_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty\.png: cannot identify image file"):
        load_image(empty)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    with pytest.raises(DatasetError, match=r"notes\.png: cannot identify image file"):
        load_image(text)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"image file .*gone\.png does not exist"):
        load_image(tmp_path / "gone.png")
    with pytest.raises(DatasetError, match=r"is a folder"):
        load_image(tmp_path)


class OneWayStream(io.RawIOBase):
    """A binary stream that cannot seek (a socket, a pipe)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def, override]
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def test_image_in_memory_reads_as_its_file(tmp_path: Path) -> None:
    pixels = np.random.default_rng(4).integers(0, 256, (H, W, 3), dtype=np.uint8)
    data = encode(pixels)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    want = np.asarray(load_image(path))
    np.testing.assert_array_equal(want, pixels)
    with open(path, "rb") as stream:
        for source in (data, bytearray(data), memoryview(data), io.BytesIO(data), OneWayStream(data), stream):
            img = load_image(source)
            assert img.mode == "RGB", type(source)
            np.testing.assert_array_equal(np.asarray(img), want)
    grey = load_image(encode(gradient()), name="grey.png", formats=("PNG",))  # converted as files are
    assert grey.mode == "RGB" and grey.size == (W, H)
    with pytest.raises(TypeError, match="give a path, bytes or a binary stream"):
        load_image(42)  # type: ignore[arg-type]


def test_image_in_memory_errors_name_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    noise = np.random.default_rng(5).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = encode(noise)
    with pytest.raises(DatasetError, match=r"^cannot read image half\.png: .*truncated"):
        load_image(data[: len(data) // 2], name="half.png")
    with pytest.raises(DatasetError, match=r"^cannot read image up\.png: cannot identify image file \(the data is empty"):
        load_image(b"", name="up.png")
    with pytest.raises(DatasetError, match=r"^cannot read image <bytes>: cannot identify image file \(not an image"):
        load_image(b"hello\n" * 20)
    path = tmp_path / "named.png"
    path.write_bytes(data[:100])
    with open(path, "rb") as stream, pytest.raises(DatasetError, match=r"^cannot read image .*named\.png: "):
        load_image(stream)  # a file's stream names itself
    gif = encode(noise, "GIF")
    assert load_image(gif).size == (128, 128)  # every format by default
    with pytest.raises(UnacceptedFormatError, match=r"^cannot read image a\.gif: GIF images are not accepted here "
                                                    r"\(accepted: PNG, JPEG\)"):
        load_image(gif, name="a.gif", formats=("PNG", "JPEG"))
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)  # the header check, before anything is decoded
    with pytest.raises(TooManyPixelsError, match=r"^image big\.png: 128x128 pixels is more than the limit of 10,000 "):
        load_image(data, name="big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 50 * 50)  # Pillow's own bomb error, converted
    with pytest.raises(TooManyPixelsError, match=r"^image big\.png: 16,384 pixels is more than the limit of 2,500 "):
        load_image(data, name="big.png")


# --------------------------------------------------------------------------------------------------------------------
# load_mask
# --------------------------------------------------------------------------------------------------------------------


def expected_mask() -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[3:9, 5:20] = True
    return mask


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "I;16", "P"])
def test_mask_modes(tmp_path: Path, mode: str) -> None:
    grey = Image.fromarray(expected_mask().astype(np.uint8) * 255)
    img = grey.convert(mode) if mode != "I;16" else Image.fromarray(expected_mask().astype(np.uint16) * 65535)
    mask = load_mask(save(img, tmp_path / f"mask_{mode.replace(';', '')}.png"))
    assert mask.dtype == bool and mask.shape == (H, W)
    np.testing.assert_array_equal(mask, expected_mask())


def test_visa_mask_values(tmp_path: Path) -> None:
    values = np.zeros((H, W), dtype=np.uint8)
    values[0:4, 0:4] = 1
    values[10:12, 20:30] = 2
    mask = load_mask(save(Image.fromarray(values), tmp_path / "visa.png"))
    np.testing.assert_array_equal(mask, values > 0)
    assert mask.sum() == 16 + 20


def test_palette_mask_uses_colours_not_indices(tmp_path: Path) -> None:
    img = Image.new("P", (W, H))
    img.putpalette([255, 255, 255, 0, 0, 0])  # index 0 is white (defect), index 1 black (normal)
    img.putdata([0 if m else 1 for m in expected_mask().ravel()])
    np.testing.assert_array_equal(load_mask(save(img, tmp_path / "inv.png")), expected_mask())


def test_mask_size_mismatch_names_both_files(tmp_path: Path) -> None:
    path = save(Image.new("L", (W, H)), tmp_path / "m_mask.png")
    np.testing.assert_array_equal(load_mask(path, "img.png", (W, H)), np.zeros((H, W), bool))
    with pytest.raises(DatasetError, match=r"mask .*m_mask\.png is 32x24 .* image .*photo\.png is 64x48"):
        load_mask(path, tmp_path / "photo.png", (64, 48))


def test_broken_mask(tmp_path: Path) -> None:
    path = tmp_path / "bad_mask.png"
    path.write_text("nope")
    with pytest.raises(DatasetError, match=r"cannot read mask file .*bad_mask\.png"):
        load_mask(path)


# --------------------------------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------------------------------


def test_resize_image_is_a_straight_bilinear_resize() -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    out = resize_image(img, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(img.resize((16, 16), Image.Resampling.BILINEAR)))
    flat = resize_image(Image.new("RGB", (300, 40), (9, 99, 199)), 64)  # aspect ratio ignored, no crop
    assert flat.shape == (64, 64, 3) and np.all(flat == (9, 99, 199))


def test_resize_image_converts_grey_and_rejects_bad_size() -> None:
    out = resize_image(Image.new("L", (10, 20), 77), 8)
    assert out.shape == (8, 8, 3) and np.all(out == 77)
    with pytest.raises(ValueError, match="size"):
        resize_image(Image.new("RGB", (4, 4)), 0)


def test_load_batch_is_the_models_uint8_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    pics = [Image.fromarray(rng.integers(0, 256, (H + 4 * i, W, 3), dtype=np.uint8)) for i in range(3)]
    path = save(pics[1], tmp_path / "b.png")
    batch = load_batch([pics[0], path, encode(np.asarray(pics[2])), Image.fromarray(gradient())], 16)
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == np.uint8
    assert batch.transpose(0, 2, 3, 1).flags.c_contiguous  # channels-last memory: PyTorch's CPU convolutions' fastest
    for got, img in zip(batch, [*pics, Image.fromarray(gradient())]):
        np.testing.assert_array_equal(got, resize_image(img, 16).transpose(2, 0, 1))
    assert load_batch([], 16).shape == (0, 3, 16, 16)
    with pytest.raises(DatasetError, match=r"gone\.png does not exist"):
        load_batch([path, tmp_path / "gone.png"], 16)
    with pytest.raises(ValueError, match="size"):
        load_batch([path], 0)


def test_resize_mask_nearest() -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[:, :2] = True
    mask[3, 3] = True
    out = resize_mask(mask, 8)
    assert out.dtype == bool and out.shape == (8, 8)
    assert out[:, :4].all()
    assert out[6:, 6:].all() and not out[:6, 4:].any() and not out[6:, 4:6].any()
    assert resize_mask(np.ones((30, 50), bool), 7).all()


# --------------------------------------------------------------------------------------------------------------------
# read_sample
# --------------------------------------------------------------------------------------------------------------------


def make_sample(tmp_path: Path, label: int, mask_size: tuple[int, int] | None) -> Sample:
    image = save(Image.new("RGB", (W, H), (10, 20, 30)), tmp_path / "img.png")
    mask = None
    if mask_size is not None:
        pixels = np.zeros((mask_size[1], mask_size[0]), dtype=np.uint8)
        pixels[:, : mask_size[0] // 2] = 255
        mask = save(Image.fromarray(pixels), tmp_path / "img_mask.png")
    return Sample(image, "thing", label, "good" if label == 0 else "crack", mask, "test")


def test_read_sample_with_mask(tmp_path: Path) -> None:
    pixels, mask = read_sample(make_sample(tmp_path, 1, (W, H)), 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8 and np.all(pixels == (10, 20, 30))
    assert mask is not None and mask.shape == (16, 16) and mask.dtype == bool
    assert mask[:, :8].all() and not mask[:, 8:].any()


def test_read_sample_without_mask(tmp_path: Path) -> None:
    _, normal = read_sample(make_sample(tmp_path, 0, None), 16)
    assert normal is not None and normal.shape == (16, 16) and not normal.any()
    _, unknown = read_sample(make_sample(tmp_path, 1, None), 16)
    assert unknown is None


def test_read_sample_checks_original_sizes(tmp_path: Path) -> None:
    sample = make_sample(tmp_path, 1, (W + 1, H))
    with pytest.raises(DatasetError, match=r"img_mask\.png is 33x24 .*img\.png is 32x24"):
        read_sample(sample, 16)


def test_read_sample_real_grey_image(iad_mix: Path) -> None:
    samples = read_mvtec(iad_mix, "test", ["magnetic_tile"])
    sample = next(s for s in samples if s.label == 1)
    assert Image.open(sample.image).mode == "L"
    pixels, mask = read_sample(sample, 64)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    assert mask is not None and mask.shape == (64, 64) and mask.dtype == bool
