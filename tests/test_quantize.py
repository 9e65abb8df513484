"""int8 dynamic quantization of the language model (`--quantize int8`): close to float32, the same answers on the
shipped model, inference only, and clear errors."""

from __future__ import annotations

import copy
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
    with pytest.raises(ValueError, match="rest of the model in float32"):
        instructblip.load(tmp_path, quantize="int8", dtype="bfloat16")
    with pytest.raises(ValueError, match="rest of the model in float32"):
        InstructBlipForConditionalGeneration.from_pretrained(tmp_path, quantize="int8", dtype="auto")
    with pytest.raises(ValueError, match="CPU only"):
        instructblip.load(tmp_path, quantize="int8", device="cuda")


@pytest.mark.parametrize("family,tie,stored", [("llama", False, "bfloat16"), ("llama", True, "float32"),
                                               ("t5", False, "bfloat16"), ("t5", True, "float32")])
def test_quantizing_while_loading_equals_quantizing_after(family, tie, stored, tmp_path):
    """`from_pretrained(quantize="int8")` quantizes each layer as it is read, from bf16 or fp32 files: the same int8
    model, so the same logits and tokens, as quantizing the loaded float32 model."""
    wide_model(family, tmp_path / "theirs", tie=tie)
    directory = tmp_path / "theirs"
    if stored == "bfloat16":
        directory = tmp_path / "bf16"
        InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "theirs", dtype=torch.bfloat16).save_pretrained(
            directory)
    after = InstructBlipForConditionalGeneration.from_pretrained(directory).quantize_int8()
    during = InstructBlipForConditionalGeneration.from_pretrained(directory, quantize="int8")
    lm = during.language_model
    assert during.quantized == "int8" and not [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    assert isinstance(lm.lm_head, Int8Linear) and during.vision_model.layers[0].fc1.weight.dtype == torch.float32
    x = wide_inputs()
    teacher = {"decoder_input_ids": torch.randint(0, 299, (3, 5))} if family == "t5" else {}
    with torch.no_grad():
        assert torch.equal(during(**x, **teacher).logits, after(**x, **teacher).logits)
    assert torch.equal(during.generate(**x, max_new_tokens=6), after.generate(**x, max_new_tokens=6))


_PEAK = """
import sys, torch
from instructblip import InstructBlipForConditionalGeneration

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current size
base = status("VmRSS")
mode = sys.argv[2]
model = InstructBlipForConditionalGeneration.from_pretrained(sys.argv[1], quantize="int8" if mode == "during" else None)
if mode == "after":
    model.quantize_int8()
print(status("VmHWM") - base)
"""


def test_quantizing_while_loading_never_holds_the_float32_language_model(tmp_path):
    """Peak memory of loading a bf16 checkpoint with a 214M-parameter LLaMA (856 MB in float32), in fresh processes:
    quantizing while loading stays under the int8 layers (2 bytes per weight: fbgemm's packed weight keeps the int8
    matrix besides its packed copy) + the float32 embeddings + one float32 layer + slack; quantizing after loading
    (the float32 model first) goes over the whole float32 language model, which shows the measurement sees the
    difference."""
    from instructblip.models.config import PRESETS, InstructBlipConfig

    data = copy.deepcopy(PRESETS["vicuna-7b"])
    data["vision_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=28, patch_size=14)
    data["qformer_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    data["text_config"].update(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                               num_attention_heads=16, num_key_value_heads=16, vocab_size=4096)
    data.update(num_query_tokens=4, image_token_index=4000)
    config = InstructBlipConfig.from_dict(data)
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(config).to(torch.bfloat16)
    lm = model.language_model
    linear = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    fp32_lm = 4 * sum(p.numel() for p in lm.parameters())
    int8_linear = sum(m.weight.numel() for m in linear)
    largest = 4 * max(m.weight.numel() for m in linear)
    embeddings = 4 * lm.embed_tokens.weight.numel()
    model.save_pretrained(tmp_path)
    del model, lm, linear

    def peak(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path), mode], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    during, after = peak("during"), peak("after")
    bound = 2 * int8_linear + embeddings + largest + 120 * 2**20
    assert during < bound < fp32_lm, (during, bound, fp32_lm)
    assert after > fp32_lm, (after, fp32_lm)
