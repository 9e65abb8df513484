"""Will a model fit: the memory each way of loading needs, checked before anything is allocated, and one line with
exit status 2 when it cannot fit (`weights.memory`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from instructblip.models.config import InstructBlipConfig
from instructblip.weights.memory import GiB, ModelTooLargeError, check_fits, needed, weight_bytes


def test_weight_bytes_of_the_official_shapes():
    vicuna = weight_bytes(InstructBlipConfig.from_name("vicuna-7b"))
    total = vicuna["float32"] // 4
    assert 7.90e9 < total < 7.93e9  # 7.914 B parameters (docs/checkpoints.md)
    assert vicuna["bfloat16"] == 2 * total
    assert vicuna["bfloat16"] < vicuna["int8"] < vicuna["float32"]  # fbgemm's int8: 2 bytes a weight, the rest fp32
    t5 = weight_bytes(InstructBlipConfig.from_name("flan-t5-xl"))
    assert 4.0e9 < t5["float32"] // 4 < 4.05e9


def test_check_fits_names_what_each_way_needs_and_what_fits():
    config = InstructBlipConfig.from_name("vicuna-7b")
    need = {name: needed(b) for name, b in weight_bytes(config).items()}
    check_fits(config, "float32", available=need["float32"])  # fits exactly: no error
    with pytest.raises(ModelTooLargeError) as e:
        check_fits(config, "float32", available=need["bfloat16"] + GiB)
    message = str(e.value)
    assert "\n" not in message and "float32" in message and "use --dtype bfloat16" in message
    assert "--quantize int8" not in message.split(";")[-1]
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


@pytest.mark.parametrize("room,expected", [(None, "none fits"), ("bfloat16", "use --dtype bfloat16")])
def test_a_model_that_cannot_fit_gives_one_line_and_status_2(tmp_path, room, expected):
    """Under an imposed address-space budget (`ulimit -v`), `instructblip ask` with a Vicuna-7B-shaped checkpoint
    says in one line what each way of loading needs, before reading any weight (the directory holds none)."""
    config = InstructBlipConfig.from_name("vicuna-7b")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    budget = GiB if room is None else needed(weight_bytes(config)[room]) + GiB // 2
    out = subprocess.run([sys.executable, "-c", _BUDGET, str(budget), "ask", str(tmp_path / "red.png"), "What?",
                          "--model", str(tmp_path), "--device", "cpu"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr and not out.stdout
    assert "needs" in lines[0] and "GiB in float32" in lines[0] and expected in lines[0]
