"""int8 dynamic quantization of the language model (`--quantize int8`): close to float32, the same answers on the
shipped model, inference only, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hf_oracle import wide_inputs, wide_model

import instructblip
from instructblip import InstructBlipForConditionalGeneration
from instructblip.accel.quantize import Int8Linear, available

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no fbgemm int8 kernels")


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int8_linear_is_close_to_float32(rows):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(700, 300, generator=g) / 300**0.5, torch.randn(700, generator=g)
    x = torch.randn(2, rows, 300, generator=g)
    with torch.no_grad():
        ref, out = F.linear(x, w, b), Int8Linear(w, b)(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()).item() < 0.02


@pytest.mark.parametrize("family,tie", [("llama", False), ("llama", True), ("t5", False), ("t5", True)])
def test_quantized_model_stays_close(family, tie, tmp_path):
    wide_model(family, tmp_path, tie=tie)
    fp32 = InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
    q = InstructBlipForConditionalGeneration.from_pretrained(tmp_path).quantize_int8()
    lm = q.language_model
    linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears and isinstance(lm.lm_head, Int8Linear)  # every projection, the (tied) head included
    assert q.vision_model.layers[0].fc1.weight.dtype == torch.float32  # the vision side stays float32
    x = wide_inputs()
    teacher = {"decoder_input_ids": torch.randint(0, 299, (3, 5))} if family == "t5" else {}
    with torch.no_grad():
        ref = fp32(**x, **teacher).logits
        out = q(**x, **teacher).logits
        assert ((out - ref).norm() / ref.norm()).item() < 0.05
        tokens = q.generate(**x, max_new_tokens=8)
    assert tokens.shape == fp32.generate(**x, max_new_tokens=8).shape


def test_shipped_model_gives_the_same_answers():
    from PIL import Image, ImageDraw

    fp32, q = instructblip.load(device="cpu"), instructblip.load(quantize="int8")
    assert q.model.quantized == "int8"
    for colour, box in (((30, 60, 200), (8, 8, 56, 56)), ((40, 160, 40), (16, 4, 48, 60))):
        image = Image.new("RGB", (64, 64), (245, 245, 240))
        ImageDraw.Draw(image).rectangle(box, fill=colour)
        for question in ("What color is the shape?", "What shape is in the image?", "Is there a rectangle?"):
            assert q.ask(image, question) == fp32.ask(image, question)


def test_cli_quantized_answer_matches_the_api(tmp_path):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (245, 245, 240))
    ImageDraw.Draw(image).ellipse((8, 8, 56, 56), fill=(220, 200, 30))
    image.save(tmp_path / "shape.png")
    expected = instructblip.load(quantize="int8").ask(image, "What color is the shape?")
    out = subprocess.run([sys.executable, "-m", "instructblip", "ask", str(tmp_path / "shape.png"),
                          "What color is the shape?", "--quantize", "int8"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected and expected


def test_inference_only_and_errors(tmp_path):
    wide_model("llama", tmp_path)
    q = InstructBlipForConditionalGeneration.from_pretrained(tmp_path).quantize_int8()
    assert q.quantize_int8() is q  # twice is once
    with pytest.raises(ValueError, match="save the float32 model"):
        q.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    embeds = torch.randn(1, 3, 256, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        q.language_model.layers[0].attn.qkv(embeds)
    bf16 = InstructBlipForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32 inference on the CPU"):
        bf16.quantize_int8()
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        instructblip.load(tmp_path, quantize="int4")
    with pytest.raises(ValueError, match="needs float32"):
        instructblip.load(tmp_path, quantize="int8", dtype="bfloat16")
    with pytest.raises(ValueError, match="CPU only"):
        instructblip.load(tmp_path, quantize="int8", device="cuda")
