"""A faster linear layer for fp32 inference on CPU.

Three routes beat `F.linear` (MKL's sgemm) on the AMD EPYCs this was measured on: two with the same weights in the
same layout, the third (the default for `Linear` layers on AVX-512 CPUs) with each weight in oneDNN's own layout:

- **Few rows (1-16: decoding, beams).** MKL runs `x @ W^T` for a (out, in) weight 1.5-3x slower than the same product
  computed as `(W @ x^T)^T` (measured on a Zen 3, AVX2: LM head 32000x512, 5 rows: 5.7 ms against 1.9 ms), and a
  single row faster still when padded to two: MKL's row-major GEMV reads the weight at about half the memory
  bandwidth its 2-column GEMM reaches (LM head 3.5 ms against 1.2 ms; the four layers of a 45M LLaMA, weights not in
  cache: 3.1 ms against 1.5 ms). The (out, rows) product is copied to a contiguous (rows, out) (`rows * out` floats):
  a strided last dimension sends SDPA to its math path and slows the elementwise ops after it. That copy runs by
  blocks of 32 outputs (`_transposed`), 2-3.5x faster than a plain transposing copy at the LM head's size.
  Better still for one row: the weight cut into `max(2, threads)` blocks of output rows, one GEMV per block through
  `bmm`, which runs the blocks side by side on the threads (a view, nothing copied; when the blocks do not divide the
  weight evenly, the row padded to two). Measured on a Zen 3 (AVX2, 2 threads, weights not in cache): the 17
  products of a decoding step of the 45M LLaMA read their 116 MB at 26-28 GB/s against 20-21 GB/s padded, with the
  memory probe at 31 GB/s; whole greedy runs at batch 1, median of 8, 471 ms against 609 ms. At 2-16 rows the same
  split is no faster.
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
  the comparison). Those figures are from a Zen 3 (AVX2) in an early session; on a Zen 3 in a later one (session
  16), oneDNN still won at 17-128 rows (1.1-1.9x; the LM head and ViT fc1 the most) but was level at 257 rows
  (0.93-1.05x; fc2 0.73-0.93x) and 1.05-1.4x slower than MKL at 514 and 2056 (the ViT-g at batch 2 and 8): whole
  image encoding at batch 8 ran 0.86x transformers'. So on CPUs without AVX-512 oneDNN takes at most
  `ONEDNN_MAX_ROWS` (256) rows and MKL the rest, except for weights with more outputs than inputs, which it takes up
  to `ONEDNN_MAX_ROWS_WIDENING` (512) rows: timed on that Zen 3 in session 17, at 257 rows the ViT-g's qkv and fc1
  ran 1.1x faster on oneDNN (106 / 113 GFLOP/s against 96 / 101), its proj and fc2 1.15-1.2x slower, and at 1028
  rows oneDNN was level or slower on all four; a batch-1 image encoding took 4.05-4.08 s against 4.31-4.48 s
  (median of 5, alternating). It has no backward, so anything that needs a gradient through the
  product stays on `F.linear`; so does anything when `torch.backends.mkldnn.enabled` is False.

- **Packed weights (`Linear` layers, AVX-512 CPUs).** Both oneDNN routes above read the ordinary (out, in) weight,
  which oneDNN first reorders into its blocked layout on every call: a pass over the weight that few-row products
  pay in full. `Linear` instead swaps its weight, on its first call without a gradient, for the blocked copy
  (`torch.ops.mkldnn._reorder_linear_weight`, which torch.compile's freezing uses too) and calls oneDNN with that
  at every row count. Measured on a Zen 4 (2 threads, weights not in cache): LM head 32000x512 at 5 rows 2.1-2.5 ms
  against 3.6-6.4 ms on MKL's transposed product, the 45M LLaMA's whole greedy runs at batch 8 1.4x and 5-beam
  search 1.5x faster, batch 1 level (its one-row products 0.9-1.1x), ViT-g image encoding at batch 1 1.1x. The
  weight is swapped in place (`torch.utils.swap_tensors`), not copied next to the plain one; see `Linear` for when
  it turns plain again. Not measured on AVX2 CPUs, so `PACK` is on for AVX-512 only; `INSTRUCTBLIP_PACK=on|off`
  overrides it. The free function `linear` never packs (it has no module to keep the copy in).
  With a packed weight, oneDNN runs 1-3 rows 15-25% slower than 4 (Zen 4, the 45M LLaMA's 17 decoding products,
  weights not in cache: 1 row 4.9-5.1 ms, 2 rows 5.2-5.5 ms, the same row padded to 4 4.0-4.4 ms; the LM head
  alone reads its 65 MB at the memory probe's rate when padded, 25-30% below it when not), so fewer rows than
  `MIN_PACKED_ROWS` are padded (one row: a broadcast view of it, no copy) and the padding's outputs dropped.
  Even so, one row reads a plain weight faster through the blocks of the few-row route above: measured on a Zen 4
  (session 18, the 17 products weights not in cache), 2.3-2.7 ms against 3.7-4.2 ms packed while the memory probe
  read 57-66 GB/s, 3.6-3.8 ms against 4.4 ms at 35 GB/s; at two rows MKL's `W @ x^T` 3.9 ms against 4.8 ms; from
  three rows packed wins (5 rows 4.1 ms against 6.1 ms). So a decoder's layers (`for_decoding`: the LLaMA, T5's
  decoder and LM heads) do not pack themselves on their first call: generation packs them (`pack_for_decoding`)
  when it decodes `PACK_DECODING_ROWS` (3) or more sequences at once, and they stay packed from then on. Whole
  greedy runs at batch 1 went 1.24-1.30x faster (LLaMA) and 1.35-1.41x (T5), the same tokens; beams and batch 8
  are unchanged. The vision encoder and the Q-Former pack on their first call as before.

Results equal `F.linear` up to float rounding (the sums are taken in another order). Everything else (GPU, half
precision, tiny weights) goes to `F.linear`.

`linear(..., residual=r)` adds a residual of the output's shape; on the oneDNN route the addition is fused into the
GEMM (`_linear_pointwise.binary`, one pass less over the output). `gelu` works in place on a temporary when no
gradient is needed (no second activation-sized buffer).
"""

from __future__ import annotations

import copy
import os
import re
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_ROWS = 16
TRANSPOSE_BLOCK = 32  # see _transposed
TRANSPOSE_BLOCKED_MIN = 4096  # elements; below, the plain transposing copy is as fast
MIN_WEIGHT = 1 << 16  # elements; smaller weights stay in cache and the plain path is as fast
HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
FEW_ROWS_ENV = "INSTRUCTBLIP_FEW_ROWS"  # auto (by CPU, the default), mkl or onednn: the route of 1..MAX_ROWS rows
PACK_ENV = "INSTRUCTBLIP_PACK"  # auto (AVX-512 CPUs, the default), on or off: Linear layers' packed weights


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


def onednn_max_rows(capability: str | None = None) -> int | None:
    """The most rows a product sends to oneDNN's matmul on the plain weight (None: no bound): 256 on CPUs without
    AVX-512, where MKL is faster above (see the module docstring)."""
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    return None if capability.startswith("AVX512") else 256


ONEDNN_MAX_ROWS = onednn_max_rows()
ONEDNN_MAX_ROWS_WIDENING = None if ONEDNN_MAX_ROWS is None else 2 * ONEDNN_MAX_ROWS  # out > in: see the docstring


def pack_weights(setting: str | None = None, capability: str | None = None) -> bool:
    """Whether `Linear` layers pack their weights for oneDNN (see the module docstring): auto = on AVX-512 CPUs."""
    setting = (os.environ.get(PACK_ENV, "") if setting is None else setting).strip().lower() or "auto"
    if setting not in ("auto", "on", "off"):
        warnings.warn(f"{PACK_ENV}={setting!r} is not a setting; using auto. Set it to auto (AVX-512 CPUs), on or "
                      "off, or unset it.", stacklevel=2)
        setting = "auto"
    if not HAS_ONEDNN or setting == "off":
        return False
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    return setting == "on" or capability.startswith("AVX512")


PACK = pack_weights()
PACK_ROWS = 16  # the row count oneDNN is told to expect when packing; every count from 2 gave the same speed
MIN_PACKED_ROWS = 4  # fewer rows are padded to this many for a packed weight; see the module docstring
PACK_DECODING_ROWS = 3  # a decoder's layers are packed to decode this many sequences at once or more (for_decoding)
_SWAP_LOCK = threading.Lock()


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """x @ weight^T + bias, plus `residual` (a tensor of the output's shape) when given."""
    rows = _rows(x)
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != x.dtype or rows == 0
            or weight.numel() < MIN_WEIGHT):
        return _add(F.linear(x, weight, bias), residual)
    if ((rows > MAX_ROWS or rows in ONEDNN_FEW_ROWS) and _within_onednn_bound(rows, weight)
            and HAS_ONEDNN and torch.backends.mkldnn.enabled and not _needs_grad(x, weight, bias, residual)):
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        if residual.dtype == x.dtype and residual.shape == (*x.shape[:-1], weight.shape[0]):
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    if rows > MAX_ROWS:
        return _add(F.linear(x, weight, bias), residual)
    flat = x.reshape(rows, x.shape[-1])
    out = _one_row(weight, flat) if rows == 1 else torch.mm(weight, flat.t())  # (out, rows)
    out = _transposed(out)  # (rows, out), unit stride last: see the module docstring
    if bias is not None:
        out = out + bias
    return _add(out.reshape(*x.shape[:-1], weight.shape[0]), residual)


def _within_onednn_bound(rows: int, weight: Tensor) -> bool:
    """Whether oneDNN takes this many rows for this weight: `ONEDNN_MAX_ROWS`, or `ONEDNN_MAX_ROWS_WIDENING` for a
    weight with more outputs than inputs (None: no bound)."""
    bound = ONEDNN_MAX_ROWS if weight.shape[0] <= weight.shape[1] else ONEDNN_MAX_ROWS_WIDENING
    return bound is None or rows <= bound


def _one_row(weight: Tensor, row: Tensor) -> Tensor:
    """weight (out, in) @ row (1, in)^T -> (out, 1): one GEMV per block of output rows, the blocks side by side
    (see the module docstring), or the row padded to two when the blocks do not divide the weight."""
    split = max(2, torch.get_num_threads())
    if weight.shape[0] % split or not weight.is_contiguous():
        return torch.mm(weight, torch.cat([row, row]).t())[:, :1]
    blocks = weight.view(split, weight.shape[0] // split, weight.shape[1])  # (split, out / split, in)
    return torch.bmm(blocks, row.t().expand(split, -1, -1)).view(weight.shape[0], 1)


def _transposed(out: Tensor) -> Tensor:
    """(N, rows) contiguous -> (rows, N) contiguous. For all but small outputs the copy runs over (N / 32, 32, rows)
    blocks, permuted to (rows, N / 32, 32): the same numbers, 2-3.5x faster than `out.t().contiguous()` (measured
    on a Zen 3: the LM head's 32000 outputs at 2 / 5 / 8 rows 221 / 296 / 438 us against 47 / 83 / 205 us, which
    at 5 rows is 4% of the product itself; 2752 outputs 42-73 us against 17-42 us)."""
    N, rows = out.shape
    if rows == 1 or N * rows < TRANSPOSE_BLOCKED_MIN or N % TRANSPOSE_BLOCK:
        return out.t().contiguous()  # one row: no copy, unless it is every other element of the padded product
    return out.view(N // TRANSPOSE_BLOCK, TRANSPOSE_BLOCK, rows).permute(2, 0, 1).contiguous().view(rows, N)


def _rows(x: Tensor) -> int:
    """The number of rows of x (..., in) seen as a matrix."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _add(out: Tensor, residual: Tensor | None) -> Tensor:
    return out if residual is None else out + residual


def gelu(x: Tensor) -> Tensor:
    """Exact GELU. Overwrites x when no gradient is needed: pass only a temporary (a layer's fresh output)."""
    if _needs_grad(x) or (x.is_inference() and not torch.is_inference_mode_enabled()):
        return F.gelu(x)
    return torch.ops.aten.gelu_(x)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose forward uses `linear` above, or a packed weight.

    With packing on (`PACK`), the first call that needs no gradient (CPU, float32, oneDNN enabled, a weight of at
    least `MIN_WEIGHT` elements) swaps the weight, in place, for oneDNN's blocked copy of it, so the memory is not
    doubled; a decoder's layers wait for `pack_for_decoding` instead (`autopack` False, see `for_decoding`). Calls
    that need it plain (a gradient, another dtype or device, `load_state_dict`, `.to()`, `deepcopy`, pickling) swap
    it back first; `state_dict()` hands out a plain copy. The Parameter object stays the same
    (optimizers keep it). `unpack(model)` below turns a whole model back.
    """

    _pack_failed = False  # set on an instance whose weight could not be swapped
    autopack = True  # pack on the first call without a gradient; False for a decoder's layers (see `for_decoding`)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        w, b = self.weight, self.bias  # (module attribute lookups cost ~1 us each: a decoding step makes 17 calls)
        fast = _packed_route(x, w, b, residual)
        if w.is_mkldnn:
            if fast:
                return _packed_linear(x, w, b, residual)
            self.unpack()
        elif fast and PACK and self.autopack and not self._pack_failed and _packable(w) and self.pack():
            return _packed_linear(x, w, b, residual)  # w: the same Parameter, swapped in place
        return linear(x, w, b, residual)

    @property
    def packed(self) -> bool:
        return self.weight.is_mkldnn

    def pack(self) -> bool:
        """Swap the weight for its packed copy. False while something else holds the weight (an autograd graph);
        False from then on if swapping fails (e.g. a weak reference to it): it stays plain."""
        with _SWAP_LOCK:
            w = self.weight
            if w.is_mkldnn:
                return True
            if w._use_count() > 1:  # an autograd graph (or C++ code) holds it: swapping now would break that graph
                return False
            try:
                with torch.inference_mode(False), torch.no_grad():
                    packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS)
                    torch.utils.swap_tensors(w, nn.Parameter(packed, requires_grad=w.requires_grad))
            except RuntimeError:  # e.g. weak references to the weight: leave it plain
                self._pack_failed = True
                return False
        return True

    def unpack(self) -> None:
        """Swap a packed weight back to the plain (out, in) matrix; a no-op when it is plain."""
        with _SWAP_LOCK:
            w = self.weight
            if not w.is_mkldnn:
                return
            with torch.inference_mode(False), torch.no_grad():
                plain = nn.Parameter(w.detach().to_dense(), requires_grad=w.requires_grad)
                try:
                    torch.utils.swap_tensors(w, plain)
                except RuntimeError as e:
                    raise RuntimeError(f"cannot turn the packed weight of {self} back into a plain one ({e}); set "
                                       f"{PACK_ENV}=off to keep weights plain") from None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_mkldnn:  # a plain copy; `unpack()` first to save without one (checkpoint.save_pretrained)
            destination[prefix + "weight"] = self.weight.detach().to_dense()

    def _load_from_state_dict(self, *args, **kwargs):
        self.unpack()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self.unpack()
        return super()._apply(fn, recurse)

    def __deepcopy__(self, memo):
        self.unpack()
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __getstate__(self):
        self.unpack()
        return super().__getstate__()


def for_decoding(module: nn.Module) -> nn.Module:
    """Marks the `Linear` layers under `module` as a decoder's: they do not pack themselves on their first call, and
    `pack_for_decoding` packs them when a generation decodes `PACK_DECODING_ROWS` (3) or more sequences at once
    (a batch, beams). Decoding one or two sequences, and a prompt's prefill, run on the plain weights, where the plain
    routes are faster (see the module docstring). Returns `module`."""
    for m in module.modules():
        if isinstance(m, Linear):
            m.autopack = False
    return module


def pack_for_decoding(module: nn.Module, rows: int) -> None:
    """Before decoding `rows` sequences at once: packs the weights of the decoder's layers under `module`
    (`for_decoding`) when `rows` >= `PACK_DECODING_ROWS` and packing is on. A packed weight stays packed."""
    if not PACK or rows < PACK_DECODING_ROWS or torch.is_grad_enabled():
        return
    for m in module.modules():
        if isinstance(m, Linear) and not m.autopack and not m._pack_failed and _packable(m.weight):
            m.pack()


def unpack(module: nn.Module) -> None:
    """Turn every packed weight under `module` back into a plain one, one at a time (no second copy of the model)."""
    for m in module.modules():
        if isinstance(m, Linear):
            m.unpack()


def _packable(weight: Tensor) -> bool:
    return (HAS_ONEDNN and weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.layout == torch.strided and weight.numel() >= MIN_WEIGHT)


def _packed_route(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None) -> bool:
    """Whether this call may use a packed weight: float32 on the CPU with oneDNN on, and no gradient to compute."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[-1] == weight.shape[1]
            and torch.backends.mkldnn.enabled and (bias is None or bias.dtype == torch.float32)
            and not _needs_grad(x, weight, bias, residual))


def _packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None) -> Tensor:
    rows = _rows(x)
    if 0 < rows < MIN_PACKED_ROWS:  # padded with copies of row 0 (or zeros), the extra rows' outputs dropped
        flat = x.reshape(rows, x.shape[-1])
        flat = flat.expand(MIN_PACKED_ROWS, -1) if rows == 1 else F.pad(flat, (0, 0, 0, MIN_PACKED_ROWS - rows))
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")[:rows]  # (rows, out)
        return _add(out.view(*x.shape[:-1], weight.shape[0]), residual)
    if residual is not None and residual.dtype == x.dtype and residual.shape == (*x.shape[:-1], weight.shape[0]):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    return _add(torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""), residual)
