"""Instruction tuning with the paper's recipe (InstructBLIP §2.6), as one explicit loop: no Trainer, no framework.

    instructblip train configs/train/flan-t5-xl.yaml --max-steps 1000 --output-dir runs/x
    torchrun --nproc_per_node 8 -m instructblip train configs/train/vicuna-7b.yaml
    python -c "from instructblip.training import TrainConfig, train; train(TrainConfig(model=..., ...))"

`TrainConfig` (config.py) is the whole configuration (its fields are the CLI flags and the YAML keys; YAML only
presets them).
The recipe, with the paper's values as defaults:
- The vision encoder and the LLM are frozen; the Q-Former (with its instruction embeddings), the query tokens, the
  projection and the LayerNorm on the image features (LAVIS's `ln_vision`, which sits outside its frozen ViT;
  `vision_model.post_layernorm` here) are trained. `train_vision` / `train_language_model` unfreeze the others.
  The frozen ViT runs in eval mode (LAVIS `disabled_train`); the frozen LLM stays in train mode, as in LAVIS (its
  dropout, 0.1 for Flan-T5, stays on; `dropout` overrides every dropout rate).
- A BLIP-2 checkpoint (its config says so) trains the same way with its Q-Former reading no instruction: the
  paper's baseline, instruction tuning without instruction-aware visual features.
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
- Checkpoints (`checkpointing.py`: `output_dir/checkpoints/step-NNNNNNNN/state.pt`) hold the trained weights,
  optimizer and loss-scaler state, the step, the data position and the RNG states of every rank; they are written
  under a temporary name and renamed into place, and only the last `keep_checkpoints` are kept. `resume: latest`
  continues exactly.
- At the end, `output_dir/model/` is a complete Hugging Face-layout model (weights + processor files) that our
  `from_pretrained` and transformers' load.

`train` reads as the run goes: start the processes, open the data, load and freeze the model, build the optimizer,
restore a checkpoint, build the loader; then per step: the global batch's counts, forward and backward, the optimizer
step, logging, validation and checkpoints; at the end, the export. Each is a function below, in that order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from instructblip.evaluation.metrics import exact_match, vqa_accuracy
from instructblip.modeling import InstructBlipForConditionalGeneration, generation_class
from instructblip.models.config import InstructBlipConfig, load_config
from instructblip.models.instructblip import IGNORE_INDEX
from instructblip.processing.processor import InstructBlipProcessor, processor_class
from instructblip.progress import progress_bar
from instructblip.training.checkpointing import (
    data_fingerprint,
    load_checkpoint,
    resume_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from instructblip.training.config import TrainConfig
from instructblip.training.data import (
    Collator,
    InstructionDataset,
    MixturePlan,
    TrainBatches,
    mixture_probabilities,
    mixture_table,
    open_source,
    validation_batches,
)

EXPORT_DIR = "model"
METRICS_FILE = "metrics.jsonl"
MAX_SKIP_MESSAGES = 20  # per rank; later skips are counted in the metrics only
MODEL_KEYS = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask", "labels",
              "decoder_attention_mask")


@dataclass
class TrainResult:
    """What `train` did: the last step, where the model went, the last step's loss, the records skipped, and the
    last validation's metrics."""

    steps: int
    export_dir: str | None
    final_loss: float | None
    skipped: int
    validation: dict = field(default_factory=dict)


def train(config: TrainConfig) -> TrainResult:
    """Run instruction tuning as configured (see the module docstring). Returns what was done; the model is in
    `output_dir/model` (when `export`), checkpoints in `output_dir/checkpoints`, metrics in `metrics.jsonl`."""
    rt = start_processes(config)
    train_sources, val_sources, probabilities = open_data(config)
    resume = resume_path(config, rt.is_main)
    model, processor, trained_names, saved_dropout = load_model(config, rt)
    optimizer, scaler = make_optimizer(model, config, rt)
    fingerprint = data_fingerprint(config, train_sources)
    start = restore(resume, model, optimizer, scaler, trained_names, fingerprint, rt) if resume else Start()
    batches, loader = make_loader(config, processor, model, train_sources, probabilities, start.data, rt)
    step_module = wrap_for_ddp(model, rt)
    logger = Logger(config, rt.is_main, start.step)
    report_start(logger, config, model, train_sources, val_sources, probabilities, batches, start.step, resume, rt)

    iterator = iter(loader)
    last_loss, validation, skipped_total, shown_skips = None, {}, start.skipped, 0
    window = _Window()
    step = start.step
    for step in range(start.step + 1, config.max_steps + 1):  # `step` = optimizer steps done after this iteration
        micro_batches = [next(iterator) for _ in range(batches.accumulation)]
        n_targets, n_skipped, n_samples = batch_counts(micro_batches, rt)
        skipped_total += int(n_skipped)
        shown_skips = report_skips(micro_batches, shown_skips, rt.rank)
        lr = learning_rate(step - 1, config)
        last_loss = optimizer_step(step_module, model, optimizer, scaler, micro_batches, n_targets, lr, config, rt)
        window.samples += int(n_samples)
        log_step(logger, window, step, start.step, last_loss, lr, skipped_total, config)
        if val_sources and (step % config.val_every == 0 or step == config.max_steps):
            validation = run_validation(model, processor, val_sources, step, config, rt, logger)
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            save_step(step, lr, model, optimizer, scaler, batches, skipped_total, fingerprint, config, rt, logger)
    logger.close()

    export_dir = export(model, processor, saved_dropout, config, rt, logger) if config.export else None
    if rt.distributed:
        dist.destroy_process_group()
    return TrainResult(steps=step, export_dir=export_dir, final_loss=last_loss, skipped=skipped_total,
                       validation=validation)


# ----------------------------------------------------------------------------------------------------------------------
# Setup: processes, data, model, optimizer, a checkpoint to resume, the loader


@dataclass
class Runtime:
    """Where this process runs: its rank among the processes (torchrun's; one process without it), its device, and
    the precision resolved from the config."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    precision: str  # fp32, bf16 or fp16

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def use_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The dtype of the frozen weights: the autocast dtype on GPU, else float32."""
        return self.amp_dtype if (self.use_cuda and self.amp_dtype is not None) else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def start_processes(config: TrainConfig) -> Runtime:
    """This process's device and rank (joining the process group under torchrun), the precision, and the seeds
    (seed + rank)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for, but no CUDA device is available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    precision = config.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if use_cuda else "fp32"
    if config.num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    random.seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    torch.manual_seed(config.seed + rank)
    return Runtime(rank=rank, local_rank=local_rank, world_size=world_size, device=device, precision=precision)


def open_data(config: TrainConfig) -> tuple[list, list, list[float]]:
    """The training and validation sources (records counted and checked), and each training source's sampling
    probability."""
    train_sources = [open_source(spec, config.strict) for spec in config.train_data]
    val_sources = [open_source(spec, config.strict) for spec in config.val_data]
    probabilities = mixture_probabilities([len(s) for s in train_sources], [s.spec.weight for s in train_sources],
                                          config.balance)
    return train_sources, val_sources, probabilities


def load_model(config: TrainConfig, rt: Runtime) -> tuple[InstructBlipForConditionalGeneration,
                                                          InstructBlipProcessor, list[str], dict[str, float]]:
    """The starting checkpoint and its processor, frozen as configured, with the trained weights in float32.
    Returns (model, processor, trained parameter names, the dropout rates to restore at export)."""
    model_config = load_config(config.model)  # InstructBLIP, or BLIP-2 (its Q-Former trained without instruction)
    saved_dropout = override_dropout(model_config, config.dropout) if config.dropout is not None else {}
    model = generation_class(model_config).from_pretrained(config.model, dtype=rt.frozen_dtype, device=rt.device,
                                                           config=model_config)
    processor = processor_class(model_config).from_pretrained(config.model)
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
    if model.config.is_encoder_decoder and rt.precision == "fp16":
        print("warning: Flan-T5 is unstable in fp16 (LAVIS #206); use precision: bf16 or fp32", file=sys.stderr)
    return model, processor, trained_names, saved_dropout


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
               (t, "attention_dropout"), (t, "dropout")]  # (T5's, LLaMA's, OPT's names)
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


def make_optimizer(model: nn.Module, config: TrainConfig, rt: Runtime) -> tuple[torch.optim.AdamW,
                                                                                torch.amp.GradScaler]:
    """AdamW over the trained parameters, and the loss scaler (enabled for fp16 on GPU only)."""
    optimizer = torch.optim.AdamW(optimizer_groups(model, config), lr=config.warmup_lr,
                                  betas=(config.beta1, config.beta2), eps=config.eps)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.precision == "fp16" and rt.use_cuda)
    return optimizer, scaler


def optimizer_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """LAVIS `get_optimizer_params`: no weight decay on biases and 1-D tensors (LayerNorm weights)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up from `warmup_lr` to `lr` over `warmup_steps`, then cosine to `min_lr` at `max_steps`."""
    if step < config.warmup_steps:
        return config.warmup_lr + (config.lr - config.warmup_lr) * step / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Start:
    """Where the loop starts: step 0 with fresh data, or a checkpoint's step, data position and skip count."""

    step: int = 0
    data: dict | None = None  # MixturePlan's state
    skipped: int = 0


def restore(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            trained_names: list[str], fingerprint: dict, rt: Runtime) -> Start:
    """Load a checkpoint into the model, optimizer and loss scaler, and this rank's RNG states; refuse one whose data
    settings or trained parameters differ from this run's."""
    state = load_checkpoint(path)
    if state["fingerprint"] != fingerprint:
        diff = {k: (state["fingerprint"].get(k), v) for k, v in fingerprint.items()
                if state["fingerprint"].get(k) != v}
        raise ValueError(f"cannot resume from {path} exactly: the data settings changed (saved, now): {diff}")
    params = dict(model.named_parameters())
    if sorted(state["trainable"]) != sorted(trained_names):
        raise ValueError(f"{path} holds other trained parameters than this run trains "
                         f"(train_qformer / train_vision / train_language_model changed?)")
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if len(state["rng"]) == rt.world_size:
        set_rng_state(state["rng"][rt.rank], rt.device)
    elif rt.is_main:
        print(f"warning: the checkpoint was written by {len(state['rng'])} processes, this run has {rt.world_size}; "
              "the data continues exactly but dropout draws differ", file=sys.stderr)
    return Start(step=state["step"], data=state["data"], skipped=state["skipped"])


def make_loader(config: TrainConfig, processor: InstructBlipProcessor, model: nn.Module, sources: list,
                probabilities: list[float], data_state: dict | None, rt: Runtime
                ) -> tuple[TrainBatches, torch.utils.data.DataLoader]:
    """This rank's micro-batches of every global batch from the data position `data_state` on (None: the start)."""
    plan = MixturePlan([len(s) for s in sources], probabilities, config.global_batch_size, config.seed,
                       state=data_state)
    batches = TrainBatches(plan, config.max_steps, config.micro_batch_size, rt.rank, rt.world_size)
    collate = Collator(processor, model.config.is_encoder_decoder, config.max_prompt_length,
                       config.max_answer_length)
    loader = torch.utils.data.DataLoader(
        InstructionDataset(sources, processor.image_processor, config.seed, config.augment, config.strict),
        batch_sampler=batches, collate_fn=collate,
        generator=torch.Generator().manual_seed(config.seed),  # else iter() draws from the global RNG (dropout's)
        num_workers=config.num_workers, pin_memory=rt.use_cuda, persistent_workers=False)
    return batches, loader


def wrap_for_ddp(model: nn.Module, rt: Runtime) -> nn.Module:
    """What each micro-batch goes through: the loss module, under DDP across processes with only the trained
    parameters synchronised."""
    step_module: nn.Module = LossModule(model)
    if not rt.distributed:
        return step_module
    frozen = [f"model.{n}" for n, p in model.named_parameters() if not p.requires_grad]
    frozen += [f"model.{n}" for n, _ in model.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step_module, frozen)
    return nn.parallel.DistributedDataParallel(
        step_module, device_ids=[rt.local_rank] if rt.use_cuda else None, broadcast_buffers=False,
        # every trained tensor is in the autograd graph of every step (the last Q-Former layer's text FFN gets
        # zero gradients, not none), so the costly search for unused parameters is not needed
        find_unused_parameters=False,
    )


class LossModule(nn.Module):
    """What DDP wraps: the model's forward returning only the mean loss over the answer tokens of a micro-batch."""

    def __init__(self, model: InstructBlipForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, **inputs) -> torch.Tensor:
        return self.model(**inputs).loss


def report_start(logger: Logger, config: TrainConfig, model: nn.Module, train_sources: list, val_sources: list,
                 probabilities: list[float], batches: TrainBatches, start_step: int, resume: str | None,
                 rt: Runtime) -> None:
    """The start-up report: the data mixture, the validation sources, what is trained, the batch split, the steps."""
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    samples = (config.max_steps - start_step) * config.global_batch_size
    logger.info("training data (sampling probability p = weight * sqrt(records), normalised):\n"
                + mixture_table(train_sources, probabilities, samples))
    if val_sources:
        logger.info("validation: " + ", ".join(f"{s.name} ({len(s)})" for s in val_sources))
    logger.info(f"trained parameters: {n_trained:,} of {n_total:,} | global batch {config.global_batch_size} = "
                f"{config.micro_batch_size} x {rt.world_size} process(es) x {batches.accumulation} accumulation | "
                f"{rt.precision} on {rt.device.type} | steps {start_step} -> {config.max_steps}"
                + (f" | resumed from {resume}" if resume else ""))


# ----------------------------------------------------------------------------------------------------------------------
# One step


def batch_counts(micro_batches: list[dict], rt: Runtime) -> tuple[float, float, float]:
    """(answer tokens, skipped records, samples) of the whole global batch, summed over the processes."""
    counts = torch.tensor([sum(b["num_targets"] for b in micro_batches),
                           sum(len(b["meta"]["skipped"]) for b in micro_batches),
                           sum(len(b["meta"]["tasks"]) for b in micro_batches)], dtype=torch.float64)
    if rt.distributed:
        counts = counts.to(rt.device)
        dist.all_reduce(counts)
    n_targets, n_skipped, n_samples = (float(c) for c in counts.tolist())
    return n_targets, n_skipped, n_samples


def report_skips(micro_batches: list[dict], shown: int, rank: int) -> int:
    """Say which records this rank skipped (the first MAX_SKIP_MESSAGES only); returns how many were shown so far."""
    for message in [m for b in micro_batches for m in b["meta"]["skipped"]]:
        shown += 1
        if shown <= MAX_SKIP_MESSAGES:
            print(f"[rank {rank}] skipped: {message}" + (" (further skips are only counted)" if
                  shown == MAX_SKIP_MESSAGES else ""), file=sys.stderr)
    return shown


def optimizer_step(step_module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, micro_batches: list[dict], n_targets: float, lr: float,
                   config: TrainConfig, rt: Runtime) -> float:
    """Forward and backward over this rank's micro-batches (gradients synchronised on the last), then one optimizer
    step at learning rate `lr`. Returns the global batch's loss: the mean over all its answer tokens."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    for i, batch in enumerate(micro_batches):
        inputs = {k: batch[k].to(rt.device, non_blocking=True) for k in MODEL_KEYS if k in batch}
        sync = i == len(micro_batches) - 1
        no_sync = step_module.no_sync() if rt.distributed and not sync else contextlib.nullcontext()
        with no_sync:
            with rt.autocast():
                mean_loss = step_module(**inputs)
            summed = mean_loss.float() * batch["num_targets"]  # >= 1: every sample has at least its eos
            # mean over the global batch's answer tokens; DDP averages over processes, hence * world_size
            scaler.scale(summed * rt.world_size / max(n_targets, 1.0)).backward()
        loss_sum += summed.detach().double()
    if config.grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if rt.distributed:
        dist.all_reduce(loss_sum)
    return float(loss_sum) / max(n_targets, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Logging, validation, checkpoints, export


@dataclass
class _Window:
    """Samples since the last logged step, and when that step was logged: the samples/s of the next line."""

    samples: int = 0
    start: float = field(default_factory=time.time)


def log_step(logger: Logger, window: _Window, step: int, start_step: int, loss: float, lr: float, skipped_total: int,
             config: TrainConfig) -> None:
    """A metrics line at the first step, every `log_every` steps and the last; the progress bar at the others."""
    if step % config.log_every == 0 or step == config.max_steps or step == start_step + 1:
        now = time.time()
        speed = window.samples / max(now - window.start, 1e-9)
        logger.log({"step": step, "loss": loss, "lr": lr, "samples_per_s": speed, "skipped_total": skipped_total,
                    "time": now})
        logger.progress(step, loss, lr, speed, force_line=True)
        window.samples, window.start = 0, now
    else:
        logger.progress(step, loss, lr, window.samples / max(time.time() - window.start, 1e-9), False)


def run_validation(model: nn.Module, processor: InstructBlipProcessor, sources: list, step: int, config: TrainConfig,
                   rt: Runtime, logger: Logger) -> dict[str, float]:
    """Validate, log the results, and put the model back in training modes."""
    validation = validate(model, processor, sources, config, rt)
    set_modes(model, config)
    logger.log({"step": step, **validation})
    logger.info(f"validation at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in validation.items()))
    return validation


@torch.no_grad()
def validate(model, processor, sources: list, config: TrainConfig, rt: Runtime) -> dict[str, float]:
    """Loss (mean over answer tokens) and, with `val_max_new_tokens` > 0, greedy/beam generation scored by exact
    match and VQA accuracy (normalised answers), per validation source and overall, summed over all ranks."""
    from instructblip.generation import generate

    model.eval()
    collate = Collator(processor, model.config.is_encoder_decoder, config.max_prompt_length, config.max_answer_length,
                       generation_inputs=config.val_max_new_tokens > 0)
    dataset = InstructionDataset(sources, processor.image_processor, config.seed, augment=False, strict=config.strict)
    keys = validation_batches([len(s) for s in sources], config.micro_batch_size, config.val_max_samples,
                              rt.rank, rt.world_size)
    sums = torch.zeros(len(sources), 5, dtype=torch.float64)  # loss sum, targets, exact, vqa accuracy, samples
    for key_batch in keys:
        batch = collate([dataset[k] for k in key_batch])
        inputs = {k: batch[k].to(rt.device) for k in MODEL_KEYS if k in batch}
        with rt.autocast():
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
            with rt.autocast():
                tokens = generate(model, pixel_values=inputs["pixel_values"],
                                  qformer_input_ids=inputs.get("qformer_input_ids"),
                                  qformer_attention_mask=inputs.get("qformer_attention_mask"),
                                  input_ids=batch["gen_input_ids"].to(rt.device),
                                  attention_mask=batch["gen_attention_mask"].to(rt.device),
                                  max_new_tokens=config.val_max_new_tokens, num_beams=config.val_num_beams)
            predictions = processor.batch_decode(tokens, skip_special_tokens=True)
            scores = [answer_scores(p, r) for p, r in zip(predictions, batch["meta"]["references"], strict=True)]
        for j, d in enumerate(batch["meta"]["sources"]):
            sums[d] += torch.tensor([sample_loss[j], sample_targets[j], scores[j][0], scores[j][1], 1.0],
                                    dtype=torch.float64)
    if rt.distributed:
        sums = sums.to(rt.device)
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


def answer_scores(prediction: str, references: list[str]) -> tuple[float, float]:
    """(exact match against any reference, VQA accuracy), with the official VQA answer normalisation
    (`metrics.py`). With fewer than 3 references (not VQA-style annotations) the VQA accuracy is the exact match."""
    exact = max(exact_match(prediction, r) for r in references)
    return exact, (vqa_accuracy(prediction, references) if len(references) >= 3 else exact)


def save_step(step: int, lr: float, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
              batches: TrainBatches, skipped_total: int, fingerprint: dict, config: TrainConfig, rt: Runtime,
              logger: Logger) -> None:
    """The checkpoint after `step`: rank 0 writes it, with every rank's RNG states; the others wait until it is."""
    rng_states = [rng_state(rt.device)]
    if rt.distributed:
        rng_states = [None] * rt.world_size
        dist.all_gather_object(rng_states, rng_state(rt.device))
    if rt.is_main:
        state = {
            "step": step,
            "trainable": {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "scheduler": {"name": "linear_warmup_cosine", "lr": lr, "warmup_lr": config.warmup_lr,
                          "warmup_steps": config.warmup_steps, "min_lr": config.min_lr, "max_steps": config.max_steps},
            "data": batches.state_after(step - 1),
            "rng": rng_states,
            "skipped": skipped_total,
            "world_size": rt.world_size,
            "fingerprint": fingerprint,
            "config": _plain(config),
        }
        path = save_checkpoint(state, config.output_dir, step, config.keep_checkpoints)
        logger.info(f"checkpoint: {path}")
    if rt.distributed:
        dist.barrier()


def export(model: nn.Module, processor: InstructBlipProcessor, saved_dropout: dict[str, float], config: TrainConfig,
           rt: Runtime, logger: Logger) -> str:
    """output_dir/model: a complete Hugging Face-layout model (weights, processor files and train_config.json),
    written by rank 0 under a temporary name and renamed into place."""
    export_dir = os.path.join(config.output_dir, EXPORT_DIR)
    if rt.is_main:
        restore_dropout(model.config, saved_dropout)
        tmp = export_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "train_config.json"), "w", encoding="utf-8") as f:
            json.dump(_plain(config), f, indent=2)
        shutil.rmtree(export_dir, ignore_errors=True)
        os.replace(tmp, export_dir)
        logger.info(f"model written to {export_dir}")
    if rt.distributed:
        dist.barrier()
    return export_dir


def _plain(config: TrainConfig) -> dict[str, Any]:
    """The config as JSON values (data sources and other objects as their str)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


class Logger:
    """Rank 0's outputs: metrics.jsonl (always), TensorBoard (if wanted and installed), a progress bar on stderr
    (if stderr is a tty, or `progress: true`), and plain log lines otherwise."""

    def __init__(self, config: TrainConfig, enabled: bool, start_step: int):
        self.enabled = enabled
        self.config = config
        # a bar when stderr is a terminal (`progress: true`: always; false or --no-progress: never)
        self.bar = progress_bar(config.max_steps, "training", unit="step", initial=start_step,
                                enabled=enabled and config.progress is not False, force=bool(config.progress))
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
            self.bar.write(message)  # above the bar, when one is drawn

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
        if not self.bar.disable:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(text.split(" | ", 1)[1])
        elif force_line:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
