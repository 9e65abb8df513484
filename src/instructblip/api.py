"""The simple Python API: `instructblip.load(...)` and an object that answers questions about images.

    import instructblip
    vlm = instructblip.load("Salesforce/instructblip-flan-t5-xl")   # or a local directory; None: the default model
    vlm.ask("photo.jpg", "What is unusual about this image?")
    vlm.ask(["a.jpg", "b.jpg"], ["What colour is the car?", "How many people?"])   # batched
    vlm.caption("photo.jpg")
    vlm.rank("photo.jpg", "Is it raining?", ["yes", "no"])
    vlm.ask("clip.mp4", "What is happening in the video?")   # 4 frames sampled uniformly
    vlm.ask([["f1.jpg", "f2.jpg", "f3.jpg", "f4.jpg"]], "What happens?")   # a video as a list of frames

Images may be paths, PIL images, numpy arrays, tensors or encoded bytes. A video is a video file (or a folder of
frame images), `num_frames` of them sampled uniformly, or a list of frames inside the list of inputs; every frame goes
through the vision encoder and the Q-Former. The vision encoder's output is cached per image (bounded), so several
instructions about one image run the vision encoder once. The checkpoint's config says what it is (InstructBLIP,
BLIP-2, InstructBLIP-Video), and with it the model and processor classes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from instructblip.accel.quantize import layer_class
from instructblip.generation.config import ANSWER, CAPTION, GenerationConfig
from instructblip.generation.features import VisionCache, image_features
from instructblip.modeling import InstructBlipForConditionalGeneration, generation_class
from instructblip.models.config import load_config
from instructblip.processing.processor import InstructBlipProcessor, processor_class
from instructblip.processing.templates import CAPTION_PROMPT
from instructblip.processing.video import NUM_FRAMES, is_video_file, video_frames
from instructblip.weights.memory import auto_dtype, check_fits, rest_dtype


def default_model_dir() -> str:
    """The model used when none is named: the small model shipped inside the package."""
    return os.path.join(os.path.dirname(__file__), "default_model")


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

    def _inputs(self, images: Sequence[Any], instructions: Sequence[str]) -> dict:
        """The processor's output with the pixels replaced by the image features (the vision cache consulted).
        `images`: all images, or all videos (the same number of frames each)."""
        if images and self.is_video(images[0]):
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

    def caption(self, image: Any, prompt: str = CAPTION_PROMPT, **generation: Any) -> str | list[str]:
        """Describe an image (or a list of images) with the paper's captioning prompt and settings."""
        images, prompts, many = self._batch(image, prompt)
        answers = self._generate(images, prompts, self._settings(CAPTION, generation))
        return answers if many else answers[0]

    def _generate(self, images: list, instructions: list[str], generation: dict) -> list[str]:
        """Answers in input order (several per input with num_return_sequences); images and videos run as separate
        batches."""
        per_input: list[list[str]] = [[] for _ in images]
        videos = [i for i, item in enumerate(images) if self.is_video(item)]
        for rows in (videos, [i for i in range(len(images)) if i not in set(videos)]):
            if not rows:
                continue
            inputs = self._inputs([images[i] for i in rows], [instructions[i] for i in rows])
            tokens = self.model.generate(**inputs, **generation)
            texts = [t.strip() for t in self.processor.batch_decode(tokens, skip_special_tokens=True)]
            n = len(texts) // len(rows)  # num_return_sequences
            for j, i in enumerate(rows):
                per_input[i] = texts[j * n:(j + 1) * n]
        return [text for texts in per_input for text in texts]

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


def load(model: str | os.PathLike | None = None, device: str | torch.device | None = "auto",
         dtype: str | torch.dtype | None = "auto", vision_cache_size: int = 64,
         quantize: str | None = None, quantize_vision: str | None = None, num_frames: int = NUM_FRAMES
         ) -> InstructBlip:
    """Load a model directory or hub id (None: the default model shipped with the package): InstructBLIP, BLIP-2
    or InstructBLIP-Video, as its config.json says. `num_frames`: frames sampled from each video file.

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
    path = default_model_dir() if model is None else model
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
