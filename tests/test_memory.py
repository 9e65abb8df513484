"""Will a model fit: the memory each way of loading needs, checked before anything is allocated, and one line with
exit status 2 when it cannot fit (`weights.memory`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from instructblip.models.config import InstructBlipConfig
from instructblip.weights.memory import GiB, ModelTooLargeError, check_fits, needed, weight_bytes


def test_weight_bytes_of_the_official_shapes():
    vicuna = weight_bytes(InstructBlipConfig.from_name("vicuna-7b"))
    total = vicuna["float32"] // 4
    assert 7.90e9 < total < 7.93e9  # 7.914 B parameters (docs/checkpoints.md)
    assert vicuna["bfloat16"] == 2 * total
    assert vicuna["int4"] < vicuna["int8"] < vicuna["bfloat16"]  # the rest in bfloat16 by default where native
    assert 8.5 * GiB < weight_bytes(InstructBlipConfig.from_name("vicuna-7b"), torch.bfloat16)["int8"] < 8.7 * GiB
    assert 5.6 * GiB < weight_bytes(InstructBlipConfig.from_name("vicuna-7b"), torch.bfloat16)["int4"] < 5.8 * GiB
    assert weight_bytes(InstructBlipConfig.from_name("vicuna-7b"), torch.float32)["int8"] > 10 * GiB  # ViT-g fp32
    t5 = weight_bytes(InstructBlipConfig.from_name("flan-t5-xl"))
    assert 4.0e9 < t5["float32"] // 4 < 4.05e9


def test_auto_dtype_fits_the_machine(monkeypatch):
    """float32 where it fits and bfloat16 is not native (or the model is small); bfloat16 where it is native for a
    large model, or where float32 does not fit."""
    from instructblip.weights import memory

    vicuna, tiny = InstructBlipConfig.from_name("vicuna-7b"), _tiny_config()
    for native in (False, True):
        monkeypatch.setattr(memory, "native_bf16", lambda native=native: native)
        assert memory.auto_dtype(vicuna, available=20 * GiB) == torch.bfloat16  # float32 does not fit
        assert memory.auto_dtype(vicuna, available=64 * GiB) == (torch.bfloat16 if native else torch.float32)
        assert memory.auto_dtype(tiny, available=64 * GiB) == torch.float32  # small: float32 either way
        assert memory.rest_dtype() == (torch.bfloat16 if native else torch.float32)


def _tiny_config() -> InstructBlipConfig:
    return InstructBlipConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=28, patch_size=14),
                              qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2, vocab_size=100),
                              text_config=dict(model_type="llama", vocab_size=100, hidden_size=32,
                                               intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                              num_query_tokens=4)


def test_check_fits_names_what_each_way_needs_and_what_fits():
    config = InstructBlipConfig.from_name("vicuna-7b")
    need = {name: needed(b) for name, b in weight_bytes(config).items()}
    check_fits(config, "float32", available=need["float32"])  # fits exactly: no error
    with pytest.raises(ModelTooLargeError) as e:
        check_fits(config, "float32", available=need["bfloat16"] + GiB)
    message = str(e.value)
    assert "\n" not in message and "float32" in message and "use --dtype bfloat16" in message
    assert message.endswith("use --dtype bfloat16 or --quantize int8 or --quantize int4")
    with pytest.raises(ModelTooLargeError) as e:
        check_fits(config, "bfloat16", available=need["int8"])
    assert str(e.value).endswith("use --quantize int8 or --quantize int4")
    with pytest.raises(ModelTooLargeError, match="none fits"):
        check_fits(config, "bfloat16", available=GiB)


_BUDGET = """
import resource, sys
from instructblip.cli import main

with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
budget = size + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (budget, resource.RLIM_INFINITY))
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("room,flags,mode,expected", [
    (None, [], "bfloat16", "none fits: use a machine with more memory, or a GPU"),  # auto asks for bfloat16
    ("bfloat16", ["--dtype", "float32"], "float32", "use --dtype bfloat16 or --quantize int8 or --quantize int4"),
    ("int4", ["--quantize", "int8"], "int8", "use --quantize int4")])
def test_a_model_that_cannot_fit_gives_one_line_and_status_2(tmp_path, room, flags, mode, expected):
    """Under an imposed address-space budget (`ulimit -v`), `instructblip ask` with a Vicuna-7B-shaped checkpoint
    says in one line what each way of loading needs, before reading any weight (the directory holds none)."""
    config = InstructBlipConfig.from_name("vicuna-7b")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    budget = GiB if room is None else needed(weight_bytes(config)[room]) + GiB // 4
    out = subprocess.run([sys.executable, "-c", _BUDGET, str(budget), "ask", str(tmp_path / "red.png"), "What?",
                          "--model", str(tmp_path), "--device", "cpu", *flags], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr and not out.stdout
    assert "needs" in lines[0] and f"GiB in {mode} " in lines[0] and lines[0].endswith(expected), lines[0]
