"""The configuration of a training run: `TrainConfig`, whose fields are the YAML keys and the flags of `instructblip
train` (YAML only presets them; the defaults are the paper's recipe, see `loop.py`), and its reading from a mapping
with clear errors for unknown keys and wrong types."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from instructblip.training.data import DataSource


@dataclass
class TrainConfig:
    """Everything a run needs. Defaults are the paper's recipe; `help` metadata is shown by `--help`."""

    model: str = field(metadata={"help": "starting checkpoint (HF-layout directory or hub id), e.g. a BLIP-2 / "
                                         "InstructBLIP checkpoint converted to the HF layout"})
    train_data: list[DataSource] = field(metadata={"help": "training sources (JSONL, parquet, image folder); YAML: a "
                                                           "list of paths or of {path, name, task, weight, ...}"})
    output_dir: str = field(default="runs/instructblip", metadata={"help": "checkpoints, metrics and the final model"})
    val_data: list[DataSource] = field(default_factory=list, metadata={"help": "held-out sources for validation"})
    balance: str = field(default="sqrt", metadata={"help": "dataset sampling: sqrt (paper), size or uniform"})
    max_prompt_length: int = field(default=128, metadata={"help": "instruction tokens kept (cut from the left)"})
    max_answer_length: int = field(default=256, metadata={"help": "answer tokens kept, eos included (cut from the "
                                                                  "right)"})
    augment: bool = field(default=False, metadata={"help": "random-resized crop, scale 0.5-1 (no flip)"})
    strict: bool = field(default=False, metadata={"help": "fail on the first bad record instead of skipping it"})
    train_qformer: bool = field(default=True, metadata={"help": "train Q-Former, query tokens, projection, ln_vision"})
    train_vision: bool = field(default=False, metadata={"help": "also train the vision encoder"})
    train_language_model: bool = field(default=False, metadata={"help": "also train the LLM"})
    dropout: float | None = field(default=None, metadata={"help": "override every dropout rate of the Q-Former and "
                                                                  "LLM (e.g. 0); default: the checkpoint's"})
    max_steps: int = field(default=60_000, metadata={"help": "optimizer steps"})
    global_batch_size: int = field(default=128, metadata={"help": "samples per optimizer step, all processes"})
    micro_batch_size: int = field(default=8, metadata={"help": "samples per forward pass per process"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    warmup_lr: float = field(default=1e-8, metadata={"help": "learning rate at step 0"})
    warmup_steps: int = field(default=1000, metadata={"help": "linear warm-up steps"})
    min_lr: float = field(default=0.0, metadata={"help": "learning rate at the end of the cosine"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on biases / 1-D tensors)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    grad_clip: float | None = field(default=None, metadata={"help": "clip the gradient norm to this (default: off)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, else fp16; fp32 on CPU), fp32, "
                                                             "bf16 or fp16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes per rank"})
    seed: int = field(default=42, metadata={"help": "seeds the data order, templates and dropout"})
    val_every: int = field(default=3000, metadata={"help": "validate every N steps (and at the end)"})
    val_max_samples: int | None = field(default=500, metadata={"help": "records per validation source"})
    val_max_new_tokens: int = field(default=10, metadata={"help": "generation length for the validation metric; 0 "
                                                                  "= loss only"})
    val_num_beams: int = field(default=1, metadata={"help": "beam width for validation generation"})
    checkpoint_every: int = field(default=1000, metadata={"help": "write a checkpoint every N steps"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep"})
    resume: str | None = field(default=None, metadata={"help": "'latest' (in output_dir; a fresh start if none) or a "
                                                               "checkpoint directory"})
    log_every: int = field(default=10, metadata={"help": "metrics line every N steps"})
    progress: bool | None = field(default=None, metadata={"help": "progress bar on stderr (default: if a tty)"})
    tensorboard: bool | None = field(default=None, metadata={"help": "TensorBoard logs (default: if installed)"})
    export: bool = field(default=True, metadata={"help": "write output_dir/model at the end"})

    def __post_init__(self):
        self.train_data = [_as_source(s, "train_data") for s in _as_list(self.train_data)]
        self.val_data = [_as_source(s, "val_data") for s in _as_list(self.val_data)]
        if not self.train_data:
            raise ValueError("train_data is empty: give at least one data source")
        for what, sources in (("train_data", self.train_data), ("val_data", self.val_data)):
            names = [s.name for s in sources]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"{what}: several sources are named {twice}; give them distinct `name:`s")
        for name in ("max_steps", "global_batch_size", "micro_batch_size", "max_prompt_length", "max_answer_length",
                     "val_every", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "num_workers", "val_max_new_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (self.train_qformer or self.train_vision or self.train_language_model):
            raise ValueError("nothing to train: train_qformer, train_vision and train_language_model are all false")


# the fields with a fixed set of values (the command line offers them as choices)
CHOICES = {"balance": ("sqrt", "size", "uniform"), "device": ("auto", "cpu", "cuda"),
           "precision": ("auto", "fp32", "bf16", "fp16")}


def _as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _as_source(value: Any, where: str) -> DataSource:
    if isinstance(value, DataSource):
        return value
    if isinstance(value, str):
        return DataSource(path=value)
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(DataSource)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} in a data source; known: {sorted(known)}")
        return DataSource(**value)
    raise ValueError(f"{where}: a data source is a path or a mapping, got {type(value).__name__}")


# ---- from YAML (and flags) ----

_FIELD_TYPES: dict[str, Any] = {}


def field_types() -> dict[str, Any]:
    """TrainConfig's field annotations, resolved (they are strings here)."""
    if not _FIELD_TYPES:
        _FIELD_TYPES.update(typing.get_type_hints(TrainConfig))
    return _FIELD_TYPES


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check/convert one value against the field's annotation (int, float, str, bool, X | None, list of sources)."""
    hint = field_types()[name]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{where}: {name} cannot be null")
    if typing.get_origin(base) is list:
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(f"{where}: {name} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise ValueError(f"{where}: {name} must be an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}: {name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {name} must be a number, got {value!r}") from None
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name} must be a string, got {value!r}")
    return value


def config_from_dict(data: dict, where: str = "config") -> TrainConfig:
    """A `TrainConfig` from a mapping (YAML contents merged with overrides); clear errors for unknown keys and
    values of the wrong type."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(names)}"
            raise ValueError(f"{where}: unknown key {key!r}{hint}")
        values[name] = _coerce(name, value, where)
    for name in ("model", "train_data"):
        if name not in values:
            raise ValueError(f"{where}: '{name}' is required")
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def load_yaml(path: str) -> dict:
    try:
        import yaml
    except ImportError:
        raise ValueError("reading a YAML config needs PyYAML (pip install 'instructblip[train]')") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data
