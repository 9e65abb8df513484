"""Checkpoints of a training run: `output_dir/checkpoints/step-NNNNNNNN/state.pt`, written atomically, the newest
`keep_checkpoints` kept; what a checkpoint must match to be resumed (the data fingerprint); and the RNG states of a
process as plain values.

A checkpoint (built by `loop.py`) holds the trained weights, the optimizer and loss-scaler state, the step, the data
position and the RNG states of every rank, so that `resume: latest` continues exactly where the run stopped.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import sys

import numpy as np
import torch

from instructblip.training.config import TrainConfig

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "state.pt"


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


def save_checkpoint(state: dict, output_dir: str, step: int, keep: int) -> str:
    """Write `state` to output_dir/checkpoints/step-NNNNNNNN/state.pt atomically (temporary directory, fsync, rename)
    and delete all but the newest `keep` checkpoints. A crash at any point leaves the previous checkpoints intact."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, CHECKPOINT_FILE), "wb") as f:
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


def resume_path(config: TrainConfig, is_main: bool) -> str | None:
    """The checkpoint to continue from: `resume: latest` (the newest in output_dir; a fresh start if there is none) or
    a checkpoint directory. A fresh run refuses an output_dir that holds another run's checkpoints."""
    if config.resume == "latest":
        found = checkpoint_dirs(config.output_dir)
        if not found and is_main:
            print(f"resume: no checkpoint in {config.output_dir}; starting from the beginning", file=sys.stderr)
        return found[-1][1] if found else None
    if config.resume:
        if not os.path.isfile(os.path.join(config.resume, CHECKPOINT_FILE)) and not os.path.isfile(config.resume):
            raise FileNotFoundError(f"resume: no checkpoint at {config.resume}")
        return config.resume
    if checkpoint_dirs(config.output_dir):
        raise ValueError(f"{config.output_dir} already holds checkpoints of a run; pass --resume to continue it, or "
                         "choose another output_dir")
    return None


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
