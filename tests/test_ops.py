"""The fast linear routes of `instructblip.ops` against `F.linear`, alone and inside whole models.

The tiny models of the other tests have weights below `ops.MIN_WEIGHT`, so they never take these routes; the models
here are just wide enough (256) that every projection does: more than 16 rows go to oneDNN, decoding's few rows to
the transposed product.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_oracle import randomize
from torch.profiler import ProfilerActivity, profile

from instructblip import InstructBlipForConditionalGeneration, ops

FAMILIES = ["llama", "t5"]
EOS = {"llama": 2, "t5": 1}
IMAGE_TOKEN = 299
QUERIES = 4


def op_names(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("shape", [(1, 300), (2, 300), (16, 300), (17, 300), (3, 40, 300), (257, 300)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(500, 300, generator=g) / 300**0.5
    b = torch.randn(500, generator=g) if bias else None
    with torch.no_grad():
        ours = ops.linear(x, w, b)
        assert ours.shape == F.linear(x, w, b).shape
        torch.testing.assert_close(ours, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        if len(shape) == 3:  # a strided view, and a transposed weight
            xt, wt = x.transpose(0, 1), w.t().contiguous().t()
            torch.testing.assert_close(ops.linear(xt, wt, b), F.linear(xt, wt, b), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # printed by torch.backends.mkldnn.flags
def test_routes_taken_and_left():
    x, w = torch.randn(64, 300), torch.randn(500, 300)
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in op_names(lambda: ops.linear(x, w))
        with torch.backends.mkldnn.flags(enabled=False):  # the user's switch turns the route off
            names = op_names(lambda: ops.linear(x, w))
            assert "mkldnn::_linear_pointwise" not in names and "aten::linear" in names
        assert "mkldnn::_linear_pointwise" not in op_names(lambda: ops.linear(x[:3], w))  # few rows: mm
        small = torch.randn(50, 300)  # below MIN_WEIGHT: the plain path
        assert "mkldnn::_linear_pointwise" not in op_names(lambda: ops.linear(x, small))
        assert "mkldnn::_linear_pointwise" not in op_names(lambda: ops.linear(x.double(), w.double()))


def test_gradients_stay_on_the_differentiable_path():
    """oneDNN's op has no backward: with a gradient to compute, the product goes through F.linear."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(500, 300, generator=g, requires_grad=True)
    b = torch.randn(500, generator=g, requires_grad=True)
    for rows in (1, 5, 64):
        x = torch.randn(rows, 300, generator=g, requires_grad=True)
        assert "mkldnn::_linear_pointwise" not in op_names(lambda x=x: ops.linear(x, w, b))
        ours = torch.autograd.grad(ops.linear(x, w, b).square().sum(), (x, w, b))
        theirs = torch.autograd.grad(F.linear(x, w, b).square().sum(), (x, w, b))
        for a, t in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-3)
    frozen = torch.randn(64, 300, generator=g)  # frozen weight and input: no gradient needed, the fast route
    assert "mkldnn::_linear_pointwise" in op_names(lambda: ops.linear(frozen, w.detach()))


def wide_model(family: str, directory):
    """A transformers model with every projection at least MIN_WEIGHT elements, saved to `directory`."""
    import transformers

    vision = transformers.InstructBlipVisionConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=64, patch_size=16)  # 17 rows
    qformer = transformers.InstructBlipQFormerConfig(vocab_size=300, hidden_size=256, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=512,
                                                     cross_attention_frequency=1, encoder_hidden_size=256,
                                                     max_position_embeddings=64)
    if family == "llama":
        text = transformers.LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    else:
        text = transformers.T5Config(vocab_size=300, d_model=256, d_kv=64, d_ff=512, num_layers=2,
                                     num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                                     dense_act_fn="gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0)
    config = transformers.InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                             text_config=text.to_dict(), num_query_tokens=QUERIES,
                                             image_token_index=IMAGE_TOKEN)
    torch.manual_seed(0)
    theirs = transformers.InstructBlipForConditionalGeneration(config)
    if family == "t5":
        head = theirs.language_model.lm_head
        head.weight = torch.nn.Parameter(torch.empty_like(head.weight))
    theirs = randomize(theirs).eval()
    with torch.no_grad():  # randomize's 0.2 spread is for width 32; keep the wide model's activations in range
        for name, p in theirs.named_parameters():
            if p.dim() == 2 and p.shape[1] > 32 and not any(k in name for k in ("embed", "shared", "query_tokens")):
                p.mul_(32 / p.shape[1])
    theirs.save_pretrained(directory)
    return theirs


def inputs(family: str) -> dict:
    g = torch.Generator().manual_seed(3)
    B, L = 3, 6
    ids = torch.randint(3, IMAGE_TOKEN, (B, L), generator=g)
    ids = torch.cat([torch.full((B, QUERIES), IMAGE_TOKEN), ids], 1)
    return dict(pixel_values=torch.randn(B, 3, 64, 64, generator=g),
                qformer_input_ids=torch.randint(1, 300, (B, 6), generator=g),
                qformer_attention_mask=torch.ones(B, 6, dtype=torch.long),
                input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_routes_give_the_same_tokens(family, tmp_path, monkeypatch):
    theirs = wide_model(family, tmp_path)
    ours = InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
    x = inputs(family)
    with torch.no_grad():
        names = op_names(lambda: ours.generate(**x, max_new_tokens=12))
        assert "mkldnn::_linear_pointwise" in names  # image encoding, Q-Former and prefill took the oneDNN route
        fast = ours.generate(**x, max_new_tokens=12)
        feats_fast = ours.get_image_features(*list(x.values())[:3]).pooler_output
        monkeypatch.setattr(ops, "MIN_WEIGHT", 1 << 62)  # every product through F.linear
        plain = ours.generate(**x, max_new_tokens=12)
        feats_plain = ours.get_image_features(*list(x.values())[:3]).pooler_output
        hf = theirs.generate(**x, max_new_tokens=12, do_sample=False)
    torch.testing.assert_close(feats_fast, feats_plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast, plain)
    hf = hf[:, x["input_ids"].shape[1]:] if family == "llama" else hf[:, 1:]
    n = min(hf.shape[1], fast.shape[1])
    assert torch.equal(fast[:, :n], hf[:, :n]), (fast.tolist(), hf.tolist())
