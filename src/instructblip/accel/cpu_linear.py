"""A faster linear layer for float32 inference on the CPU: `linear` (a function) and `Linear` (an nn.Linear that
`instructblip.accel.optimize` puts into a loaded model in place of each nn.Linear).

Each call takes one route, by its row count, the CPU, and whether a gradient is needed:
- another device or dtype, a weight below `MIN_WEIGHT`: `F.linear`;
- 1..`MAX_ROWS` rows (decoding, beams): MKL's transposed product (`_few_rows`, `_one_row`), or oneDNN's matmul for
  the counts in `ONEDNN_FEW_ROWS` (some AVX-512 CPUs) when no gradient is needed;
- more rows (image encoding, the Q-Former, a prompt's prefill): without a gradient, oneDNN's matmul on the plain
  weight (`_onednn`), up to `ONEDNN_MAX_ROWS` rows on CPUs without AVX-512; `F.linear` above, or with a gradient;
- a `Linear` layer with packing on (`PACK`, AVX-512 CPUs): oneDNN on its weight reordered once into oneDNN's blocked
  layout (`_packed_linear`); a decoder's layers pack only for a decoding step of 3 or more sequences.
Results equal `F.linear` up to float rounding (the sums are taken in another order).

The measurements behind each choice, with the CPU and session they come from, and how to take them again
(`benchmarks/gemm_routes.py`, `benchmarks/bench.py`), are in docs/performance.md, "CPU linear routes".

The route tables (`ONEDNN_FEW_ROWS`, `ONEDNN_MAX_ROWS`, `ONEDNN_MAX_ROWS_WIDENING`, `PACK`) depend on the CPU and on
`INSTRUCTBLIP_FEW_ROWS` / `INSTRUCTBLIP_PACK`; `settle()` computes them on first use (the first product, or the first
read of one of them as a module attribute), never at import.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_ROWS = 16  # the most rows of the few-row routes
TRANSPOSE_BLOCK = 32  # see _transposed
TRANSPOSE_BLOCKED_MIN = 4096  # elements; below, the plain transposing copy is as fast
MIN_WEIGHT = 1 << 16  # elements; smaller weights stay in cache and the plain path is as fast
HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")  # (the build)
FEW_ROWS_ENV = "INSTRUCTBLIP_FEW_ROWS"  # auto (by CPU, the default), mkl or onednn: the route of 1..MAX_ROWS rows
PACK_ENV = "INSTRUCTBLIP_PACK"  # auto (AVX-512 CPUs, the default), on or off: Linear layers' packed weights
PACK_ROWS = 16  # the row count oneDNN is told to expect when packing; every count from 2 gave the same speed
MIN_PACKED_ROWS = 4  # fewer rows are padded to this many for a packed weight (see _packed_linear)
PACK_DECODING_ROWS = 3  # a decoder's layers pack for a decoding step of this many sequences or more (Linear)
_SWAP_LOCK = threading.Lock()
_TABLES = ("ONEDNN_FEW_ROWS", "ONEDNN_MAX_ROWS", "ONEDNN_MAX_ROWS_WIDENING", "PACK")  # set by settle()


# ---------------------------------------------------------------------------------------------------------------------
# the route tables: by CPU and environment, computed on first use


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
    """The row counts (within 1..MAX_ROWS) whose products take oneDNN rather than MKL's transposed product: every
    count but 2 on AMD family 26 and up (Zen 5), 6..MAX_ROWS on other AVX-512 CPUs, none on AVX2 ones; `setting`
    (default: `INSTRUCTBLIP_FEW_ROWS`) "mkl" or "onednn" overrides the CPU."""
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


def onednn_max_rows(capability: str | None = None) -> int | None:
    """The most rows a product sends to oneDNN's matmul on the plain weight (None: no bound): 256 on CPUs without
    AVX-512, where MKL is faster above."""
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    return None if capability.startswith("AVX512") else 256


def pack_weights(setting: str | None = None, capability: str | None = None) -> bool:
    """Whether `Linear` layers pack their weights for oneDNN: with `setting` (default: `INSTRUCTBLIP_PACK`) "auto",
    on AVX-512 CPUs; "on" or "off" overrides the CPU. Never without oneDNN."""
    setting = (os.environ.get(PACK_ENV, "") if setting is None else setting).strip().lower() or "auto"
    if setting not in ("auto", "on", "off"):
        warnings.warn(f"{PACK_ENV}={setting!r} is not a setting; using auto. Set it to auto (AVX-512 CPUs), on or "
                      "off, or unset it.", stacklevel=2)
        setting = "auto"
    if not HAS_ONEDNN or setting == "off":
        return False
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    return setting == "on" or capability.startswith("AVX512")


@functools.cache
def settle() -> None:
    """Set the route tables for this CPU and environment, once: `ONEDNN_FEW_ROWS` (`onednn_few_rows`),
    `ONEDNN_MAX_ROWS` (`onednn_max_rows`), `ONEDNN_MAX_ROWS_WIDENING` (twice that, for weights with more outputs than
    inputs) and `PACK` (`pack_weights`). Every product calls it first; tests may replace the tables after it ran."""
    global ONEDNN_FEW_ROWS, ONEDNN_MAX_ROWS, ONEDNN_MAX_ROWS_WIDENING, PACK
    ONEDNN_FEW_ROWS = onednn_few_rows()
    ONEDNN_MAX_ROWS = onednn_max_rows()
    ONEDNN_MAX_ROWS_WIDENING = None if ONEDNN_MAX_ROWS is None else 2 * ONEDNN_MAX_ROWS
    PACK = pack_weights()


def __getattr__(name: str):
    """The route tables as module attributes (`cpu_linear.PACK`), settled on the first read."""
    if name in _TABLES:
        settle()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------------------
# the routes of `linear`


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """x @ weight^T + bias, plus `residual` (a tensor of the output's shape) when given, by the route this call
    takes (see the module docstring). On the oneDNN route the residual is added inside the GEMM."""
    settle()
    rows = _rows(x)
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != x.dtype or rows == 0
            or weight.numel() < MIN_WEIGHT):
        return _add(F.linear(x, weight, bias), residual)
    if ((rows > MAX_ROWS or rows in ONEDNN_FEW_ROWS) and _within_onednn_bound(rows, weight)
            and HAS_ONEDNN and torch.backends.mkldnn.enabled and not _needs_grad(x, weight, bias, residual)):
        out = _onednn(x, weight, bias, residual)
        if out is not None:
            return out
    if rows > MAX_ROWS:
        return _add(F.linear(x, weight, bias), residual)
    return _add(_few_rows(x, weight, bias, rows), residual)


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None) -> Tensor | None:
    """oneDNN's matmul on the plain (out, in) weight (`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile's
    CPU backend calls; oneDNN reorders the weight into its blocked layout inside every call, nothing is kept), with
    the residual fused into the GEMM (`.binary`, one pass less over the output). Chosen without a gradient (it has no
    backward) and with `torch.backends.mkldnn.enabled`, for more than `MAX_ROWS` rows up to `ONEDNN_MAX_ROWS` (or
    `ONEDNN_MAX_ROWS_WIDENING`), and for the few-row counts in `ONEDNN_FEW_ROWS`. Its output is contiguous. None for
    a residual it cannot fuse (broadcast or of another dtype): the caller takes the next route."""
    if residual is None:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if residual.dtype == x.dtype and residual.shape == (*x.shape[:-1], weight.shape[0]):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    return None


def _within_onednn_bound(rows: int, weight: Tensor) -> bool:
    """Whether oneDNN takes this many rows for this weight: `ONEDNN_MAX_ROWS`, or `ONEDNN_MAX_ROWS_WIDENING` for a
    weight with more outputs than inputs (None: no bound)."""
    bound = ONEDNN_MAX_ROWS if weight.shape[0] <= weight.shape[1] else ONEDNN_MAX_ROWS_WIDENING
    return bound is None or rows <= bound


def _few_rows(x: Tensor, weight: Tensor, bias: Tensor | None, rows: int) -> Tensor:
    """MKL's transposed product, for 1..MAX_ROWS rows that oneDNN does not take (not in `ONEDNN_FEW_ROWS`, oneDNN
    off, or a gradient to compute: these ops are differentiable): `(W @ x^T)^T`, which MKL runs 1.5-3x faster than
    the `x @ W^T` of `F.linear` for an (out, in) weight; one row through `_one_row`. The (out, rows) product comes back
    as a contiguous (rows, out) (`_transposed`): a strided last dimension would send SDPA to its math path and slow
    the elementwise ops after it."""
    flat = x.reshape(rows, x.shape[-1])
    out = _one_row(weight, flat) if rows == 1 else torch.mm(weight, flat.t())  # (out, rows)
    out = _transposed(out)  # (rows, out), unit stride last
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _one_row(weight: Tensor, row: Tensor) -> Tensor:
    """weight (out, in) @ row (1, in)^T -> (out, 1): the weight viewed as `max(2, threads)` blocks of output rows,
    one GEMV per block through `bmm`, which runs the blocks side by side on the threads (a view, nothing copied;
    MKL's single GEMV reads the weight at well below the memory's rate). When the blocks do not divide the weight
    evenly, the row padded to two (a 2-column GEMM, still faster than the GEMV)."""
    split = max(2, torch.get_num_threads())
    if weight.shape[0] % split or not weight.is_contiguous():
        return torch.mm(weight, torch.cat([row, row]).t())[:, :1]
    blocks = weight.view(split, weight.shape[0] // split, weight.shape[1])  # (split, out / split, in)
    return torch.bmm(blocks, row.t().expand(split, -1, -1)).view(weight.shape[0], 1)


def _transposed(out: Tensor) -> Tensor:
    """(N, rows) contiguous -> (rows, N) contiguous. For all but small outputs the copy runs over (N / 32, 32, rows)
    blocks, permuted to (rows, N / 32, 32): the same numbers, 2-3.5x faster than `out.t().contiguous()`."""
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
    """Exact GELU. Overwrites x when no gradient is needed (no second activation-sized buffer): pass only a
    temporary (a layer's fresh output)."""
    if _needs_grad(x) or (x.is_inference() and not torch.is_inference_mode_enabled()):
        return F.gelu(x)
    return torch.ops.aten.gelu_(x)


class GELU(nn.GELU):
    """nn.GELU whose exact form runs in place (`gelu`) when no gradient is needed. Only for a GELU whose input is a
    temporary that nothing reads afterwards (`optimize` puts it between the vision and Q-Former MLPs' fc1 and fc2)."""

    def forward(self, x: Tensor) -> Tensor:
        return gelu(x) if self.approximate == "none" else super().forward(x)


# ---------------------------------------------------------------------------------------------------------------------
# packed weights: `Linear`


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose forward uses `linear` above, or a packed weight.

    Packed weights: oneDNN's routes on the plain weight reorder it into oneDNN's blocked layout on every call, a pass
    over the weight that few-row products pay in full. With packing on (`PACK`), the first call that needs no
    gradient (CPU, float32, oneDNN enabled, a weight of at least `MIN_WEIGHT` elements) swaps the weight, in place, for
    the blocked copy (`torch.ops.mkldnn._reorder_linear_weight`, which torch.compile's freezing uses too), so the
    memory is not doubled; every later call at any row count then runs `_packed_linear`. A decoder's layers
    (`decoding`, set by `for_decoding`) wait for a decoding step of `PACK_DECODING_ROWS` (3) or more sequences (a
    batch, beams; see `_packs_at`): one or two rows run faster on the plain weight's few-row routes, and a prompt's
    prefill does not pack them. Calls that need the weight plain (a gradient, another dtype or device,
    `load_state_dict`, `.to()`, `deepcopy`, pickling) swap it back first; `state_dict()` hands out a plain copy. The
    Parameter object stays the same (optimizers keep it). `unpack(model)` below turns a whole model back.
    """

    _pack_failed = False  # set on an instance whose weight could not be swapped
    decoding = False  # a decoder's layer: packs only for a decoding step of 3+ sequences (see `for_decoding`)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        settle()
        w, b = self.weight, self.bias  # (module attribute lookups cost ~1 us each: a decoding step makes 17 calls)
        fast = _packed_route(x, w, b, residual)
        if w.is_mkldnn:
            if fast:
                return _packed_linear(x, w, b, residual)
            self.unpack()
        elif fast and PACK and not self._pack_failed and self._packs_at(x) and _packable(w) and self.pack():
            return _packed_linear(x, w, b, residual)  # w: the same Parameter, swapped in place
        return linear(x, w, b, residual)

    def _packs_at(self, x: Tensor) -> bool:
        """Whether a call with input x may pack the weight: any call; for a decoder's layer, a decoding step of
        `PACK_DECODING_ROWS` or more sequences: one new position per sequence, x (N, in) or (N, 1, in) with N >= 3.
        (A row count alone cannot tell a decoding step from a short prompt's prefill: (1, 10, in) has 10 rows.)"""
        return not self.decoding or ((x.dim() < 3 or x.shape[-2] == 1) and _rows(x) >= PACK_DECODING_ROWS)

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
        if self.weight.is_mkldnn:  # a plain copy; `unpack()` first to save without a second copy in memory
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
    """Marks the `Linear` layers under `module` as a decoder's (`Linear.decoding`): they pack their weights on their
    first decoding step of `PACK_DECODING_ROWS` (3) or more sequences without a gradient, and stay packed from then
    on; decoding one or two sequences, and a prompt's prefill, run on the plain weights. Returns `module`."""
    for m in module.modules():
        if isinstance(m, Linear):
            m.decoding = True
    return module


def pack_for_decoding(module: nn.Module, rows: int) -> None:
    """Before decoding `rows` sequences at once: packs the weights of the decoder's layers under `module`
    (`for_decoding`) when `rows` >= `PACK_DECODING_ROWS` and packing is on. A packed weight stays packed. (The layers
    decide this for themselves on their first such call; this packs them ahead of it.)"""
    settle()
    if not PACK or rows < PACK_DECODING_ROWS or torch.is_grad_enabled():
        return
    for m in module.modules():
        if isinstance(m, Linear) and m.decoding and not m._pack_failed and _packable(m.weight):
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
    """oneDNN's matmul on a packed weight, at every row count, the residual fused as in `_onednn`. oneDNN runs 1-3
    rows on a packed weight 15-25% slower than 4, so fewer than `MIN_PACKED_ROWS` rows are padded (one row: a
    broadcast view of it, no copy) and the padding's outputs dropped."""
    rows = _rows(x)
    if 0 < rows < MIN_PACKED_ROWS:  # padded with copies of row 0 (or zeros), the extra rows' outputs dropped
        flat = x.reshape(rows, x.shape[-1])
        flat = flat.expand(MIN_PACKED_ROWS, -1) if rows == 1 else F.pad(flat, (0, 0, 0, MIN_PACKED_ROWS - rows))
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")[:rows]  # (rows, out)
        return _add(out.view(*x.shape[:-1], weight.shape[0]), residual)
    if residual is not None and residual.dtype == x.dtype and residual.shape == (*x.shape[:-1], weight.shape[0]):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    return _add(torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""), residual)
