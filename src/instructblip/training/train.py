"""Instruction tuning with the paper's recipe (InstructBLIP §2.6), as one explicit loop: no Trainer, no framework.

    instructblip train configs/train/flan-t5-xl.yaml --max-steps 1000 --output-dir runs/x
    torchrun --nproc_per_node 8 -m instructblip train configs/train/vicuna-7b.yaml
    python -c "from instructblip.training.train import TrainConfig, train; train(TrainConfig(model=..., ...))"

`TrainConfig` is the whole configuration (its fields are the CLI flags and the YAML keys; YAML only presets them).
The recipe, with the paper's values as defaults:
- The vision encoder and the LLM are frozen; the Q-Former (with its instruction embeddings), the query tokens, the
  projection and the LayerNorm on the image features (LAVIS's `ln_vision`, which sits outside its frozen ViT;
  `vision_model.post_layernorm` here) are trained. `train_vision` / `train_language_model` unfreeze the others.
  The frozen ViT runs in eval mode (LAVIS `disabled_train`); the frozen LLM stays in train mode, as in LAVIS (its
  dropout, 0.1 for Flan-T5, stays on; `dropout` overrides every dropout rate).
- AdamW (0.9, 0.999), weight decay 0.05 (none on biases and 1-D tensors, as LAVIS `get_optimizer_params`),
  learning rate warmed up linearly from 1e-8 to 1e-5 over 1,000 steps, then cosine decay to 0 at `max_steps`
  (the paper's 60K). Per step, not per LAVIS "inner epoch". No gradient clipping unless `grad_clip` is set.
- Global batch `global_batch_size` (paper: 192 Flan-T5-XL, 128 Vicuna-7B, 64 XXL/13B) = micro-batch x processes x
  accumulation steps. The loss is the mean over all answer tokens of the global batch, whatever its split, so one
  process and N processes compute the same update.
- Data: `data.py` (sqrt-balanced mixture, templates per task, LAVIS truncation, label masking).
- Precision: bf16 autocast on GPUs that have it (else fp16 with loss scaling), fp32 on CPU; frozen weights are kept
  in the autocast dtype on GPU, trained weights and optimizer state in fp32.
- Distributed: under `torchrun`, DDP (NCCL on GPU, gloo on CPU). Only trained parameters are in DDP's buckets; the
  frozen ones (and all buffers) are excluded from its start-up broadcast too, since every rank loads the same files.
  Each rank reads its own slice of every global batch. Rank 0 alone writes logs, checkpoints and the final model.
- Checkpoints (`output_dir/checkpoints/step-NNNNNNNN/state.pt`) hold the trained weights, optimizer and loss-scaler
  state, the step, the data position and the RNG states of every rank; they are written under a temporary name and
  renamed into place, and only the last `keep_checkpoints` are kept. `resume: latest` continues exactly.
- At the end, `output_dir/model/` is a complete Hugging Face-layout model (weights + processor files) that our
  `from_pretrained` and transformers' load.

Test hooks (environment): INSTRUCTBLIP_CHECKPOINT_WRITE_DELAY="STEP:SECONDS" sleeps in the middle of writing the
checkpoint of STEP (to test a kill during the write).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import random
import re
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from instructblip.evaluation.metrics import exact_match, vqa_accuracy
from instructblip.modeling import InstructBlipForConditionalGeneration
from instructblip.models.config import InstructBlipConfig
from instructblip.models.instructblip import IGNORE_INDEX
from instructblip.processing.processor import InstructBlipProcessor
from instructblip.training.data import (
    Collator,
    DataSource,
    InstructionDataset,
    MixturePlan,
    TrainBatches,
    mixture_probabilities,
    mixture_table,
    open_source,
    validation_batches,
)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "state.pt"
EXPORT_DIR = "model"
METRICS_FILE = "metrics.jsonl"
MAX_SKIP_MESSAGES = 20  # per rank; later skips are counted in the metrics only
MODEL_KEYS = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask", "labels",
              "decoder_attention_mask")


# ----------------------------------------------------------------------------------------------------------------------
# Configuration


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
        choices = {"balance": ("sqrt", "size", "uniform"), "device": ("auto", "cpu", "cuda"),
                   "precision": ("auto", "fp32", "bf16", "fp16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (self.train_qformer or self.train_vision or self.train_language_model):
            raise ValueError("nothing to train: train_qformer, train_vision and train_language_model are all false")


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


# ---- YAML and command line ----

_FIELD_TYPES: dict[str, Any] = {}


def _field_types() -> dict[str, Any]:
    if not _FIELD_TYPES:
        _FIELD_TYPES.update(typing.get_type_hints(TrainConfig))
    return _FIELD_TYPES


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check/convert one value against the field's annotation (int, float, str, bool, X | None, list of sources)."""
    hint = _field_types()[name]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructblip train",
        description="Instruction-tune InstructBLIP (the paper's recipe). Values: defaults < CONFIG.yaml < flags.",
        epilog="Multi-GPU / multi-process: torchrun --nproc_per_node N -m instructblip train CONFIG.yaml ...",
    )
    parser.add_argument("config", nargs="?", help="YAML file presetting any of the flags below (keys = flag names "
                                                  "with underscores)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING:
            help_text += f" (default: {f.default})"
        hint = _field_types()[f.name]
        if typing.get_origin(hint) is list:
            parser.add_argument(flag, dest=f.name, nargs="+", metavar="PATH", default=argparse.SUPPRESS,
                                help=help_text)
        elif f.name == "resume":
            parser.add_argument(flag, dest=f.name, nargs="?", const="latest", default=argparse.SUPPRESS,
                                help=help_text)
        elif bool in typing.get_args(hint) or hint is bool:
            parser.add_argument(flag, dest=f.name, nargs="?", const="true", metavar="BOOL",
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text)
    return parser


def parse_args(argv: list[str]) -> TrainConfig:
    """`[CONFIG.yaml] [--key value ...]` -> TrainConfig."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config")
    data = load_yaml(path) if path else {}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    data.update(args)
    return config_from_dict(data, where=path or "command line")


def main(argv: list[str] | None = None) -> int:
    """`instructblip train ...`: parse, train, return 0. User errors raise ValueError / FileNotFoundError."""
    config = parse_args(sys.argv[1:] if argv is None else list(argv))
    train(config)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Small pieces of the loop


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up from `warmup_lr` to `lr` over `warmup_steps`, then cosine to `min_lr` at `max_steps`."""
    if step < config.warmup_steps:
        return config.warmup_lr + (config.lr - config.warmup_lr) * step / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def trainable_prefixes(config: TrainConfig) -> tuple[str, ...]:
    prefixes = []
    if config.train_qformer:
        prefixes += ["qformer.", "query_tokens", "language_projection.", "vision_model.post_layernorm."]
    if config.train_vision:
        prefixes.append("vision_model.")
    if config.train_language_model:
        prefixes.append("language_model.")
    return tuple(prefixes)


def freeze(model: nn.Module, config: TrainConfig) -> list[str]:
    """Set requires_grad from the config and return the trained parameter names (in model order)."""
    prefixes = trainable_prefixes(config)
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        if p.requires_grad:
            names.append(name)
    return names


def set_modes(model: nn.Module, config: TrainConfig) -> None:
    """Training mode, except a frozen vision encoder, which runs in eval mode (LAVIS `disabled_train`)."""
    model.train()
    if not config.train_vision:
        model.vision_model.eval()


def override_dropout(config: InstructBlipConfig, rate: float) -> dict[str, float]:
    """Set every Q-Former / LLM dropout rate in the model config; returns the old values to restore at export."""
    q, t = config.qformer_config, config.text_config
    targets = [(q, "hidden_dropout_prob"), (q, "attention_probs_dropout_prob"), (t, "dropout_rate"),
               (t, "attention_dropout")]
    saved = {}
    for obj, name in targets:
        if hasattr(obj, name):
            saved[f"{id(obj)}:{name}"] = getattr(obj, name)
            setattr(obj, name, rate)
    return saved


def restore_dropout(config: InstructBlipConfig, saved: dict[str, float]) -> None:
    for obj in (config.qformer_config, config.text_config):
        for key, value in saved.items():
            oid, name = key.split(":")
            if int(oid) == id(obj):
                setattr(obj, name, value)


def optimizer_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """LAVIS `get_optimizer_params`: no weight decay on biases and 1-D tensors (LayerNorm weights)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LossModule(nn.Module):
    """What DDP wraps: the model's forward returning only the mean loss over the answer tokens of a micro-batch."""

    def __init__(self, model: InstructBlipForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, **inputs) -> torch.Tensor:
        return self.model(**inputs).loss


def answer_scores(prediction: str, references: list[str]) -> tuple[float, float]:
    """(exact match against any reference, VQA accuracy), with the official VQA answer normalisation
    (`metrics.py`). With fewer than 3 references (not VQA-style annotations) the VQA accuracy is the exact match."""
    exact = max(exact_match(prediction, r) for r in references)
    return exact, (vqa_accuracy(prediction, references) if len(references) >= 3 else exact)


# ---- RNG states (weights_only-safe structures) ----


def rng_state(device: torch.device) -> dict:
    """This process's RNG states as plain Python values (picklable for `all_gather_object`, loadable with
    `torch.load(weights_only=True)`)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


# ---- checkpoints ----


def checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as (step, directory), oldest first; temporary (half-written) ones are ignored."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = re.fullmatch(r"step-(\d+)", name)
        if m and os.path.isfile(os.path.join(root, name, CHECKPOINT_FILE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


class _DelayedWriter:
    """File wrapper for the test hook: sleeps once after half of `expected` bytes are written."""

    def __init__(self, f, seconds: float, after_bytes: int):
        self.f, self.seconds, self.after, self.written, self.slept = f, seconds, after_bytes, 0, False

    def write(self, data) -> int:
        n = self.f.write(data)
        self.written += n
        if not self.slept and self.written >= self.after:
            self.slept = True
            self.f.flush()
            print(f"[test hook] checkpoint write paused for {self.seconds}s", file=sys.stderr, flush=True)
            time.sleep(self.seconds)
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)


def save_checkpoint(state: dict, output_dir: str, step: int, keep: int) -> str:
    """Write `state` to output_dir/checkpoints/step-NNNNNNNN/state.pt atomically (temporary directory, fsync, rename)
    and delete all but the newest `keep` checkpoints. A crash at any point leaves the previous checkpoints intact."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    path = os.path.join(tmp, CHECKPOINT_FILE)
    hook = os.environ.get("INSTRUCTBLIP_CHECKPOINT_WRITE_DELAY", "")
    with open(path, "wb") as f:
        if hook and int(hook.split(":")[0]) == step:
            size = sum(t.numel() * t.element_size() for t in state["trainable"].values())
            torch.save(state, _DelayedWriter(f, float(hook.split(":")[1]), size // 2))
        else:
            torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.isdir(final):  # a checkpoint of this step from an earlier, interrupted run
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint directory (or its state.pt)."""
    file = os.path.join(path, CHECKPOINT_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no checkpoint at {path} (expected {CHECKPOINT_FILE} inside)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise ValueError(f"cannot read checkpoint {file}: {type(e).__name__}: {e}") from None


def data_fingerprint(config: TrainConfig, sources: list) -> dict:
    """What must not change for a resumed run to see the data an uninterrupted run would have seen."""
    return {
        "seed": config.seed, "global_batch_size": config.global_batch_size, "balance": config.balance,
        "max_prompt_length": config.max_prompt_length, "max_answer_length": config.max_answer_length,
        "augment": config.augment,
        "sources": [[s.name, len(s), float(s.spec.weight)] for s in sources],
    }


# ---- logging ----


class Logger:
    """Rank 0's outputs: metrics.jsonl (always), TensorBoard (if wanted and installed), a progress bar on stderr
    (if stderr is a tty, or `progress: true`), and plain log lines otherwise."""

    def __init__(self, config: TrainConfig, enabled: bool, start_step: int):
        self.enabled = enabled
        self.config = config
        self.bar = enabled and (config.progress if config.progress is not None else sys.stderr.isatty())
        self.tb = None
        self.start_time = time.time()
        self.start_step = start_step
        if not enabled:
            return
        os.makedirs(config.output_dir, exist_ok=True)
        self.path = os.path.join(config.output_dir, METRICS_FILE)
        if os.path.isfile(self.path):  # resuming: drop lines of steps after the checkpoint (they will be redone)
            with open(self.path, encoding="utf-8") as f:
                lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= start_step]
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(lines)
        if config.tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(config.output_dir, "tensorboard"))
            except ImportError:
                if config.tensorboard:
                    print("tensorboard is not installed; logging to metrics.jsonl only", file=sys.stderr)

    def info(self, message: str) -> None:
        if self.enabled:
            if self.bar:
                print("\r\033[K", end="", file=sys.stderr)
            print(message, file=sys.stderr, flush=True)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, metrics["step"])

    def progress(self, step: int, loss: float, lr: float, samples_per_s: float, force_line: bool) -> None:
        if not self.enabled:
            return
        total = self.config.max_steps
        done = step - self.start_step
        elapsed = time.time() - self.start_time
        eta = elapsed / max(done, 1) * (total - step)
        text = (f"step {step}/{total} | loss {loss:.4f} | lr {lr:.3g} | {samples_per_s:.1f} samples/s | "
                f"eta {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m")
        if self.bar:
            width = 20
            filled = int(width * step / total)
            print(f"\r\033[K[{'#' * filled}{'.' * (width - filled)}] {text}", end="", file=sys.stderr, flush=True)
        elif force_line:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.bar:
            print(file=sys.stderr)
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class TrainResult:
    steps: int
    export_dir: str | None
    final_loss: float | None
    skipped: int
    validation: dict = field(default_factory=dict)


def train(config: TrainConfig) -> TrainResult:
    """Run instruction tuning as configured (see the module docstring). Returns what was done; the model is in
    `output_dir/model` (when `export`), checkpoints in `output_dir/checkpoints`, metrics in `metrics.jsonl`."""

    # ---- processes and devices ----
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for, but no CUDA device is available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    is_main = rank == 0
    precision = config.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if use_cuda else "fp32"
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    frozen_dtype = amp_dtype if (use_cuda and amp_dtype is not None) else torch.float32
    if config.num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    random.seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    torch.manual_seed(config.seed + rank)

    # ---- data ----
    train_sources = [open_source(spec, config.strict) for spec in config.train_data]
    val_sources = [open_source(spec, config.strict) for spec in config.val_data]
    probabilities = mixture_probabilities([len(s) for s in train_sources], [s.spec.weight for s in train_sources],
                                          config.balance)

    # ---- where to start: a checkpoint to resume from, or a fresh output directory ----
    resume_path = None
    if config.resume == "latest":
        found = checkpoint_dirs(config.output_dir)
        resume_path = found[-1][1] if found else None
        if resume_path is None and is_main:
            print(f"resume: no checkpoint in {config.output_dir}; starting from the beginning", file=sys.stderr)
    elif config.resume:
        resume_path = config.resume
        if not os.path.isfile(os.path.join(resume_path, CHECKPOINT_FILE)) and not os.path.isfile(resume_path):
            raise FileNotFoundError(f"resume: no checkpoint at {resume_path}")
    elif checkpoint_dirs(config.output_dir):
        raise ValueError(f"{config.output_dir} already holds checkpoints of a run; pass --resume to continue it, or "
                         "choose another output_dir")

    # ---- model and processor ----
    model_config = InstructBlipConfig.from_pretrained(config.model)
    saved_dropout = override_dropout(model_config, config.dropout) if config.dropout is not None else {}
    model = InstructBlipForConditionalGeneration.from_pretrained(config.model, dtype=frozen_dtype, device=device,
                                                                 config=model_config)
    processor = InstructBlipProcessor.from_pretrained(config.model)
    if (model.config.image_token_index is not None) != processor.insert_image_tokens:
        raise ValueError(f"{config.model}: the model and processor disagree on image tokens (config "
                         f"image_token_index={model.config.image_token_index}, processor inserts: "
                         f"{processor.insert_image_tokens})")
    trained_names = freeze(model, config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # master weights in fp32
    set_modes(model, config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(vision=config.train_vision, qformer=True, language_model=True)
    if model.config.is_encoder_decoder and precision == "fp16":
        print("warning: Flan-T5 is unstable in fp16 (LAVIS #206); use precision: bf16 or fp32", file=sys.stderr)

    # ---- optimizer and state ----
    optimizer = torch.optim.AdamW(optimizer_groups(model, config), lr=config.warmup_lr,
                                  betas=(config.beta1, config.beta2), eps=config.eps)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16" and use_cuda)
    fingerprint = data_fingerprint(config, train_sources)
    start_step, data_state, skipped_total = 0, None, 0
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        if state["fingerprint"] != fingerprint:
            diff = {k: (state["fingerprint"].get(k), v) for k, v in fingerprint.items()
                    if state["fingerprint"].get(k) != v}
            raise ValueError(f"cannot resume from {resume_path} exactly: the data settings changed "
                             f"(saved, now): {diff}")
        params = dict(model.named_parameters())
        if sorted(state["trainable"]) != sorted(trained_names):
            raise ValueError(f"{resume_path} holds other trained parameters than this run trains "
                             f"(train_qformer / train_vision / train_language_model changed?)")
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_step, data_state, skipped_total = state["step"], state["data"], state["skipped"]
        if len(state["rng"]) == world_size:
            set_rng_state(state["rng"][rank], device)
        elif is_main:
            print(f"warning: the checkpoint was written by {len(state['rng'])} processes, this run has {world_size}; "
                  "the data continues exactly but dropout draws differ", file=sys.stderr)
        del state

    # ---- loaders ----
    plan = MixturePlan([len(s) for s in train_sources], probabilities, config.global_batch_size, config.seed,
                       state=data_state)
    batches = TrainBatches(plan, config.max_steps, config.micro_batch_size, rank, world_size)
    collate = Collator(processor, model.config.is_encoder_decoder, config.max_prompt_length,
                       config.max_answer_length)
    loader_options = dict(num_workers=config.num_workers, pin_memory=use_cuda,
                          persistent_workers=False)
    train_loader = torch.utils.data.DataLoader(
        InstructionDataset(train_sources, processor.image_processor, config.seed, config.augment, config.strict),
        batch_sampler=batches, collate_fn=collate,
        generator=torch.Generator().manual_seed(config.seed),  # else iter() draws from the global RNG (dropout's)
        **loader_options)

    # ---- DDP: only the trained parameters are synchronised ----
    step_module: nn.Module = LossModule(model)
    if distributed:
        frozen = [f"model.{n}" for n, p in model.named_parameters() if not p.requires_grad]
        frozen += [f"model.{n}" for n, _ in model.named_buffers()]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step_module, frozen)
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[local_rank] if use_cuda else None, broadcast_buffers=False,
            # every trained tensor is in the autograd graph of every step (the last Q-Former layer's text FFN gets
            # zero gradients, not none), so the costly search for unused parameters is not needed
            find_unused_parameters=False,
        )

    # ---- start-up report ----
    logger = Logger(config, is_main, start_step)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    samples = (config.max_steps - start_step) * config.global_batch_size
    logger.info("training data (sampling probability p = weight * sqrt(records), normalised):\n"
                + mixture_table(train_sources, probabilities, samples))
    if val_sources:
        logger.info("validation: " + ", ".join(f"{s.name} ({len(s)})" for s in val_sources))
    logger.info(f"trained parameters: {n_trained:,} of {n_total:,} | global batch {config.global_batch_size} = "
                f"{config.micro_batch_size} x {world_size} process(es) x {batches.accumulation} accumulation | "
                f"{precision} on {device.type} | steps {start_step} -> {config.max_steps}"
                + (f" | resumed from {resume_path}" if resume_path else ""))

    # ---- the loop ----
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    iterator = iter(train_loader)
    last_loss, validation = None, {}
    window_samples, window_start = 0, time.time()
    shown_skips = 0
    step = start_step
    for step in range(start_step + 1, config.max_steps + 1):  # `step` = optimizer steps done after this iteration
        micro_batches = [next(iterator) for _ in range(batches.accumulation)]
        counts = torch.tensor([sum(b["num_targets"] for b in micro_batches),
                               sum(len(b["meta"]["skipped"]) for b in micro_batches),
                               sum(len(b["meta"]["tasks"]) for b in micro_batches)], dtype=torch.float64)
        if distributed:
            counts = counts.to(device)
            dist.all_reduce(counts)
        n_targets, n_skipped, n_samples = (float(c) for c in counts.tolist())
        skipped_total += int(n_skipped)
        for message in [m for b in micro_batches for m in b["meta"]["skipped"]]:
            shown_skips += 1
            if shown_skips <= MAX_SKIP_MESSAGES:
                print(f"[rank {rank}] skipped: {message}" + (" (further skips are only counted)" if
                      shown_skips == MAX_SKIP_MESSAGES else ""), file=sys.stderr)
        lr = learning_rate(step - 1, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, batch in enumerate(micro_batches):
            inputs = {k: batch[k].to(device, non_blocking=True) for k in MODEL_KEYS if k in batch}
            sync = i == len(micro_batches) - 1
            no_sync = step_module.no_sync() if distributed and not sync else contextlib.nullcontext()
            with no_sync:
                with amp():
                    mean_loss = step_module(**inputs)
                summed = mean_loss.float() * batch["num_targets"]  # >= 1: every sample has at least its eos
                # mean over the global batch's answer tokens; DDP averages over processes, hence * world_size
                scaler.scale(summed * world_size / max(n_targets, 1.0)).backward()
            loss_sum += summed.detach().double()
        if config.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        # ---- bookkeeping: loss, throughput, logs ----
        if distributed:
            dist.all_reduce(loss_sum)
        last_loss = float(loss_sum) / max(n_targets, 1.0)
        window_samples += int(n_samples)
        if step % config.log_every == 0 or step == config.max_steps or step == start_step + 1:
            now = time.time()
            speed = window_samples / max(now - window_start, 1e-9)
            logger.log({"step": step, "loss": last_loss, "lr": lr, "samples_per_s": speed,
                        "skipped_total": skipped_total, "time": now})
            logger.progress(step, last_loss, lr, speed, force_line=True)
            window_samples, window_start = 0, now
        else:
            logger.progress(step, last_loss, lr, window_samples / max(time.time() - window_start, 1e-9), False)

        if val_sources and (step % config.val_every == 0 or step == config.max_steps):
            validation = validate(model, processor, val_sources, config, rank, world_size, device, amp)
            set_modes(model, config)
            logger.log({"step": step, **validation})
            logger.info(f"validation at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in validation.items()))

        if step % config.checkpoint_every == 0 or step == config.max_steps:
            rng_states = [rng_state(device)]
            if distributed:
                rng_states = [None] * world_size
                dist.all_gather_object(rng_states, rng_state(device))
            if is_main:
                state = {
                    "step": step,
                    "trainable": {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                                  if p.requires_grad},
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "scheduler": {"name": "linear_warmup_cosine", "lr": lr, "warmup_lr": config.warmup_lr,
                                  "warmup_steps": config.warmup_steps, "min_lr": config.min_lr,
                                  "max_steps": config.max_steps},
                    "data": batches.state_after(step - 1),
                    "rng": rng_states,
                    "skipped": skipped_total,
                    "world_size": world_size,
                    "fingerprint": fingerprint,
                    "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
                }
                path = save_checkpoint(state, config.output_dir, step, config.keep_checkpoints)
                logger.info(f"checkpoint: {path}")
                del state
            if distributed:
                dist.barrier()
    logger.close()

    # ---- export: a complete Hugging Face-layout model directory ----
    export_dir = None
    if config.export:
        export_dir = os.path.join(config.output_dir, EXPORT_DIR)
        if is_main:
            restore_dropout(model.config, saved_dropout)
            tmp = export_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            with open(os.path.join(tmp, "train_config.json"), "w", encoding="utf-8") as f:
                json.dump(json.loads(json.dumps(dataclasses.asdict(config), default=str)), f, indent=2)
            shutil.rmtree(export_dir, ignore_errors=True)
            os.replace(tmp, export_dir)
            logger.info(f"model written to {export_dir}")
        if distributed:
            dist.barrier()
    if distributed:
        dist.destroy_process_group()
    return TrainResult(steps=step, export_dir=export_dir, final_loss=last_loss, skipped=skipped_total,
                       validation=validation)


@torch.no_grad()
def validate(model, processor, sources: list, config: TrainConfig, rank: int, world_size: int,
             device: torch.device, amp) -> dict[str, float]:
    """Loss (mean over answer tokens) and, with `val_max_new_tokens` > 0, greedy/beam generation scored by exact
    match and VQA accuracy (normalised answers), per validation source and overall, summed over all ranks."""
    from instructblip.generation import generate

    model.eval()
    collate = Collator(processor, model.config.is_encoder_decoder, config.max_prompt_length, config.max_answer_length,
                       generation_inputs=config.val_max_new_tokens > 0)
    dataset = InstructionDataset(sources, processor.image_processor, config.seed, augment=False, strict=config.strict)
    keys = validation_batches([len(s) for s in sources], config.micro_batch_size, config.val_max_samples, rank,
                              world_size)
    sums = torch.zeros(len(sources), 5, dtype=torch.float64)  # loss sum, targets, exact, vqa accuracy, samples
    for key_batch in keys:
        batch = collate([dataset[k] for k in key_batch])
        inputs = {k: batch[k].to(device) for k in MODEL_KEYS if k in batch}
        with amp():
            out = model(**inputs)
        # per-sample loss sums, so that each source gets its own
        labels = inputs["labels"]
        logits = out.logits.float()
        if not model.config.is_encoder_decoder:
            if labels.shape[1] != logits.shape[1]:  # legacy: text-length labels
                labels = torch.nn.functional.pad(labels, (logits.shape[1] - labels.shape[1], 0), value=IGNORE_INDEX)
            labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                                       reduction="none")  # (B, T)
        sample_loss = token_loss.sum(1).double().cpu()
        sample_targets = (labels != IGNORE_INDEX).sum(1).double().cpu()
        scores = [(0.0, 0.0)] * len(key_batch)
        if config.val_max_new_tokens > 0:
            with amp():
                tokens = generate(model, pixel_values=inputs["pixel_values"],
                                  qformer_input_ids=inputs["qformer_input_ids"],
                                  qformer_attention_mask=inputs["qformer_attention_mask"],
                                  input_ids=batch["gen_input_ids"].to(device),
                                  attention_mask=batch["gen_attention_mask"].to(device),
                                  max_new_tokens=config.val_max_new_tokens, num_beams=config.val_num_beams)
            predictions = processor.batch_decode(tokens, skip_special_tokens=True)
            scores = [answer_scores(p, r) for p, r in zip(predictions, batch["meta"]["references"], strict=True)]
        for j, d in enumerate(batch["meta"]["sources"]):
            sums[d] += torch.tensor([sample_loss[j], sample_targets[j], scores[j][0], scores[j][1], 1.0],
                                    dtype=torch.float64)
    if world_size > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    results = {}
    for d, source in enumerate(sources):
        loss, targets, exact, acc, n = sums[d].tolist()
        results[f"val/{source.name}/loss"] = loss / max(targets, 1.0)
        if config.val_max_new_tokens > 0:
            results[f"val/{source.name}/exact_match"] = exact / max(n, 1.0)
            results[f"val/{source.name}/vqa_accuracy"] = acc / max(n, 1.0)
    total = sums.sum(0).tolist()
    results["val/loss"] = total[0] / max(total[1], 1.0)
    if config.val_max_new_tokens > 0:
        results["val/exact_match"] = total[2] / max(total[4], 1.0)
        results["val/vqa_accuracy"] = total[3] / max(total[4], 1.0)
    return results
