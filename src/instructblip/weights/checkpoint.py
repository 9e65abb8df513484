"""Checkpoints in the Hugging Face layout: the weight map between transformers' keys and our module names, and
loading/saving single-file or sharded safetensors.

Our modules fuse some projections (q|k|v, the Q-Former's cross-attention k|v, LLaMA's gate|up, T5's wi_0|wi_1), so
one of our tensors may be several HF tensors stacked along dim 0: the map lists the parts in order with their row
counts. Loading builds the model on the meta device, allocates each tensor once in its final dtype and device and
fills it from the files (one copy of the weights in memory, not two). Every key in the files must be used, and
every tensor of the model filled, apart from the legacy keys listed in `_TOLERATED`.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from instructblip.files import write_json
from instructblip.hub import resolve_checkpoint_dir
from instructblip.models.config import (
    CONFIG_NAME,
    ConfigError,
    InstructBlipConfig,
    LlamaConfig,
    OPTConfig,
    T5Config,
)
from instructblip.progress import progress_bar

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# keys older files carry that hold nothing we need
_TOLERATED = [
    re.compile(r"^qformer\.embeddings\.position_ids$"),  # persistent buffer in 2023 files
    re.compile(r"^language_model\.(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),  # old LLaMA files
    re.compile(r"^language_model\.(encoder|decoder)\.embed_tokens\.weight$"),  # T5: aliases of shared.weight
]
# keys BLIP-2 files carry that its conditional-generation model does not use: the Q-Former's text feed-forward
# networks (written by transformers before `use_qformer_text_input`; no text reaches the Q-Former) and OPT's LM head
# stored beside the embeddings it is tied to
_TOLERATED_BLIP2 = [
    re.compile(r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)$"),
    re.compile(r"^qformer\.embeddings\.position_ids$"),
]
_TIED_OPT_HEAD = "language_model.lm_head.weight"


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded as it is."""


@dataclass(frozen=True)
class Entry:
    """Our tensor `ours` is the HF tensors `parts` stacked along dim 0, with `rows[i]` rows each (None: one part)."""

    ours: str
    parts: tuple[str, ...]
    rows: tuple[int, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# The weight map


def _vision_map(config: InstructBlipConfig) -> list[Entry]:
    v = config.vision_config
    out = [
        Entry("vision_model.class_embedding", ("vision_model.embeddings.class_embedding",)),
        Entry("vision_model.position_embedding", ("vision_model.embeddings.position_embedding",)),
        Entry("vision_model.post_layernorm.weight", ("vision_model.post_layernorm.weight",)),
        Entry("vision_model.post_layernorm.bias", ("vision_model.post_layernorm.bias",)),
    ]
    for p in ("weight", "bias"):
        out.append(Entry(f"vision_model.patch_embed.{p}", (f"vision_model.embeddings.patch_embedding.{p}",)))
    names = {"attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection", "norm1": "layer_norm1",
             "norm2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    for i in range(v.num_hidden_layers):
        for ours, hf in names.items():
            for p in ("weight", "bias"):
                if ours == "attn.qkv" and p == "bias" and not v.qkv_bias:
                    continue
                out.append(Entry(f"vision_model.layers.{i}.{ours}.{p}", (f"vision_model.encoder.layers.{i}.{hf}.{p}",)))
    return out


def _qformer_map(config: InstructBlipConfig) -> list[Entry]:
    q = config.qformer_config
    D = q.hidden_size
    if q.reads_instruction:
        out = [
            Entry("qformer.word_embeddings.weight", ("qformer.embeddings.word_embeddings.weight",)),
            Entry("qformer.position_embeddings.weight", ("qformer.embeddings.position_embeddings.weight",)),
            Entry("qformer.embed_norm.weight", ("qformer.embeddings.layernorm.weight",)),
            Entry("qformer.embed_norm.bias", ("qformer.embeddings.layernorm.bias",)),
        ]
    else:  # BLIP-2: the queries' LayerNorm sits on the Q-Former itself
        out = [Entry("qformer.embed_norm.weight", ("qformer.layernorm.weight",)),
               Entry("qformer.embed_norm.bias", ("qformer.layernorm.bias",))]
    for i in range(q.num_hidden_layers):
        hf, ours = f"qformer.encoder.layer.{i}.", f"qformer.layers.{i}."
        for p in ("weight", "bias"):
            out.append(Entry(ours + f"qkv.{p}", tuple(hf + f"attention.attention.{n}.{p}" for n in
                                                     ("query", "key", "value")), (D, D, D)))
            single = {"attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
                      "query_ffn.fc1": "intermediate_query.dense", "query_ffn.fc2": "output_query.dense",
                      "query_ffn.norm": "output_query.LayerNorm"}
            if q.reads_instruction:
                single |= {"text_ffn.fc1": "intermediate.dense", "text_ffn.fc2": "output.dense",
                           "text_ffn.norm": "output.LayerNorm"}
            if q.has_cross_attention(i):
                single |= {"cross_q": "crossattention.attention.query", "cross_out": "crossattention.output.dense",
                           "cross_norm": "crossattention.output.LayerNorm"}
                out.append(Entry(ours + f"cross_kv.{p}", (hf + f"crossattention.attention.key.{p}",
                                                          hf + f"crossattention.attention.value.{p}"), (D, D)))
            out += [Entry(ours + f"{o}.{p}", (hf + f"{h}.{p}",)) for o, h in single.items()]
    return out


def _llama_map(c: LlamaConfig, hf: str, lm_head: bool) -> list[Entry]:
    """hf: the prefix of the decoder body (`language_model.model.` with a head, `language_model.` without)."""
    q, kv, inter = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size
    out = [Entry("language_model.embed_tokens.weight", (hf + "embed_tokens.weight",)),
           Entry("language_model.norm.weight", (hf + "norm.weight",))]
    for i in range(c.num_hidden_layers):
        h, o = f"{hf}layers.{i}.", f"language_model.layers.{i}."
        params = ("weight", "bias") if c.attention_bias else ("weight",)
        for p in params:
            out.append(Entry(o + f"attn.qkv.{p}", tuple(h + f"self_attn.{n}_proj.{p}" for n in "qkv"), (q, kv, kv)))
            out.append(Entry(o + f"attn.o_proj.{p}", (h + f"self_attn.o_proj.{p}",)))
        for p in ("weight", "bias") if c.mlp_bias else ("weight",):
            out.append(Entry(o + f"gate_up.{p}", (h + f"mlp.gate_proj.{p}", h + f"mlp.up_proj.{p}"), (inter, inter)))
            out.append(Entry(o + f"down.{p}", (h + f"mlp.down_proj.{p}",)))
        out.append(Entry(o + "attn_norm.weight", (h + "input_layernorm.weight",)))
        out.append(Entry(o + "mlp_norm.weight", (h + "post_attention_layernorm.weight",)))
    if lm_head:
        out.append(Entry("language_model.lm_head.weight", ("language_model.lm_head.weight",)))
    return out


def _t5_map(c: T5Config, lm_head: bool) -> list[Entry]:
    inner, F = c.num_heads * c.d_kv, c.d_ff
    out = [Entry("language_model.shared.weight", ("language_model.shared.weight",))]
    for stack, n in (("encoder", c.num_layers), ("decoder", c.num_decoder_layers)):
        s = f"language_model.{stack}."
        out.append(Entry(s + "relative_attention_bias.weight",
                         (s + "block.0.layer.0.SelfAttention.relative_attention_bias.weight",)))
        out.append(Entry(s + "final_norm.weight", (s + "final_layer_norm.weight",)))
        for i in range(n):
            h, o = f"{s}block.{i}.layer.", f"{s}layers.{i}."
            out.append(Entry(o + "attn.qkv.weight", tuple(h + f"0.SelfAttention.{x}.weight" for x in "qkv"),
                             (inner, inner, inner)))
            out.append(Entry(o + "attn.o.weight", (h + "0.SelfAttention.o.weight",)))
            out.append(Entry(o + "attn_norm.weight", (h + "0.layer_norm.weight",)))
            ff = 1
            if stack == "decoder":
                ff = 2
                out.append(Entry(o + "cross.q.weight", (h + "1.EncDecAttention.q.weight",)))
                out.append(Entry(o + "cross.kv.weight", (h + "1.EncDecAttention.k.weight",
                                                         h + "1.EncDecAttention.v.weight"), (inner, inner)))
                out.append(Entry(o + "cross.o.weight", (h + "1.EncDecAttention.o.weight",)))
                out.append(Entry(o + "cross_norm.weight", (h + "1.layer_norm.weight",)))
            if c.is_gated_act:
                out.append(Entry(o + "ffn.wi.weight", (h + f"{ff}.DenseReluDense.wi_0.weight",
                                                       h + f"{ff}.DenseReluDense.wi_1.weight"), (F, F)))
            else:
                out.append(Entry(o + "ffn.wi.weight", (h + f"{ff}.DenseReluDense.wi.weight",)))
            out.append(Entry(o + "ffn.wo.weight", (h + f"{ff}.DenseReluDense.wo.weight",)))
            out.append(Entry(o + "ffn_norm.weight", (h + f"{ff}.layer_norm.weight",)))
    if lm_head:
        out.append(Entry("language_model.lm_head.weight", ("language_model.lm_head.weight",)))
    return out


def _opt_map(c: OPTConfig, causal_lm: bool, lm_head: bool) -> list[Entry]:
    """transformers' `OPTForCausalLM` (`causal_lm`; BLIP-2's base model has it too) or `OPTModel` under
    `language_model.`; `lm_head`: an untied head."""
    hf, D = ("language_model.model.decoder." if causal_lm else "language_model.decoder."), c.hidden_size
    out = [Entry("language_model.embed_tokens.weight", (hf + "embed_tokens.weight",)),
           Entry("language_model.embed_positions.weight", (hf + "embed_positions.weight",))]
    for name in ("project_in", "project_out"):
        if c.word_embed_proj_dim != D:
            out.append(Entry(f"language_model.{name}.weight", (hf + f"{name}.weight",)))
    norms = ("weight", "bias") if c.layer_norm_elementwise_affine else ()
    if c.has_final_layer_norm:
        out += [Entry(f"language_model.final_norm.{p}", (hf + f"final_layer_norm.{p}",)) for p in norms]
    linear = ("weight", "bias") if c.enable_bias else ("weight",)
    for i in range(c.num_hidden_layers):
        h, o = f"{hf}layers.{i}.", f"language_model.layers.{i}."
        for p in linear:
            out.append(Entry(o + f"attn.qkv.{p}", tuple(h + f"self_attn.{n}_proj.{p}" for n in "qkv"), (D, D, D)))
            out += [Entry(o + f"{ours}.{p}", (h + f"{theirs}.{p}",))
                    for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("fc1", "fc1"), ("fc2", "fc2"))]
        for p in norms:
            out += [Entry(o + f"attn_norm.{p}", (h + f"self_attn_layer_norm.{p}",)),
                    Entry(o + f"mlp_norm.{p}", (h + f"final_layer_norm.{p}",))]
    if lm_head:
        out.append(Entry("language_model.lm_head.weight", ("language_model.lm_head.weight",)))
    return out


def weight_map(config: InstructBlipConfig, has_lm_head: bool = True, body_prefix: str | None = None) -> list[Entry]:
    """Every tensor of our model with the HF keys it is made of, for `InstructBlipForConditionalGeneration`
    (`has_lm_head`) or `InstructBlipModel` (and BLIP-2's and the video classes alike: the config says which Q-Former
    and language model). A tied head (`tie_word_embeddings`) has no entry.
    `body_prefix`: where the LLaMA body lives, `language_model.model.` (with a head) or `language_model.` (without);
    the base model also reads the former."""
    text = config.text_config
    untied_head = has_lm_head and not text.tie_word_embeddings
    out = [Entry("query_tokens", ("query_tokens",)),
           Entry("language_projection.weight", ("language_projection.weight",)),
           Entry("language_projection.bias", ("language_projection.bias",))]
    out += _vision_map(config) + _qformer_map(config)
    if isinstance(text, T5Config):
        out += _t5_map(text, untied_head)
    elif isinstance(text, OPTConfig):
        out += _opt_map(text, has_lm_head, untied_head)
    else:
        prefix = body_prefix or ("language_model.model." if has_lm_head else "language_model.")
        out += _llama_map(text, prefix, untied_head)
    return out


def _expected_part_shape(shape: torch.Size, entry: Entry, i: int) -> tuple[int, ...]:
    return tuple(shape) if entry.rows is None else (entry.rows[i], *shape[1:])


# ----------------------------------------------------------------------------------------------------------------------
# Reading the files


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class _SafetensorsFile:
    """One .safetensors file read with plain file I/O straight into the destination tensors.

    The safetensors library memory-maps the file; the pages it touches stay resident while the handle lives, which
    would count the weights twice while a model loads. The format is a little-endian u64 header length, a JSON
    header of {name: {dtype, shape, data_offsets}} and the raw bytes, so reading it directly is short.
    """

    def __init__(self, path: str):
        self.path = path
        self._map: mmap.mmap | None = None
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 2 <= n <= size - 8:
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(f.read(n))
            self.start = 8 + n
            header.pop("__metadata__", None)
            self.entries = {}
            for key, info in header.items():
                begin, end = info["data_offsets"]
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                nbytes = torch.Size(shape).numel() * dtype.itemsize
                if end - begin != nbytes or begin < 0:
                    raise ValueError(f"{key}: data_offsets {begin}..{end} do not hold {shape} of {info['dtype']}")
                self.entries[key] = (dtype, shape, begin)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file (truncated or corrupt? re-download or re-save it): {e}"
            ) from None
        needed = self.start + max((b + _nbytes(d, s) for d, s, b in self.entries.values()), default=0)
        if size < needed:
            raise CheckpointError(
                f"{path} is truncated: its header describes {needed} bytes but the file has {size} "
                "(re-download or re-save it)"
            )

    def mapped(self, key: str) -> Tensor | None:
        """Tensor `key` backed by a private (copy-on-write) memory map of the file: no copy, pages read on first
        touch. None when its bytes are not aligned for its dtype."""
        dtype, shape, begin = self.entries[key]
        offset = self.start + begin
        if offset % dtype.itemsize:
            return None
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        count = _nbytes(dtype, shape)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "non-writable buffer" warnings do not apply to ACCESS_COPY maps
            flat = torch.frombuffer(self._map, dtype=torch.uint8, count=count, offset=offset)
        return flat.view(dtype).view(shape)

    def read_into(self, key: str, out: Tensor, scratch: _Scratch | None = None) -> None:
        """Copy tensor `key` into `out` (same shape; any dtype and device). A conversion reads through `scratch`."""
        dtype, shape, begin = self.entries[key]
        direct = out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous()
        buffer = out if direct else (scratch or _Scratch()).tensor(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            f.readinto(memoryview(buffer.view(-1).view(torch.uint8).numpy()))
        if not direct:
            out.copy_(buffer)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


class _Scratch:
    """One buffer, grown to the largest tensor, that the tensors read for a conversion (bf16 files loaded in fp32,
    say) pass through. A fresh buffer per tensor would be a fresh mapping of zeroed pages each time (glibc maps
    allocations above 32 MB anew): its page faults cost a bf16 -> fp32 load of a 1.2 GB checkpoint about a third of
    its time."""

    def __init__(self):
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        count = _nbytes(dtype, shape)
        if count > self.buffer.numel():
            self.buffer = torch.empty(count, dtype=torch.uint8)
        return self.buffer[:count].view(dtype).view(shape)


class _Reader:
    """The tensors of a checkpoint directory: safetensors (single or sharded) or legacy weights-only .bin files."""

    def __init__(self, directory: str):
        self.directory = directory
        self.where: dict[str, str] = {}  # key -> file
        self._safetensors: dict[str, _SafetensorsFile] = {}
        self._bins: dict[str, dict[str, Tensor]] = {}
        self._scratch = _Scratch()  # freed with the reader, once the model is loaded
        files = os.listdir(directory)
        if SAFE_INDEX in files:
            self._index(SAFE_INDEX)
        elif SAFE_WEIGHTS in files:
            self._add(SAFE_WEIGHTS)
        elif BIN_INDEX in files:
            self._index(BIN_INDEX)
        elif BIN_WEIGHTS in files:
            self._add(BIN_WEIGHTS)
        else:
            raise CheckpointError(
                f"{directory} has no weights: expected {SAFE_WEIGHTS}, {SAFE_INDEX} (sharded) or {BIN_WEIGHTS}"
            )

    def _index(self, name: str) -> None:
        path = os.path.join(self.directory, name)
        try:
            with open(path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not a valid shard index ({type(e).__name__}: {e})") from None
        for file in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(self.directory, file)):
                raise CheckpointError(f"{path} names the shard {file}, which is missing from {self.directory}")
            self._add(file)
        missing = set(weight_map) - set(self.where)
        if missing:
            raise CheckpointError(f"{path} lists keys that its shards lack, e.g. {sorted(missing)[0]}")

    def _add(self, file: str) -> None:
        path = os.path.join(self.directory, file)
        if file.endswith(".safetensors"):
            self._safetensors[file] = _SafetensorsFile(path)
            keys = list(self._safetensors[file].entries)
        else:
            try:  # never unpickle arbitrary objects
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{path} could not be read as a weights-only PyTorch file: {e}") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"{path} does not hold a state dict")
            self._bins[file] = state
            keys = list(state)
        for key in keys:
            self.where[key] = file

    def shape(self, key: str) -> tuple[int, ...]:
        file = self.where[key]
        if file in self._bins:
            return tuple(self._bins[file][key].shape)
        return self._safetensors[file].entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        file = self.where[key]
        return self._bins[file][key].dtype if file in self._bins else self._safetensors[file].entries[key][0]

    def mapped(self, key: str) -> Tensor | None:
        file = self.where[key]
        if file in self._bins:
            return self._bins[file][key]  # torch.load(mmap=True) maps it already
        return self._safetensors[file].mapped(key)

    def read_into(self, key: str, out: Tensor) -> None:
        file = self.where[key]
        if file in self._bins:
            out.copy_(self._bins[file][key])
        else:
            self._safetensors[file].read_into(key, out, self._scratch)

    def first_float_dtype(self) -> torch.dtype | None:
        for key in self.where:
            if key != "query_tokens" and self.dtype(key).is_floating_point:  # query_tokens stay fp32 in any case
                return self.dtype(key)
        return None


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def check_weights(directory: str) -> None:
    """CheckpointError (or OSError) unless `directory` holds weights whose headers read, every shard present; no
    tensor data is read (`instructblip serve` checks this before loading)."""
    _Reader(directory)


def _resolve_dtype(dtype, reader: _Reader, devices: list[torch.device]) -> torch.dtype:
    if dtype is None:  # our default: fp32 on CPU (half precision is slow there), the stored dtype elsewhere
        stored = reader.first_float_dtype() or torch.float32
        return torch.float32 if all(d.type == "cpu" for d in devices) else stored
    if dtype == "auto":
        return reader.first_float_dtype() or torch.float32
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'")
        return names[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype or 'auto', got {dtype!r}")
    return dtype


_INIT_FUNCTIONS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "zeros_", "ones_", "constant_")


@contextmanager
def _skip_init():
    """Random initialisation turned into no-ops while a model is built on the meta device: its weights come from
    the files, and initialising meta tensors would only import torch's reference kernels (torch._refs pulls in
    torch._dynamo and sympy: ~75 MB of resident memory and ~1 s on the first load of a process)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


# the model's top-level parts, which a device map may put on different devices
PARTS = ("vision_model", "query_tokens", "qformer", "language_projection", "language_model")


def load_pretrained(cls, path, dtype=None, device: str | torch.device | dict[str, torch.device] = "cpu",
                    config: InstructBlipConfig | None = None, mmap_ok: bool = True,
                    linear: dict[str, Callable[[Tensor, Tensor | None], nn.Module]] | None = None,
                    progress: bool = True):
    """Build `cls` (one of the public model classes of `modeling`; its `config_class` reads config.json) from an
    HF-layout directory.

    `device`: one device for the whole model, or a device per top-level part (`PARTS`: each tensor goes to its
    part's device, so the vision encoder and the language model can sit on different GPUs).
    `progress`: a progress bar by bytes on stderr while reading (`instructblip.progress`: a terminal only).

    `linear`: per top-level part ("language_model", "vision_model"), what builds each of its linear layers from the
    weight and bias as soon as both are read (e.g. an int8 layer: quantizing while loading), so that the part never
    exists in `dtype` as a whole; the tensors it was given are released before the next is read. A part not named
    keeps `nn.Linear`.

    On CPU, a tensor stored in the dtype it will be used in is mapped from the file (copy-on-write) instead of read:
    loading is then nearly free and the pages are read as the model first touches them; fused tensors (q|k|v...)
    and converted dtypes are read into fresh memory. `mmap_ok=False` reads everything (the files may then be
    replaced or deleted while the model lives)."""
    directory = resolve_checkpoint_dir(path)
    if config is None:
        config_path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{directory} is not a model checkpoint: it has no {CONFIG_NAME}")
        try:
            config = cls.config_class.from_json_file(config_path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
    reader = _Reader(directory)
    if isinstance(device, dict):
        devices = {part: torch.device(device[part]) for part in PARTS}
    else:
        devices = dict.fromkeys(PARTS, torch.device(device))
    dtype = _resolve_dtype(dtype, reader, list(devices.values()))

    # A head is tied when the config says so and the files bring no separate lm_head (transformers 5.x writes
    # tie_word_embeddings: true for every T5 but keeps Flan-T5's own lm_head in the files).
    text = config.text_config
    if (cls.has_lm_head and text.tie_word_embeddings and "language_model.lm_head.weight" in reader.where
            and isinstance(text, T5Config)):
        text.tie_word_embeddings = False
    body_prefix = "language_model.model." if "language_model.model.norm.weight" in reader.where else None
    entries = weight_map(config, cls.has_lm_head, body_prefix)
    with torch.device("meta"), _skip_init():
        model = cls(config)
    targets = {name: t.shape for name, t in model.state_dict().items()}
    if set(targets) != {e.ours for e in entries}:  # internal invariant between the map and the modules
        raise AssertionError(f"weight map out of sync: {sorted(set(targets) ^ {e.ours for e in entries})[:5]}")
    _check_keys(entries, targets, reader, directory, cls.has_lm_head, config)

    # the linear layers that `linear` builds: module name -> the keys of its tensors, and its builder
    built: dict[str, dict[str, Tensor]] = {}
    pending: dict[str, set[str]] = {}
    builders: dict[str, Callable[[Tensor, Tensor | None], nn.Module]] = {}
    for part, builder in (linear or {}).items():
        for name, module in model.get_submodule(part).named_modules():
            if isinstance(module, nn.Linear):
                full = f"{part}.{name}"
                pending[full] = {f"{full}.weight"} | ({f"{full}.bias"} if module.bias is not None else set())
                builders[full] = builder
    owner = {key: name for name, keys in pending.items() for key in keys}

    def build(name: str) -> None:  # a layer `linear` builds, once its tensors are all read; they are dropped
        tensors = built.pop(name)
        parent, _, child = name.rpartition(".")
        layer = builders[name](tensors[f"{name}.weight"], tensors.get(f"{name}.bias"))
        setattr(model.get_submodule(parent), child, layer)

    state = {}
    total = sum(_nbytes(tensor_dtype(e.ours, dtype), tuple(targets[e.ours])) for e in entries)
    bar = progress_bar(total, f"loading {os.path.basename(os.path.normpath(directory))}", unit="B", enabled=progress)
    for entry in entries:
        # (a layer `linear` builds is read, not mapped: mapped pages touched would stay resident while loading)
        state[entry.ours] = _read_entry(entry, targets[entry.ours], dtype, devices[entry.ours.split(".")[0]], reader,
                                        mmap_ok and entry.ours not in owner)
        bar.update(_nbytes(tensor_dtype(entry.ours, dtype), tuple(targets[entry.ours])))
        name = owner.get(entry.ours)
        if name is not None:
            built.setdefault(name, {})[entry.ours] = state.pop(entry.ours)
            if set(built[name]) == pending[name]:
                build(name)
    bar.close()
    if built:  # internal invariant: every weight of a built layer is in the map
        raise AssertionError(f"layers left half-read: {sorted(built)[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    return model


def _read_entry(entry: Entry, shape: torch.Size, dtype: torch.dtype, device: torch.device, reader: _Reader,
                mmap_ok: bool) -> Tensor:
    """One of our tensors from the files: mapped when stored as it will be used (CPU), else read into place (a fused
    tensor's parts stacked along dim 0, the legacy q/v biases joined with zeros)."""
    wanted = tensor_dtype(entry.ours, dtype)
    key = entry.parts[0]
    if (mmap_ok and device.type == "cpu" and entry.rows is None and key in reader.where
            and reader.dtype(key) == wanted):  # stored as it will be used: map the file, copy nothing
        tensor = reader.mapped(key)
        if tensor is not None:
            return tensor
    out = torch.empty(shape, dtype=wanted, device=device)
    legacy = _legacy_qkv_bias(entry)
    if entry.parts[0] not in reader.where and legacy:  # q_bias | zeros | v_bias
        width = shape[0] // 3
        reader.read_into(legacy[0], out[:width])
        out[width:2 * width].zero_()
        reader.read_into(legacy[1], out[2 * width:])
    else:  # one tensor, or a fused tensor: its parts stacked along dim 0
        start = 0
        for key in entry.parts:
            rows = reader.shape(key)[0] if entry.rows is not None else shape[0]
            reader.read_into(key, out[start:start + rows] if entry.rows is not None else out)
            start += rows
    return out


def tensor_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if name == "query_tokens" else dtype  # as transformers' keep-in-fp32


def _legacy_qkv_bias(entry: Entry) -> tuple[str, str] | None:
    """Very early BLIP-2 files keep the vision q/v biases apart: `self_attn.q_bias`, `self_attn.v_bias`."""
    if entry.ours.startswith("vision_model.layers.") and entry.ours.endswith("attn.qkv.bias"):
        base = entry.parts[0].removesuffix("qkv.bias")
        return base + "q_bias", base + "v_bias"
    return None


def _check_keys(entries: list[Entry], targets: dict[str, torch.Size], reader: _Reader, directory: str,
                has_lm_head: bool, config: InstructBlipConfig) -> None:
    """Strict: every expected key present with its shape, every key in the files used or tolerated."""
    used: set[str] = set()
    missing = []
    for entry in entries:
        shape = targets[entry.ours]
        legacy = _legacy_qkv_bias(entry)
        if entry.parts[0] not in reader.where and legacy and all(k in reader.where for k in legacy):
            parts = [(key, (shape[0] // 3,)) for key in legacy]
        else:
            parts = [(key, _expected_part_shape(shape, entry, i)) for i, key in enumerate(entry.parts)]
        for key, expected in parts:
            if key not in reader.where:
                missing.append(key)
                continue
            used.add(key)
            got = reader.shape(key)
            if got != expected:
                raise CheckpointError(
                    f"{key} in {directory} has shape {list(got)}, but the config calls for {list(expected)}; "
                    "does config.json match the weights?"
                )
    if missing:
        hint = ""
        if any(k.endswith("lm_head.weight") for k in missing):
            hint = " (the config says the LM head is untied: tie_word_embeddings is false)"
        raise CheckpointError(
            f"{directory} lacks {len(missing)} weight(s) the config calls for, e.g. {missing[0]}{hint}; "
            "is the checkpoint complete and does config.json match it?"
        )
    tolerated = _TOLERATED + (_TOLERATED_BLIP2 if not config.reads_instruction else [])
    unexpected = [k for k in reader.where if k not in used and not any(p.match(k) for p in tolerated)]
    if isinstance(config.text_config, OPTConfig) and config.text_config.tie_word_embeddings:
        unexpected = [k for k in unexpected if k != _TIED_OPT_HEAD]  # the embeddings again
    if not has_lm_head:  # the base model reads a full checkpoint and leaves its head
        unexpected = [k for k in unexpected if k != "language_model.lm_head.weight"]
    if unexpected:
        raise CheckpointError(
            f"{directory} holds {len(unexpected)} weight(s) this model does not have, e.g. {unexpected[0]}; "
            "does config.json match the weights?"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Saving


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size like '5GB' or '500MB'")
    unit = m.group(2).upper()
    scale = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def hf_state_dict(model) -> dict[str, Tensor]:
    """Our weights under transformers' keys (fused tensors split into views)."""
    ours = model.state_dict()
    out = {}
    for entry in weight_map(model.config, model.has_lm_head):
        tensor = ours[entry.ours]
        if entry.rows is None:
            out[entry.parts[0]] = tensor
        else:
            for key, part in zip(entry.parts, tensor.split(list(entry.rows), dim=0), strict=True):
                out[key] = part
    return out


def save_pretrained(model, directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
    """Write config.json and safetensors (sharded with an index past `max_shard_size`), each file written to a
    temporary name and renamed into place, so that a crash never leaves a half-written file under a real name."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    limit = _parse_size(max_shard_size)
    state = hf_state_dict(model)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    names = [SAFE_WEIGHTS] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for name, shard in zip(names, shards, strict=True):
        tmp = os.path.join(directory, name + ".tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in shard.items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(directory, name))
    config = model.config
    config.extra["dtype"] = str(model.dtype).removeprefix("torch.")
    config.save_pretrained(directory)
    _write_generation_config(config, directory)
    stale = [SAFE_INDEX] if len(shards) == 1 else [SAFE_WEIGHTS]
    stale += [f for f in os.listdir(directory) if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f) and
              f not in names]
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: names[i] for i, shard in enumerate(shards) for k in shard}}
        write_json(os.path.join(directory, SAFE_INDEX), index)
    for name in stale:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            os.remove(path)


def _write_generation_config(config: InstructBlipConfig, directory: str) -> None:
    text = config.text_config
    data = {"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id}
    if isinstance(text, T5Config):
        data["decoder_start_token_id"] = text.decoder_start_token_id
    write_json(os.path.join(directory, "generation_config.json"), {k: v for k, v in data.items() if v is not None})
