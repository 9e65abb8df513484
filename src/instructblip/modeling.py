"""The public model classes, with transformers' names: the network of `models.instructblip` plus loading and saving
(`weights`), the CPU speed routes applied after loading (`accel`), generation and ranking (`generation`).

They live here, above those subpackages, so that `models/` imports none of them.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from instructblip.models.config import Blip2Config, InstructBlipConfig, InstructBlipVideoConfig
from instructblip.models.instructblip import InstructBlipNetwork
from instructblip.models.outputs import EncoderOutput

# the keywords of `from_pretrained` beyond its named parameters: transformers' own, and ours for the loader
HUB_KEYWORDS = ("revision", "token", "cache_dir", "local_files_only")
FROM_PRETRAINED_KEYWORDS = ("dtype", "torch_dtype", "device", "device_map", "optimize", "quantize", "quantize_vision",
                            *HUB_KEYWORDS, "low_cpu_mem_usage", "attn_implementation", "config", "mmap_ok",
                            "progress")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
# the top-level parts a device map places (weights.checkpoint.PARTS), "" standing for those not named
_PARTS = ("vision_model", "query_tokens", "qformer", "language_projection", "language_model")


def _dtype_keywords(dtype, torch_dtype):
    """`dtype` and transformers' older `torch_dtype` name the same thing; giving both, they must agree."""
    if torch_dtype is None:
        return dtype
    if dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one of them")
    return torch_dtype


def _one_device(value, where: str) -> torch.device:
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"cuda:{value}"
    if value in ("disk", "meta"):
        raise ValueError(f"{where}: {value!r} offloading is not supported; place every part on a CPU or GPU")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{where}: {value!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or a GPU index") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{where}: {value!r} asks for CUDA but no CUDA device is available; use 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{where}: {value!r}, but there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_device_map(device, device_map) -> torch.device | dict[str, torch.device]:
    """Where the weights go, from `device` (ours) or `device_map` (transformers'): one device, or one per top-level
    part. "auto": the first GPU when there is one, else the CPU (the whole model on one device; for two GPUs name
    the parts in a dict)."""
    if device_map is None:
        return torch.device("cpu" if device is None else device)
    if device is not None and torch.device(device) != torch.device("cpu"):
        raise ValueError("give device or device_map, not both")
    if device_map == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if not isinstance(device_map, dict):
        return _one_device(device_map, "device_map")
    unknown = sorted(set(device_map) - {*_PARTS, ""})
    if unknown:
        raise ValueError(f"device_map names {', '.join(map(repr, unknown))}, which are not parts of the model; its "
                         f"parts are {', '.join(_PARTS)} ('' for every part not named)")
    missing = [part for part in _PARTS if part not in device_map and "" not in device_map]
    if missing:
        raise ValueError(f"device_map does not place {', '.join(missing)}; name every part, or add '' for the rest")
    return {part: _one_device(device_map.get(part, device_map.get("")), f"device_map[{part!r}]") for part in _PARTS}


def check_attn_implementation(name: str | None) -> None:
    """Attention runs through `torch.nn.functional.scaled_dot_product_attention` everywhere, which computes the
    same function as transformers' "eager" (softmax(q k^T / sqrt(d)) v, then dropout) and picks the fastest kernel
    for the device; both names are accepted and give the same results (we do not return attention weights, which
    is what "eager" is chosen for in transformers). Others (flash_attention_2, flex_attention) raise."""
    if name is not None and name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={name!r} is not supported; use one of {', '.join(ATTN_IMPLEMENTATIONS)} "
                         "(both run torch's scaled_dot_product_attention)")


class InstructBlipModel(InstructBlipNetwork):
    """InstructBLIP without the LM head: `forward` returns the language model's last hidden state."""

    config_class = InstructBlipConfig
    has_lm_head = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, optimize: bool = True, quantize: str | None = None,
                        quantize_vision: str | None = None, **kwargs):
        """Load an HF-layout directory or hub id. dtype: None (default) = float32 on CPU, the stored dtype on
        accelerators; "auto" = the stored dtype (as in transformers; `instructblip.load` and the CLI's "auto" pick
        what fits the machine instead); or a torch dtype / its name. Weights go straight to `device` (default CPU).

        transformers' keywords, with the same meaning (`FROM_PRETRAINED_KEYWORDS`; any other raises TypeError):
        `torch_dtype` (the older name of `dtype`), `device_map` ("auto": the GPU if there is one, else the CPU;
        "cpu", "cuda", "cuda:N", an index, or a dict from top-level parts - `vision_model`, `query_tokens`,
        `qformer`, `language_projection`, `language_model`, "" for the rest - to devices, e.g.
        `{"vision_model": 0, "qformer": 0, "query_tokens": 0, "language_projection": 1, "language_model": 1}`; the
        forward pass moves the activations between them), `revision`, `token`, `cache_dir`, `local_files_only`
        (the hub cache, `instructblip.hub`), `low_cpu_mem_usage` (accepted: loading always builds the model on the
        meta device and reads each tensor once), `attn_implementation` ("sdpa" or "eager", see
        `check_attn_implementation`), `config` (an `InstructBlipConfig` to use instead of the directory's).

        optimize: on the CPU in float32, put in the fast CPU layers (`instructblip.accel.optimize`: faster linear
        routes, packed weights, in-place GELU; the same parameters and state-dict keys, results equal up to float
        rounding; see docs/performance.md). False keeps the plain torch layers. Other devices and dtypes get plain
        layers either way.

        quantize: "int8" or "int4" stores the language model's linear layers (its head included) quantized
        (`accel.quantize`, CPU only), each quantized as it is read from the checkpoint (bf16, fp16 or fp32 files):
        the unquantized language model never exists in memory whole. quantize_vision: "int8" does the same for the
        vision encoder. The unquantized rest is in `dtype`; left None, bfloat16 where the CPU has it natively, else
        float32 (`weights.memory.rest_dtype`).

        `model.generation_config`: the decoding options of the checkpoint's `generation_config.json`, the defaults
        of `generate` (as in transformers; official checkpoints set none but token ids, which come from config.json)."""
        from instructblip import accel
        from instructblip.accel import quantize as q
        from instructblip.generation.config import GenerationConfig
        from instructblip.hub import resolve_checkpoint_dir
        from instructblip.weights.checkpoint import load_pretrained
        from instructblip.weights.memory import rest_dtype

        unknown = sorted(set(kwargs) - set(FROM_PRETRAINED_KEYWORDS))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained() got unexpected keyword argument(s) "
                            f"{', '.join(unknown)}; it takes {', '.join(FROM_PRETRAINED_KEYWORDS)}")
        dtype = _dtype_keywords(dtype, kwargs.pop("torch_dtype", None))
        placement = resolve_device_map(device, kwargs.pop("device_map", None))
        check_attn_implementation(kwargs.pop("attn_implementation", None))
        kwargs.pop("low_cpu_mem_usage", None)
        hub = {k: kwargs.pop(k) for k in HUB_KEYWORDS if k in kwargs}
        directory = resolve_checkpoint_dir(pretrained_model_name_or_path, **hub)

        linear = {}
        if quantize is not None:
            linear["language_model"] = q.layer_class(quantize)
        if quantize_vision is not None:
            linear["vision_model"] = q.layer_class(quantize_vision, vision=True)
        if linear:
            for where in placement.values() if isinstance(placement, dict) else [placement]:
                q.check_device(where, "quantizing")
            if dtype is None:
                dtype = rest_dtype()
        model = load_pretrained(cls, directory, dtype=dtype, device=placement, linear=linear, **kwargs)
        if linear:
            q.finish(model, quantize, quantize_vision)
        model.generation_config = GenerationConfig.from_pretrained(directory)
        return accel.optimize(model) if optimize else model

    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True) -> None:
        from instructblip.accel.cpu_linear import unpack
        from instructblip.weights.checkpoint import save_pretrained

        if not safe_serialization:
            raise ValueError("only safetensors checkpoints are written (safe_serialization=True)")
        if self.quantized or self.quantized_vision:
            raise ValueError(f"this model is {self.quantized or self.quantized_vision}-quantized, for inference only; "
                             "save the unquantized model and quantize it when loading")
        unpack(self)  # packed weights plain in place: state_dict() would hand out a dense copy of each, all at once
        save_pretrained(self, directory, max_shard_size=max_shard_size)

    def quantize_int8(self):
        """int8 quantization of the language model for CPU inference, in place (`accel.quantize`)."""
        return self.quantize("int8")

    def quantize(self, mode: str | None = "int8", vision: str | None = None):
        """Quantize the language model's linear layers ("int8" or "int4") and, with `vision="int8"`, the vision
        encoder's, for CPU inference, in place; returns the model. Loading with `from_pretrained(..., quantize=...)`
        needs less memory: it quantizes each layer as it is read."""
        from instructblip.accel.quantize import quantize

        return quantize(self, mode, vision)


class InstructBlipForConditionalGeneration(InstructBlipModel):
    """InstructBLIP with the language model's head: logits, loss, `generate` and `rank`."""

    has_lm_head = True

    @torch.no_grad()
    def generate(self, **kwargs) -> Tensor:
        """Generate with a KV cache; returns the new tokens only. See `instructblip.generation.generate`."""
        from instructblip.generation import generate

        return generate(self, **kwargs)

    @torch.no_grad()
    def rank(self, inputs: dict, candidates, **kwargs):
        """Score candidate answers by log-likelihood. See `instructblip.generation.rank`."""
        from instructblip.generation.rank import rank

        return rank(self, inputs, candidates, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# BLIP-2 and InstructBLIP-Video: the same network, read from their own configs


def _get_qformer_features(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
    """The Q-Former's last hidden state over the learned queries (B, Q, D_qformer), before the projection."""
    return self.get_image_features(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding
                                   ).qformer_outputs.last_hidden_state


def _get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: object) -> EncoderOutput:
    """The language model's hidden states for text alone: a decoder-only model's last hidden state, T5's encoder
    output (transformers' `Blip2Model.get_text_features`)."""
    lm = self.language_model
    embeds = lm.embed_tokens(input_ids)
    if self.config.text_config.is_encoder_decoder:
        return EncoderOutput(last_hidden_state=lm.encode(embeds, attention_mask))
    return EncoderOutput(last_hidden_state=lm(embeds, attention_mask))


class Blip2Model(InstructBlipModel):
    """BLIP-2 (its Q-Former reads no instruction). As in transformers, the base model keeps the LM head: `forward`
    returns logits (and the loss given `labels`)."""

    config_class = Blip2Config
    has_lm_head = True
    get_qformer_features = _get_qformer_features
    get_text_features = _get_text_features


class Blip2ForConditionalGeneration(InstructBlipForConditionalGeneration):
    """BLIP-2 with OPT or Flan-T5: logits, loss, `generate` and `rank`; the Q-Former reads no instruction, so the
    processor's `qformer_input_ids` are not needed (and ignored)."""

    config_class = Blip2Config
    get_qformer_features = _get_qformer_features
    get_text_features = _get_text_features


class InstructBlipVideoModel(InstructBlipModel):
    """InstructBLIP-Video without the LM head (`pixel_values` (B, T, 3, H, W))."""

    config_class = InstructBlipVideoConfig


class InstructBlipVideoForConditionalGeneration(InstructBlipForConditionalGeneration):
    """InstructBLIP over video frames, transformers' semantics: `pixel_values` (B, T, 3, H, W); every frame goes
    through the vision encoder and the Q-Former with the instruction, and the T x Q query outputs, concatenated in
    frame order, take the place of the prompt's T x Q `<video>` tokens. Loads InstructBLIP checkpoints as well."""

    config_class = InstructBlipVideoConfig


GENERATION_CLASSES = {InstructBlipConfig: InstructBlipForConditionalGeneration,
                      Blip2Config: Blip2ForConditionalGeneration,
                      InstructBlipVideoConfig: InstructBlipVideoForConditionalGeneration}


def generation_class(config: InstructBlipConfig) -> type[InstructBlipForConditionalGeneration]:
    """The conditional-generation class of a config (what `instructblip.load` builds): its kind says which."""
    return GENERATION_CLASSES[type(config)]
