"""Configs as plain dataclasses, read from and written to the Hugging Face `config.json` layout.

The field names and defaults are those of transformers (`InstructBlipVisionConfig`, `InstructBlipQFormerConfig`,
`LlamaConfig`, `T5Config`, `OPTConfig`, `InstructBlipConfig`, `Blip2Config`, `InstructBlipVideoConfig`), because hub
files omit fields that equal their default. The composite's `model_type` says which model a checkpoint is
(`load_config` picks the class): InstructBLIP, BLIP-2 (its Q-Former reads no instruction) or InstructBLIP-Video
(the same network reading frames; its placeholder id is `video_token_index`).
Quirks handled here (see docs/checkpoints.md#config-quirks):
- LLaMA: transformers 5.x writes `rope_parameters: {rope_theta, rope_type}`, 4.x a top-level `rope_theta`.
- T5: 5.x forces `tie_word_embeddings: true` and keeps the old meaning in `scale_decoder_outputs`; `gated-gelu`
  means the tanh GELU unless `dense_act_fn` is written out (InstructBLIP's configs say `"gelu"`, the exact one).
- The Q-Former's `encoder_hidden_size` always equals the vision width.
- Vicuna checkpoints say bos 0 / eos 1 although their tokenizer uses `</s>` = 2 for both: we keep the file's values
  (round trips stay exact) and generation stops on the tokenizer's eos.
This module imports nothing from torch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

CONFIG_NAME = "config.json"


class ConfigError(ValueError):
    """A config.json that cannot describe an InstructBLIP model."""


def _from_known_fields(cls, data: dict, where: str):
    """Build dataclass `cls` from `data`; unknown keys are kept in `extra` so that a round trip loses nothing."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names and k != "model_type"}
    try:
        obj = cls(**known)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e
    obj.extra = extra
    return obj


def _to_dict(obj, skip: tuple[str, ...] = ()) -> dict:
    out = {"model_type": obj.model_type}
    for f in dataclasses.fields(obj):
        if f.name == "extra" or f.name in skip:
            continue
        out[f.name] = copy.deepcopy(getattr(obj, f.name))
    out.update(copy.deepcopy(obj.extra))
    return dict(sorted(out.items()))


def _check_positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


def _check_heads(obj, width: str, heads: str) -> None:
    if getattr(obj, width) % getattr(obj, heads):
        raise ConfigError(
            f"{type(obj).__name__}: {width}={getattr(obj, width)} is not divisible by {heads}={getattr(obj, heads)}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Vision encoder (EVA ViT-g/14 as ported by BLIP-2)


@dataclass
class InstructBlipVisionConfig:
    model_type: ClassVar[str] = "instructblip_vision_model"
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"  # exact (erf) GELU
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 1e-10  # HF's value: random vision weights are ~0 unless re-randomised
    qkv_bias: bool = True  # q and v biases; the key third of qkv.bias is zero in every real checkpoint
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        for name in ("image_size", "patch_size"):  # HF allows [h, w]; InstructBLIP only uses square sizes
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if len(value) != 2 or value[0] != value[1]:
                    raise ConfigError(f"vision_config.{name} must be square, got {value!r}")
                setattr(self, name, int(value[0]))
        _check_positive(self, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "image_size", "patch_size")
        _check_heads(self, "hidden_size", "num_attention_heads")
        if self.hidden_act != "gelu":
            raise ConfigError(f"vision_config.hidden_act {self.hidden_act!r} is not supported (only 'gelu')")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, data: dict) -> InstructBlipVisionConfig:
        return _from_known_fields(cls, data, "vision_config")

    def to_dict(self) -> dict:
        return _to_dict(self)


# ----------------------------------------------------------------------------------------------------------------------
# Q-Former (BERT-base with cross-attention every other layer)


@dataclass
class InstructBlipQFormerConfig:
    model_type: ClassVar[str] = "instructblip_qformer"
    reads_instruction: ClassVar[bool] = True  # word and position embeddings, text feed-forward networks
    vocab_size: int = 30522  # 30523 in the real checkpoints (bert-base-uncased + [DEC])
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408  # always set to the vision width by InstructBlipConfig
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        _check_positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "intermediate_size", "max_position_embeddings", "cross_attention_frequency",
                        "encoder_hidden_size")
        _check_heads(self, "hidden_size", "num_attention_heads")
        if self.hidden_act != "gelu":
            raise ConfigError(f"qformer_config.hidden_act {self.hidden_act!r} is not supported (only 'gelu')")

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0

    @classmethod
    def from_dict(cls, data: dict) -> InstructBlipQFormerConfig:
        return _from_known_fields(cls, data, "qformer_config")

    def to_dict(self) -> dict:
        return _to_dict(self)


# ----------------------------------------------------------------------------------------------------------------------
# Language models


@dataclass
class LlamaConfig:
    """LLaMA / Vicuna decoder. Defaults are transformers' `LlamaConfig` defaults (= LLaMA-7B)."""

    model_type: ClassVar[str] = "llama"
    is_encoder_decoder: ClassVar[bool] = False
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: multi-head attention (= num_attention_heads)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            _check_heads(self, "hidden_size", "num_attention_heads")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads", "head_dim")
        _check_heads(self, "num_attention_heads", "num_key_value_heads")
        if self.hidden_act != "silu":
            raise ConfigError(f"text_config.hidden_act {self.hidden_act!r} is not supported (only 'silu')")

    @classmethod
    def from_dict(cls, data: dict) -> LlamaConfig:
        data = dict(data)
        rope = data.pop("rope_parameters", None) or {}  # transformers 5.x
        scaling = data.pop("rope_scaling", None) or {}  # transformers 4.x
        for params in (rope, scaling):
            kind = params.get("rope_type", params.get("type", "default"))
            if kind != "default":
                raise ConfigError(f"text_config: rope type {kind!r} is not supported (only 'default')")
        if "rope_theta" in rope:
            data["rope_theta"] = rope["rope_theta"]
        return _from_known_fields(cls, data, "text_config")

    def to_dict(self) -> dict:
        out = _to_dict(self, skip=("rope_theta",))
        out["rope_parameters"] = {"rope_theta": float(self.rope_theta), "rope_type": "default"}
        return dict(sorted(out.items()))


@dataclass
class T5Config:
    """T5 v1.1 / Flan-T5 encoder-decoder. Defaults are transformers' `T5Config` defaults (= t5-small)."""

    model_type: ClassVar[str] = "t5"
    is_encoder_decoder: ClassVar[bool] = True
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    dense_act_fn: str | None = None  # None: derived from feed_forward_proj ("gated-gelu" -> "gelu_new")
    # True: lm_head shares `shared.weight` (unless a checkpoint brings its own lm_head, as 5.x does)
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None  # None: = tie_word_embeddings (4.x meaning); multiply by d_model**-0.5
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None  # None: pad_token_id
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ConfigError(f"text_config.feed_forward_proj {self.feed_forward_proj!r} is not 'ACT' or 'gated-ACT'")
        if self.dense_act_fn is None:
            self.dense_act_fn = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        if self.dense_act_fn not in ("gelu", "gelu_new", "relu", "silu"):
            raise ConfigError(f"text_config.dense_act_fn {self.dense_act_fn!r} is not supported")
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.pad_token_id
        _check_positive(self, "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                        "num_heads", "relative_attention_num_buckets")

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @classmethod
    def from_dict(cls, data: dict) -> T5Config:
        data = dict(data)
        data.pop("is_gated_act", None)  # derived
        return _from_known_fields(cls, data, "text_config")

    def to_dict(self) -> dict:
        out = _to_dict(self)
        out["is_gated_act"] = self.is_gated_act
        if out["bos_token_id"] is None:  # transformers' T5Config has no bos by default and writes none
            del out["bos_token_id"]
        return dict(sorted(out.items()))


@dataclass
class OPTConfig:
    """OPT decoder (BLIP-2's OPT-2.7B / 6.7B). Defaults are transformers' `OPTConfig` defaults (= OPT-125M)."""

    model_type: ClassVar[str] = "opt"
    is_encoder_decoder: ClassVar[bool] = False
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True  # pre-LayerNorm (every OPT but 350M)
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None  # None: hidden_size; else embeddings projected in and out (OPT-350M)
    dropout: float = 0.1
    attention_dropout: float = 0.0
    num_attention_heads: int = 12
    activation_function: str = "relu"
    layerdrop: float = 0.0
    init_std: float = 0.02
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 2
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        _check_positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "max_position_embeddings",
                        "num_attention_heads", "word_embed_proj_dim")
        _check_heads(self, "hidden_size", "num_attention_heads")
        if self.activation_function not in ("relu", "gelu"):
            raise ConfigError(f"text_config.activation_function {self.activation_function!r} is not supported "
                              "(only 'relu' and 'gelu')")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self._remove_final_layer_norm

    @classmethod
    def from_dict(cls, data: dict) -> OPTConfig:
        return _from_known_fields(cls, data, "text_config")

    def to_dict(self) -> dict:
        return _to_dict(self)


TEXT_CONFIGS = {"llama": LlamaConfig, "t5": T5Config, "opt": OPTConfig}
TextConfig = LlamaConfig | T5Config | OPTConfig


def text_config_from_dict(data: dict) -> TextConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"text_config must be a JSON object, got {type(data).__name__}")
    kind = data.get("model_type")
    if kind not in TEXT_CONFIGS:
        raise ConfigError(
            f"text_config.model_type is {kind!r}; supported language models: {', '.join(TEXT_CONFIGS)} "
            "(Vicuna checkpoints say 'llama', Flan-T5 checkpoints say 't5', BLIP-2's OPT checkpoints say 'opt')"
        )
    return TEXT_CONFIGS[kind].from_dict(data)


# ----------------------------------------------------------------------------------------------------------------------
# The composites: InstructBLIP, BLIP-2 and InstructBLIP-Video share one layout (vision_config, qformer_config,
# text_config, num_query_tokens and the id of the placeholder token the processor writes); they differ in the names
# config.json uses and in whether the Q-Former reads the instruction.


@dataclass
class InstructBlipConfig:
    model_type: ClassVar[str] = "instructblip"
    architecture: ClassVar[str] = "InstructBlipForConditionalGeneration"
    vision_class: ClassVar[type] = InstructBlipVisionConfig
    qformer_class: ClassVar[type] = InstructBlipQFormerConfig
    token_key: ClassVar[str] = "image_token_index"  # the placeholder id's name in config.json
    other_types: ClassVar[tuple[str, ...]] = ("instructblipvideo",)  # model_types whose config.json this class reads
    preset_prefix: ClassVar[str] = "instructblip-"
    vision_config: InstructBlipVisionConfig = field(default_factory=InstructBlipVisionConfig)
    qformer_config: InstructBlipQFormerConfig = field(default_factory=InstructBlipQFormerConfig)
    text_config: TextConfig = field(default_factory=LlamaConfig)
    num_query_tokens: int = 32
    # Set: the processor writes num_query_tokens `<image>` ids (per video frame) and the model puts the image features
    # in their place. None (configs of 2023): the features are prepended to the text embeddings.
    image_token_index: int | None = None
    initializer_factor: float = 1.0
    initializer_range: float = 0.02
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.vision_config, dict):
            self.vision_config = self.vision_class.from_dict(self.vision_config)
        if isinstance(self.qformer_config, dict):
            self.qformer_config = self.qformer_class.from_dict(self.qformer_config)
        if isinstance(self.text_config, dict):
            self.text_config = text_config_from_dict(self.text_config)
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        _check_positive(self, "num_query_tokens")
        width = getattr(self.text_config, "word_embed_proj_dim", self.text_config.hidden_size)
        if width != self.text_config.hidden_size:  # the projected query outputs take the place of token embeddings
            raise ConfigError(
                f"text_config.word_embed_proj_dim ({width}) differs from its hidden_size "
                f"({self.text_config.hidden_size}): the image features would not fit among the token embeddings; "
                "use an OPT whose embeddings are as wide as its blocks"
            )
        if self.image_token_index is not None and not 0 <= self.image_token_index < self.text_config.vocab_size:
            raise ConfigError(
                f"{self.token_key} {self.image_token_index} is outside the text vocabulary "
                f"(vocab_size {self.text_config.vocab_size})"
            )

    # transformers' alias
    @property
    def image_token_id(self) -> int | None:
        return self.image_token_index

    @property
    def reads_instruction(self) -> bool:
        """Whether the Q-Former reads the instruction (InstructBLIP) or the learned queries alone (BLIP-2)."""
        return self.qformer_config.reads_instruction

    @property
    def use_decoder_only_language_model(self) -> bool:
        return not self.text_config.is_encoder_decoder

    @property
    def is_encoder_decoder(self) -> bool:
        return self.text_config.is_encoder_decoder

    @classmethod
    def from_vision_qformer_text_configs(
        cls,
        vision_config: InstructBlipVisionConfig,
        qformer_config: InstructBlipQFormerConfig,
        text_config: TextConfig,
        **kwargs,
    ):
        return cls(
            vision_config=copy.deepcopy(vision_config),
            qformer_config=copy.deepcopy(qformer_config),
            text_config=copy.deepcopy(text_config),
            **kwargs,
        )

    # ---- dict / JSON ----

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(data).__name__}")
        kind = data.get("model_type")
        if kind not in (None, cls.model_type, *cls.other_types):
            raise ConfigError(f"config.json has model_type {kind!r}; expected {cls.model_type!r}")
        for key in ("vision_config", "qformer_config", "text_config"):
            if not isinstance(data.get(key), dict):
                raise ConfigError(
                    f"config.json lacks the field '{key}' (an object); a {cls.__name__.removesuffix('Config')} "
                    "config.json has vision_config, qformer_config and text_config"
                )
        data = dict(data)
        data.pop("use_decoder_only_language_model", None)  # derived from text_config.model_type
        data.pop("architectures", None)  # written from the class
        for alias in ("image_token_id", "video_token_index", "video_token_id"):
            if alias in data:
                value = data.pop(alias)
                data.setdefault("image_token_index", value)
        return _from_known_fields(cls, data, "config.json")

    def to_dict(self) -> dict:
        out = {
            "model_type": self.model_type,
            "architectures": [self.architecture],
            "vision_config": self.vision_config.to_dict(),
            "qformer_config": self.qformer_config.to_dict(),
            "text_config": self.text_config.to_dict(),
            "use_decoder_only_language_model": self.use_decoder_only_language_model,
        }
        for f in dataclasses.fields(self):
            if f.name not in ("vision_config", "qformer_config", "text_config", "extra", "image_token_index"):
                out[f.name] = copy.deepcopy(getattr(self, f.name))
        out[self.token_key] = self.image_token_index
        for key, value in self.extra.items():
            out.setdefault(key, copy.deepcopy(value))
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike):
        data = _read_json(path)
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike):
        """Read `config.json` from a checkpoint directory (or a hub id / preset name resolved like the weights)."""
        from instructblip.hub import resolve_checkpoint_dir  # no torch there either

        directory = resolve_checkpoint_dir(path)
        return cls.from_json_file(os.path.join(directory, CONFIG_NAME))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, CONFIG_NAME + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        os.replace(tmp, os.path.join(directory, CONFIG_NAME))

    @classmethod
    def from_name(cls, name: str, **overrides: Any):
        """A preset by name: one of the official checkpoints (`Salesforce/instructblip-vicuna-7b` or `vicuna-7b`,
        `Salesforce/blip2-opt-2.7b` or `opt-2.7b` for `Blip2Config`...), with optional top-level overrides."""
        table = PRESETS if cls.preset_prefix == "instructblip-" else BLIP2_PRESETS
        key = name.removeprefix("Salesforce/").removeprefix(cls.preset_prefix)
        if key not in table:
            known = ", ".join("Salesforce/" + cls.preset_prefix + k for k in table)
            raise ConfigError(f"unknown preset {name!r}; known: {known}")
        data = copy.deepcopy(table[key])
        data.update(overrides)
        return cls.from_dict(data)


@dataclass
class Blip2VisionConfig(InstructBlipVisionConfig):
    """The same EVA ViT-g as InstructBLIP's, under BLIP-2's name."""

    model_type: ClassVar[str] = "blip_2_vision_model"


@dataclass
class Blip2QFormerConfig(InstructBlipQFormerConfig):
    """BLIP-2's Q-Former: the learned queries alone, no instruction (no word or position embeddings, no text
    feed-forward networks)."""

    model_type: ClassVar[str] = "blip_2_qformer"
    reads_instruction: ClassVar[bool] = False
    # transformers' switch for the text feed-forward networks of the image-text retrieval model; conditional
    # generation never feeds text to the Q-Former, so it is only carried through
    use_qformer_text_input: bool = False


@dataclass
class Blip2Config(InstructBlipConfig):
    """BLIP-2 (Li et al. 2023): vision encoder -> Q-Former over the learned queries -> projection -> OPT or Flan-T5."""

    model_type: ClassVar[str] = "blip-2"
    architecture: ClassVar[str] = "Blip2ForConditionalGeneration"
    vision_class: ClassVar[type] = Blip2VisionConfig
    qformer_class: ClassVar[type] = Blip2QFormerConfig
    other_types: ClassVar[tuple[str, ...]] = ()
    preset_prefix: ClassVar[str] = "blip2-"
    vision_config: Blip2VisionConfig = field(default_factory=Blip2VisionConfig)
    qformer_config: Blip2QFormerConfig = field(default_factory=Blip2QFormerConfig)
    text_config: TextConfig = field(default_factory=OPTConfig)
    image_text_hidden_size: int = 256  # the retrieval heads' width (no such heads here; carried through)


@dataclass
class InstructBlipVideoVisionConfig(InstructBlipVisionConfig):
    model_type: ClassVar[str] = "instructblipvideo_vision_model"


@dataclass
class InstructBlipVideoQFormerConfig(InstructBlipQFormerConfig):
    model_type: ClassVar[str] = "instructblipvideo_qformer"


@dataclass
class InstructBlipVideoConfig(InstructBlipConfig):
    """InstructBLIP reading videos (transformers' `InstructBlipVideoConfig`): the same network and weights; the
    placeholder id is called `video_token_index` in config.json. Reads InstructBLIP configs as well."""

    model_type: ClassVar[str] = "instructblipvideo"
    architecture: ClassVar[str] = "InstructBlipVideoForConditionalGeneration"
    vision_class: ClassVar[type] = InstructBlipVideoVisionConfig
    qformer_class: ClassVar[type] = InstructBlipVideoQFormerConfig
    token_key: ClassVar[str] = "video_token_index"
    other_types: ClassVar[tuple[str, ...]] = ("instructblip",)
    vision_config: InstructBlipVideoVisionConfig = field(default_factory=InstructBlipVideoVisionConfig)
    qformer_config: InstructBlipVideoQFormerConfig = field(default_factory=InstructBlipVideoQFormerConfig)

    @property
    def video_token_index(self) -> int | None:
        return self.image_token_index

    @property
    def video_token_id(self) -> int | None:
        return self.image_token_index


COMPOSITES = {"instructblip": InstructBlipConfig, "blip-2": Blip2Config, "instructblipvideo": InstructBlipVideoConfig}
Config = InstructBlipConfig  # the type of every composite (the others subclass it)


def _read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None


def config_class(data: dict) -> type[InstructBlipConfig]:
    """The composite config class a config.json's `model_type` names (InstructBLIP when it names none)."""
    kind = data.get("model_type") if isinstance(data, dict) else None
    if kind is not None and kind not in COMPOSITES:
        raise ConfigError(f"config.json has model_type {kind!r}; supported: {', '.join(COMPOSITES)}")
    return COMPOSITES.get(kind, InstructBlipConfig)


def config_from_dict(data: dict) -> InstructBlipConfig:
    """A composite config of the kind its `model_type` says: InstructBLIP, BLIP-2 or InstructBLIP-Video."""
    return config_class(data).from_dict(data)


def load_config(path: str | os.PathLike) -> InstructBlipConfig:
    """The config of a checkpoint directory (or hub id), of the class its `model_type` names."""
    from instructblip.hub import resolve_checkpoint_dir

    file = os.path.join(resolve_checkpoint_dir(path), CONFIG_NAME)
    data = _read_json(file)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Presets: the four official checkpoints (hub config.json files of Salesforce/instructblip-*, re-saved by
# transformers 4.47). Vision and Q-Former are the defaults apart from the Q-Former's 30523-token vocabulary.

_VICUNA_TEXT = dict(
    model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=32000,
)
_FLAN_T5_TEXT = dict(
    model_type="t5", vocab_size=32128, d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24,
    num_decoder_layers=24, feed_forward_proj="gated-gelu", dense_act_fn="gelu", relative_attention_num_buckets=32,
    relative_attention_max_distance=128, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
    scale_decoder_outputs=False, bos_token_id=1, eos_token_id=1, pad_token_id=0, decoder_start_token_id=0,
)
PRESETS: dict[str, dict] = {
    # https://huggingface.co/Salesforce/instructblip-vicuna-7b/blob/main/config.json
    "vicuna-7b": dict(vision_config={}, qformer_config=dict(vocab_size=30523), num_query_tokens=32,
                      image_token_index=32001, text_config=_VICUNA_TEXT),
    # https://huggingface.co/Salesforce/instructblip-vicuna-13b/blob/main/config.json
    "vicuna-13b": dict(vision_config={}, qformer_config=dict(vocab_size=30523), num_query_tokens=32,
                       image_token_index=32001,
                       text_config={**_VICUNA_TEXT, "hidden_size": 5120, "intermediate_size": 13824,
                                    "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40}),
    # https://huggingface.co/Salesforce/instructblip-flan-t5-xl/blob/main/config.json
    "flan-t5-xl": dict(vision_config={}, qformer_config=dict(vocab_size=30523), num_query_tokens=32,
                       image_token_index=32100, text_config=_FLAN_T5_TEXT),
    # https://huggingface.co/Salesforce/instructblip-flan-t5-xxl/blob/main/config.json
    "flan-t5-xxl": dict(vision_config={}, qformer_config=dict(vocab_size=30523), num_query_tokens=32,
                        image_token_index=32100,
                        text_config={**_FLAN_T5_TEXT, "d_model": 4096, "d_ff": 10240, "num_heads": 64}),
}

# BLIP-2 (the Salesforce/blip2-* checkpoints, as transformers' conversion and its image-token update describe them;
# the hub files could not be read here, see docs/checkpoints.md#parameter-counts): OPT's vocabulary grows by
# `<image>` (50265) to 50266, padded to a multiple of 64; its eos is "\n" (50118), where BLIP-2 ends a caption.
# Flan-T5 takes `<image>` as 32100 within its 32128. The COCO-finetuned variants read 364-pixel images (26 x 26).
_OPT_TEXT = dict(
    model_type="opt", vocab_size=50304, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
    max_position_embeddings=2048, word_embed_proj_dim=2560, do_layer_norm_before=True, activation_function="relu",
    enable_bias=True, tie_word_embeddings=True, bos_token_id=2, eos_token_id=50118, pad_token_id=1,
)
_OPT_6B_TEXT = {**_OPT_TEXT, "hidden_size": 4096, "ffn_dim": 16384, "word_embed_proj_dim": 4096}
_BLIP2_T5_XXL_TEXT = {**_FLAN_T5_TEXT, "d_model": 4096, "d_ff": 10240, "num_heads": 64}


def _blip2(text: dict, image_token: int, image_size: int = 224) -> dict:
    return dict(vision_config=dict(image_size=image_size), qformer_config={}, num_query_tokens=32,
                image_token_index=image_token, text_config=text)


BLIP2_PRESETS: dict[str, dict] = {
    # https://huggingface.co/Salesforce/blip2-opt-2.7b/blob/main/config.json
    "opt-2.7b": _blip2(_OPT_TEXT, 50265),
    # https://huggingface.co/Salesforce/blip2-opt-6.7b/blob/main/config.json
    "opt-6.7b": _blip2(_OPT_6B_TEXT, 50265),
    # https://huggingface.co/Salesforce/blip2-flan-t5-xl/blob/main/config.json
    "flan-t5-xl": _blip2(_FLAN_T5_TEXT, 32100),
    # https://huggingface.co/Salesforce/blip2-flan-t5-xxl/blob/main/config.json
    "flan-t5-xxl": _blip2(_BLIP2_T5_XXL_TEXT, 32100),
    # https://huggingface.co/Salesforce/blip2-opt-2.7b-coco/blob/main/config.json
    "opt-2.7b-coco": _blip2(_OPT_TEXT, 50265, 364),
    # https://huggingface.co/Salesforce/blip2-opt-6.7b-coco/blob/main/config.json
    "opt-6.7b-coco": _blip2(_OPT_6B_TEXT, 50265, 364),
    # https://huggingface.co/Salesforce/blip2-flan-t5-xl-coco/blob/main/config.json
    "flan-t5-xl-coco": _blip2(_FLAN_T5_TEXT, 32100, 364),
}
