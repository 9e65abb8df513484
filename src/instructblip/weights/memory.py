"""Will a model fit? The memory a checkpoint needs per way of loading it, against what this process may still use,
checked before anything is allocated (a 7B model in float32 needs 32 GB: better one clear line than the allocator's
failure twenty seconds in).
"""

from __future__ import annotations

import resource

import torch
from torch import nn

from instructblip.models.config import InstructBlipConfig
from instructblip.models.instructblip import InstructBlipNetwork

GiB = 2**30
HEADROOM = 0.10  # activations, the KV cache, the allocator's slack: on top of the weights
MIN_HEADROOM = 256 * 2**20
FLAGS = {"float32": "--dtype float32", "bfloat16": "--dtype bfloat16", "int8": "--quantize int8"}  # per option


class ModelTooLargeError(ValueError):
    """The model does not fit in the memory this process may use, in the way it was asked to load."""


def weight_bytes(config: InstructBlipConfig) -> dict[str, int]:
    """Bytes of the weights per way of loading: "float32", "bfloat16", and "int8" (the language model's linear layers
    in int8 at two bytes a weight, fbgemm's packed copy and its int8 matrix; the rest in float32). Counted on the
    meta device: nothing is allocated."""
    with torch.device("meta"):
        model = InstructBlipNetwork(config)
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.language_model.modules() if isinstance(m, nn.Linear))
    return {"float32": 4 * total, "bfloat16": 2 * total, "int8": 2 * linear + 4 * (total - linear)}


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


def check_fits(config: InstructBlipConfig, mode: str, available: int | None = None) -> None:
    """ModelTooLargeError, in one line naming the GiB each way of loading needs and the flags of those that fit,
    unless `mode` ("float32", "bfloat16" or "int8") fits in `available` bytes (default: `available_bytes()`)."""
    available = available_bytes() if available is None else available
    if available is None:
        return
    need = {name: needed(b) for name, b in weight_bytes(config).items()}
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

