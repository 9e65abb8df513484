"""Optional int8 dynamic quantization of the language model, for CPU inference (`--quantize int8`).

Every linear layer of the LLM (attention, feed-forward, LM head) becomes an `Int8Linear`: its weight is stored as int8
with one scale per output row (symmetric, round to nearest), and each call quantizes the activations per tensor on the
fly and multiplies in int8 with PyTorch's fbgemm kernels (`torch.ops.quantized.linear_dynamic`). Decoding reads a
quarter of the weight bytes: on this CPU a 4096x4096 layer at one row takes 0.6 ms against 6.6 ms in fp32, the LM
head of a 32000-word vocabulary 0.6 ms against 5.7 ms. The vision encoder and the Q-Former stay fp32 (they are
compute-bound, and feed every answer). A quantized model is for inference only: it has no gradients and
cannot be saved (save the fp32 model, quantize after loading). Outputs differ from fp32 by about 1-2% relative
per layer; `benchmarks/bench.py` reports the agreement of greedy outputs. PyTorch marks the quantized-tensor API
these kernels take deprecated; if a later torch drops it, `available()` is False and quantizing says so.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from instructblip.accel.cpu_linear import unpack

_ENGINES = ("x86", "fbgemm")


def available() -> bool:
    """Whether this torch has the fbgemm engine and the dynamic int8 linear ops used here."""
    ops = torch.ops.quantized
    return (any(e in torch.backends.quantized.supported_engines for e in _ENGINES)
            and hasattr(ops, "linear_prepack") and hasattr(ops, "linear_dynamic"))


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 (per-output-row scales) and x quantized per call; float32 in and out."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
        zero = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # PyTorch marks its quantized tensors deprecated (pytorch#184982); the
            warnings.simplefilter("ignore")  # kernels are in torch 2.13, and available() says when they are gone
            q = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        b = bias.detach().float() if bias is not None else None
        self._packed = torch.ops.quantized.linear_prepack(q, b)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("an int8-quantized model is for inference only; train the float32 model")
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.quantized.linear_dynamic(flat.float(), self._packed, True)  # 7-bit activations, as on x86
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def check_int8(device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise, saying what to do, unless int8 quantization can run here for a model in `dtype` on `device`; then
    select the int8 engine."""
    if not available():
        raise RuntimeError("this torch build has no fbgemm int8 kernels (torch.backends.quantized.supported_engines "
                           f"= {torch.backends.quantized.supported_engines}); run without --quantize")
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        raise ValueError(f"--quantize int8 is for float32 inference on the CPU; this model is {dtype} on "
                         f"{torch.device(device).type}: load it with device='cpu' and dtype='float32' (--device cpu "
                         "--dtype float32), or drop --quantize")
    torch.backends.quantized.engine = next(e for e in _ENGINES if e in torch.backends.quantized.supported_engines)


def finish_int8(model: nn.Module) -> nn.Module:
    """After the language model's linear layers became `Int8Linear`s: a tied LM head gets an int8 copy of the
    embedding matrix (the embedding itself stays float32 for the lookups); the model is marked quantized."""
    lm = model.language_model
    if lm.has_lm_head and lm.lm_head is None:  # tied to the embeddings
        lm.lm_head = Int8Linear(lm.embed_tokens.weight, None)
    model.quantized = "int8"
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize the language model of a loaded InstructBlipForConditionalGeneration in place; returns it. (Loading
    with `from_pretrained(..., quantize="int8")` quantizes each layer as it is read instead, without the float32
    language model ever being in memory whole.)

    The model must be on the CPU in float32.
    """
    if model.quantized:
        return model
    lm = model.language_model
    param = next(lm.parameters())
    check_int8(param.device, param.dtype)
    unpack(lm)  # packed float32 weights (cpu_linear.Linear) back to plain matrices, which quantizing reads
    targets = [(name, m) for name, m in lm.named_modules() if isinstance(m, nn.Linear)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = lm.get_submodule(parent_name) if parent_name else lm
        setattr(parent, child, Int8Linear(module.weight, module.bias))
    return finish_int8(model)
