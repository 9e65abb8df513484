"""InstructBlipImageProcessor against transformers' PIL-backend BlipImageProcessor on real photos, every input type,
odd PIL modes, and inputs that must be refused with a clear error."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from assets import PHOTOS, encode, photo, png_header_only
from PIL import Image, ImageFile
from transformers import BlipImageProcessorPil

from instructblip.processing.image import BlipImageProcessor, InstructBlipImageProcessor

ATOL = 1e-6


@pytest.fixture(scope="module")
def hf():
    return BlipImageProcessorPil(size={"height": 224, "width": 224})


@pytest.fixture(scope="module")
def ours():
    return InstructBlipImageProcessor()


def assert_same(expected: torch.Tensor, actual: torch.Tensor) -> None:
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def as_json(data: dict) -> dict:
    return json.loads(json.dumps(data))


def rgba_gradient() -> Image.Image:
    array = np.array(Image.fromarray(photo("astronaut")).convert("RGBA"))
    array[..., 3] = np.linspace(0, 255, array.shape[1]).astype(np.uint8)[None]
    return Image.fromarray(array)


# ----------------------------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("name", PHOTOS)
def test_photos_match_transformers_for_every_input_type(name, hf, ours, tmp_path):
    array = photo(name)
    image = Image.fromarray(array)
    expected = hf(image, return_tensors="pt")["pixel_values"]
    assert expected.shape == (1, 3, 224, 224)
    assert_same(expected, ours(image)["pixel_values"])
    assert_same(expected, ours(array)["pixel_values"])
    if array.ndim == 3:
        chw = np.ascontiguousarray(array.transpose(2, 0, 1))
        assert_same(expected, ours(chw)["pixel_values"])
        assert_same(expected, ours(torch.from_numpy(chw))["pixel_values"])
        assert_same(expected, ours(torch.from_numpy(array))["pixel_values"])
        floats = array.astype(np.float32) / 255
        assert_same(hf(floats, do_rescale=False, return_tensors="pt")["pixel_values"],
                    ours(floats, do_rescale=False)["pixel_values"])
    # files: transformers opens a path with EXIF transpose + convert("RGB"); bytes and Path objects go the same way
    png, jpg = tmp_path / f"{name}.png", tmp_path / f"{name}.jpg"
    png.write_bytes(encode(image))
    image.convert("RGB").save(jpg, quality=90)
    assert_same(hf(str(png), return_tensors="pt")["pixel_values"], ours(str(png))["pixel_values"])
    from_jpg = hf(str(jpg), return_tensors="pt")["pixel_values"]
    assert_same(from_jpg, ours(str(jpg))["pixel_values"])
    assert_same(from_jpg, ours(jpg)["pixel_values"])
    assert_same(from_jpg, ours(jpg.read_bytes())["pixel_values"])


@pytest.mark.parametrize(
    "mode", ["L", "LA", "RGBA", "CMYK", "1", "I;16", "I", "F", "P", "P+transparency", "L+transparency", "YCbCr"]
)
def test_pil_modes_match_transformers(mode, hf, ours):
    base = Image.fromarray(photo("chelsea"))
    if mode == "LA":
        image = rgba_gradient().convert("LA")
    elif mode == "RGBA":
        image = rgba_gradient()
    elif mode == "I;16":
        image = Image.fromarray(np.array(base.convert("L")).astype(np.uint16) * 257).convert("I;16")
    elif mode.endswith("+transparency"):
        image = base.convert(mode.split("+")[0])
        image.info["transparency"] = 0
    else:
        image = base.convert(mode)
    assert_same(hf(image, return_tensors="pt")["pixel_values"], ours(image)["pixel_values"])


def test_transparency_is_composited_on_white(ours):
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    pixels = ours(clear, do_normalize=False)["pixel_values"]
    torch.testing.assert_close(pixels, torch.ones_like(pixels))


def test_rgba_arrays_match_transformers(hf, ours):
    array = np.array(rgba_gradient())
    assert_same(hf(array, return_tensors="pt")["pixel_values"], ours(array)["pixel_values"])
    floats = array.astype(np.float64) / 255
    assert_same(hf(floats, do_rescale=False, return_tensors="pt")["pixel_values"],
                ours(floats, do_rescale=False)["pixel_values"])


def test_float_unit_range_with_rescale_warns_and_matches_transformers(hf, ours):
    floats = photo("coffee").astype(np.float32) / 255
    with pytest.warns(UserWarning, match="do_rescale=False"):
        pixels = ours(floats)["pixel_values"]
    assert_same(hf(floats, return_tensors="pt")["pixel_values"], pixels)


def test_exif_orientation_is_applied_to_files_like_transformers(hf, ours, tmp_path):
    image = Image.fromarray(photo("rocket"))  # 640 wide, 427 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    expected = hf(str(path), return_tensors="pt")["pixel_values"]
    assert_same(expected, ours(path.read_bytes())["pixel_values"])
    unrotated = ours(Image.open(path))["pixel_values"]  # a PIL image is taken as it is, as in transformers
    assert (expected - unrotated).abs().max() > 0.1


def test_batches_and_other_settings_match_transformers(hf, ours):
    images = [Image.fromarray(photo(n)) for n in ("astronaut", "camera", "logo")]
    assert_same(hf(images, return_tensors="pt")["pixel_values"], ours(images)["pixel_values"])
    batch = np.stack([photo("astronaut"), photo("immunohistochemistry")])
    assert_same(hf(batch, return_tensors="pt")["pixel_values"], ours(batch)["pixel_values"])
    assert ours(tuple(images))["pixel_values"].shape == (3, 3, 224, 224)
    settings = dict(size={"height": 48, "width": 32}, resample=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.25] * 3)
    assert_same(BlipImageProcessorPil(**settings)(images, return_tensors="pt")["pixel_values"],
                InstructBlipImageProcessor(**settings)(images)["pixel_values"])
    assert ours(images, return_tensors="np")["pixel_values"].shape == (3, 3, 224, 224)
    assert [a.shape for a in ours(images, return_tensors=None)["pixel_values"]] == [(3, 224, 224)] * 3


def test_grey_2d_array_is_accepted(ours):
    grey = photo("camera")
    assert_same(ours(Image.fromarray(grey))["pixel_values"], ours(grey)["pixel_values"])


# ----------------------------------------------------------------------------------------------------------------------
# JSON layout


def test_json_layout_round_trips_with_transformers(hf, tmp_path):
    ours = InstructBlipImageProcessor()
    assert ours.to_dict() == as_json(hf.to_dict())
    assert BlipImageProcessor is InstructBlipImageProcessor
    ours.save_pretrained(tmp_path / "ours")
    loaded = BlipImageProcessorPil.from_pretrained(tmp_path / "ours")
    assert as_json(loaded.to_dict()) == as_json(hf.to_dict())
    custom = BlipImageProcessorPil(size={"height": 364, "width": 364}, do_convert_rgb=False, image_mean=[0.5] * 3)
    custom.save_pretrained(tmp_path / "hf")
    mine = InstructBlipImageProcessor.from_pretrained(tmp_path / "hf")
    assert mine.to_dict() == as_json(custom.to_dict())
    assert mine.size == {"height": 364, "width": 364} and mine.do_convert_rgb is False


def test_reads_the_image_processor_inside_processor_config(tmp_path):
    entry = {**InstructBlipImageProcessor(size=(96, 128)).to_dict()}
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": entry, "num_query_tokens": 32}))
    assert InstructBlipImageProcessor.from_pretrained(tmp_path).size == {"height": 96, "width": 128}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        InstructBlipImageProcessor.from_pretrained(empty)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="size"):
        InstructBlipImageProcessor(size={"shortest_edge": 224})
    with pytest.raises(ValueError, match="image_std"):
        InstructBlipImageProcessor(image_std=[0.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_unreadable_bytes(ours):
    with pytest.raises(ValueError, match="not an image"):
        ours(b"this is certainly not an image")
    with pytest.raises(ValueError, match="empty"):
        ours(b"")


def test_text_file_is_not_an_image(ours, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not an image"):
        ours(str(path))


def test_truncated_jpeg_is_refused(ours, tmp_path, monkeypatch):
    data = encode(Image.fromarray(photo("astronaut")), "JPEG", quality=90)
    truncated = data[: len(data) // 2]
    with pytest.raises(ValueError, match="truncated"):
        ours(truncated)
    path = tmp_path / "cut.jpg"
    path.write_bytes(truncated)
    with pytest.raises(ValueError, match="truncated"):
        ours(path)
    # even when another library told PIL to accept truncated files
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ValueError, match="truncated"):
        ours(truncated)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_empty_images_are_refused(ours):
    with pytest.raises(ValueError, match="0x0"):
        ours(Image.new("RGB", (0, 0)))
    with pytest.raises(ValueError, match="empty"):
        ours(Image.new("RGB", (0, 10)))
    with pytest.raises(ValueError, match="empty"):
        ours(np.zeros((10, 0, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="no images"):
        ours([])


def test_decompression_bomb_is_refused_before_decoding(ours):
    header = png_header_only(100_000, 100_000)  # 10 Gpx claimed, a few bytes on disk
    with pytest.raises(ValueError, match="max_image_pixels"):
        ours(header)
    small_limit = InstructBlipImageProcessor(max_image_pixels=1000)
    with pytest.raises(ValueError, match=r"512x512 = 262144 pixels, more than max_image_pixels=1000"):
        small_limit(encode(Image.fromarray(photo("astronaut"))))
    assert small_limit(Image.fromarray(photo("astronaut")))["pixel_values"].shape == (1, 3, 224, 224)


def test_missing_file_names_the_path(ours, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        ours(str(missing))
    with pytest.raises(ValueError, match="URL"):
        ours("https://example.com/cat.png")


def test_unsupported_types_and_values(ours):
    with pytest.raises(ValueError, match="unsupported image type int"):
        ours(42)
    with pytest.raises(ValueError, match="unsupported image type dict"):
        ours({"image": 1})
    with pytest.raises(ValueError, match="channel axis"):
        ours(np.zeros((10, 10, 7), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        ours(np.full((8, 8, 3), 1.5, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        ours(np.full((8, 8, 3), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="return_tensors"):
        ours(np.zeros((8, 8, 3), dtype=np.uint8), return_tensors="tf")


def test_pil_image_from_bytes_io_stays_usable(ours):
    image = Image.open(io.BytesIO(encode(Image.fromarray(photo("coins")))))
    assert ours(image)["pixel_values"].shape == (1, 3, 224, 224)
