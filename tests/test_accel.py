"""`instructblip.accel.optimize`: the fast CPU layers put into a loaded model, kept out of the model files.

The model files build plain `nn.Linear` / `nn.GELU` layers; `from_pretrained` swaps them (CPU, float32) for
`cpu_linear.Linear` / `GELU` with the same parameters and keys, and marks the decoder's layers, which then pack their
weights on their own first decoding step of 3+ sequences, with no call from generation. The routes themselves are
tested in test_ops.py.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_oracle import wide_inputs, wide_model

from instructblip import InstructBlipForConditionalGeneration, accel
from instructblip.accel import cpu_linear as ops
from instructblip.accel.apply import TiedHead
from instructblip.generation import decode
from instructblip.models.config import InstructBlipConfig

FAMILIES = ["llama", "t5"]
MODELS = Path(__file__).resolve().parents[1] / "src" / "instructblip" / "models"
packing = pytest.mark.skipif(not ops.HAS_ONEDNN, reason="this torch build has no oneDNN: weights are never packed")


@pytest.fixture(scope="module", params=FAMILIES)
def wide(request, tmp_path_factory) -> tuple[str, Path]:
    directory = tmp_path_factory.mktemp(f"wide-{request.param}")
    wide_model(request.param, directory)
    return request.param, directory


def linears(model) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def decoding_layers(lm) -> list[ops.Linear]:
    return [m for m in lm.modules() if isinstance(m, ops.Linear) and m.decoding]


def test_no_model_file_imports_accel():
    """models/ is plain PyTorch: no import of `instructblip.accel`, no call of its decoding marks."""
    files = sorted(MODELS.glob("*.py"))
    assert files
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("instructblip.accel") for n in names), (path.name, names)
            assert not (isinstance(node, ast.ImportFrom) and node.level and "accel" in (node.module or "")), path.name
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not called & {"for_decoding", "pack_for_decoding", "unpack"}, path.name


@pytest.mark.parametrize("family", FAMILIES)
def test_models_built_directly_are_plain_until_optimized(family, tmp_path):
    wide_model(family, tmp_path)
    model = InstructBlipForConditionalGeneration(InstructBlipConfig.from_json_file(tmp_path / "config.json"))
    assert linears(model) and all(type(m) is torch.nn.Linear for m in linears(model))
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    assert accel.optimize(model) is model
    lm = model.language_model
    # every one, the projection and LM head included; a tied head (5.x T5 configs say tied) becomes a TiedHead over
    # the embedding matrix, outside the state dict
    routed = (ops.Linear, TiedHead)
    assert all(type(m) in routed for m in linears(model))
    if family == "t5":
        assert isinstance(lm.lm_head, TiedHead) and lm.lm_head.weight is lm.embed_tokens.weight
    assert all(p is params[name] for name, p in model.named_parameters())  # the same Parameter objects
    assert list(model.state_dict()) == keys
    gelus = [b.act for b in model.vision_model.layers]
    gelus += [f.act for layer in model.qformer.layers for f in (layer.query_ffn, layer.text_ffn)]
    assert gelus and all(type(g) is ops.GELU for g in gelus)
    assert [m for m in model.modules() if isinstance(m, torch.nn.GELU)] == gelus  # no other GELU runs in place
    if family == "llama":
        expected = linears(lm)  # the lm_head among them
    else:
        expected = linears(lm.decoder) + ([lm.lm_head] if lm.lm_head is not None else [])
        expected = [m for m in expected if all(m is not block.cross.kv for block in lm.decoder.layers)]
    assert {id(m) for m in decoding_layers(model)} == {id(m) for m in expected}
    accel.optimize(model)  # again: nothing more
    assert list(model.state_dict()) == keys and all(type(m) in routed for m in linears(model))


def test_from_pretrained_optimizes_cpu_float32_models_only(wide):
    family, directory = wide
    fast = InstructBlipForConditionalGeneration.from_pretrained(directory)
    assert all(type(m) is ops.Linear for m in linears(fast)) and decoding_layers(fast)
    plain = InstructBlipForConditionalGeneration.from_pretrained(directory, optimize=False)
    assert all(type(m) is torch.nn.Linear for m in linears(plain))
    assert list(fast.state_dict()) == list(plain.state_dict())
    bf16 = InstructBlipForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16)
    assert all(type(m) is torch.nn.Linear for m in linears(bf16))  # the routes are float32 CPU ones
    assert accel.optimize(bf16) is bf16 and all(type(m) is torch.nn.Linear for m in linears(bf16))


def test_optimized_model_gives_the_plain_models_logits(wide):
    family, directory = wide
    fast = InstructBlipForConditionalGeneration.from_pretrained(directory)
    plain = InstructBlipForConditionalGeneration.from_pretrained(directory, optimize=False)
    x = wide_inputs()
    teacher = {"decoder_input_ids": torch.randint(0, 299, (3, 5), generator=torch.Generator().manual_seed(1))}
    teacher = teacher if family == "t5" else {}
    with torch.no_grad():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ours = fast(**x, **teacher)
        names = {e.key for e in prof.key_averages()}
        theirs = plain(**x, **teacher)
        again = fast(**x, **teacher)  # packed weights by now (AVX-512 CPUs or INSTRUCTBLIP_PACK=on)
    if ops.HAS_ONEDNN:
        assert "mkldnn::_linear_pointwise" in names  # the fast routes ran
    for a in (ours, again):
        torch.testing.assert_close(a.logits, theirs.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.vision_outputs.last_hidden_state, theirs.vision_outputs.last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        tokens = fast.generate(**x, max_new_tokens=8)
        assert torch.equal(tokens, plain.generate(**x, max_new_tokens=8))


@packing
@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_packs_itself_on_a_step_of_three_sequences(family, tmp_path, monkeypatch):
    """The language model called directly, no generation involved: a prefill (10 rows of one sequence) and one-row
    steps leave the decoder's weights plain; a step of 5 sequences packs them; the encoder packs on its first call."""
    monkeypatch.setattr(ops, "PACK", True)
    wide_model(family, tmp_path)
    model = InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
    lm = model.language_model
    layers = decoding_layers(lm)
    D = 256
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        if family == "llama":
            def step(batch: int, length: int):
                return lm.logits(lm(torch.randn(batch, length, D, generator=g))[:, -1])
        else:
            memory = lm.encode(torch.randn(1, 10, D, generator=g))
            assert all(m.packed for m in linears(lm.encoder))  # an encoder's layers pack on their first call

            def step(batch: int, length: int):
                ids = torch.randint(0, 299, (batch, length), generator=g)
                return lm.logits(lm.decode(ids, memory.expand(batch, -1, -1))[:, -1])
        for batch, length in [(1, 10), (1, 1), (2, 1), (1, 1)]:
            step(batch, length)
            assert not any(m.packed for m in layers), (batch, length)
        step(5, 1)
        assert all(m.packed for m in layers)
        step(1, 1)
        assert all(m.packed for m in layers)  # and they stay packed


@packing
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_layouts_without_pack_for_decoding(family, tmp_path, monkeypatch):
    """Generation never calls accel: the decoding layers settle their own layout, greedy batch 1 on plain weights,
    5 beams and batch 8 packed; the tokens are the plain model's."""
    monkeypatch.setattr(ops, "PACK", True)
    assert not hasattr(decode, "pack_for_decoding")
    wide_model(family, tmp_path)
    plain = InstructBlipForConditionalGeneration.from_pretrained(tmp_path, optimize=False)
    base = wide_inputs()
    one = {k: v[:1] for k, v in base.items()}
    eight = {k: torch.cat([v, v, v])[:8] for k, v in base.items()}
    for inputs, beams, packed in [(one, 1, False), (one, 5, True), (eight, 1, True)]:
        model = InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
        layers = decoding_layers(model)
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=6, num_beams=beams)
            assert torch.equal(tokens, plain.generate(**inputs, max_new_tokens=6, num_beams=beams))
        assert layers and all(m.packed == packed for m in layers), (len(inputs["input_ids"]), beams)


def test_in_place_gelu_layer():
    act, tanh = ops.GELU(), ops.GELU(approximate="tanh")
    x = torch.randn(4, 100)
    expected = torch.nn.functional.gelu(x)
    with torch.no_grad():
        tmp = x.clone()
        assert act(tmp).data_ptr() == tmp.data_ptr() and torch.equal(tmp, expected)
        tmp = x.clone()
        out = tanh(tmp)  # the tanh form keeps nn.GELU's own forward
        assert out.data_ptr() != tmp.data_ptr() and torch.equal(out, torch.nn.functional.gelu(x, approximate="tanh"))
    leaf = x.clone().requires_grad_(True)
    assert torch.equal(act(leaf), expected) and torch.equal(leaf.detach(), x)  # a gradient: a new tensor


PROBE = """
import builtins, json, torch
opened, probed = [], []
real_open, capability = builtins.open, torch.backends.cpu.get_cpu_capability
builtins.open = lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k)
torch.backends.cpu.get_cpu_capability = lambda: probed.append(1) or capability()
import instructblip
from instructblip.accel import cpu_linear as ops
from instructblip.accel.apply import TiedHead
at_import = [f for f in opened if "cpuinfo" in f] + probed
x, w = torch.randn(2, 300), torch.randn(500, 300)
with torch.no_grad():
    ops.linear(x, w)  # the first product settles the tables
print(json.dumps({"at_import": at_import, "probed": bool(probed), "few_rows": sorted(ops.ONEDNN_FEW_ROWS),
                  "pack": ops.PACK, "max_rows": ops.ONEDNN_MAX_ROWS}))
"""


@pytest.mark.parametrize("few_rows,pack", [("onednn", "off"), ("mkl", "on")])
def test_route_tables_are_settled_on_first_use_from_the_environment(few_rows, pack):
    """Importing probes nothing (no /proc/cpuinfo, no CPU capability); the first product settles the tables, with
    INSTRUCTBLIP_FEW_ROWS and INSTRUCTBLIP_PACK overriding the CPU's choice."""
    env = {**os.environ, "INSTRUCTBLIP_FEW_ROWS": few_rows, "INSTRUCTBLIP_PACK": pack, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["at_import"] == [] and report["probed"]
    assert report["few_rows"] == (list(range(1, ops.MAX_ROWS + 1)) if few_rows == "onednn" else [])
    assert report["pack"] is (pack == "on" and ops.HAS_ONEDNN)
    assert report["max_rows"] == ops.onednn_max_rows()
