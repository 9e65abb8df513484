"""Quantized linear layers for CPU inference: `--quantize int8` / `--quantize int4` for the language model, and
`--quantize-vision int8` for the vision encoder.

- `Int8Linear`: the weight in int8 with one scale per output row (symmetric, round to nearest), one byte per weight.
  Each call quantizes its input rows to int8 the same way (one scale per row) and multiplies int8 by int8 into int32
  sums with `torch._int_mm`; for 2 to `FEW_ROWS - 1` rows of a layer at least `WIDE` inputs wide, where `_int_mm` is
  slow, it multiplies the input as it is (bfloat16) by the int8 weight with `torch.ops.aten._weight_int8pack_mm`.
  Integer sums are exact, so on the `_int_mm` path a row's result does not depend on the other rows of the call.
- `Int4Linear`: the weight in 4 bits per value, asymmetric, a bfloat16 scale and offset per group of `GROUP` inputs
  (0.56 bytes per weight), multiplied with `torch.ops.aten._weight_int4pack_mm_for_cpu`, the layout torchao's CPU int4
  uses; the input runs in bfloat16.

Both are PyTorch's own kernels: nothing to install, and unlike the fbgemm `torch.ao` quantized-tensor API they are not
deprecated. docs/performance.md ("Quantized kernels") compares them with fbgemm and with torchao's layers at the
official models' shapes (`benchmarks/quant_kernels.py`). A layer takes any floating input and answers in the input's
dtype, so the rest of the model may be float32 or bfloat16. A quantized model is for inference only: it has no
gradients and cannot be saved (save the unquantized model; quantize when loading).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instructblip.accel.cpu_linear import unpack

MODES = ("int8", "int4")  # the language model's quantizations
VISION_MODES = ("int8",)
FEW_ROWS = 16  # from this many rows on, int8 x int8 (`_int_mm`) beats the bf16 x int8 kernel again
WIDE = 2048  # inputs: from this width on, `_int_mm` is slow for 2 to FEW_ROWS - 1 rows (narrower, it is the faster)
GROUP = 128  # int4: inputs per scale and offset (torchao's default); smaller groups where the width needs them
_INT4_GROUPS = (GROUP, 64, 32)
_INT4_ROWS = 16  # the int4 packing takes a multiple of this many output rows
_CHUNK = 1 << 18  # weights converted at a time while quantizing


def available(mode: str = "int8") -> bool:
    """Whether this torch has the kernels of `mode` ("int8" or "int4")."""
    ops = torch.ops.aten
    if mode == "int8":
        return hasattr(ops, "_int_mm") and hasattr(ops, "_weight_int8pack_mm")
    return hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")


def _inference_only(x: Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("a quantized model is for inference only; train the unquantized model")


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 (per-output-row scales); x quantized per row on each call; out in x's dtype."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        qweight = torch.empty(weight.shape, dtype=torch.int8)
        scale = torch.empty(self.out_features)
        step = max(1, _CHUNK // self.in_features)
        for start in range(0, self.out_features, step):  # a block of rows at a time: its float32 copy stays in cache
            w = weight[start:start + step].detach().float()
            s = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
            qweight[start:start + step] = (w / s[:, None]).round_().clamp_(-127, 127)
            scale[start:start + step] = s
        # buffers, not in the state dict: a quantized model is not saved, and loading fills no keys of its layers
        self.register_buffer("qweight", qweight, False)
        self.register_buffer("scale", scale, False)
        self.register_buffer("scale_bf16", scale.bfloat16(), False)
        self.register_buffer("bias", None if bias is None else bias.detach().float(), False)

    def forward(self, x: Tensor) -> Tensor:
        _inference_only(x)
        flat = x.reshape(-1, self.in_features)  # [rows, in]
        rows = flat.shape[0]
        if 1 < rows < FEW_ROWS and self.in_features >= WIDE:
            out = torch.ops.aten._weight_int8pack_mm(flat.bfloat16(), self.qweight, self.scale_bf16).float()
        else:
            xf = flat.float()
            x_scale = (xf.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)  # [rows, 1]
            xq = (xf / x_scale).round_().to(torch.int8)
            out = torch._int_mm(xq, self.qweight.t()).float() * x_scale * self.scale
        if self.bias is not None:
            out += self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(nn.Module):
    """y = x W^T + b with W in 4 bits (asymmetric, a scale and offset per group of inputs); x runs in bfloat16."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group = next((g for g in _INT4_GROUPS if self.in_features % g == 0), 0)
        if not self.group:
            raise ValueError(f"int4 needs an input width divisible by 32, not {self.in_features}")
        rows = self.out_features + (-self.out_features % _INT4_ROWS)  # zero rows added, sliced off the output
        packed = torch.empty(rows, self.in_features // 2, dtype=torch.uint8)
        scale_zero = torch.empty(self.in_features // self.group, rows, 2, dtype=torch.bfloat16)  # the kernel's layout
        step = max(_INT4_ROWS, _CHUNK // self.in_features // _INT4_ROWS * _INT4_ROWS)
        for start in range(0, rows, step):  # blocks of rows (the packing is row by row): small float32 copies
            w = weight[start:start + step].detach().float()
            w = F.pad(w, (0, 0, 0, min(step, rows - start) - w.shape[0]))
            groups = w.reshape(w.shape[0], -1, self.group)  # [block rows, in / group, group]
            low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
            scale = ((high - low) / 15).clamp_min(1e-12)
            q = ((groups - low) / scale).round_().clamp_(0, 15).to(torch.int32).reshape(w.shape[0], -1)
            packed[start:start + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
            scale_zero[:, start:start + step, 0] = scale.reshape(w.shape[0], -1).t()
            scale_zero[:, start:start + step, 1] = zero.reshape(w.shape[0], -1).t()
        self.register_buffer("packed", packed, False)
        self.register_buffer("scale_zero", scale_zero, False)
        self.register_buffer("bias", None if bias is None else bias.detach().float(), False)

    def forward(self, x: Tensor) -> Tensor:
        _inference_only(x)
        flat = x.reshape(-1, self.in_features).bfloat16().contiguous()  # [rows, in]
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scale_zero)
        out = out[:, :self.out_features].float()
        if self.bias is not None:
            out += self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 (group {self.group})"


def layer_class(mode: str, vision: bool = False) -> type[nn.Module]:
    """The layer of a quantization mode (of the language model, or with `vision` of the vision encoder), after
    checking the mode exists and can run here."""
    if vision and mode not in VISION_MODES:
        raise ValueError(f"unknown vision quantization {mode!r}; use {' or '.join(VISION_MODES)}, or none")
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; use {' or '.join(MODES)}, or none")
    if not available(mode):
        raise RuntimeError(f"this torch ({torch.__version__}) lacks the {mode} CPU kernels; run without --quantize")
    return Int8Linear if mode == "int8" else Int4Linear


def check_device(device: torch.device | str, flag: str) -> None:
    """Quantized layers run on the CPU only."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"{flag} runs on the CPU only, not {torch.device(device).type}: use --device cpu, or drop "
                         f"{flag} on a GPU (bfloat16 is the fast path there)")


def finish(model: nn.Module, mode: str | None, vision: str | None) -> nn.Module:
    """After the linear layers were replaced while loading: a tied LM head gets a quantized copy of the embedding
    matrix (the embedding itself stays as it is, for the lookups); the model records what is quantized."""
    if mode is not None:
        lm = model.language_model
        if lm.has_lm_head and lm.lm_head is None:  # tied to the embeddings
            lm.lm_head = layer_class(mode)(lm.embed_tokens.weight, None)
    model.quantized = mode
    model.quantized_vision = vision
    return model


def quantize(model: nn.Module, mode: str | None = "int8", vision: str | None = None) -> nn.Module:
    """Quantize a loaded InstructBLIP network on the CPU in place: the language model's linear layers in `mode`,
    the vision encoder's in `vision` (None: leave it); returns the model. (Loading with `from_pretrained(...,
    quantize=...)` quantizes each layer as it is read instead, never holding the whole model unquantized.)"""
    if (model.quantized, model.quantized_vision) == (mode, vision):
        return model  # quantizing twice the same way is once
    if model.quantized or model.quantized_vision:
        raise ValueError("this model is already quantized; load it again to quantize it another way")
    check_device(next(model.parameters()).device, "quantizing")
    for part, how, is_vision in ((model.language_model, mode, False), (model.vision_model, vision, True)):
        if how is None:
            continue
        cls = layer_class(how, is_vision)
        unpack(part)  # packed float32 weights (cpu_linear.Linear) back to plain matrices, which quantizing reads
        for name, module in [(n, m) for n, m in part.named_modules() if isinstance(m, nn.Linear)]:
            parent_name, _, child = name.rpartition(".")
            parent = part.get_submodule(parent_name) if parent_name else part
            setattr(parent, child, cls(module.weight, module.bias))
    return finish(model, mode, vision)
