"""The public model classes, with transformers' names: the network of `models.instructblip` plus loading and saving
(`weights`), the CPU speed routes applied after loading (`accel`), generation and ranking (`generation`).

They live here, above those subpackages, so that `models/` imports none of them.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from instructblip.models.instructblip import InstructBlipNetwork


class InstructBlipModel(InstructBlipNetwork):
    """InstructBLIP without the LM head: `forward` returns the language model's last hidden state."""

    has_lm_head = False

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                        device: str | torch.device = "cpu", optimize: bool = True, quantize: str | None = None,
                        **kwargs):
        """Load an HF-layout directory or hub id. dtype: None (default) = float32 on CPU, the stored dtype on
        accelerators; "auto" = the stored dtype; or a torch dtype / its name. Weights go straight to `device`.

        optimize: on the CPU in float32, put in the fast CPU layers (`instructblip.accel.optimize`: faster linear
        routes, packed weights, in-place GELU; the same parameters and state-dict keys, results equal up to float
        rounding; see docs/performance.md). False keeps the plain torch layers. Other devices and dtypes get plain
        layers either way.

        quantize: "int8" stores the language model's linear layers in int8 (`accel.quantize`, CPU float32 only),
        each quantized as it is read from the checkpoint (bf16, fp16 or fp32 files): the float32 language model
        never exists in memory whole, so the peak is about the int8 model plus the vision encoder and Q-Former.

        `model.generation_config`: the decoding options of the checkpoint's `generation_config.json`, the defaults
        of `generate` (as in transformers; official checkpoints set none but token ids, which come from config.json)."""
        from instructblip import accel
        from instructblip.generation.config import GenerationConfig
        from instructblip.hub import resolve_checkpoint_dir
        from instructblip.weights.checkpoint import load_pretrained

        lm_linear = None
        if quantize is not None:
            from instructblip.accel.quantize import Int8Linear, check_int8, finish_int8

            if quantize != "int8":
                raise ValueError(f"unknown quantization {quantize!r}; use 'int8' (CPU inference) or None")
            if dtype not in (None, "float32", torch.float32):
                raise ValueError(f"quantize='int8' loads the rest of the model in float32, not {dtype}; leave dtype "
                                 "unset (or 'float32')")
            check_int8(device, torch.float32)
            dtype, lm_linear = torch.float32, Int8Linear
        model = load_pretrained(cls, path, dtype=dtype, device=device, lm_linear=lm_linear, **kwargs)
        if quantize is not None:
            finish_int8(model)
        model.generation_config = GenerationConfig.from_pretrained(resolve_checkpoint_dir(path))
        return accel.optimize(model) if optimize else model

    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True) -> None:
        from instructblip.accel.cpu_linear import unpack
        from instructblip.weights.checkpoint import save_pretrained

        if not safe_serialization:
            raise ValueError("only safetensors checkpoints are written (safe_serialization=True)")
        if self.quantized:
            raise ValueError(f"this model is {self.quantized}-quantized, for inference only; save the float32 model "
                             "and quantize it after loading")
        unpack(self)  # packed weights plain in place: state_dict() would hand out a dense copy of each, all at once
        save_pretrained(self, directory, max_shard_size=max_shard_size)

    def quantize_int8(self):
        """int8 dynamic quantization of the language model for CPU float32 inference, in place (accel/quantize.py)."""
        from instructblip.accel.quantize import quantize_int8

        return quantize_int8(self)


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
