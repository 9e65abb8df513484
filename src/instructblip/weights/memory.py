"""Will a model fit, and in which dtype? The memory a checkpoint needs per way of loading it, against what this
process may still use, checked before anything is allocated (a 7B model in float32 needs 32 GB: better one clear line
than the allocator's failure twenty seconds in); the dtype "auto" picks on the CPU.
"""

from __future__ import annotations

import functools
import resource

import torch
from torch import nn

from instructblip.models.config import InstructBlipConfig
from instructblip.models.instructblip import InstructBlipNetwork

GiB = 2**30
HEADROOM = 0.10  # activations, the KV cache, the allocator's slack: on top of the weights
MIN_HEADROOM = 256 * 2**20
SMALL = GiB  # float32 weights below this: float32 even where bfloat16 is native (speed is not the weights' reads)
FLAGS = {"float32": "--dtype float32", "bfloat16": "--dtype bfloat16", "int8": "--quantize int8",
         "int4": "--quantize int4"}  # per way of loading
INT4_GROUP = 128  # inputs per int4 scale and offset (accel.quantize.GROUP)


class ModelTooLargeError(ValueError):
    """The model does not fit in the memory this process may use, in the way it was asked to load."""


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), where bfloat16 runs faster than float32
    instead of being converted back and forth."""
    try:
        with open("/proc/cpuinfo") as f:
            head = f.read(8192)  # the first processor's block
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in head.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def rest_dtype() -> torch.dtype:
    """The dtype of what a quantized model keeps unquantized (vision encoder, Q-Former, embeddings, norms) when none
    is asked for: bfloat16 where the CPU computes it natively, else float32."""
    return torch.bfloat16 if native_bf16() else torch.float32


def weight_bytes(config: InstructBlipConfig, rest: torch.dtype | None = None) -> dict[str, int]:
    """Bytes of the weights per way of loading: "float32", "bfloat16", "int8" and "int4" (the language model's linear
    layers, its head included, in int8 at one byte a weight plus the scales of its rows, or in int4 at half a byte plus
    a bfloat16 scale and offset per `INT4_GROUP` weights; the rest in `rest`, default `rest_dtype()`). Counted on the
    meta device: nothing is allocated."""
    rest_size = (rest or rest_dtype()).itemsize
    with torch.device("meta"):
        model = InstructBlipNetwork(config)
    total = sum(p.numel() for p in model.parameters())
    lm = model.language_model
    layers = [m.weight for m in lm.modules() if isinstance(m, nn.Linear)]
    linear, rows = sum(w.numel() for w in layers), sum(w.shape[0] for w in layers)
    tied = lm.embed_tokens.weight if lm.has_lm_head and lm.lm_head is None else None  # gets a quantized copy
    copy, copy_rows = (tied.numel(), tied.shape[0]) if tied is not None else (0, 0)
    unquantized = rest_size * (total - linear)
    return {"float32": 4 * total, "bfloat16": 2 * total,
            "int8": (linear + copy) + 6 * (rows + copy_rows) + unquantized,
            "int4": (linear + copy) // 2 + 4 * (linear + copy) // INT4_GROUP + unquantized}


def auto_dtype(config: InstructBlipConfig, available: int | None = None) -> torch.dtype:
    """The dtype that fits this CPU: float32 when it fits with room for the run and either the CPU has no native
    bfloat16 or the model is small (under `SMALL` in float32); bfloat16 otherwise (`check_fits` then says whether even
    that fits)."""
    available = available_bytes() if available is None else available
    sizes = weight_bytes(config, torch.float32)
    fits = available is None or needed(sizes["float32"]) <= available
    return torch.float32 if fits and (not native_bf16() or sizes["float32"] < SMALL) else torch.bfloat16


def needed(weights: int) -> int:
    """Weights plus the room a run needs besides them."""
    return weights + max(int(weights * HEADROOM), MIN_HEADROOM)


def available_bytes() -> int | None:
    """What this process may still allocate: the least of the memory the kernel reports available, the cgroup's limit
    less its use, and the address-space limit (`ulimit -v`) less this process's size; None when none is known."""
    limits = []
    meminfo = _read_fields("/proc/meminfo")
    if "MemAvailable" in meminfo:
        limits.append(meminfo["MemAvailable"])
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            cap = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if cap != "max":
            limits.append(int(cap) - used)
    except (OSError, ValueError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        size = _read_fields("/proc/self/status").get("VmSize", 0)
        limits.append(soft - size)
    return max(min(limits), 0) if limits else None


def check_fits(config: InstructBlipConfig, mode: str, available: int | None = None,
               rest: torch.dtype | None = None) -> None:
    """ModelTooLargeError, in one line naming the GiB each way of loading needs and the flags of those that fit,
    unless `mode` (a key of `FLAGS`) fits in `available` bytes (default: `available_bytes()`); `rest`: the dtype of
    a quantized model's unquantized parts."""
    available = available_bytes() if available is None else available
    if available is None:
        return
    need = {name: needed(b) for name, b in weight_bytes(config, rest).items()}
    if need[mode] <= available:
        return
    table = ", ".join(f"{name} {need[name] / GiB:.1f} GiB" for name in need)
    fits = [FLAGS[name] for name in need if need[name] <= available]
    advice = f"use {' or '.join(fits)}" if fits else "none fits: use a machine with more memory, or a GPU"
    raise ModelTooLargeError(f"the model needs {need[mode] / GiB:.1f} GiB in {mode} and {available / GiB:.1f} GiB "
                             f"are free (needed: {table}); {advice}")


def _read_fields(path: str) -> dict[str, int]:
    """`Name: value kB` lines of a /proc file, in bytes."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[name] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    except OSError:
        pass
    return out

