"""The CUDA paths: bfloat16 by default, the same entry points as on the CPU, parity with transformers on the GPU.

Marked `gpu`; they run wherever CUDA is present (`pytest -m gpu`) and are skipped elsewhere. README, "GPU", says
where they were last run.
"""

from __future__ import annotations

import pytest
import torch
from hf_oracle import hf_model, wide_inputs, wide_model
from test_generation import assert_same_tokens, hf_new_tokens
from test_model_parity import make_inputs

import instructblip
from instructblip import InstructBlipForConditionalGeneration

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_load_defaults_to_bfloat16_on_cuda_and_answers_as_on_the_cpu():
    from PIL import Image, ImageDraw

    gpu, cpu = instructblip.load(), instructblip.load(device="cpu", dtype="float32")
    assert gpu.model.device.type == "cuda"
    assert gpu.model.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    image = Image.new("RGB", (64, 64), (245, 245, 240))
    ImageDraw.Draw(image).rectangle((8, 8, 56, 56), fill=(30, 60, 200))
    for question in ("What color is the shape?", "What shape is in the image?"):
        assert gpu.ask(image, question) == cpu.ask(image, question)
    assert gpu.caption(image)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_logits_and_greedy_tokens_match_transformers_on_cuda(family, tmp_path):
    """Same weights, both on the GPU in float32 (TF32 off): logits within 1e-4, greedy tokens equal; in bfloat16
    the logits within bfloat16's rounding."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    theirs = hf_model(family).to("cuda").eval()
    theirs.save_pretrained(tmp_path)
    ours = InstructBlipForConditionalGeneration.from_pretrained(tmp_path, device="cuda", dtype=torch.float32)
    x = {k: v.to("cuda") for k, v in make_inputs(family).items()}
    valid = x["attention_mask"].bool() if family == "llama" else slice(None)  # padded positions aside
    with torch.no_grad():
        ref, out = theirs(**x).logits[valid], ours(**x).logits[valid]
    assert (out - ref).abs().max().item() < 1e-4
    x.pop("decoder_input_ids", None)
    eos = [theirs.config.text_config.eos_token_id]
    assert_same_tokens(ours.generate(**x, max_new_tokens=8).cpu(),
                       hf_new_tokens(theirs, family, x, max_new_tokens=8, do_sample=False).cpu(), eos)
    bf16 = InstructBlipForConditionalGeneration.from_pretrained(tmp_path, device="cuda", dtype=torch.bfloat16)
    x = {k: v.to("cuda") for k, v in make_inputs(family).items()}
    with torch.no_grad():
        rel = ((bf16(**x).logits[valid].float() - ref).norm() / ref.norm()).item()
    assert rel < 0.1


def test_wide_model_generates_the_same_on_cuda_and_cpu(tmp_path):
    wide_model("llama", tmp_path)
    cpu = InstructBlipForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    gpu = InstructBlipForConditionalGeneration.from_pretrained(tmp_path, device="cuda", dtype=torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    x = wide_inputs()
    with torch.no_grad():
        a = cpu.generate(**x, max_new_tokens=6)
        b = gpu.generate(**{k: v.to("cuda") for k, v in x.items()}, max_new_tokens=6)
    assert torch.equal(a, b.cpu())
