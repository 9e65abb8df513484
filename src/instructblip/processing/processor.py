"""`InstructBlipProcessor`: images + instruction text -> the model's inputs, as transformers 5.x builds them.

For a batch of images with instructions it returns (key order as 5.x):
- `qformer_input_ids`, `qformer_attention_mask`: the instruction in the Q-Former's BERT vocabulary (`[CLS] ... [SEP]`).
- `input_ids`, `attention_mask`: the instruction in the LLM vocabulary, padded/truncated, and then - only when images
  are given - `num_query_tokens` copies of `<image>` put in front of every row (after padding, so a left-padded
  LLaMA row reads `<image>x32 [PAD]... </s> prompt`, a T5 row `<image>x32 prompt </s> <pad>...`). The model swaps
  those positions for the image features.
- `pixel_values`: `[B, 3, 224, 224]` float32.

Legacy checkpoints (2023 configs without `image_token_index`) prepend the image features inside the model: for them
(`insert_image_tokens=False`) no `<image>` tokens are written and `max_length` is not reduced.

Videos (`videos=`, or `images=` for `InstructBlipVideoProcessor` as in transformers): each video is a list of frames
(or a file, `processing/video.py`); `pixel_values` is then `[B, T, 3, 224, 224]` and each row gets T x
`num_query_tokens` placeholder tokens, one block per frame. The family's processors differ in little:
- `Blip2Processor` (BLIP-2): no Q-Former tokenizer and no `qformer_*` outputs (its Q-Former reads no instruction);
- `InstructBlipVideoProcessor`: the placeholder is `<video>` (unless the checkpoint's config names `<image>`), and
  `images` are videos. transformers writes 4 x Q placeholders whatever the number of frames (the model's count is
  T x Q, so other counts fail there); here it is T x Q, the same for the paper's 4 frames.

Text options follow transformers: `padding` (False, True/"longest", "max_length"), `truncation`, `max_length` (the
Q-Former text gets `max_length`, the LLM text `max_length - num_query_tokens`, as in 5.x), `padding_side`. Keys of
that kind written in the LLM's `tokenizer_config.json` (e.g. `padding_side`) are defaults for *both* tokenizers,
as in 5.x.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from instructblip.files import read_json
from instructblip.processing.image import PREPROCESSOR_CONFIG_NAME, PROCESSOR_CONFIG_NAME, InstructBlipImageProcessor
from instructblip.processing.tokenizers import Tokenizer
from instructblip.processing.video import NUM_FRAMES, batch_of_videos

QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
VIDEO_PREPROCESSOR_CONFIG_NAME = "video_preprocessor_config.json"  # transformers 5.x's video processor settings
# text options that, when written in the LLM tokenizer's config, become call defaults (transformers' _merge_kwargs)
_TEXT_OPTIONS = ("add_special_tokens", "padding", "truncation", "max_length", "pad_to_multiple_of", "padding_side")
# what `from_pretrained` takes besides the path: the hub's keywords and transformers' tokenizer choice
PROCESSOR_KEYWORDS = ("revision", "token", "cache_dir", "local_files_only", "use_fast")
_IMAGE_OPTIONS = ("size", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                  "image_std", "do_convert_rgb", "max_image_pixels")


class BatchFeature(dict):
    """The processor's output: a dict of tensors that can be moved with `.to(device)` / cast with `.to(dtype)`
    (only floating tensors change dtype, so ids stay int64), then passed on as `model.generate(**inputs)`."""

    def to(self, *args: Any, device: Any = None, dtype: torch.dtype | None = None, non_blocking: bool = False
           ) -> BatchFeature:
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device, int)):
                device = arg
            else:
                raise ValueError(f"BatchFeature.to() takes a device and/or a dtype, got {arg!r}")
        for key, value in self.items():
            if not isinstance(value, torch.Tensor):
                continue
            if dtype is not None and torch.is_floating_point(value):
                self[key] = value.to(device=device, dtype=dtype, non_blocking=non_blocking)
            elif device is not None:
                self[key] = value.to(device=device, non_blocking=non_blocking)
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class InstructBlipProcessor:
    """Image processor + LLM tokenizer + Q-Former tokenizer.

    Args:
        image_processor: resizes and normalizes the images (and video frames).
        tokenizer: the LLM tokenizer (LLaMA/Vicuna, Flan-T5 or OPT's GPT-2 BPE). The placeholder token (`<image>`)
            is added to it (special, not normalized) when missing and placeholder tokens are inserted, as
            transformers 5.x's processor does.
        qformer_tokenizer: the Q-Former's BERT tokenizer (None for BLIP-2, whose Q-Former reads no text).
        num_query_tokens: image tokens per image (32 for the released checkpoints).
        insert_image_tokens: False for legacy checkpoints whose model prepends the image features itself.
        image_token: the placeholder's text (default `<image>`; `<video>` for `InstructBlipVideoProcessor`).
    """

    processor_class = "InstructBlipProcessor"
    reads_instruction = True  # the Q-Former reads the instruction: a Q-Former tokenizer and qformer_* outputs
    default_image_token = IMAGE_TOKEN
    token_name = "image_token"  # the special-token name the tokenizer may already give the placeholder

    def __init__(
        self,
        image_processor: InstructBlipImageProcessor,
        tokenizer: Tokenizer,
        qformer_tokenizer: Tokenizer | None,
        num_query_tokens: int | None = None,
        insert_image_tokens: bool = True,
        image_token: str | None = None,
    ):
        if num_query_tokens is not None and (not isinstance(num_query_tokens, int) or num_query_tokens <= 0):
            raise ValueError(f"num_query_tokens must be a positive integer, got {num_query_tokens!r}")
        if self.reads_instruction and qformer_tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs the Q-Former's tokenizer (qformer_tokenizer)")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer if self.reads_instruction else None
        self.num_query_tokens = num_query_tokens
        self.insert_image_tokens = insert_image_tokens
        self.image_token = image_token or tokenizer.special_tokens.get(self.token_name, self.default_image_token)
        if insert_image_tokens and tokenizer.special_tokens.get(self.token_name) != self.image_token:
            from tokenizers import AddedToken

            tokenizer.add_tokens([AddedToken(self.image_token, normalized=False, special=True)], special_tokens=True)

    def __repr__(self) -> str:
        qformer = f",\n  qformer_tokenizer={self.qformer_tokenizer}" if self.qformer_tokenizer is not None else ""
        return (
            f"{type(self).__name__}(num_query_tokens={self.num_query_tokens}, "
            f"insert_image_tokens={self.insert_image_tokens},\n  image_processor={self.image_processor},\n"
            f"  tokenizer={self.tokenizer}{qformer})"
        )

    @property
    def image_token_id(self) -> int | None:
        return self.tokenizer.backend.token_to_id(self.image_token)

    @property
    def model_input_names(self) -> list[str]:
        names = self.tokenizer.model_input_names + ["pixel_values"]
        return names + (["qformer_input_ids", "qformer_attention_mask"] if self.reads_instruction else [])

    # ------------------------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load from a checkpoint directory or hub id: LLM tokenizer files at the top, the Q-Former tokenizer in
        `qformer_tokenizer/` (not for BLIP-2), the image settings in `preprocessor_config.json` (hub) or in
        `processor_config.json` (transformers 5.x `save_pretrained`; a video processor's in
        `video_preprocessor_config.json` when present), `num_query_tokens` from `processor_config.json` or
        `config.json`. A `config.json` without an image (or video) token id marks a legacy checkpoint (no
        placeholder tokens); one that names `video_token_index` makes the placeholder `<video>`.

        transformers' keywords (`PROCESSOR_KEYWORDS`; any other raises TypeError): `revision`, `token`, `cache_dir`,
        `local_files_only` (the hub cache, `instructblip.hub`) and `use_fast` (accepted either way: transformers picks a
        tokenizer class or an image-processor backend with it; ours has one tokenizer, the `tokenizers` library's,
        whose ids equal transformers', and one image processor, equal to transformers' PIL backend)."""
        from instructblip.hub import resolve_checkpoint_dir
        from instructblip.models.config import CONFIG_NAME

        unknown = sorted(set(kwargs) - set(PROCESSOR_KEYWORDS))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained() got unexpected keyword argument(s) "
                            f"{', '.join(unknown)}; it takes {', '.join(PROCESSOR_KEYWORDS)}")
        kwargs.pop("use_fast", None)
        directory = resolve_checkpoint_dir(pretrained_model_name_or_path, **kwargs)
        qformer_tokenizer = None
        if cls.reads_instruction:
            qformer_dir = os.path.join(directory, QFORMER_TOKENIZER_DIR)
            if not os.path.isdir(qformer_dir):
                raise FileNotFoundError(
                    f"{directory} has no {QFORMER_TOKENIZER_DIR}/ directory (the Q-Former tokenizer)")
            qformer_tokenizer = Tokenizer.from_pretrained(qformer_dir)
        processor_config = read_json(os.path.join(directory, PROCESSOR_CONFIG_NAME), missing_ok=True)
        model_config = read_json(os.path.join(directory, CONFIG_NAME), missing_ok=True)
        num_query_tokens = processor_config.get("num_query_tokens", model_config.get("num_query_tokens"))
        image_token = None
        if model_config:
            keys = ("image_token_index", "image_token_id", "video_token_index", "video_token_id")
            named = [k for k in keys if model_config.get(k) is not None]
            image_token_index = model_config[named[0]] if named else None
            insert_image_tokens = image_token_index is not None
            wanted = VIDEO_TOKEN if named and named[0].startswith("video") else IMAGE_TOKEN
            if named and wanted != cls.default_image_token:  # an InstructBLIP checkpoint read as a video one
                image_token = wanted
        else:
            image_token_index = None
            insert_image_tokens = num_query_tokens is not None
        video_settings = os.path.join(directory, VIDEO_PREPROCESSOR_CONFIG_NAME)
        if cls is InstructBlipVideoProcessor and os.path.isfile(video_settings):
            image_processor = InstructBlipImageProcessor.from_dict(read_json(video_settings))
        else:
            image_processor = InstructBlipImageProcessor.from_pretrained(directory)
        processor = cls._build(image_processor, Tokenizer.from_pretrained(directory), qformer_tokenizer,
                               num_query_tokens, insert_image_tokens, image_token)
        if image_token_index is not None and processor.image_token_id != image_token_index:
            raise ValueError(
                f"{directory}: config.json says the image token id is {image_token_index}, but the tokenizer gives "
                f"{processor.image_token!r} the id {processor.image_token_id}; the tokenizer files do not belong to "
                f"this model"
            )
        return processor

    @classmethod
    def _build(cls, image_processor, tokenizer, qformer_tokenizer, num_query_tokens, insert_image_tokens,
               image_token):
        return cls(image_processor, tokenizer, qformer_tokenizer, num_query_tokens=num_query_tokens,
                   insert_image_tokens=insert_image_tokens, image_token=image_token)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the hub layout (read by transformers 5.x and 4.x alike): `preprocessor_config.json`,
        `processor_config.json` (`num_query_tokens`; left out for legacy processors, as in the 2023 checkpoints),
        the LLM tokenizer files and `qformer_tokenizer/` (not for BLIP-2)."""
        os.makedirs(directory, exist_ok=True)
        image_config = {**self.image_processor.to_dict(), "processor_class": self.processor_class}
        with open(os.path.join(directory, PREPROCESSOR_CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(image_config, indent=2, sort_keys=True) + "\n")
        processor_config = {"processor_class": self.processor_class}
        if self.insert_image_tokens and self.num_query_tokens is not None:
            processor_config["num_query_tokens"] = self.num_query_tokens
        with open(os.path.join(directory, PROCESSOR_CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")
        self.tokenizer.save_pretrained(directory)
        if self.qformer_tokenizer is not None:
            self.qformer_tokenizer.save_pretrained(os.path.join(directory, QFORMER_TOKENIZER_DIR))

    # ------------------------------------------------------------------------------------------------------------------
    # Processing

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        padding: bool | str | None = None,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
        add_special_tokens: bool | None = None,
        videos: Any = None,
        num_frames: int = NUM_FRAMES,
        **image_options: Any,
    ) -> BatchFeature:
        """Prepare images (or videos) and/or instructions for the model.

        `images`: one image or a list (anything `InstructBlipImageProcessor` takes: PIL, array, tensor, path, bytes).
        `videos` (instead of images): one video or a list; a video is a list of frames (each an image as above), a
        (T, H, W, C) array, a video file or a folder of frame images (`num_frames` sampled uniformly from those
        two); every video of a batch needs the same number of frames. `pixel_values` is then (B, T, 3, H, W).
        `text`: one instruction or a list, one per image. An empty instruction `""` is allowed with images: that is
        how to caption (the Q-Former sees `[CLS] [SEP]`, the LLM `<image>x32` + bos); a prompt such as
        "A short image description:" usually captions better. Empty text without images is an error (there is
        nothing to condition on). Images without text return only `pixel_values`, as in transformers 5.x; the model
        needs the text inputs too, so pass `text=""` to caption.
        `return_tensors`: "pt" (tensors; rows of different lengths need `padding=True`) or None (lists).
        `image_options`: image processor settings for this call, e.g. `do_rescale=False`.
        Raises `ValueError` for missing/empty inputs, mismatched counts and unreadable images.
        """
        if videos is not None and images is not None:
            raise ValueError("give images or videos, not both")
        frames = None
        if videos is not None:
            videos = batch_of_videos(videos, num_frames)
            counts = {len(v) for v in videos}
            if len(counts) > 1 or 0 in counts:
                raise ValueError(f"every video of a batch needs the same number of frames (at least one); got "
                                 f"{sorted(counts)}")
            frames = counts.pop()
            images = [frame for video in videos for frame in video]
        if images is None and text is None:
            raise ValueError("give images, text or both (got neither)")
        unknown = sorted(set(image_options) - set(_IMAGE_OPTIONS))
        if unknown:
            raise TypeError(f"unexpected arguments {unknown}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        encoding: dict[str, Any] = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else text
            if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a list of strings")
            if len(texts) == 0:
                raise ValueError("text is an empty list: give one instruction per image")
            if images is None and all(t == "" for t in texts):
                raise ValueError('text is empty ("") and no images are given: there is nothing to process')
            options = self._text_options(padding, truncation, max_length, padding_side, pad_to_multiple_of,
                                         add_special_tokens)
            if self.qformer_tokenizer is not None:
                qformer = self.qformer_tokenizer(list(texts), return_token_type_ids=False, **options)
                encoding["qformer_input_ids"] = qformer["input_ids"]
                encoding["qformer_attention_mask"] = qformer["attention_mask"]
            if options["max_length"] is not None and self.insert_image_tokens:
                if self.num_query_tokens is None:
                    raise ValueError("max_length needs num_query_tokens, which this processor does not have")
                options["max_length"] -= self.num_query_tokens
                if options["max_length"] <= 0:
                    raise ValueError(
                        f"max_length must exceed num_query_tokens={self.num_query_tokens} (the image tokens count "
                        f"towards it), got {options['max_length'] + self.num_query_tokens}"
                    )
            llm = self.tokenizer(list(texts), **options)
            input_ids, attention_mask = llm["input_ids"], llm["attention_mask"]
            if images is not None and self.insert_image_tokens:
                if self.num_query_tokens is None:
                    raise ValueError(
                        "num_query_tokens is not set, so the <image> tokens cannot be inserted; give it to the "
                        "processor (it is `num_query_tokens` in the model's config.json)"
                    )
                per_sample = self.num_query_tokens * (frames or 1)  # one block per video frame
                image_ids = self.tokenizer(self.image_token * per_sample, add_special_tokens=False)
                input_ids = [image_ids["input_ids"] + row for row in input_ids]
                attention_mask = [image_ids["attention_mask"] + row for row in attention_mask]
            encoding["input_ids"] = input_ids
            encoding["attention_mask"] = attention_mask
        if images is not None:
            pixels = self.image_processor(images, return_tensors=return_tensors, **image_options)["pixel_values"]
            samples = len(pixels) // (frames or 1)
            if text is not None and samples != len(encoding["input_ids"]):
                what = "videos" if frames else "images"
                raise ValueError(f"got {samples} {what} but {len(encoding['input_ids'])} texts; give one "
                                 f"instruction per {what[:-1]}")
            if frames is not None:
                if return_tensors == "pt":
                    pixels = pixels.reshape(samples, frames, *pixels.shape[1:])  # (B, T, 3, H, W)
                else:
                    pixels = [pixels[i * frames:(i + 1) * frames] for i in range(samples)]
            encoding["pixel_values"] = pixels
        if return_tensors == "pt":
            for key, value in encoding.items():
                if key != "pixel_values":
                    encoding[key] = _to_tensor(key, value)
        return BatchFeature(encoding)

    def _text_options(self, padding, truncation, max_length, padding_side, pad_to_multiple_of, add_special_tokens):
        """Call arguments, falling back to text options written in the LLM tokenizer's config (5.x behaviour)."""
        given = {"padding": padding, "truncation": truncation, "max_length": max_length, "padding_side": padding_side,
                 "pad_to_multiple_of": pad_to_multiple_of, "add_special_tokens": add_special_tokens}
        config = self.tokenizer.config
        for key in _TEXT_OPTIONS:
            if given[key] is None and key in config:
                given[key] = getattr(self.tokenizer, key, config[key])
        if given["padding"] is None:
            given["padding"] = False
        if given["add_special_tokens"] is None:
            given["add_special_tokens"] = True
        return given

    # ------------------------------------------------------------------------------------------------------------------
    # Decoding (LLM vocabulary)

    def decode(self, ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)


def _to_tensor(key: str, rows: list[list[int]]) -> torch.Tensor:
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        raise ValueError(f"{key} rows have different lengths {sorted(lengths)}; pass padding=True to get tensors")
    return torch.tensor(rows, dtype=torch.long)


class Blip2Processor(InstructBlipProcessor):
    """BLIP-2's processor: image processor + LLM tokenizer (OPT's or Flan-T5's), no Q-Former tokenizer (its
    Q-Former reads no instruction), so no `qformer_*` outputs; otherwise as `InstructBlipProcessor`."""

    processor_class = "Blip2Processor"
    reads_instruction = False

    def __init__(self, image_processor: InstructBlipImageProcessor, tokenizer: Tokenizer,
                 num_query_tokens: int | None = None, insert_image_tokens: bool = True, image_token: str | None = None):
        super().__init__(image_processor, tokenizer, None, num_query_tokens, insert_image_tokens, image_token)

    @classmethod
    def _build(cls, image_processor, tokenizer, qformer_tokenizer, num_query_tokens, insert_image_tokens,
               image_token):
        return cls(image_processor, tokenizer, num_query_tokens=num_query_tokens,
                   insert_image_tokens=insert_image_tokens, image_token=image_token)


class InstructBlipVideoProcessor(InstructBlipProcessor):
    """transformers' `InstructBlipVideoProcessor`: `images` are videos (a list of frames, or a list of such lists;
    also video files), `pixel_values` (B, T, 3, H, W), and T x `num_query_tokens` `<video>` tokens per row."""

    processor_class = "InstructBlipVideoProcessor"
    default_image_token = VIDEO_TOKEN
    token_name = "video_token"

    @property
    def video_token(self) -> str:
        return self.image_token

    @property
    def video_token_id(self) -> int | None:
        return self.image_token_id

    def __call__(self, images: Any = None, text: str | list[str] | None = None, **kwargs: Any) -> BatchFeature:
        videos = kwargs.pop("videos", None)
        if images is not None and videos is not None:
            raise ValueError("give the videos once (images= or videos=)")
        return super().__call__(text=text, videos=images if images is not None else videos, **kwargs)


PROCESSORS = {"instructblip": InstructBlipProcessor, "blip-2": Blip2Processor,
              "instructblipvideo": InstructBlipVideoProcessor}


def processor_class(config) -> type[InstructBlipProcessor]:
    """The processor class of a model config (its `model_type` says which)."""
    return PROCESSORS[config.model_type]
