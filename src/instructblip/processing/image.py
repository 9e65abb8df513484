"""Image preprocessing for InstructBLIP: the numbers of transformers' `BlipImageProcessorPil` (the PIL backend that
`BlipImageProcessor` falls back to without torchvision), read from and written to the Hugging Face JSON layout.

The pipeline for one image:
1. load: a path (str / PathLike) or raw bytes is opened with PIL, its header checked (size, pixel limit) before any
   pixel is decoded, then decoded in full (a truncated file is an error), EXIF-rotated and converted with
   `convert("RGB")` - exactly what transformers' `load_image` does for a path (so an alpha channel in a *file* is
   dropped, not composited; this keeps file inputs identical to transformers).
2. convert to RGB (`do_convert_rgb`): PIL images with transparency (RGBA, LA, P or L with a transparency entry) are
   composited onto white, any other mode goes through `image.convert("RGB")`; arrays with 1 channel are repeated,
   arrays with 4 channels are composited onto white.
3. resize to exactly `size` (no aspect ratio kept, no crop) with PIL (`resample=3`: bicubic). Arrays go through PIL
   too: floats in [0, 1] are scaled to 0..255 and truncated to uint8 first, as transformers does.
4. rescale by `rescale_factor` (1/255; computed in float64, stored as float32), normalize with the OpenAI CLIP
   mean/std in float32.

Arrays may be HWC or CHW (the channel axis is the one of size 1, 3 or 4; CHW wins when both fit, as in transformers).
Float arrays already in [0, 1] with `do_rescale=True` are rescaled twice, as in transformers: pass `do_rescale=False`
for them (a warning says so).
"""

from __future__ import annotations

import io
import json
import os
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from instructblip.files import read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL's own warning threshold (Image.MAX_IMAGE_PIXELS): ~179 Mpx, a 13.4k x 13.4k image
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"

_PIL_GLOBALS_LOCK = threading.Lock()


class InstructBlipImageProcessor:
    """Resize to `size`, rescale, normalize: `processor(images)["pixel_values"]` is float32 `[B, 3, H, W]`.

    The defaults are InstructBLIP's (224x224, bicubic, CLIP mean/std), which the hub's `preprocessor_config.json`
    spells out; transformers' `BlipImageProcessor` class itself defaults to 384x384.

    Args:
        size: output `{"height": h, "width": w}`, an `(h, w)` pair or one int for a square.
        resample: PIL resampling filter (0 nearest, 2 bilinear, 3 bicubic, ...).
        max_image_pixels: largest width * height accepted from a file or bytes (checked from the header, before
            decoding); `None` for no limit of our own (PIL still refuses more than 2 * `PIL.Image.MAX_IMAGE_PIXELS`).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict[str, int] | Sequence[int] | int = 224,
        resample: int = Image.Resampling.BICUBIC,
        do_resize: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] | float = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] | float = OPENAI_CLIP_STD,
        do_convert_rgb: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.size = _size_dict(size)
        self.resample = int(resample)
        self.do_resize = do_resize
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = _channel_values(image_mean, "image_mean")
        self.image_std = _channel_values(image_std, "image_std")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")
        self.do_convert_rgb = do_convert_rgb
        self.max_image_pixels = max_image_pixels

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.to_dict())})"

    # ------------------------------------------------------------------------------------------------------------------
    # JSON layout

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> InstructBlipImageProcessor:
        """Build from a `preprocessor_config.json` dict; keys we do not use (`image_processor_type`,
        `processor_class`, `do_center_crop`, ...) are ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"an image processor config must be a JSON object, got {type(data).__name__}")
        names = (
            "size", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
            "image_std", "do_convert_rgb", "max_image_pixels",
        )
        kwargs = {k: data[k] for k in names if k in data and data[k] is not None}
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The dict transformers writes for a `BlipImageProcessor` (and reads back)."""
        return {
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.image_mean),
            "image_processor_type": "BlipImageProcessor",
            "image_std": list(self.image_std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": dict(self.size),
        }

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> InstructBlipImageProcessor:
        """Read `preprocessor_config.json` (hub layout) or the `image_processor` entry of `processor_config.json`
        (what transformers 5.x `save_pretrained` writes) from a directory or hub id."""
        from instructblip.hub import resolve_checkpoint_dir

        directory = resolve_checkpoint_dir(path)
        file = os.path.join(directory, PREPROCESSOR_CONFIG_NAME)
        if os.path.isfile(file):
            return cls.from_dict(read_json(file), **overrides)
        file = os.path.join(directory, PROCESSOR_CONFIG_NAME)
        if os.path.isfile(file):
            data = read_json(file)
            if isinstance(data.get("image_processor"), dict):
                return cls.from_dict(data["image_processor"], **overrides)
        raise FileNotFoundError(
            f"{directory} has no {PREPROCESSOR_CONFIG_NAME} and no {PROCESSOR_CONFIG_NAME} with an 'image_processor' "
            f"entry"
        )

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write `preprocessor_config.json` (the hub layout; transformers 5.x reads it too)."""
        os.makedirs(directory, exist_ok=True)
        file = os.path.join(directory, PREPROCESSOR_CONFIG_NAME)
        with open(file, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return file

    # ------------------------------------------------------------------------------------------------------------------
    # Processing

    def __call__(self, images: Any, return_tensors: str | None = "pt", **overrides: Any) -> dict[str, Any]:
        """Preprocess one image or a list of them.

        `images`: PIL image, numpy array or torch tensor (HWC or CHW; a 4-D array is a batch; a 2-D one is grey),
        file path (str or PathLike), raw encoded bytes, or a list/tuple of those.
        `return_tensors`: "pt" (a `[B, 3, H, W]` tensor), "np" (an array) or None (a list of `[3, H, W]` arrays).
        `overrides`: any constructor argument for this call only, e.g. `do_rescale=False`.
        Returns `{"pixel_values": ...}`. Raises `ValueError` (or `FileNotFoundError` for a missing path) naming the
        problem with the input.
        """
        if overrides:
            return type(self).from_dict({**self.to_dict(), "max_image_pixels": self.max_image_pixels}, **overrides)(
                images, return_tensors=return_tensors
            )
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        arrays = [self.preprocess_one(image) for image in _flat_list(images)]
        if return_tensors is None:
            return {"pixel_values": arrays}
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes {sorted(shapes)} cannot be stacked; set do_resize=True")
        batch = np.stack(arrays)
        return {"pixel_values": torch.from_numpy(batch) if return_tensors == "pt" else batch}

    def preprocess_one(self, image: Any) -> np.ndarray:
        """One image (any accepted input type) -> `[C, H, W]` array (float32 unless every step is switched off)."""
        if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
            image = load_image(image, max_image_pixels=self.max_image_pixels)
        array = self._to_channels_first(image)
        float_unit_range = np.issubdtype(array.dtype, np.floating) and array.min() >= 0 and array.max() <= 1
        if self.do_resize:
            array = _pil_resize(array, self.size["height"], self.size["width"], self.resample)
        if self.do_rescale:
            if float_unit_range and array.max() > 0:
                warnings.warn(
                    "The image has float values in [0, 1] and do_rescale=True, so it is rescaled a second time "
                    "(as in transformers); pass do_rescale=False if it is already rescaled.",
                    stacklevel=3,
                )
            array = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(array.dtype, np.floating):
                array = array.astype(np.float32)
            if array.shape[0] != len(self.image_mean) or array.shape[0] != len(self.image_std):
                raise ValueError(
                    f"the image has {array.shape[0]} channels but image_mean/image_std have "
                    f"{len(self.image_mean)}/{len(self.image_std)} values"
                )
            mean = np.array(self.image_mean, dtype=array.dtype)[:, None, None]
            std = np.array(self.image_std, dtype=array.dtype)[:, None, None]
            array = (array - mean) / std
        return array

    def _to_channels_first(self, image: Any) -> np.ndarray:
        """RGB conversion and layout: PIL / array / tensor -> `[C, H, W]` array (transformers' `process_image`)."""
        if isinstance(image, Image.Image):
            _check_size(image.width, image.height, None, "the image")
            array = convert_to_rgb(image) if self.do_convert_rgb else np.asarray(image)
            return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if not isinstance(image, np.ndarray):
            raise ValueError(
                f"unsupported image type {type(image).__name__}: pass a PIL image, a numpy array, a torch tensor, a "
                f"file path or the encoded bytes of an image"
            )
        numeric = np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
        if image.dtype == bool or not numeric:
            raise ValueError(f"unsupported image array dtype {image.dtype}; use uint8 or float")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise ValueError(f"an image array must have 2 or 3 dimensions (HW, HWC or CHW), got shape {image.shape}")
        channels_last = _channel_axis(image) == 2
        if channels_last:
            image = np.moveaxis(image, -1, 0)
        _check_size(image.shape[2], image.shape[1], None, "the image array")
        if not np.isfinite(image).all():
            raise ValueError("the image array contains NaN or infinite values")
        if self.do_convert_rgb:
            image = _convert_array_to_rgb(image)
        return image


BlipImageProcessor = InstructBlipImageProcessor


# ----------------------------------------------------------------------------------------------------------------------
# Loading and conversion helpers


def load_image(source: str | os.PathLike | bytes | bytearray | memoryview, max_image_pixels: int | None = None):
    """Open a file path or encoded bytes as an RGB PIL image, as transformers' `load_image` does for a path
    (EXIF transpose, `convert("RGB")`), with errors that name the problem.

    The header is checked first (zero size, more than `max_image_pixels` pixels), then every pixel is decoded, so
    a truncated file raises instead of coming back half grey."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        what = f"the image bytes ({len(source)} bytes)"
        if len(source) == 0:
            raise ValueError("the image bytes are empty")
        fp = io.BytesIO(bytes(source))
    else:
        path = os.fspath(source)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if path.startswith(("http://", "https://")):
            raise ValueError(f"{path} is a URL; download the image first and pass the file path or its bytes")
        if not os.path.exists(path):
            raise FileNotFoundError(f"image file not found: {path}")
        if not os.path.isfile(path):
            raise ValueError(f"{path} is not a file")
        what = path
        fp = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
    except UnidentifiedImageError:
        raise ValueError(f"{what} is not an image PIL can read (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"{what} is too large to decode safely ({e}); this is PIL's own decompression bomb guard, which refuses "
            f"more than 2 * PIL.Image.MAX_IMAGE_PIXELS whatever max_image_pixels={max_image_pixels} allows"
        ) from None
    except OSError as e:
        raise ValueError(f"cannot read {what}: {e}") from None
    _check_size(image.width, image.height, max_image_pixels, what)
    try:
        _load_fully(image)
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        msg = str(e)
        if "truncated" in msg or "broken data stream" in msg or "unrecognized data stream" in msg:
            raise ValueError(f"{what} is truncated or corrupt: {e}") from None
        raise ValueError(f"cannot decode {what}: {e}") from None


def _load_fully(image: Image.Image) -> None:
    """`image.load()` with `ImageFile.LOAD_TRUNCATED_IMAGES` off, so that PIL raises on a truncated file instead of
    padding it (another library may have switched that global on)."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        image.load()
        return
    with _PIL_GLOBALS_LOCK:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            image.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = True


def convert_to_rgb(image: Image.Image) -> np.ndarray:
    """PIL image -> `[H, W, 3]` uint8, transparency composited onto white (transformers' `convert_to_rgb`)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        rgb = image.convert("RGB")
    return np.array(rgb)


def _convert_array_to_rgb(image: np.ndarray) -> np.ndarray:
    """`[C, H, W]` array: 1 channel -> repeated 3 times; 4 channels -> composited onto white; else unchanged."""
    channels = image.shape[0]
    if channels == 1:
        return np.repeat(image, 3, axis=0)
    if channels == 4:
        floating = np.issubdtype(image.dtype, np.floating)
        if floating and (image.min() < 0.0 or image.max() > 1.0):
            raise ValueError(
                f"a float RGBA image must have values in [0, 1] to composite its alpha, got "
                f"[{image.min()}, {image.max()}]"
            )
        white = 1.0 if floating else 255
        hwc = np.moveaxis(image, 0, -1)
        alpha = hwc[..., 3:4] / white
        composite = alpha * hwc[..., :3] + (1 - alpha) * white
        rgb = composite.astype(image.dtype) if floating else np.round(composite).astype(image.dtype)
        return np.moveaxis(rgb, -1, 0)
    return image


def _pil_resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """`[C, H, W]` array -> resized `[C, height, width]` via a uint8 PIL image (transformers' `resize`)."""
    hwc = np.moveaxis(image, 0, -1)
    if hwc.shape[-1] == 1:
        hwc = hwc[..., 0]
    scale_back = _needs_rescale_for_pil(hwc)
    if scale_back:
        hwc = (hwc.astype(np.float64) * 255).astype(np.float32)
    pil = Image.fromarray(hwc.astype(np.uint8))
    resized = np.array(pil.resize((width, height), resample=resample))
    if resized.ndim == 2:
        resized = resized[..., None]
    resized = np.moveaxis(resized, -1, 0)
    if scale_back:
        resized = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    return resized


def _needs_rescale_for_pil(image: np.ndarray) -> bool:
    """Whether an array must be multiplied by 255 to become uint8 (floats in [0, 1]); errors for other ranges."""
    if image.dtype == np.uint8:
        return False
    if np.allclose(image, image.astype(int)):
        if np.all(image >= 0) and np.all(image <= 255):
            return False
        raise ValueError(
            f"the image has integer values outside [0, 255] ([{image.min()}, {image.max()}]); convert it to uint8"
        )
    if np.all(image >= 0) and np.all(image <= 1):
        return True
    raise ValueError(
        f"the float image has values outside [0, 1] ([{image.min()}, {image.max()}]) that are not whole numbers in "
        f"[0, 255]; scale it to [0, 1] or [0, 255]"
    )


def _channel_axis(image: np.ndarray) -> int:
    """0 for CHW, 2 for HWC: the axis of size 1, 3 or 4, the first one when both fit (as transformers)."""
    if image.shape[0] in (1, 3, 4):
        return 0
    if image.shape[2] in (1, 3, 4):
        return 2
    raise ValueError(f"cannot find the channel axis of an image array of shape {image.shape} (need 1, 3 or 4 channels)")


def _check_size(width: int, height: int, max_pixels: int | None, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"{what} is empty: {width}x{height} pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(
            f"{what} has {width}x{height} = {width * height} pixels, more than max_image_pixels={max_pixels} "
            f"(decompression bomb guard; raise max_image_pixels to allow it)"
        )


def _flat_list(images: Any) -> list:
    """A single image, a list/tuple of images or a 4-D batch array/tensor -> list of single images."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("no images given (empty list)")
        flat = []
        for image in images:
            if isinstance(image, (list, tuple)):
                flat.extend(_flat_list(image))
            elif isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
                flat.extend(list(image))
            else:
                flat.append(image)
        return flat
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        if images.shape[0] == 0:
            raise ValueError("no images given (empty batch)")
        return list(images)
    if images is None:
        raise ValueError("no images given (None)")
    return [images]


def _size_dict(size: dict[str, int] | Sequence[int] | int) -> dict[str, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size}
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, dict) or set(size) != {"height", "width"}:
        raise ValueError(f"size must be {{'height': h, 'width': w}}, (h, w) or an int, got {size!r}")
    for key, value in size.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"size[{key!r}] must be a positive integer, got {value!r}")
    return {"height": size["height"], "width": size["width"]}


def _channel_values(values: Sequence[float] | float, name: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError(f"{name} must not be empty")
    return values
