"""`GenerationConfig`: every decoding option once, with its default and its check.

One dataclass serves every caller. It is built by one function per source:
- keyword arguments (`generate(**kwargs)`, `InstructBlip.ask(**kwargs)`): `GenerationConfig.from_kwargs`;
- a checkpoint's `generation_config.json`: `GenerationConfig.from_pretrained`;
- the command line: `instructblip.cli.generation_config`;
- a server request: `instructblip.serving.protocol.generation_config`.

The defaults are transformers' (greedy, 20 new tokens). `ANSWER` and `CAPTION` are the paper's settings as LAVIS
ships them (beam search with 5 beams, repetition penalty 1.5; docs/recipe.md), which `ask`, `caption`, the CLI and
the server use when the caller names no search.

Lengths, as transformers 5.x counts them (so that `max_length=256, min_length=1` means what it meant there):
- decoder-only: `max_length` / `min_length` count the whole language-model input (image tokens or prepended image
  features, padding and prompt) plus the new tokens;
- T5: they count the decoder tokens, the start token included;
- `max_new_tokens` / `min_new_tokens` count new tokens only and take precedence; with neither `max_new_tokens` nor
  `max_length`, 20 new tokens (for LLaMA at most up to `max_position_embeddings`).

Repetition penalty and no-repeat n-grams, `penalty_scope`:
- "generated" (default; LAVIS and transformers 4.x, which passed only `inputs_embeds`): decoder-only models penalise
  the generated tokens only, never the prompt or the `<image>` placeholders;
- "all" (transformers 5.x, which also passes `input_ids`): the prompt ids count too (left padding excluded from the
  repetition penalty, as transformers does).
T5 always works on the decoder ids, the start token included (transformers and LAVIS agree there).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

DEFAULT_MAX_NEW_TOKENS = 20  # transformers' default max_length (20) counted on top of the prompt
DEFAULT_TOP_K = 50  # transformers' default top_k, active only when sampling
GENERATION_CONFIG_NAME = "generation_config.json"


@dataclass(frozen=True)
class GenerationConfig:
    """The decoding options of one call (or one request). Unset lengths (None) follow the rules of the module
    docstring; `validate()` checks every field and names the offending one."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int | None = None
    min_length: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None  # None: 50 when sampling (transformers); 0 disables
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never" (beam search)
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_token_id: int | list[int] | None = None  # None: the text config's (`default_eos_ids`)
    pad_token_id: int | None = None  # None: the text config's, else the first eos id
    penalty_scope: str = "generated"
    stop_strings: tuple[str, ...] = field(default=())  # a row stops once its text holds one (needs a tokenizer)
    seed: int | None = None  # sampling: a generator seeded with it (unless one is passed)

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        elif not isinstance(self.stop_strings, tuple):
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings or ()))
        if isinstance(self.eos_token_id, (list, tuple)):
            object.__setattr__(self, "eos_token_id", [int(i) for i in self.eos_token_id])

    @classmethod
    def from_kwargs(cls, base: GenerationConfig | None = None, **kwargs: Any) -> tuple[GenerationConfig, dict]:
        """(`base` updated with the keyword arguments that are fields, the others). `generation_config=` may name a
        config to start from, as in transformers."""
        start = kwargs.pop("generation_config", None) or base or cls()
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in kwargs.items() if k in names}
        if "stop_strings" in known and known["stop_strings"] is None:
            known["stop_strings"] = ()
        return dataclasses.replace(start, **known), {k: v for k, v in kwargs.items() if k not in names}

    @classmethod
    def from_dict(cls, data: dict) -> GenerationConfig:
        """From a `generation_config.json`-style dict: its decoding options are read, other keys ignored. Special
        token ids are not taken from it: they come from `config.json` (with the Vicuna quirk of `default_eos_ids`)."""
        skip = {"eos_token_id", "pad_token_id", "seed"}
        names = {f.name for f in fields(cls)} - skip
        return cls(**{k: v for k, v in data.items() if k in names and v is not None})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> GenerationConfig:
        """The decoding options of a checkpoint directory's `generation_config.json` (defaults without one)."""
        path = os.path.join(directory, GENERATION_CONFIG_NAME)
        if not os.path.isfile(path):
            return cls()
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            warnings.warn(f"{path} is not readable JSON ({e}); using the default generation settings", stacklevel=2)
            return cls()
        config = cls.from_dict(data if isinstance(data, dict) else {})
        try:
            config.validate()
        except ValueError as e:
            warnings.warn(f"{path}: {e}; using the default generation settings", stacklevel=2)
            return cls()
        return config

    @property
    def beam(self) -> bool:
        return self.num_beams > 1

    def validate(self) -> None:
        """ValueError naming the parameter and its value for an option outside its range."""
        _integer("num_beams", self.num_beams, 1)
        _integer("num_return_sequences", self.num_return_sequences, 1)
        _integer("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        for name in ("max_new_tokens", "max_length"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), 1)
        for name in ("min_new_tokens", "min_length"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), 0)
        if self.top_k is not None:
            _integer("top_k", self.top_k, 0, "(0 disables it)")
        _finite("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _finite("temperature", self.temperature)
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature!r}")
        if self.do_sample and self.temperature < 1e-6:
            raise ValueError(f"temperature {self.temperature!r} is too small to sample with (it overflows the "
                             "scores); use at least 1e-6, or greedy decoding (do_sample=False)")
        _finite("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        _finite("length_penalty", self.length_penalty)
        if abs(self.length_penalty) > 100:
            raise ValueError(f"length_penalty must be within [-100, 100], got {self.length_penalty!r}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                             f"({self.num_beams})")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise ValueError(
                f"num_return_sequences={self.num_return_sequences} with greedy decoding would repeat one sequence; "
                "use do_sample=True or num_beams >= num_return_sequences"
            )
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.penalty_scope not in ("generated", "all"):
            raise ValueError(f"penalty_scope must be 'generated' or 'all', got {self.penalty_scope!r}")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {list(self.stop_strings)!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(name: str, value: Any, minimum: int, note: str = "") -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' ' + note if note else ''}, got {value!r}")


def _finite(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------------
# special tokens


def default_eos_ids(config) -> list[int]:
    """The eos ids generation stops on when none are passed: the text config's `eos_token_id` (int or list).

    Exception, the Vicuna quirk: the InstructBLIP Vicuna configs carry decapoda-LLaMA ids (bos 0, eos 1) while the
    tokenizer LAVIS trained with uses `</s>` = 2 as eos (and bos). Stopping on id 1 (`<s>`) would never happen, so for
    a LLaMA config with bos 0 / eos 1 this returns [2]. `config`: an `InstructBlipConfig` or its text config.
    """
    text = getattr(config, "text_config", config)
    eos = text.eos_token_id
    ids = [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]
    if not text.is_encoder_decoder and text.bos_token_id == 0 and ids == [1]:
        return [2]
    return ids


def caption_bos(config, eos: list[int]) -> int:
    """The token after the image tokens when no prompt is given (transformers: the text config's bos).

    Vicuna quirk as in `default_eos_ids`: bos 0 in the config, `</s>` = 2 in LAVIS' tokenizer -> 2. T5 configs may
    have no bos: then eos, which is what LAVIS' T5 tokenizer gives for an empty prompt.
    """
    text = config.text_config
    if not text.is_encoder_decoder and text.bos_token_id == 0 and text.eos_token_id == 1:
        return 2
    if text.bos_token_id is not None:
        return int(text.bos_token_id)
    if not eos:
        raise ValueError("the text config has no bos_token_id and no eos_token_id; pass input_ids")
    return eos[0]


# ---------------------------------------------------------------------------------------------------------------------
# a config settled for one prompt


@dataclass
class Settings:
    """A `GenerationConfig` settled for one prompt: lengths in new tokens, the eos ids as a tensor, pad and top_k
    resolved, the sampling generator made. Every other option is read from `config` (attribute access falls
    through to it)."""

    config: GenerationConfig
    max_new_tokens: int
    min_new_tokens: int  # eos is suppressed while fewer tokens than this have been generated
    eos: Tensor  # (n_eos,) long
    pad: int
    top_k: int
    generator: torch.Generator | None

    def __getattr__(self, name: str) -> Any:
        if name == "config":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.config, name)


def settle(config: GenerationConfig, model_config, prompt_length: int, device: torch.device | str,
           generator: torch.Generator | None = None) -> Settings:
    """`config` (validated) settled for a prompt of `prompt_length` positions of a model with `model_config` (an
    `InstructBlipConfig`). `generator`: for sampling; without one, `config.seed` seeds a new one (else torch's
    global generator is used, as transformers does)."""
    text = model_config.text_config
    eos = default_eos_ids(model_config) if config.eos_token_id is None else (
        [int(config.eos_token_id)] if isinstance(config.eos_token_id, int) else list(config.eos_token_id))
    pad = config.pad_token_id
    if pad is None:
        pad = text.pad_token_id
        if pad is None:
            pad = eos[0] if eos else 0
    max_new, min_new = _lengths(config, text, prompt_length)
    if generator is None and config.seed is not None and config.do_sample:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    return Settings(config=config, max_new_tokens=max_new, min_new_tokens=min_new,
                    eos=torch.tensor(eos, dtype=torch.long, device=device), pad=int(pad),
                    top_k=DEFAULT_TOP_K if config.top_k is None else config.top_k, generator=generator)


def _lengths(config: GenerationConfig, text, prompt_length: int) -> tuple[int, int]:
    """(max new tokens, min new tokens) from transformers-style length arguments; see the module docstring."""
    # the tokens max_length / min_length count besides the new ones: the LM input, or T5's decoder start token
    prefix = 1 if text.is_encoder_decoder else prompt_length
    context = None if text.is_encoder_decoder else text.max_position_embeddings
    if context is not None and prompt_length >= context:
        raise ValueError(
            f"the prompt has {prompt_length} positions (image tokens and padding included), which leaves no room "
            f"in the language model's context (max_position_embeddings={context})"
        )
    if config.max_new_tokens is not None:
        max_new = config.max_new_tokens
    elif config.max_length is not None:
        max_new = config.max_length - prefix
        if max_new < 1:
            what = "the decoder start token" if text.is_encoder_decoder else "the prompt (image tokens included)"
            raise ValueError(
                f"max_length={config.max_length} leaves no new tokens: it counts {what}, {prefix} tokens here; "
                "raise it or pass max_new_tokens"
            )
    else:
        max_new = DEFAULT_MAX_NEW_TOKENS
        if context is not None:
            max_new = min(max_new, context - prompt_length)
    if context is not None and prompt_length + max_new > context:
        warnings.warn(
            f"prompt ({prompt_length}) + max new tokens ({max_new}) exceed the context "
            f"(max_position_embeddings={context}); positions beyond it were never trained",
            stacklevel=4,
        )
    if config.min_new_tokens is not None:
        min_new = config.min_new_tokens
    else:
        min_new = max((config.min_length or 0) - prefix, 0)
    return max_new, min_new


# The paper's settings as LAVIS ships them (docs/recipe.md): a beam search of 5 with repetition penalty 1.5.
ANSWER = GenerationConfig(num_beams=5, max_new_tokens=256, min_new_tokens=1, repetition_penalty=1.5,
                          length_penalty=1.0)
CAPTION = GenerationConfig(num_beams=5, max_new_tokens=80, min_new_tokens=10, repetition_penalty=1.5,
                           length_penalty=1.0)
