"""Shared pieces of the data and training tests: tiny checkpoints (built once per session), synthetic datasets of
coloured squares (a task a tiny model can learn: the answer depends on the image), running the CLI in a subprocess
(with a checkpoint write that pauses half-way, to be killed there)."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def one_thread():
    """Context: torch on one thread. Tiny models gain nothing from two, and on a busy 2-core machine two threads
    per process slow small ops down by orders of magnitude (OpenMP spinning)."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def scope():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return scope()


@functools.cache
def tiny_checkpoint(family: str = "t5", legacy: bool = False) -> str:
    """A complete tiny checkpoint directory (transformers-written weights, real tokenizers), made once per session.
    `legacy`: the 2023 layout, without `image_token_index` (the model prepends the image features)."""
    from tiny_checkpoint import make_full_checkpoint

    root = Path(tempfile.mkdtemp(prefix=f"ib-train-{family}-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    directory = make_full_checkpoint(root / "model", family)
    if legacy:
        config = json.loads((directory / "config.json").read_text())
        config.pop("image_token_index", None)
        config.pop("image_token_id", None)
        (directory / "config.json").write_text(json.dumps(config))
        (directory / "processor_config.json").unlink(missing_ok=True)
    return str(directory)


def color_image(color: str, seed: int, size: int = 64) -> Image.Image:
    """A noisy background with a square of `color` at a random place."""
    rng = np.random.default_rng(seed)
    array = rng.integers(90, 160, size=(size, size, 3), dtype=np.uint8)
    x, y = rng.integers(0, size // 2, size=2)
    array[y:y + size // 2, x:x + size // 2] = COLORS[color]
    return Image.fromarray(array)


def write_color_dataset(directory: Path, n: int, name: str = "colors", seed: int = 0, task: str = "vqa",
                        extra_records: list[dict] | None = None) -> Path:
    """`directory/name.jsonl` with `n` records about `directory/images/*.png`: VQA "what colour is the square"
    (answer = the colour) or captions ("a red square")."""
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    lines = []
    for i in range(n):
        color = names[(i + seed) % len(names)]
        file = images / f"{name}-{i}.png"
        if not file.exists():
            color_image(color, seed * 100_000 + i).save(file)
        if task == "vqa":
            lines.append({"image": f"images/{file.name}", "task": "vqa", "question": "What color is the square?",
                          "answers": [color, color, color]})
        else:
            lines.append({"image": f"images/{file.name}", "task": "caption", "caption": f"a {color} square"})
    lines += extra_records or []
    path = directory / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def subprocess_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # as the in-process runs (see `one_thread`): same numbers, no oversubscription
    env.update(extra)
    return env


# `instructblip train ARGS` (through the CLI's entry point) in which writing the checkpoint of step STEP pauses for
# SECONDS once half of its tensor bytes are out, and says so on stderr: a test kills the process there. The pause goes
# in through torch.save, which the checkpoint writer calls, wrapped for that one checkpoint in a file that sleeps.
PAUSED_CHECKPOINT_PROGRAM = """
import sys
import time

import torch

from instructblip.cli import main

step, seconds, argv = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
real_save = torch.save


class PausingFile:
    def __init__(self, f, after_bytes):
        self.f, self.after, self.written, self.slept = f, after_bytes, 0, False

    def write(self, data):
        n = self.f.write(data)
        self.written += n
        if not self.slept and self.written >= self.after:
            self.slept = True
            self.f.flush()
            print(f"[test hook] checkpoint write paused for {seconds}s", file=sys.stderr, flush=True)
            time.sleep(seconds)
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)


def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("step") == step and "trainable" in obj:
        size = sum(t.numel() * t.element_size() for t in obj["trainable"].values())
        f = PausingFile(f, size // 2)
    return real_save(obj, f, *args, **kwargs)


torch.save = save
sys.exit(main(["train", *argv]))
"""


def paused_checkpoint_command(step: int, seconds: float, *args: str) -> list[str]:
    """The command line of `instructblip train ARGS` whose checkpoint of `step` stops half-written for `seconds`."""
    return [sys.executable, "-c", PAUSED_CHECKPOINT_PROGRAM, str(step), str(seconds), *args]


def run(command: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result


def trained_state(output_dir: Path) -> dict:
    """The trained weights of the newest checkpoint of a run."""
    from instructblip.training.checkpointing import checkpoint_dirs, load_checkpoint

    return load_checkpoint(checkpoint_dirs(str(output_dir))[-1][1])["trainable"]


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
