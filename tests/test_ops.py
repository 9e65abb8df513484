"""The fast linear routes of `instructblip.accel.cpu_linear` against `F.linear`, alone and inside whole models.

The tiny models of the other tests have weights below `ops.MIN_WEIGHT`, so they never take these routes; the models
here (loaded by `from_pretrained`, which puts `ops.Linear` in: `accel.optimize`) are just wide enough (256) that every
projection does: more than 16 rows go to oneDNN, decoding's few rows to the transposed product or, on some AVX-512
CPUs, to oneDNN too. The `few_rows` fixture runs a test with each choice, whatever the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hf_oracle import wide_inputs, wide_model
from torch.profiler import ProfilerActivity, profile

from instructblip import InstructBlipForConditionalGeneration
from instructblip.accel import cpu_linear as ops
from instructblip.weights.checkpoint import save_pretrained

FAMILIES = ["llama", "t5"]
EVERY = frozenset(range(1, ops.MAX_ROWS + 1))
ROUTES = {"mkl": frozenset(), "zen4": frozenset(range(6, ops.MAX_ROWS + 1)), "zen5": EVERY - {2}}  # ONEDNN_FEW_ROWS


@pytest.fixture(params=sorted(ROUTES))
def few_rows(request, monkeypatch) -> frozenset:
    """The row counts that take MKL's transposed product in this test (the others take oneDNN)."""
    monkeypatch.setattr(ops, "ONEDNN_FEW_ROWS", ROUTES[request.param])
    return EVERY - ROUTES[request.param]


def test_few_rows_route_by_cpu_and_setting(monkeypatch):
    assert ops.onednn_few_rows("auto", "AVX2", 26) == frozenset()
    assert ops.onednn_few_rows("", "AVX512", 26) == EVERY - {2}  # Zen 5
    assert ops.onednn_few_rows("auto", "AVX512", 25) == ROUTES["zen4"]  # Zen 4
    assert ops.onednn_few_rows("auto", "AVX512", 0) == ROUTES["zen4"]  # not AMD
    assert ops.onednn_few_rows(" MKL ", "AVX512", 26) == frozenset()
    assert ops.onednn_few_rows("onednn", "AVX2", 0) == EVERY
    with pytest.warns(UserWarning, match="INSTRUCTBLIP_FEW_ROWS='fast' is not a route; using auto"):
        assert ops.onednn_few_rows("fast", "AVX512", 26) == EVERY - {2}
    monkeypatch.setenv(ops.FEW_ROWS_ENV, "mkl")
    assert ops.onednn_few_rows(capability="AVX512", family=26) == frozenset()
    assert isinstance(ops.amd_cpu_family(), int)


def op_names(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("shape", [(1, 300), (2, 300), (16, 300), (17, 300), (3, 40, 300), (257, 300)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear(shape, bias, few_rows):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(500, 300, generator=g) / 300**0.5
    b = torch.randn(500, generator=g) if bias else None
    with torch.no_grad():
        ours = ops.linear(x, w, b)
        assert ours.shape == F.linear(x, w, b).shape and ours.is_contiguous()
        torch.testing.assert_close(ours, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        if len(shape) == 3:  # a strided view, and a transposed weight
            xt, wt = x.transpose(0, 1), w.t().contiguous().t()
            torch.testing.assert_close(ops.linear(xt, wt, b), F.linear(xt, wt, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2048, 1), (2048, 2), (2752, 5), (2048, 16), (512, 5), (500, 16), (4100, 3)])
def test_transposed_copy_in_blocks(shape):
    """The few-row product's (out, rows) result made (rows, out) contiguous, by blocks or plainly: the same numbers."""
    a = torch.randn(*shape)
    t = ops._transposed(a)
    assert t.is_contiguous() and torch.equal(t, a.t())
    blocked = shape[0] * shape[1] >= ops.TRANSPOSE_BLOCKED_MIN and shape[0] % ops.TRANSPOSE_BLOCK == 0
    if blocked:  # through linear, on MKL's few-row route
        x, w = torch.randn(shape[1], 64), torch.randn(shape[0], 64)
        with torch.no_grad():
            torch.testing.assert_close(ops.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("out", [500, 501])
def test_one_row_splits_the_weight_into_blocks(out, threads, monkeypatch):
    """MKL's route for one row: one GEMV per block of output rows (as many blocks as threads, at least two), when
    the blocks divide the weight evenly; otherwise the row padded to two."""
    monkeypatch.setattr(ops, "ONEDNN_FEW_ROWS", frozenset())
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(1, 1, 300, generator=g), torch.randn(out, 300, generator=g) / 300**0.5, torch.randn(out)
    r = torch.randn(1, 1, out, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            names = op_names(lambda: ops.linear(x, w, b))
            torch.testing.assert_close(ops.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ops.linear(x, w, b, residual=r), F.linear(x, w, b) + r, rtol=1e-5, atol=1e-5)
            padded = ops.linear(x[0], w.t().contiguous().t())  # a strided weight: the padded product
            torch.testing.assert_close(padded, F.linear(x[0], w), rtol=1e-5, atol=1e-5)
            assert padded.is_contiguous()
    finally:
        torch.set_num_threads(before)
    split = out % max(2, threads) == 0
    assert ("aten::bmm" in names) == split and ("aten::mm" in names) != split


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # printed by torch.backends.mkldnn.flags
def test_routes_taken_and_left(few_rows):
    x, w = torch.randn(64, 300), torch.randn(500, 300)
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in op_names(lambda: ops.linear(x, w))
        with torch.backends.mkldnn.flags(enabled=False):  # the user's switch turns the route off
            for rows in (64, 3):
                names = op_names(lambda r=rows: ops.linear(x[:r], w))
                assert "mkldnn::_linear_pointwise" not in names
            assert "aten::linear" in op_names(lambda: ops.linear(x, w))
        for rows in (1, 2, 3, 5, 16):  # few rows: MKL's transposed product or oneDNN, as ONEDNN_FEW_ROWS says
            names = op_names(lambda r=rows: ops.linear(x[:r], w))
            assert ("mkldnn::_linear_pointwise" not in names) == (rows in few_rows), rows
            assert ("aten::bmm" if rows == 1 else "aten::mm") in names or rows not in few_rows, rows
        if ops.ONEDNN_MAX_ROWS is None:  # no bound on AVX-512 CPUs
            assert "mkldnn::_linear_pointwise" in op_names(lambda: ops.linear(torch.randn(300, 300), w))
        assert ops.onednn_max_rows("AVX512") is None and ops.onednn_max_rows("AVX2") == 256
        with pytest.MonkeyPatch.context() as m:
            m.setattr(ops, "ONEDNN_MAX_ROWS", 256)  # more rows than that: MKL, on the same numbers
            m.setattr(ops, "ONEDNN_MAX_ROWS_WIDENING", 512)  # for a weight with more outputs than inputs (w here)
            narrowing = torch.randn(300, 500)
            for rows in (256, 257, 512, 513):
                names = op_names(lambda r=rows: ops.linear(torch.randn(r, 300), w))
                assert ("mkldnn::_linear_pointwise" in names) == (rows <= 512), rows
                names = op_names(lambda r=rows: ops.linear(torch.randn(r, 500), narrowing))
                assert ("mkldnn::_linear_pointwise" in names) == (rows <= 256), rows
            for big in (torch.randn(300, 300), torch.randn(600, 300)):
                torch.testing.assert_close(ops.linear(big, w), F.linear(big, w), rtol=1e-5, atol=1e-4)  # |y| ~ 17
        small = torch.randn(50, 300)  # below MIN_WEIGHT: the plain path
        assert "mkldnn::_linear_pointwise" not in op_names(lambda: ops.linear(x, small))
        assert "mkldnn::_linear_pointwise" not in op_names(lambda: ops.linear(x.double(), w.double()))


def test_gradients_stay_on_the_differentiable_path(few_rows):
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


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_routes_give_the_same_tokens(family, pack, few_rows, tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "PACK", pack and ops.HAS_ONEDNN)
    theirs = wide_model(family, tmp_path)
    ours = InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
    x = wide_inputs()
    with torch.no_grad():
        names = op_names(lambda: ours.generate(**x, max_new_tokens=12))
        assert "mkldnn::_linear_pointwise" in names  # image encoding, Q-Former and prefill took the oneDNN route
        # the few-row route hands back contiguous outputs, so decoding's attention keeps SDPA's flash kernel (T5's q
        # goes from the projection straight into SDPA, which takes the slow math path for a strided last dimension)
        assert "aten::_scaled_dot_product_attention_math" not in names
        linears = [m for m in ours.modules() if isinstance(m, ops.Linear) and m.weight.numel() >= ops.MIN_WEIGHT]
        assert all(m.packed == ops.PACK for m in linears) and linears  # a batch of 3 packs the decoder's too
        fast = ours.generate(**x, max_new_tokens=12)
        beams = ours.generate(**x, max_new_tokens=12, num_beams=3)
        feats_fast = ours.get_image_features(*list(x.values())[:3]).pooler_output
        monkeypatch.setattr(ops, "PACK", False)
        ops.unpack(ours)
        assert not any(m.packed for m in linears)
        monkeypatch.setattr(ops, "MIN_WEIGHT", 1 << 62)  # every product through F.linear
        plain = ours.generate(**x, max_new_tokens=12)
        plain_beams = ours.generate(**x, max_new_tokens=12, num_beams=3)
        feats_plain = ours.get_image_features(*list(x.values())[:3]).pooler_output
        hf = theirs.generate(**x, max_new_tokens=12, do_sample=False)
    torch.testing.assert_close(feats_fast, feats_plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast, plain) and torch.equal(beams, plain_beams)
    hf = hf[:, x["input_ids"].shape[1]:] if family == "llama" else hf[:, 1:]
    n = min(hf.shape[1], fast.shape[1])
    assert torch.equal(fast[:, :n], hf[:, :n]), (fast.tolist(), hf.tolist())


def test_pack_setting_by_cpu_and_environment(monkeypatch):
    assert ops.pack_weights("auto", "AVX2") is False
    assert ops.pack_weights("", "AVX512") is ops.HAS_ONEDNN
    assert ops.pack_weights(" OFF ", "AVX512") is False
    assert ops.pack_weights("on", "AVX2") is ops.HAS_ONEDNN
    with pytest.warns(UserWarning, match="INSTRUCTBLIP_PACK='yes' is not a setting; using auto"):
        assert ops.pack_weights("yes", "AVX2") is False
    monkeypatch.setenv(ops.PACK_ENV, "off")
    assert ops.pack_weights(capability="AVX512") is False


packing = pytest.mark.skipif(not ops.HAS_ONEDNN, reason="this torch build has no oneDNN: weights are never packed")


@pytest.fixture
def packed_layer(monkeypatch):
    """A Linear wide enough to be packed, with packing on whatever the CPU; its plain weight and bias."""
    monkeypatch.setattr(ops, "PACK", True)
    torch.manual_seed(4)
    layer = ops.Linear(300, 500)
    return layer, layer.weight.detach().clone(), layer.bias.detach().clone()


@packing
def test_packing_swaps_the_weight_in_place_and_back(packed_layer):
    layer, w, b = packed_layer
    param = layer.weight
    x = torch.randn(2, 5, 300)
    with torch.no_grad():
        out = layer(x)
    assert layer.packed and layer.weight is param and param.is_mkldnn  # same Parameter object, new contents
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    r = torch.randn(2, 5, 500)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x, residual=r), F.linear(x, w, b) + r, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(layer(x[0, 0]), F.linear(x[0, 0], w, b), rtol=1e-5, atol=1e-5)
    state = layer.state_dict()
    assert not state["weight"].is_mkldnn and torch.equal(state["weight"], w) and layer.packed  # a plain copy
    # a gradient: the weight turns plain again, and training works on the same Parameter
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    xg = x.clone().requires_grad_(True)
    layer(xg).square().sum().backward()
    assert not layer.packed and layer.weight is param and param.grad is not None
    wg = w.clone().requires_grad_(True)
    F.linear(xg.detach(), wg, b).square().sum().backward()
    torch.testing.assert_close(param.grad, wg.grad, rtol=1e-4, atol=1e-3)
    optimizer.step()
    with torch.no_grad():
        layer(x)  # packs the updated weight
    assert layer.packed
    torch.testing.assert_close(layer.state_dict()["weight"], (w - 0.1 * wg.grad).detach(), rtol=1e-5, atol=1e-5)


@packing
def test_packed_layer_converts_copies_saves_and_loads(packed_layer, tmp_path):
    layer, w, b = packed_layer
    x = torch.randn(3, 300)
    with torch.no_grad():
        layer(x)
    twin = copy.deepcopy(layer)
    assert not twin.packed and not layer.packed and torch.equal(twin.weight, w)
    with torch.no_grad():
        layer(x)
    torch.save(layer, tmp_path / "layer.pt")
    again = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert torch.equal(again.weight, w)
    with torch.no_grad():
        layer(x)
    layer.load_state_dict({"weight": w * 2, "bias": b})
    assert not layer.packed and torch.equal(layer.weight, w * 2)
    with torch.no_grad():
        layer(x)
        layer.double()  # .to() turns it plain first
    assert layer.weight.dtype == torch.float64 and not layer.packed
    with torch.no_grad():
        torch.testing.assert_close(layer(x.double()), F.linear(x.double(), w.double() * 2, b.double()))
    assert not layer.packed  # float64 stays on the plain path


@packing
@pytest.mark.parametrize("shape", [(300,), (1, 300), (2, 300), (1, 3, 300), (4, 300), (5, 300), (2, 9, 300)])
def test_packed_layer_pads_few_rows_and_adds_residuals(packed_layer, shape):
    """Fewer than MIN_PACKED_ROWS rows are padded for the packed kernel (and the padding dropped): the same numbers as
    F.linear at every row count, with and without a residual, and the input is left as it was."""
    layer, w, b = packed_layer
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g)
    r = torch.randn(*shape[:-1], 500, generator=g)
    before = x.clone()
    with torch.no_grad():
        out = layer(x)
        assert layer.packed and out.shape == (*shape[:-1], 500) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(layer(x, residual=r), F.linear(x, w, b) + r, rtol=1e-5, atol=1e-4)
    assert torch.equal(x, before)


@packing
def test_a_weight_held_by_a_graph_stays_plain_until_released(packed_layer):
    layer, w, b = packed_layer
    x = torch.randn(3, 300)
    graph = (layer.weight * 2).sum()  # the graph holds the weight: swapping it would poison its backward
    with torch.no_grad():
        out = layer(x)
    assert not layer.packed
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    graph.backward()
    assert torch.equal(layer.weight.grad, torch.full_like(w, 2.0))
    del graph
    with torch.no_grad():
        torch.testing.assert_close(layer(x), out, rtol=1e-5, atol=1e-5)
    assert layer.packed  # released: packed on the next call


@packing
def test_decoding_layers_pack_on_a_decoding_step_of_three_sequences_or_more(packed_layer, monkeypatch):
    """`for_decoding`: a decoder's layer packs itself only on a decoding step (one position per sequence) of 3 or more
    sequences, without gradients and with packing on (one or two rows, and a prompt's many rows, run faster on the
    plain routes), and from then on every call uses the packed weight; other layers pack on their first call."""
    layer, w, b = packed_layer
    assert ops.for_decoding(layer) is layer and layer.decoding
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode():  # one or two sequences, prefills (a short prompt's too: 10 rows), a lone vector
        for shape in [(300,), (1, 300), (1, 1, 300), (2, 300), (2, 1, 300), (1, 10, 300), (3, 6, 300), (1, 40, 300)]:
            x = torch.randn(shape, generator=g)
            torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
            assert not layer.packed, shape
    x = torch.randn(5, 1, 300, generator=g)
    layer(x)  # gradients enabled and a weight that requires one: a training loop's forward, left alone
    assert not layer.packed
    monkeypatch.setattr(ops, "PACK", False)
    with torch.inference_mode():
        layer(x)
        assert not layer.packed
        monkeypatch.setattr(ops, "PACK", True)
        torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-4)  # a step of 5 sequences
        assert layer.packed
        one = torch.randn(1, 300, generator=g)
        torch.testing.assert_close(layer(one), F.linear(one, w, b), rtol=1e-5, atol=1e-4)
        assert layer.packed  # stays packed
    for shape in [(3, 300), (16, 1, 300), (40, 1, 300)]:  # (N, in) and (N, 1, in) from 3 sequences, any count
        fresh = ops.for_decoding(ops.Linear(300, 500))
        with torch.no_grad():
            fresh(torch.randn(shape, generator=g))
        assert fresh.packed, shape
    fresh = ops.Linear(300, 500)
    with torch.inference_mode():
        fresh(torch.randn(1, 300))
    assert fresh.packed and not fresh.decoding  # other layers pack themselves on their first call


@packing
def test_pack_for_decoding_packs_ahead_of_the_first_step(packed_layer, monkeypatch):
    """`pack_for_decoding` (generation's call before its first step): the decoder's layers under a module packed for
    3 or more rows, only without gradients and with packing on; other layers left to their own first call."""
    layer, w, b = packed_layer
    other = ops.Linear(300, 500)
    module = torch.nn.Sequential(ops.for_decoding(layer), other)
    with torch.inference_mode():
        ops.pack_for_decoding(module, rows=2)
        assert not layer.packed
    ops.pack_for_decoding(module, rows=5)  # gradients enabled
    assert not layer.packed
    monkeypatch.setattr(ops, "PACK", False)
    with torch.inference_mode():
        ops.pack_for_decoding(module, rows=5)
        assert not layer.packed
        monkeypatch.setattr(ops, "PACK", True)
        ops.pack_for_decoding(module, rows=ops.PACK_DECODING_ROWS)
        assert layer.packed and not other.packed
        x = torch.randn(1, 300)
        torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


@packing
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_one_decodes_on_plain_weights_and_beams_pack_them(family, tmp_path, monkeypatch):
    """Greedy decoding of one sequence keeps the decoder's weights plain (one-row products on MKL's route: `bmm` over
    blocks of the weight); beam search then packs them; the tokens are the plain F.linear model's either way."""
    monkeypatch.setattr(ops, "PACK", True)
    monkeypatch.setattr(ops, "ONEDNN_FEW_ROWS", frozenset())
    wide_model(family, tmp_path)
    ours = InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
    x = {k: v[:1] for k, v in wide_inputs().items()}
    lm = ours.language_model
    decoder = [m for m in (lm.decoder if family == "t5" else lm).modules() if isinstance(m, ops.Linear)]
    decoder += [lm.lm_head] if family == "t5" else []
    if family == "t5":  # the cross-attention's keys and values are projected once per generation, from the encoder
        decoder = [m for m in decoder if all(m is not block.cross.kv for block in lm.decoder.layers)]
    assert {id(m) for m in decoder} == {id(m) for m in ours.modules() if isinstance(m, ops.Linear) and m.decoding}
    with torch.no_grad():
        names = op_names(lambda: ours.generate(**x, max_new_tokens=8))
        assert "aten::bmm" in names and not any(m.packed for m in decoder)
        assert all(m.packed for m in ours.vision_model.modules() if isinstance(m, ops.Linear)
                   and m.weight.numel() >= ops.MIN_WEIGHT)
        greedy = ours.generate(**x, max_new_tokens=8)
        beams = ours.generate(**x, max_new_tokens=8, num_beams=3)
        assert all(m.packed for m in decoder)
        again = ours.generate(**x, max_new_tokens=8)  # one row on packed weights now
        monkeypatch.setattr(ops, "PACK", False)
        ops.unpack(ours)
        monkeypatch.setattr(ops, "MIN_WEIGHT", 1 << 62)  # every product through F.linear
        plain = ours.generate(**x, max_new_tokens=8)
        plain_beams = ours.generate(**x, max_new_tokens=8, num_beams=3)
    assert torch.equal(greedy, plain) and torch.equal(again, plain) and torch.equal(beams, plain_beams)


@packing
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_model_saves_plain_weights_that_transformers_loads(family, tmp_path, monkeypatch):
    import transformers

    monkeypatch.setattr(ops, "PACK", True)
    wide_model(family, tmp_path / "hf")
    ours = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "hf")
    x = wide_inputs()
    with torch.no_grad():
        before = ours.generate(**x, max_new_tokens=6)
    assert any(m.packed for m in ours.modules() if isinstance(m, ops.Linear))
    ours.save_pretrained(tmp_path / "ours")
    assert not any(m.packed for m in ours.modules() if isinstance(m, ops.Linear))  # unpacked in place to save
    theirs = transformers.InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    reference = transformers.InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    for (name, a), (_, b) in zip(theirs.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(ours.generate(**x, max_new_tokens=6), before)  # packs again, same tokens
    packed = [m for m in ours.modules() if isinstance(m, ops.Linear) and m.packed]
    assert packed
    save_pretrained(ours, tmp_path / "direct")  # weights/ knows nothing of packing: state_dict's dense copies
    assert all(m.packed for m in packed)
    files = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "direct").iterdir())
    for name in files:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name
    with torch.no_grad():
        ours.quantize_int8()  # quantizing reads the plain weights
        assert ours.generate(**x, max_new_tokens=6).shape[0] == before.shape[0]


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_linear_adds_the_residual_on_every_route(rows, few_rows):
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(2, rows, 300, generator=g), torch.randn(500, 300, generator=g), torch.randn(500, generator=g)
    r = torch.randn(2, rows, 500, generator=g)
    expected = F.linear(x, w, b) + r
    with torch.no_grad():
        if rows * 2 not in few_rows:  # the oneDNN route fuses the addition into the product
            names = op_names(lambda: ops.linear(x, w, b, r))
            assert "mkldnn::_linear_pointwise" in names and "aten::add" not in names
        torch.testing.assert_close(ops.linear(x, w, b, r), expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ops.linear(x, w, None, r), F.linear(x, w) + r, rtol=1e-5, atol=1e-4)
        rt = r.transpose(0, 1).contiguous().transpose(0, 1)  # a strided residual
        torch.testing.assert_close(ops.linear(x, w, b, rt), expected, rtol=1e-5, atol=1e-4)
        bias_like = torch.randn(500, generator=g)  # broadcast residuals take the unfused addition
        torch.testing.assert_close(ops.linear(x, w, b, bias_like), F.linear(x, w, b) + bias_like, rtol=1e-5, atol=1e-4)
        with torch.backends.mkldnn.flags(enabled=False):
            torch.testing.assert_close(ops.linear(x, w, b, r), expected, rtol=1e-5, atol=1e-4)
    # with gradients: through F.linear and an ordinary addition, gradients reach the residual
    x.requires_grad_(True), r.requires_grad_(True)
    gx, gr = torch.autograd.grad(ops.linear(x, w, b, r).square().sum(), (x, r))
    tx, tr = torch.autograd.grad((F.linear(x, w, b) + r).square().sum(), (x, r))
    torch.testing.assert_close(gx, tx, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gr, tr, rtol=1e-4, atol=1e-3)


def test_gelu_in_place_only_without_gradients():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 100, generator=g)
    expected = F.gelu(x)
    with torch.no_grad():
        tmp = x.clone()
        out = ops.gelu(tmp)
        assert out.data_ptr() == tmp.data_ptr() and torch.equal(out, expected)  # in place
    with torch.inference_mode():
        tmp = x.clone()
        assert ops.gelu(tmp).data_ptr() == tmp.data_ptr()
        made_in_inference = x.clone()
    assert torch.equal(ops.gelu(made_in_inference), expected)  # an inference tensor outside: a new tensor, no error
    leaf = x.clone().requires_grad_(True)
    y = leaf * 1.0
    out = ops.gelu(y)
    assert out.data_ptr() != y.data_ptr() and torch.equal(y, x)  # the input is kept for the backward
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    (expected_grad,) = torch.autograd.grad(F.gelu(leaf).sum(), leaf)
    torch.testing.assert_close(grad, expected_grad)
