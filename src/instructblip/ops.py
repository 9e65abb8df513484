"""A faster linear layer for fp32 inference on CPU.

Two routes beat `F.linear` (MKL's sgemm) on the AMD EPYCs this was measured on, with the same weights in the same
layout:

- **Few rows (1-16: decoding, beams).** MKL runs `x @ W^T` for a (out, in) weight 1.5-3x slower than the same product
  computed as `(W @ x^T)^T` (measured on a Zen 3, AVX2: LM head 32000x512, 5 rows: 5.7 ms against 1.9 ms), and a
  single row faster still when padded to two: MKL's row-major GEMV reads the weight at about half the memory
  bandwidth its 2-column GEMM reaches (LM head 3.5 ms against 1.2 ms; the four layers of a 45M LLaMA, weights not in
  cache: 3.1 ms against 1.5 ms). The (out, rows) product is copied to a contiguous (rows, out) (`rows * out` floats):
  a strided last dimension sends SDPA to its math path and slows the elementwise ops after it.
  oneDNN's matmul below wins at few rows too on some AVX-512 CPUs (`ONEDNN_FEW_ROWS`). On a Zen 5, whose AVX-512
  units are full width and which MKL on AMD leaves unused (it keeps to AVX2), at every count but two (the 45M LLaMA,
  weights not in cache: 1 row 1.08x, 5 rows 1.0-1.5x, 8-16 rows 1.3-2.3x; 2 rows 0.8x; whole greedy runs 1.25x at
  batch 1). On a Zen 4, which runs AVX-512 as two 256-bit halves, only from about 6 rows (whole runs: batch 1 1.6x
  slower on oneDNN, 5 beams 1.1x slower, batch 8 1.07x faster). No CPU flag tells the two apart, so the choice reads
  the AMD CPU family (26 and up: Zen 5); other AVX-512 CPUs (Zen 4, Intel's, where MKL uses AVX-512 itself: not
  measured) take oneDNN from 6 rows, AVX2 CPUs never. Timing each weight shape's routes in isolation picked wrongly
  on the Zen 4 (oneDNN for the down projection, 1.2x faster alone, 1.1x slower inside the model), so the choice is
  by CPU, and `INSTRUCTBLIP_FEW_ROWS=mkl` or `onednn` overrides it. oneDNN's output is contiguous already.
- **More rows (image encoding, the Q-Former, prompt prefill), when no gradient is needed.** oneDNN's matmul
  (`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile's CPU backend calls; it reads the ordinary dense
  weight, nothing is repacked or copied) runs the ViT-g shapes at 257 rows up to 1.7x faster than MKL (fc1 the most,
  qkv and fc2 level to 1.45x across runs), and most shapes 1.3-2x at 32-128 rows (`benchmarks/gemm_routes.py` prints
  the comparison). It has no backward, so anything that needs a gradient through the product stays on `F.linear`;
  so does anything when `torch.backends.mkldnn.enabled` is False.

Results equal `F.linear` up to float rounding (the sums are taken in another order). Everything else (GPU, half
precision, tiny weights) goes to `F.linear`.

`linear(..., residual=r)` adds a residual of the output's shape; on the oneDNN route the addition is fused into the
GEMM (`_linear_pointwise.binary`, one pass less over the output). `gelu` works in place on a temporary when no
gradient is needed (no second activation-sized buffer).
"""

from __future__ import annotations

import os
import re
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_ROWS = 16
MIN_WEIGHT = 1 << 16  # elements; smaller weights stay in cache and the plain path is as fast
HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
FEW_ROWS_ENV = "INSTRUCTBLIP_FEW_ROWS"  # auto (by CPU, the default), mkl or onednn: the route of 1..MAX_ROWS rows


def amd_cpu_family() -> int:
    """The CPU family of an AMD processor as /proc/cpuinfo gives it (25: Zen 3 and Zen 4, 26: Zen 5); 0 otherwise."""
    try:
        with open("/proc/cpuinfo") as f:
            head = f.read(4096)  # the first processor's block
    except OSError:
        return 0
    family = re.search(r"^cpu family\s*:\s*(\d+)", head, re.MULTILINE)
    return int(family.group(1)) if family and "AuthenticAMD" in head else 0


def onednn_few_rows(setting: str | None = None, capability: str | None = None, family: int | None = None):
    """The row counts (within 1..MAX_ROWS) whose products take oneDNN rather than MKL's transposed product."""
    setting = (os.environ.get(FEW_ROWS_ENV, "") if setting is None else setting).strip().lower() or "auto"
    if setting not in ("auto", "mkl", "onednn"):
        warnings.warn(f"{FEW_ROWS_ENV}={setting!r} is not a route; using auto. Set it to auto (by CPU), mkl or "
                      "onednn, or unset it.", stacklevel=2)
        setting = "auto"
    every = frozenset(range(1, MAX_ROWS + 1))
    if setting != "auto":
        return every if setting == "onednn" else frozenset()
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    if not capability.startswith("AVX512"):
        return frozenset()
    if (amd_cpu_family() if family is None else family) >= 26:
        return every - {2}
    return frozenset(range(6, MAX_ROWS + 1))


ONEDNN_FEW_ROWS = onednn_few_rows()  # see the module docstring


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """x @ weight^T + bias, plus `residual` (a tensor of the output's shape) when given."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != x.dtype or rows == 0
            or weight.numel() < MIN_WEIGHT):
        return _add(F.linear(x, weight, bias), residual)
    if ((rows > MAX_ROWS or rows in ONEDNN_FEW_ROWS) and HAS_ONEDNN and torch.backends.mkldnn.enabled
            and not _needs_grad(x, weight, bias, residual)):
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        if residual.dtype == x.dtype and residual.shape == (*x.shape[:-1], weight.shape[0]):
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    if rows > MAX_ROWS:
        return _add(F.linear(x, weight, bias), residual)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        out = torch.mm(weight, torch.cat([flat, flat]).t())[:, :1]  # (out, 1)
    else:
        out = torch.mm(weight, flat.t())  # (out, rows)
    out = out.t().contiguous()  # (rows, out), unit stride last: see the module docstring
    if bias is not None:
        out = out + bias
    return _add(out.reshape(*x.shape[:-1], weight.shape[0]), residual)


def _add(out: Tensor, residual: Tensor | None) -> Tensor:
    return out if residual is None else out + residual


def gelu(x: Tensor) -> Tensor:
    """Exact GELU. Overwrites x when no gradient is needed: pass only a temporary (a layer's fresh output)."""
    if _needs_grad(x) or (x.is_inference() and not torch.is_inference_mode_enabled()):
        return F.gelu(x)
    return torch.ops.aten.gelu_(x)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose forward uses `linear` above."""

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return linear(x, self.weight, self.bias, residual)
