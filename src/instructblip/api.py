"""The simple Python API: `instructblip.load(...)` and an object that answers questions about images.

    import instructblip
    vlm = instructblip.load("Salesforce/instructblip-flan-t5-xl")   # or a local directory; None: the built-in model
    vlm.ask("photo.jpg", "What is unusual about this image?")
    vlm.ask(["a.jpg", "b.jpg"], ["What colour is the car?", "How many people?"])   # batched
    vlm.caption("photo.jpg")
    vlm.rank("photo.jpg", "Is it raining?", ["yes", "no"])
    vlm("photo.jpg", "What is this?")        # transformers' pipeline shape: [{"input_text", "generated_text"}]
    vlm.ask("clip.mp4", "What is happening in the video?")   # 4 frames sampled uniformly
    vlm.ask([["f1.jpg", "f2.jpg", "f3.jpg", "f4.jpg"]], "What happens?")   # a video as a list of frames

    pipe = instructblip.pipeline("image-text-to-text", model="Salesforce/instructblip-flan-t5-xl")   # the same object

Images may be paths, PIL images, numpy arrays, tensors or encoded bytes. A video is a video file (or a folder of
frame images), `num_frames` of them sampled uniformly, or a list of frames inside the list of inputs; every frame goes
through the vision encoder and the Q-Former. The vision encoder's output is cached per image (bounded), so several
instructions about one image run the vision encoder once. The checkpoint's config says what it is (InstructBLIP,
BLIP-2, InstructBLIP-Video), and with it the model and processor classes.

The built-in model (no model named) is a small InstructBLIP trained on easy-vqa's pictures only (one flat shape of
one colour on a pale background): `BUILTIN_NOTICE` says so and `unlike_easyvqa` tells an image it cannot read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from instructblip.accel.quantize import layer_class
from instructblip.generation.config import ANSWER, CAPTION, GenerationConfig
from instructblip.generation.features import VisionCache, image_features
from instructblip.hub import resolve_checkpoint_dir
from instructblip.modeling import InstructBlipForConditionalGeneration, generation_class
from instructblip.models.config import load_config
from instructblip.processing.processor import InstructBlipProcessor, processor_class
from instructblip.processing.templates import CAPTION_PROMPT
from instructblip.processing.video import NUM_FRAMES, is_video_file, video_frames
from instructblip.weights.memory import auto_dtype, check_fits, rest_dtype


def default_model_dir() -> str:
    """The model used when none is named: the small model shipped inside the package."""
    return os.path.join(os.path.dirname(__file__), "default_model")


EXAMPLE_CHECKPOINT = "Salesforce/instructblip-flan-t5-xl"
BUILTIN_NOTICE = (f"using the built-in model, a small InstructBLIP trained only on easy-vqa pictures (one flat "
                  f"coloured shape on a pale background); for real images pass --model {EXAMPLE_CHECKPOINT} (or "
                  f"another checkpoint: a hub id or a local directory)")


def unlike_easyvqa(image: Any) -> str | None:
    """Why `image` (a path, PIL image or HxWx3 array) is unlike the pictures the built-in model was trained on, or
    None when it is like them. easy-vqa's are 64x64 PNGs: one flat shape on a pale background, so over 75% of the
    pixels are pale (every channel >= 200) and two colours (in 8 levels per channel) cover over 95%; photos have
    a few percent pale pixels and two colours cover 20-60% (skimage's photos; docs/easyvqa.md)."""
    import numpy as np
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    height, width = pixels.shape[:2]
    if max(height, width) > 256:
        return f"{width}x{height} pixels; easy-vqa's are 64x64"
    flat = pixels[..., :3].reshape(-1, 3).astype(np.int64)
    pale = float((flat.min(1) >= 200).mean())
    if pale < 0.5:
        return f"only {pale:.0%} of it is pale background"
    levels = flat // 32
    _, counts = np.unique(levels[:, 0] * 64 + levels[:, 1] * 8 + levels[:, 2], return_counts=True)
    top_two = float(np.sort(counts)[::-1][:2].sum() / len(flat))
    if top_two < 0.9:
        return f"it has many colours (the two commonest cover {top_two:.0%})"
    return None


SAMPLING_EPSILON = 1e-5  # a temperature below this decodes greedily (vLLM's _SAMPLING_EPS): it would overflow


def samples(temperature: float | None, top_p: float | None = None, do_sample: bool = False) -> bool:
    """Whether to sample, by the one rule the server and the CLI share (OpenAI's and vLLM's): a temperature decides
    when there is one (at least SAMPLING_EPSILON samples; below it, 0 included, is greedy); without one, `top_p` or
    `do_sample` asks for sampling."""
    if temperature is not None:
        return temperature >= SAMPLING_EPSILON
    return top_p is not None or do_sample


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """'auto': bf16 on GPUs that support it (fp16 on others), float32 on the CPU (where `load` first asks
    `weights.memory.auto_dtype`, which knows the model)."""
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return names[dtype]


@dataclass
class Ranking:
    """`best`: the winning candidate; `scores`: log-likelihood per candidate (higher is better)."""

    best: str
    scores: dict[str, float]


class InstructBlip:
    """A loaded model with its processor. Build it with `instructblip.load`."""

    def __init__(self, model: InstructBlipForConditionalGeneration, processor: InstructBlipProcessor,
                 vision_cache_size: int = 64, num_frames: int = NUM_FRAMES):
        self.model = model.eval()
        self.processor = processor
        self.vision_cache = VisionCache(vision_cache_size) if vision_cache_size > 0 else None
        self.num_frames = num_frames  # frames sampled from a video file

    @property
    def device(self) -> torch.device:
        return self.model.device

    @staticmethod
    def is_video(item: Any) -> bool:
        """Whether an input is a video: a video file or a folder (of frames), or a list of frames."""
        return isinstance(item, (list, tuple)) or is_video_file(item)

    def _inputs(self, images: Sequence[Any], instructions: Sequence[str], preprocessed: bool = False) -> dict:
        """The processor's output with the pixels replaced by the image features (the vision cache consulted).
        `images`: all images, or all videos (the same number of frames each); `preprocessed`: images that are
        `preprocess` outputs, so the image processor's steps are all skipped."""
        if preprocessed:
            options = {"do_resize": False, "do_rescale": False, "do_normalize": False, "do_convert_rgb": False}
            inputs = self.processor(images=list(images), text=list(instructions), padding=True, return_tensors="pt",
                                    **options)
        elif images and self.is_video(images[0]):
            videos = [video_frames(v, self.num_frames) for v in images]
            inputs = self.processor(videos=videos, text=list(instructions), padding=True, return_tensors="pt")
        else:
            inputs = self.processor(images=list(images), text=list(instructions), padding=True, return_tensors="pt")
        inputs = dict(inputs.to(self.device, dtype=self.model.dtype))
        with torch.inference_mode():
            features = image_features(self.model, inputs.pop("pixel_values"), inputs.pop("qformer_input_ids", None),
                                      inputs.pop("qformer_attention_mask", None), cache=self.vision_cache)
        inputs["image_features"] = features.clone()  # an ordinary tensor, outside inference mode
        return inputs

    @staticmethod
    def _batch(images: Any, instructions: Any) -> tuple[list, list[str], bool]:
        """Normalise (one image, one instruction) or lists into lists; True when the caller gave a list."""
        many = isinstance(images, (list, tuple))
        images = list(images) if many else [images]
        if isinstance(instructions, str):
            instructions = [instructions] * len(images)
        elif not isinstance(instructions, (list, tuple)) or not all(isinstance(t, str) for t in instructions):
            raise ValueError("instruction must be a string or a list of strings")
        if len(instructions) != len(images):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions; give one per image")
        if not images:
            raise ValueError("no images given")
        return images, list(instructions), many

    def ask(self, image: Any, instruction: str | Sequence[str], **generation: Any) -> str | list[str]:
        """Answer an instruction about an image (or lists of both, answered as one batch)."""
        images, instructions, many = self._batch(image, instruction)
        if any(not t.strip() for t in instructions):
            raise ValueError("the instruction is empty; ask something (or use caption())")
        answers = self._generate(images, instructions, self._settings(ANSWER, generation))
        return answers if many else answers[0]

    def preprocess(self, image: Any) -> np.ndarray:
        """One image (path, bytes, PIL, array, tensor) -> its pixel values (3, H, W) float32, as `ask` computes them.
        Needs no model, so a data loader's workers can run it ahead of `ask_preprocessed`."""
        return self.processor.image_processor.preprocess_one(image)

    def ask_preprocessed(self, pixel_values: Sequence[Any], instructions: Sequence[str], **generation: Any
                         ) -> list[str]:
        """`ask` for images that went through `preprocess` already: `pixel_values` (B, 3, H, W) or a list of
        (3, H, W), one instruction per image; the same answers as `ask` on the original images."""
        instructions = list(instructions)
        if len(pixel_values) != len(instructions) or not instructions:
            raise ValueError(f"{len(pixel_values)} images but {len(instructions)} instructions; give one per image")
        if any(not isinstance(t, str) or not t.strip() for t in instructions):
            raise ValueError("the instruction is empty; ask something (or use caption())")
        return self._generate(list(pixel_values), instructions, self._settings(ANSWER, generation), preprocessed=True)

    def caption(self, image: Any, prompt: str = CAPTION_PROMPT, **generation: Any) -> str | list[str]:
        """Describe an image (or a list of images) with the paper's captioning prompt and settings."""
        images, prompts, many = self._batch(image, prompt)
        answers = self._generate(images, prompts, self._settings(CAPTION, generation))
        return answers if many else answers[0]

    def _generate(self, images: list, instructions: list[str], generation: dict, preprocessed: bool = False
                  ) -> list[str]:
        """Answers in input order (several per input with num_return_sequences); images and videos run as separate
        batches."""
        per_input: list[list[str]] = [[] for _ in images]
        videos = [] if preprocessed else [i for i, item in enumerate(images) if self.is_video(item)]
        for rows in (videos, [i for i in range(len(images)) if i not in set(videos)]):
            if not rows:
                continue
            inputs = self._inputs([images[i] for i in rows], [instructions[i] for i in rows], preprocessed)
            tokens = self.model.generate(**inputs, **generation)
            texts = [t.strip() for t in self.processor.batch_decode(tokens, skip_special_tokens=True)]
            n = len(texts) // len(rows)  # num_return_sequences
            for j, i in enumerate(rows):
                per_input[i] = texts[j * n:(j + 1) * n]
        return [text for texts in per_input for text in texts]

    def __call__(self, images: Any = None, text: Any = None, max_new_tokens: int | None = None,
                 return_full_text: bool = True, generate_kwargs: dict | None = None, **generation: Any) -> list:
        """transformers' image-text-to-text pipeline, called as `pipe(images, text)`, with its output shape:

        - one image and a string: `[{"input_text": text, "generated_text": text + answer}]`; lists of images and
          strings (one per image): one such dict per image, in one list;
        - a chat (`text=[{"role": "user", "content": [{"type": "image", "image": ...}, {"type": "text", "text":
          ...}]}]`, the image in the content as transformers wants it): `[{"input_text": messages,
          "generated_text": messages + [{"role": "assistant", "content": answer}]}]`; a list of chats: a list of
          such lists;
        - `return_full_text=False`: `generated_text` is the answer alone.

        The answer is the text transformers' pipeline would give for the same tokens (the prompt's decoded text is
        cut from the front of a decoder-only model's output, as there). Decoding: the paper's settings, as `ask`
        (generation.ANSWER), changed by `max_new_tokens`, `generate_kwargs` or keyword arguments."""
        settings = {**(generate_kwargs or {}), **generation}
        if max_new_tokens is not None:
            if "max_new_tokens" in settings:
                raise ValueError("max_new_tokens is given twice (directly and in generate_kwargs); give it once")
            settings["max_new_tokens"] = max_new_tokens
        chats = _chats(text if text is not None else images)
        if chats is not None:
            if text is not None and images is not None:
                raise ValueError("with a chat, put the image in a message's content, not in images=")
            pairs = [_chat_input(chat) for chat in chats]
            answers = self._pipeline_answers([p[0] for p in pairs], [p[1] for p in pairs], settings)
            out = []
            for chat, answer in zip(chats, answers, strict=True):
                full = [*chat, {"role": "assistant", "content": answer}] if return_full_text else answer
                out.append([{"input_text": chat, "generated_text": full}])
            return out[0] if isinstance(chats, _OneChat) else out
        if images is None or text is None:
            raise ValueError("give an image and a text (or a chat whose content holds the image)")
        image_list, texts, _ = self._batch(images, text)
        answers = self._pipeline_answers(image_list, texts, settings)
        return [{"input_text": t, "generated_text": t + a if return_full_text else a}
                for t, a in zip(texts, answers, strict=True)]

    def _pipeline_answers(self, images: list, texts: list[str], generation: dict) -> list[str]:
        inputs = self._inputs(images, texts)
        prompt = inputs["input_ids"]
        tokens = self.model.generate(**inputs, **self._settings(ANSWER, generation))
        decode = lambda ids: self.processor.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
        if self.model.config.text_config.is_encoder_decoder:
            return decode(tokens)
        # transformers' generate returns prompt + answer for a decoder-only model and its pipeline cuts the decoded
        # prompt from the decoded whole (a space may stay in front): the same cut here, for the same text
        answers = []
        for whole, start in zip(decode(torch.cat([prompt.to(tokens.device), tokens], 1)), decode(prompt), strict=True):
            at = whole.find(start)
            answers.append(whole[at + len(start):] if 0 <= at <= 2 else whole)
        return answers

    def stream(self, image: Any, instruction: str, **generation: Any) -> Iterator[str]:
        """Yield the answer in pieces as it is generated (greedy unless do_sample=True; one image)."""
        from instructblip.generation import stream

        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("the instruction must be a non-empty string")
        settings = self._settings(ANSWER, {**generation, "num_beams": 1})
        inputs = self._inputs([image], [instruction])
        yield from stream(self.model, self.processor.tokenizer, **inputs, **settings)

    def _settings(self, preset: GenerationConfig, generation: dict) -> dict:
        """Keyword arguments for `generate`: `preset` (the paper's settings, with max_new_tokens at most half the
        context of a decoder-only LLM, so that the prompt keeps the rest: the small default model has 256
        positions) updated with the caller's options; other arguments (`generator`, `tokenizer`) pass through."""
        text = self.model.config.text_config
        if not text.is_encoder_decoder:
            preset = replace(preset, max_new_tokens=min(preset.max_new_tokens, text.max_position_embeddings // 2))
        config, rest = GenerationConfig.from_kwargs(preset, **generation)
        return {"generation_config": config, **rest}

    def rank(self, image: Any, instruction: str, candidates: Sequence[str], reduction: str = "sum") -> Ranking:
        """Pick the candidate answer with the highest log-likelihood (the paper's vocabulary ranking)."""
        if not candidates or not all(isinstance(c, str) and c for c in candidates):
            raise ValueError("candidates must be a non-empty list of non-empty strings")
        inputs = self._inputs([image], [instruction])
        result = self.model.rank(inputs, list(candidates), tokenizer=self.processor.tokenizer, reduction=reduction)
        scores = {c: float(s) for c, s in zip(candidates, result.scores[0].tolist(), strict=True)}
        return Ranking(best=candidates[int(result.best[0])], scores=scores)


class _OneChat(list):
    """A single chat (a list of messages), as opposed to a list of chats."""


def _chats(value: Any) -> list | None:
    """The chats in a pipeline input (a list of messages, or a list of such lists), else None."""
    if not isinstance(value, (list, tuple)) or not value:
        return None
    if all(isinstance(m, dict) and "role" in m for m in value):
        return _OneChat([list(value)])
    if all(isinstance(c, (list, tuple)) and c and all(isinstance(m, dict) and "role" in m for m in c) for c in value):
        return [list(c) for c in value]
    return None


def _chat_input(chat: list[dict]) -> tuple[Any, str]:
    """(the image, the instruction) of a chat: its one image (a content part {"type": "image", "image" | "url" |
    "path": ...}) and the text of its last user message."""
    images = [part.get("image", part.get("url", part.get("path")))
              for message in chat if isinstance(message.get("content"), list)
              for part in message["content"] if isinstance(part, dict) and part.get("type") == "image"]
    if len(images) != 1:
        raise ValueError(f"a chat must hold exactly one image part ({{'type': 'image', 'image': ...}}), got "
                         f"{len(images)}")
    last = chat[-1]
    if last.get("role") != "user":
        raise ValueError("the last message of a chat must be the user's")
    content = last.get("content")
    if isinstance(content, str):
        return images[0], content
    texts = [part["text"] for part in content if isinstance(part, dict) and part.get("type") == "text"]
    return images[0], "\n".join(texts)


def pipeline(task: str = "image-text-to-text", model: str | os.PathLike | None = None, **kwargs: Any) -> InstructBlip:
    """transformers' `pipeline(task, model=...)` for InstructBLIP: the object `load` returns, which called as
    `pipe(images, text)` gives the pipeline's output (`InstructBlip.__call__`). `device`, `dtype` (or `torch_dtype`)
    and the other keywords of `load` pass through; `device_map` may name one device."""
    tasks = ("image-text-to-text", "visual-question-answering", "image-to-text")
    if task not in tasks:
        raise ValueError(f"task {task!r} is not supported; use one of {', '.join(tasks)}")
    torch_dtype = kwargs.pop("torch_dtype", None)
    if torch_dtype is not None:
        if kwargs.get("dtype", torch_dtype) != torch_dtype:
            raise ValueError("dtype and torch_dtype disagree; give one of them")
        kwargs["dtype"] = torch_dtype
    device_map = kwargs.pop("device_map", None)
    if device_map is not None:
        if isinstance(device_map, dict):
            raise ValueError("pipeline() places the model on one device; for a device map per part use "
                             "InstructBlipForConditionalGeneration.from_pretrained(..., device_map={...})")
        kwargs["device"] = device_map
    if isinstance(kwargs.get("device"), int):
        kwargs["device"] = "cpu" if kwargs["device"] < 0 else f"cuda:{kwargs['device']}"
    return load(model, **kwargs)


def load(model: str | os.PathLike | None = None, device: str | torch.device | None = "auto",
         dtype: str | torch.dtype | None = "auto", vision_cache_size: int = 64,
         quantize: str | None = None, quantize_vision: str | None = None, num_frames: int = NUM_FRAMES,
         revision: str | None = None, token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
         local_files_only: bool = False) -> InstructBlip:
    """Load a model directory or hub id (None: the built-in model shipped with the package, see BUILTIN_NOTICE):
    InstructBLIP, BLIP-2 or InstructBLIP-Video, as its config.json says. `num_frames`: frames sampled from each video
    file. `revision`, `token`, `cache_dir`, `local_files_only`: for a hub id, as in transformers (`instructblip.hub`).

    dtype="auto": on the CPU the dtype that fits the machine (`weights.memory.auto_dtype`: float32 when it fits and
    the CPU has no native bfloat16 or the model is small, else bfloat16); bfloat16 (or float16) on GPUs.

    quantize="int8" or "int4": the language model's linear layers quantized for CPU inference (`accel.quantize`),
    each layer as it is read; quantize_vision="int8": the vision encoder's too. With device="auto" a quantized model
    goes to the CPU; its unquantized rest runs in bfloat16 where the CPU has it natively, else float32 (dtype="auto").

    On the CPU the memory the model needs is compared with what this process may use before anything is allocated
    (`weights.memory`): a model that cannot fit raises `ModelTooLargeError`, naming the GiB each way of loading
    needs and the flags of those that fit."""
    for mode, vision in ((quantize, False), (quantize_vision, True)):
        if mode is not None:
            layer_class(mode, vision)  # an unknown mode fails here, before the memory check reads its name
    path = resolve_checkpoint_dir(default_model_dir() if model is None else model, revision=revision, token=token,
                                  cache_dir=cache_dir, local_files_only=local_files_only)
    quantized = quantize or quantize_vision
    if quantized:
        flag = "--quantize" if quantize else "--quantize-vision"
        if device not in (None, "auto") and torch.device(device).type != "cpu":
            raise ValueError(f"{flag} runs on the CPU only, not {torch.device(device).type}; use --device cpu, or "
                             f"drop {flag} on a GPU (bf16 is the fast path there)")
        device = "cpu"
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    device = resolve_device(device)
    config = load_config(path)
    if device.type != "cpu":
        torch_dtype = resolve_dtype(dtype, device)
    else:  # before anything is allocated: the dtype that fits, and one clear line if nothing does
        if dtype in (None, "auto"):
            torch_dtype = rest_dtype() if quantized else auto_dtype(config)
        else:
            torch_dtype = resolve_dtype(dtype, device)
        check_fits(config, quantize or ("float32" if torch_dtype == torch.float32 else "bfloat16"), rest=torch_dtype)
    weights = generation_class(config).from_pretrained(path, dtype=torch_dtype, device=device, quantize=quantize,
                                                       quantize_vision=quantize_vision)
    processor = processor_class(config).from_pretrained(path)
    return InstructBlip(weights, processor, vision_cache_size=vision_cache_size, num_frames=num_frames)
