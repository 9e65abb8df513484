"""Generation, streaming and vocabulary ranking against transformers 5.23 on the tiny random models of both families.

transformers returns prompt + new tokens (decoder-only) or [start] + new tokens (T5); we return the new tokens only,
so its output is sliced before comparing. Two transformers quirks the comparisons allow for:
- its beam search fills finished rows with eos instead of pad when pad_token_id is 0 (`pad or eos` on a tensor 0),
  so tokens after a row's first eos are compared only on our side (they must be pad);
- its T5 cache is sized for `num_layers` encoder layers and breaks when the decoder is deeper (the tiny T5 has 2
  encoder and 3 decoder layers), so the T5 oracle runs with use_cache=False.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch
from hf_oracle import IMAGE_TOKEN, NUM_QUERY_TOKENS, hf_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from instructblip import InstructBlipForConditionalGeneration
from instructblip.generation import (
    ANSWER,
    CAPTION,
    Decoding,
    GenerationConfig,
    default_eos_ids,
    generate,
    incremental_text,
    prepare_prompt,
    rank,
    stream,
)
from instructblip.generation.beam import _topk_over_beams
from instructblip.generation.config import settle
from instructblip.generation.logits import apply_repetition_penalty, top_k_filter, top_p_filter, warp
from instructblip.models.config import InstructBlipConfig
from instructblip.models.t5 import T5

FAMILIES = ["llama", "t5"]
EOS = {"llama": 2, "t5": 1}
EXTRA_EOS = {"llama": 69, "t5": 50}  # frequent tokens of the random models: as eos, beams finish at various steps
PAD = 0
MIN_GAP = 1e-3  # greedy comparisons need the top-2 logits this far apart at every step


# ---------------------------------------------------------------------------------------------------------------------
# models and inputs


@pytest.fixture(scope="module")
def pairs(hf_checkpoints):
    """{family: (transformers model, our model)}, the same random weights."""
    return {f: (hf_checkpoints[f][0], InstructBlipForConditionalGeneration.from_pretrained(hf_checkpoints[f][1]))
            for f in FAMILIES}


def make_inputs(family: str, seed: int = 5, lengths=(7, 4, 6)) -> dict:
    """A batch with prompts of different lengths: left-padded for LLaMA, right-padded for T5, image tokens first."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    qformer_ids = torch.randint(1, 64, (B, 6), generator=g)
    qformer_mask = torch.ones(B, 6, dtype=torch.long)
    qformer_mask[min(1, B - 1), 3:] = 0  # a padded instruction
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lengths):
        span = slice(L - n, L) if family == "llama" else slice(0, n)
        ids[b, span] = torch.randint(3, 90, (n,), generator=g)
        mask[b, span] = 1
    ids = torch.cat([torch.full((B, NUM_QUERY_TOKENS), IMAGE_TOKEN), ids], 1)  # (B, Q + L)
    mask = torch.cat([torch.ones(B, NUM_QUERY_TOKENS, dtype=torch.long), mask], 1)
    return dict(pixel_values=torch.randn(B, 3, 30, 30, generator=g), qformer_input_ids=qformer_ids,
                qformer_attention_mask=qformer_mask, input_ids=ids, attention_mask=mask)


def hf_new_tokens(theirs, family: str, inputs: dict, **kwargs) -> torch.Tensor:
    """transformers' generate, without the prompt (LLaMA) or the decoder start token (T5)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = theirs.generate(**inputs, use_cache=family == "llama", **kwargs)
    if family == "llama":
        prompt = inputs["input_ids"].shape[1] if "input_ids" in inputs else NUM_QUERY_TOKENS + 1
        return out[:, prompt:]
    return out[:, 1:]


def assert_same_tokens(ours: torch.Tensor, theirs: torch.Tensor, eos: list[int]) -> None:
    """Equal shapes, equal tokens up to and including each row's first eos; after it ours holds pad."""
    assert ours.shape == theirs.shape, (ours.tolist(), theirs.tolist())
    for o, t in zip(ours.tolist(), theirs.tolist(), strict=True):
        end = next((i + 1 for i, tok in enumerate(o) if tok in eos), len(o))
        assert o[:end] == t[:end], (ours.tolist(), theirs.tolist())
        assert all(tok == PAD for tok in o[end:]), o


def full_forward_logits(model, inputs: dict, new: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) for every generated position from ONE uncached forward over prompt + new tokens."""
    feats = model.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                     inputs["qformer_attention_mask"]).pooler_output
    embeds, mask = model.merge_image_features(feats, inputs["input_ids"], inputs["attention_mask"])
    lm = model.language_model
    B, T = new.shape
    if isinstance(lm, T5):
        encoder_hidden = lm.encode(embeds, mask)
        start = torch.full((B, 1), lm.config.decoder_start_token_id)
        hidden = lm.decode(torch.cat([start, new[:, :-1]], 1), encoder_hidden, mask)  # (B, T, D)
    else:
        L = embeds.shape[1]
        embeds = torch.cat([embeds, lm.embed_tokens(new[:, :-1])], 1)  # (B, L + T - 1, D)
        mask = torch.cat([mask, torch.ones(B, T - 1, dtype=mask.dtype)], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers' generate positions (left padding)
        hidden = lm(embeds, mask, positions)[:, L - 1:]  # (B, T, D)
    return lm.logits(hidden).float()


def assert_greedy_margin(model, family: str, inputs: dict, new: torch.Tensor, eos: list[int],
                         repetition_penalty: float = 1.0) -> None:
    """Precondition of a greedy comparison: at every step a row was still running, its top-2 (processed) scores
    differ by more than MIN_GAP, so float noise between two implementations cannot flip the choice."""
    with torch.no_grad():
        logits = full_forward_logits(model, inputs, new)
    B, T = new.shape
    gaps = []
    for b in range(B):
        for t in range(T):
            scores = logits[b, t][None]
            if repetition_penalty != 1.0:
                history = new[b, :t][None]
                if family == "t5":  # T5 penalises the decoder ids, start token included
                    history = torch.cat([torch.zeros(1, 1, dtype=torch.long), history], 1)
                scores = apply_repetition_penalty(scores, history, repetition_penalty)
            top2 = scores[0].topk(2).values
            gaps.append(float(top2[0] - top2[1]))
            if int(new[b, t]) in eos:
                break
    assert min(gaps) > MIN_GAP, f"near-tie in the random model: min gap {min(gaps):.2e}"


def count_vision_calls(model):
    calls = []
    handle = model.vision_model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


# ---------------------------------------------------------------------------------------------------------------------
# token-identical to transformers


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(pairs, family):
    theirs, ours = pairs[family]
    inputs = make_inputs(family)
    new = ours.generate(**inputs, max_new_tokens=10)
    assert_greedy_margin(ours, family, inputs, new, [EOS[family]])
    assert_same_tokens(new, hf_new_tokens(theirs, family, inputs, max_new_tokens=10), [EOS[family]])
    assert (new == EOS[family]).any(), "one row should stop early, to cover the pad filling"
    # max_length counts the prompt (image tokens included) for LLaMA and the start token for T5, as in 5.x
    prefix = inputs["input_ids"].shape[1] if family == "llama" else 1
    assert torch.equal(ours.generate(**inputs, max_length=prefix + 10), new)
    # precomputed image features instead of pixel values
    with torch.no_grad():
        feats = ours.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                        inputs["qformer_attention_mask"]).pooler_output
    text = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    assert torch.equal(generate(ours, image_features=feats, **text, max_new_tokens=10), new)


BEAM_CASES = [  # num_beams, length_penalty, num_return_sequences, early_stopping, extra eos
    (3, 1.0, 1, False, False),
    (3, -1.0, 2, True, True),
    (3, 0.0, 3, "never", True),
    (5, 2.0, 3, False, True),
    (5, 1.0, 5, "never", False),
    (5, -1.0, 1, True, False),
    (5, 0.0, 2, False, True),
    (5, 2.0, 1, True, True),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_beams,length_penalty,num_return_sequences,early_stopping,extra_eos", BEAM_CASES)
def test_beam_search_matches_transformers(pairs, family, num_beams, length_penalty, num_return_sequences,
                                          early_stopping, extra_eos):
    theirs, ours = pairs[family]
    inputs = make_inputs(family)
    eos = [EOS[family], EXTRA_EOS[family]] if extra_eos else [EOS[family]]
    kwargs = dict(num_beams=num_beams, length_penalty=length_penalty, num_return_sequences=num_return_sequences,
                  early_stopping=early_stopping, max_new_tokens=8, eos_token_id=eos)
    calls, handle = count_vision_calls(ours)
    new = ours.generate(**inputs, **kwargs)
    handle.remove()
    assert len(calls) == 1  # image features computed once, then copied per beam
    assert new.shape[0] == 3 * num_return_sequences
    assert_same_tokens(new, hf_new_tokens(theirs, family, inputs, **kwargs), eos)


@pytest.mark.parametrize("shape, k", [((2, 5, 3000), 10), ((1, 3, 4), 6), ((3, 1, 50), 2)])
def test_topk_over_beams_equals_one_topk(shape, k):
    """The two-pass top-k of beam search picks what one topk over each item's K * V row picks (V < k included)."""
    scores = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    values, index = _topk_over_beams(scores, k)
    expected_values, expected_index = torch.topk(scores.view(shape[0], -1), k)
    assert torch.equal(values, expected_values) and torch.equal(index, expected_index)


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_finishes_early(pairs, family):
    """Cover beams that stop on eos before the length limit (the finished-set bookkeeping)."""
    theirs, ours = pairs[family]
    inputs = make_inputs(family)
    eos = [EOS[family], EXTRA_EOS[family]]
    kwargs = dict(num_beams=3, num_return_sequences=3, max_new_tokens=8, eos_token_id=eos)
    new = ours.generate(**inputs, **kwargs)
    assert torch.isin(new[:, :-1], torch.tensor(eos)).any()
    assert_same_tokens(new, hf_new_tokens(theirs, family, inputs, **kwargs), eos)


@pytest.mark.parametrize("family", FAMILIES)
def test_documented_lavis_settings_match_transformers(pairs, family):
    """The snippet from the model card (beam 5, max_length 256, min_length 1, top_p 0.9 - inactive without
    sampling -, repetition_penalty 1.5), max_length scaled down to the tiny model: max_length counts the prompt,
    and with scope "all" the penalty covers the prompt too, as in transformers 5.x."""
    theirs, ours = pairs[family]
    inputs = make_inputs(family)
    kwargs = dict(do_sample=False, num_beams=5, max_length=24, min_length=1, top_p=0.9, repetition_penalty=1.5,
                  length_penalty=1.0, temperature=1)
    new = ours.generate(**inputs, **kwargs, penalty_scope="all")
    assert_same_tokens(new, hf_new_tokens(theirs, family, inputs, **kwargs), [EOS[family]])


@pytest.mark.parametrize("family", FAMILIES)
def test_min_length_and_min_new_tokens_match(pairs, family):
    theirs, ours = pairs[family]
    inputs = make_inputs(family)
    free = ours.generate(**inputs, max_new_tokens=10)
    prefix = inputs["input_ids"].shape[1] if family == "llama" else 1  # what min_length counts besides new tokens
    for kwargs in (dict(max_new_tokens=10, min_new_tokens=10), dict(max_new_tokens=10, min_length=prefix + 10),
                   dict(max_new_tokens=8, min_new_tokens=6, num_beams=3, num_return_sequences=2)):
        new = ours.generate(**inputs, **kwargs)
        assert_same_tokens(new, hf_new_tokens(theirs, family, inputs, **kwargs), [EOS[family]])
        if kwargs.get("num_beams", 1) == 1:
            assert not (new == EOS[family]).any() and not torch.equal(new, free)  # the constraint acted
            assert_greedy_margin(ours, family, inputs, new, [EOS[family]])


def test_repetition_penalty_on_t5_matches(pairs):
    theirs, ours = pairs["t5"]
    inputs = make_inputs("t5")
    for kwargs in (dict(max_new_tokens=10, repetition_penalty=1.5),
                   dict(max_new_tokens=8, repetition_penalty=1.5, num_beams=3, num_return_sequences=2),
                   dict(max_new_tokens=10, no_repeat_ngram_size=2)):
        new = ours.generate(**inputs, **kwargs)
        assert_same_tokens(new, hf_new_tokens(theirs, "t5", inputs, **kwargs), [1])
        # T5 penalises the decoder ids whatever the scope
        assert torch.equal(ours.generate(**inputs, **kwargs, penalty_scope="all"), new)
    new = ours.generate(**inputs, max_new_tokens=10, repetition_penalty=1.5)
    assert not torch.equal(new, ours.generate(**inputs, max_new_tokens=10))
    assert_greedy_margin(ours, "t5", inputs, new, [1], repetition_penalty=1.5)


def test_llama_penalty_scopes(pairs):
    """scope "all" = transformers 5.x (prompt ids count); "generated" = LAVIS / 4.x, i.e. transformers' LLaMA
    generating from inputs_embeds alone."""
    theirs, ours = pairs["llama"]
    inputs = make_inputs("llama")
    for kwargs in (dict(max_new_tokens=10, repetition_penalty=2.0), dict(max_new_tokens=10, no_repeat_ngram_size=2),
                   dict(max_new_tokens=8, repetition_penalty=2.0, num_beams=3)):
        every = ours.generate(**inputs, **kwargs, penalty_scope="all")
        assert_same_tokens(every, hf_new_tokens(theirs, "llama", inputs, **kwargs), [2])
        generated = ours.generate(**inputs, **kwargs)  # the default scope
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            feats = theirs.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                              inputs["qformer_attention_mask"]).pooler_output
            embeds = theirs.get_input_embeddings()(inputs["input_ids"])
            embeds = embeds.masked_scatter((inputs["input_ids"] == IMAGE_TOKEN)[..., None], feats)
            lavis = theirs.language_model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                                   **kwargs)
        assert_same_tokens(generated, lavis, [2])
        if "repetition_penalty" in kwargs:
            assert not torch.equal(generated, every)


@pytest.mark.parametrize("family", FAMILIES)
def test_caption_path_without_prompt_matches(pairs, family):
    theirs, ours = pairs[family]
    if family == "t5":  # transformers reads text_config.bos_token_id, which the tiny T5 config lacks
        theirs = hf_model("t5")
        theirs.config.text_config.bos_token_id = 1  # what we fall back to: eos, as LAVIS' empty T5 prompt
    inputs = make_inputs(family)
    inputs = {k: inputs[k] for k in ("pixel_values", "qformer_input_ids", "qformer_attention_mask")}
    for kwargs in (dict(max_new_tokens=8), dict(max_new_tokens=8, num_beams=3)):
        new = ours.generate(**inputs, **kwargs)
        assert_same_tokens(new, hf_new_tokens(theirs, family, inputs, **kwargs), [EOS[family]])


@pytest.mark.parametrize("family", FAMILIES)
def test_legacy_prepend_scheme_generates_the_same(pairs, family, hf_checkpoints, tmp_path):
    """A 2023 config (no image tokens): features prepended; same tokens, and max_length counts them as well."""
    _, ours = pairs[family]
    legacy = tmp_path / "legacy"
    shutil.copytree(hf_checkpoints[family][1], legacy)
    config = json.loads((legacy / "config.json").read_text())
    config["image_token_index"] = None
    (legacy / "config.json").write_text(json.dumps(config))
    old = InstructBlipForConditionalGeneration.from_pretrained(legacy)
    inputs = make_inputs(family)
    text_only = dict(inputs, input_ids=inputs["input_ids"][:, NUM_QUERY_TOKENS:],
                     attention_mask=inputs["attention_mask"][:, NUM_QUERY_TOKENS:])
    prefix = inputs["input_ids"].shape[1] if family == "llama" else 1
    for kwargs in (dict(max_length=prefix + 8), dict(max_new_tokens=8, num_beams=3, repetition_penalty=1.5)):
        assert torch.equal(old.generate(**text_only, **kwargs), ours.generate(**inputs, **kwargs))


# ---------------------------------------------------------------------------------------------------------------------
# cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", [(7, 4, 6), (6, 6, 6), (5,)], ids=["padded", "unpadded", "single"])
def test_cached_decoding_equals_full_forward(hf_checkpoints, family, lengths):
    """In float64, so that the comparison sees the cache logic, not float32 summation order (which alone moves
    logits of magnitude ~4 by up to ~1e-5 between a one-token step and a full forward)."""
    ours = InstructBlipForConditionalGeneration.from_pretrained(hf_checkpoints[family][1], dtype=torch.float64)
    inputs = make_inputs(family, lengths=lengths)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    T = 10
    new = ours.generate(**inputs, max_new_tokens=T, eos_token_id=[])  # no stopping: every step is a real token
    assert new.shape == (len(lengths), T)
    with torch.no_grad():
        prompt = prepare_prompt(ours, **inputs)
        lm = ours.language_model
        state, logits = lm.prefill(prompt.inputs_embeds, prompt.attention_mask, T)
        steps = [logits]
        for t in range(1, T):
            steps.append(lm.step(state, new[:, t - 1]))
        full = full_forward_logits(ours, inputs, new)
    cached = torch.stack(steps, 1)  # (B, T, V)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    assert torch.equal(cached.argmax(-1), new)


def test_rotary_tables_and_rotation_are_the_plain_formula():
    """The cache's rotary tables give exactly what `rotary` computes per call, and `_rotate` (halves swapped, signed
    sin) exactly the textbook x * cos + cat(-x2, x1) * sin, in float32 and bfloat16."""
    from instructblip.models.llama import KVCache, _rotate, rope, rotary

    positions = torch.tensor([[0, 1, 5, 17], [3, 3, 4, 29]])
    for dtype in (torch.float32, torch.bfloat16):
        cache = KVCache(1, 2, 2, 30, 16, dtype, "cpu")
        cos, sin = rope(cache, positions, 16, 10000.0, dtype)
        expected_cos, expected_sin = rotary(positions, 16, 10000.0, dtype)
        assert cos.shape == (2, 4, 1, 16) and torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)
        freqs = positions[..., None].float() * (1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16))
        emb = torch.cat([freqs, freqs], -1)[..., None, :]
        assert torch.equal(cos, emb.cos().to(dtype)) and torch.equal(sin.abs(), emb.sin().abs().to(dtype))
        x = torch.randn(2, 4, 3, 16).to(dtype)
        textbook = x * cos + torch.cat([-x[..., 8:], x[..., :8]], -1) * emb.sin().to(dtype)
        assert torch.equal(_rotate(x, cos, sin), textbook)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_returns_an_ordinary_tensor(pairs, family):
    """The search runs in inference mode; what it returns can still be edited in place and used with autograd."""
    _, ours = pairs[family]
    new = ours.generate(**make_inputs(family), max_new_tokens=3)
    assert not new.is_inference()
    new[0, 0] = 7  # an inference tensor would raise here
    assert not torch.is_inference_mode_enabled()


# ---------------------------------------------------------------------------------------------------------------------
# sampling and warpers


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling(pairs, family):
    theirs, ours = pairs[family]
    inputs = make_inputs(family)
    kwargs = dict(do_sample=True, max_new_tokens=10, temperature=1.5, top_k=0, eos_token_id=[])

    def draw(seed, **extra):
        return ours.generate(**inputs, **kwargs, **extra, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    several = draw(0, num_return_sequences=3)
    assert several.shape == (9, 10)
    assert not torch.equal(several[0], several[1])  # copies of one item sample independently
    # the global RNG (no generator) draws as transformers does: same seed, same tokens (default top_k 50 included)
    for extra in (dict(max_new_tokens=8), dict(max_new_tokens=8, top_p=0.8, temperature=0.7),
                  dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, top_k=20)):
        torch.manual_seed(7)
        new = ours.generate(**inputs, do_sample=True, **extra)
        torch.manual_seed(7)
        assert_same_tokens(new, hf_new_tokens(theirs, family, inputs, do_sample=True, **extra), [EOS[family]])


def test_top_p_and_top_k_keep_the_right_support():
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = torch.isfinite(top_p_filter(scores, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(scores, 0.85)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p_filter(scores, 1.0)).all()
    assert torch.isfinite(top_p_filter(scores, 0.01)).tolist() == [[True, False, False, False]]  # keeps >= 1
    assert torch.isfinite(top_p_filter(scores, 0.01, min_tokens_to_keep=3)).sum() == 3
    assert torch.isfinite(top_k_filter(scores, 2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_k_filter(scores, 1, min_tokens_to_keep=2)).sum() == 2
    assert torch.isfinite(top_k_filter(scores, 0)).all()  # 0 disables
    # order: temperature first (it changes the probabilities top-p sees), then top-k, then top-p
    sharp = warp(scores, temperature=0.5, top_k=3, top_p=0.7)
    assert torch.isfinite(sharp).tolist() == [[True, True, False, False]]
    torch.testing.assert_close(warp(scores, temperature=2.0), scores / 2.0)
    # shuffled vocabulary: the support follows the scores, not the positions
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.isfinite(top_p_filter(scores[:, perm], 0.7)).tolist() == [[False, True, False, True]]


@pytest.mark.parametrize("family", FAMILIES)
def test_top_k_one_is_greedy(pairs, family):
    _, ours = pairs[family]
    inputs = make_inputs(family)
    greedy = ours.generate(**inputs, max_new_tokens=8)
    for seed in (0, 1):
        sampled = ours.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=1, temperature=3.0,
                                generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sampled, greedy)


# ---------------------------------------------------------------------------------------------------------------------
# ranking


def word_tokenizer() -> Tokenizer:
    """Word i <-> id i over the tiny vocabulary."""
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(99)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def reference_scores(theirs, family: str, inputs: dict, candidates: list[list[int]]) -> torch.Tensor:
    """Independent log-likelihoods (B, C): transformers' forward with labels, one unpadded sample and one
    candidate at a time (T5: the candidate plus eos as decoder labels)."""
    B = inputs["input_ids"].shape[0]
    out = torch.zeros(B, len(candidates))
    for b in range(B):
        prompt = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]  # image tokens + real prompt
        image = {k: inputs[k][b:b + 1] for k in ("pixel_values", "qformer_input_ids", "qformer_attention_mask")}
        for c, cand in enumerate(candidates):
            cand = torch.tensor(cand)
            with torch.no_grad():
                if family == "llama":
                    ids = torch.cat([prompt, cand])[None]
                    labels = torch.full_like(ids, -100)
                    labels[0, len(prompt):] = cand
                    loss = theirs(**image, input_ids=ids, labels=labels).loss
                    n = len(cand)
                else:
                    labels = torch.cat([cand, torch.tensor([1])])[None]
                    loss = theirs(**image, input_ids=prompt[None], labels=labels).loss
                    n = labels.shape[1]
            out[b, c] = -loss * n  # the loss is the mean negative log-likelihood over the labelled tokens
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_rank_matches_independent_log_likelihoods(pairs, family):
    theirs, ours = pairs[family]
    inputs = make_inputs(family)
    candidates = [[5, 9], [17], [33, 41, 8], [69], [24, 24]]
    expected = reference_scores(theirs, family, inputs, candidates)
    calls, handle = count_vision_calls(ours)
    result = ours.rank(inputs, candidates, batch_size=4)  # 15 rows in 4 forwards
    handle.remove()
    assert len(calls) == 1  # the image features are computed once for all candidates
    torch.testing.assert_close(result.scores, expected, atol=1e-4, rtol=0)
    top2 = expected.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > MIN_GAP  # precondition: a clear winner per sample
    assert torch.equal(result.best, expected.argmax(1))
    assert len(set(result.best.tolist())) > 1  # not the same answer everywhere
    # one forward for all rows gives the same scores
    torch.testing.assert_close(rank(ours, inputs, candidates).scores, result.scores, atol=1e-5, rtol=0)
    # mean: per-token average (T5 counts the appended eos)
    lengths = torch.tensor([len(c) + (family == "t5") for c in candidates], dtype=torch.float)
    mean = rank(ours, inputs, candidates, reduction="mean")
    torch.testing.assert_close(mean.scores, expected / lengths, atol=1e-4, rtol=0)


def test_rank_per_sample_candidates_and_strings(pairs):
    _, ours = pairs["t5"]
    inputs = make_inputs("t5")
    shared = rank(ours, inputs, [[5, 9], [17], [33, 41, 8]])
    per_sample = rank(ours, inputs, [[[5, 9], [17]], [[33, 41, 8]], [[17], [33, 41, 8], [5, 9]]])
    assert per_sample.scores.shape == (3, 3)
    expected = torch.stack([
        torch.cat([shared.scores[0, :2], torch.tensor([-math.inf])]),
        torch.tensor([shared.scores[1, 2], -math.inf, -math.inf]),
        shared.scores[2, [1, 2, 0]],
    ])
    torch.testing.assert_close(per_sample.scores, expected, atol=1e-5, rtol=0)
    assert per_sample.best[1] == 0
    words = rank(ours, inputs, ["w5 w9", "w17", "w33 w41 w8"], tokenizer=word_tokenizer())
    torch.testing.assert_close(words.scores, shared.scores, atol=1e-6, rtol=0)
    # without the appended eos the scores change (the eos probability no longer counts)
    assert not torch.allclose(rank(ours, inputs, [[5, 9], [17]], append_eos=False).scores, shared.scores[:, :2])


# ---------------------------------------------------------------------------------------------------------------------
# streaming


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies use."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def byte_tokenizer() -> Tokenizer:
    """99 ids: 3 specials and 96 single-byte tokens, among them the pieces of 'é', '€' and an emoji, so that
    characters span several tokens as in sentencepiece byte fallback / byte-level BPE."""
    chars = bytes_to_unicode()
    text = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!?.,;:'\"()-_/*+=<>[]{}@#"
    byte_values = list(text.encode()) + list("é€😀".encode())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {chars[b]: 3 + i for i, b in enumerate(byte_values)}
    assert len(vocab) == 99
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<pad>", "<s>", "</s>"])
    return tokenizer


def test_incremental_text_holds_back_split_characters():
    tokenizer = byte_tokenizer()
    vocab = tokenizer.get_vocab()
    chars = bytes_to_unicode()
    ids = [vocab[chars[b]] for b in "café € 😀 ok".encode()]
    pieces = list(incremental_text(tokenizer, iter(ids + [2])))
    assert "".join(pieces) == "café € 😀 ok" == tokenizer.decode(ids + [2], skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 5


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_pieces_concatenate_to_the_decode(pairs, family):
    _, ours = pairs[family]
    tokenizer = byte_tokenizer()
    batch = make_inputs(family)
    one = {k: v[2:3] for k, v in batch.items()}  # a single sample
    for kwargs in (dict(max_new_tokens=12), dict(max_new_tokens=12, do_sample=True, temperature=2.0)):
        if kwargs.get("do_sample"):
            kwargs["generator"] = torch.Generator().manual_seed(3)
        new = ours.generate(**one, **kwargs)
        if kwargs.get("do_sample"):
            kwargs["generator"] = torch.Generator().manual_seed(3)
        pieces = list(stream(ours, tokenizer, **one, **kwargs))
        ids = [t for t in new[0].tolist() if t not in (EOS[family], PAD)]
        assert len(pieces) > 1
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    # transformers' streamer protocol: put(new tokens) per step, then end()

    class Collect:
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens.extend(value.tolist())

        def end(self):
            self.ended = True

    collect = Collect()
    new = ours.generate(**one, max_new_tokens=12, streamer=collect)
    assert collect.ended and collect.tokens == new[0].tolist()


# ---------------------------------------------------------------------------------------------------------------------
# defaults and bad input


def test_default_eos_ids():
    vicuna = InstructBlipConfig.from_name("vicuna-7b")
    assert default_eos_ids(vicuna) == [2]  # the decapoda ids in Vicuna configs (bos 0, eos 1); the tokenizer's </s>
    assert default_eos_ids(InstructBlipConfig.from_name("flan-t5-xl")) == [1]
    llama = InstructBlipConfig.from_name("vicuna-7b")
    llama.text_config.bos_token_id, llama.text_config.eos_token_id = 1, [2, 7]  # an ordinary LLaMA config
    assert default_eos_ids(llama) == [2, 7]
    assert default_eos_ids(llama.text_config) == [2, 7]


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_beams=0), "num_beams"),
    (dict(top_p=0.0, do_sample=True), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1, do_sample=True), "top_k"),
    (dict(temperature=0.0, do_sample=True), "temperature"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(early_stopping="sometimes", num_beams=2), "early_stopping"),
    (dict(penalty_scope="prompt"), "penalty_scope"),
    (dict(max_length=5), "max_length"),
])
def test_bad_options_raise(pairs, kwargs, name):
    _, ours = pairs["llama"]
    with pytest.raises(ValueError, match=name):
        generate(ours, **make_inputs("llama"), **kwargs)


def test_prompt_longer_than_the_context_raises(pairs):
    _, ours = pairs["llama"]
    inputs = make_inputs("llama", lengths=(130, 3, 3))  # 4 image tokens + 130 > max_position_embeddings 128
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.generate(**inputs, max_new_tokens=2)


def test_streaming_refuses_beams_and_batches(pairs):
    _, ours = pairs["llama"]
    inputs = make_inputs("llama")
    with pytest.raises(ValueError, match="num_beams"):
        list(stream(ours, byte_tokenizer(), **inputs, num_beams=2))
    with pytest.raises(ValueError, match="single sequence"):
        list(stream(ours, byte_tokenizer(), **inputs))
    with pytest.raises(ValueError, match="num_beams"):
        ours.generate(**inputs, num_beams=2, streamer=object())
    with pytest.raises(ValueError, match="reduction"):
        ours.rank(inputs, [[5]], reduction="max")


# ---------------------------------------------------------------------------------------------------------------------
# GenerationConfig and the token iterator


def test_generation_config_builders_and_checks(tmp_path):
    config, rest = GenerationConfig.from_kwargs(num_beams=3, max_new_tokens=7, use_cache=True, stop_strings="END")
    assert (config.num_beams, config.max_new_tokens, config.stop_strings) == (3, 7, ("END",))
    assert rest == {"use_cache": True}
    start = GenerationConfig(repetition_penalty=1.5)
    assert GenerationConfig.from_kwargs(generation_config=start, top_p=0.5)[0] == GenerationConfig(
        repetition_penalty=1.5, top_p=0.5)
    assert GenerationConfig.from_kwargs(start, num_beams=2)[0].repetition_penalty == 1.5  # a base to start from
    assert ANSWER.num_beams == 5 and ANSWER.repetition_penalty == 1.5 and CAPTION.min_new_tokens == 10
    # generation_config.json: its decoding options, not its token ids (config.json's, with the Vicuna quirk)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"num_beams": 4, "max_length": 30, "eos_token_id": 1, "bos_token_id": 0, "transformers_version": "5.23"}))
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert (loaded.num_beams, loaded.max_length, loaded.eos_token_id) == (4, 30, None)
    assert GenerationConfig.from_pretrained(tmp_path / "missing") == GenerationConfig()
    (tmp_path / "generation_config.json").write_text('{"num_beams": 0}')
    with pytest.warns(UserWarning, match="num_beams"):
        assert GenerationConfig.from_pretrained(tmp_path) == GenerationConfig()
    for bad, name in [(dict(temperature=1e-300, do_sample=True), "temperature"),
                      (dict(length_penalty=1e308, num_beams=2), "length_penalty"),
                      (dict(length_penalty=math.nan), "length_penalty"),
                      (dict(repetition_penalty=math.inf), "repetition_penalty"),
                      (dict(seed=2**64, do_sample=True), "seed"), (dict(num_beams=True), "num_beams"),
                      (dict(stop_strings=("",)), "stop_strings")]:
        with pytest.raises(ValueError, match=name):
            GenerationConfig(**bad).validate()


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_with_their_own_settings_decode_as_they_would_alone(hf_checkpoints, family):
    """The token iterator runs rows with different settings in one batch (as the server does); each row's tokens
    equal those of a `generate` call for it alone, and finished items leave the batch mid-run. In float64, so
    that a sampled token cannot flip on float32 noise between batch sizes."""
    ours = InstructBlipForConditionalGeneration.from_pretrained(hf_checkpoints[family][1], dtype=torch.float64)
    inputs = make_inputs(family)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    configs = [GenerationConfig(max_new_tokens=9, repetition_penalty=1.7, no_repeat_ngram_size=2),
               GenerationConfig(max_new_tokens=5, min_new_tokens=4, do_sample=True, temperature=1.5, top_k=20,
                                seed=11),
               GenerationConfig(max_new_tokens=12, do_sample=True, top_p=0.8, seed=4, num_return_sequences=2)]
    alone = []
    for b, config in enumerate(configs):
        one = {k: v[b:b + 1] for k, v in inputs.items()}
        alone += ours.generate(**one, generation_config=config).tolist()
    with torch.inference_mode():
        prompt = prepare_prompt(ours, **inputs)
        L = prompt.attention_mask.shape[1]
        settings = [settle(c, ours.config, L, "cpu") for c in configs]
        run = Decoding(ours, prompt, settings, copies=[1, 1, 2])
        rows, tokens, item = list(range(4)), {i: [] for i in range(4)}, [0, 1, 2, 2]
        for step in run:
            for i, token in zip(rows, step.tolist(), strict=True):
                tokens[i].append(token)
            # an item's rows leave together: they share one generator, whose draws depend on the rows sampled
            running = {item[rows[j]] for j, reason in enumerate(run.reason) if reason is None}
            keep = [j for j in range(run.rows) if item[rows[j]] in running]
            if keep and len(keep) < run.rows:
                run.keep(keep)
                rows = [rows[j] for j in keep]
    pad = PAD
    for i in range(4):
        expected = [t for t in alone[i] if t != pad] if i == 1 else alone[i]
        got = tokens[i][: len(expected)]
        assert got == expected[: len(got)] and len(got) == len(expected), (i, tokens[i], expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_that_join_a_running_batch_decode_as_they_would_alone(hf_checkpoints, family):
    """Continuous batching: runs over other prompts join a running batch between steps (`Decoding.admit`; the
    last one prefilled a few positions at a time, as the server does while a batch runs); every row's tokens and
    log-probabilities equal those of a run for it alone, and finished rows leave (between steps, or in the copy of
    the cache a join makes). In float64, so that a sampled
    token cannot flip on float32 noise between batch sizes."""
    from instructblip.generation.decode import penalty_prefix, prefill_chunks

    ours = InstructBlipForConditionalGeneration.from_pretrained(hf_checkpoints[family][1], dtype=torch.float64)
    inputs = make_inputs(family, lengths=(7, 3, 6, 5))
    inputs["pixel_values"] = inputs["pixel_values"].double()
    eos = [EOS[family], EXTRA_EOS[family]]
    configs = [GenerationConfig(max_new_tokens=14, min_new_tokens=12, repetition_penalty=1.7, no_repeat_ngram_size=2,
                                eos_token_id=eos),
               GenerationConfig(max_new_tokens=8, min_new_tokens=6, do_sample=True, temperature=1.5, top_k=20,
                                seed=11, eos_token_id=[EOS[family], EXTRA_EOS[family], *range(3, 40)]),
               GenerationConfig(max_new_tokens=9, do_sample=True, top_p=0.8, seed=4, num_return_sequences=2,
                                repetition_penalty=1.3, penalty_scope="all"),
               # greedy like item 0 but for its penalty and minimum length: the two are processed as one group
               GenerationConfig(max_new_tokens=11, min_new_tokens=8, repetition_penalty=1.2, no_repeat_ngram_size=2,
                                eos_token_id=eos)]
    joins = {0: 0, 1: 3, 2: 5, 3: 12}  # item: the step of the running batch before which it joins (item 1 has ended
    # by step 12: its rows leave in that join's copy)

    def one(b: int) -> dict:
        return {k: v[b:b + 1] for k, v in inputs.items() if k != "pixel_values"} | {
            "pixel_values": inputs["pixel_values"][b:b + 1]}

    def start(b: int, chunk: int | None = None) -> Decoding:
        prompt = prepare_prompt(ours, **one(b))
        settings = [settle(configs[b], ours.config, prompt.attention_mask.shape[1], "cpu")]
        prefix, ignore = penalty_prefix(ours, prompt, configs[b].penalty_scope)
        copies = [configs[b].num_return_sequences]
        prefilled = None
        if chunk is not None:
            chunks = list(prefill_chunks(ours.language_model, prompt, configs[b].max_new_tokens, copies, prefix,
                                         ignore, chunk))
            assert family == "t5" or chunks[:-1] == [None] * (len(chunks) - 1) and len(chunks) > 2
            prefilled = chunks[-1]
        return Decoding(ours, prompt, settings, copies, prefix, ignore, logprobs=[3], prefilled=prefilled)

    def running_rows(run: Decoding, owners: list) -> list[int]:  # an item's rows leave together
        items_running = {owners[r][0] for r in range(run.rows) if run.reason[r] is None}
        return [r for r in range(run.rows) if owners[r][0] in items_running]

    with torch.inference_mode():
        alone = {}
        for b in range(4):
            run, rows = start(b), {}
            for _ in run:
                for r in range(run.rows):
                    if run.logprobs[r] is not None:
                        rows.setdefault(r, []).append((int(run.history[r, -1]), run.logprobs[r]))
            alone.update({(b, r): v for r, v in rows.items()})
        run, owners, got, step, grouped, left_in_join = None, [], {}, 0, False, False
        while True:
            for b, at in joins.items():
                if at == step:
                    new = start(b, chunk=4 if b == 2 else None)
                    if run is None:
                        run = new
                    else:  # finished items leave in the join's copy (as the server does)
                        keep = running_rows(run, owners)
                        left_in_join |= len(keep) < run.rows
                        run.admit(new, keep)
                        owners = [owners[r] for r in keep]
                    owners += [(b, r) for r in range(new.rows)]
            if run is None or run.done() and max(joins.values()) <= step:
                break
            if not run.done():
                grouped |= bool(run._groups)
                tokens = next(run).tolist()
                for r, owner in enumerate(owners):
                    if run.logprobs[r] is not None:
                        got.setdefault(owner, []).append((tokens[r], run.logprobs[r]))
            step += 1
            keep = running_rows(run, owners)
            if keep and run.rows - len(keep) >= len(keep):  # the server's rule: ended rows wait for a join
                run.keep(keep)
                owners = [owners[r] for r in keep]
    assert set(got) == set(alone) == {(0, 0), (1, 0), (2, 0), (2, 1), (3, 0)}
    assert grouped  # items 0 and 3 ran as one greedy group
    assert left_in_join
    for owner, expected in alone.items():
        assert [t for t, _ in got[owner]] == [t for t, _ in expected], owner
        for (_, a), (_, b) in zip(got[owner], expected, strict=True):
            assert a.top_ids == b.top_ids and math.isclose(a.logprob, b.logprob, rel_tol=1e-9, abs_tol=1e-9)
    # the reported log-probabilities are the model's: log-softmax of a plain forward over prompt + tokens
    tokens = torch.tensor([[t for t, _ in alone[(0, 0)]]])
    with torch.no_grad():
        logp = full_forward_logits(ours, one(0), tokens).log_softmax(-1)[0]
    for t, (token, lp) in enumerate(alone[(0, 0)]):
        assert math.isclose(lp.logprob, float(logp[t, token]), abs_tol=1e-9)
        assert lp.top_ids == logp[t].topk(3).indices.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_strings_end_rows_in_generate(pairs, family):
    """`stop_strings` with `tokenizer=` (transformers' names): a row ends with the token that completes a stop
    string, which stays in the output; other rows go on."""
    _, ours = pairs[family]
    tokenizer = byte_tokenizer()
    inputs = make_inputs(family)
    plain = ours.generate(**inputs, max_new_tokens=12, eos_token_id=[])
    text = tokenizer.decode(plain[0].tolist(), skip_special_tokens=True)
    stop = text[3:5]  # two characters the first row produces after a few tokens
    assert stop.strip() and len(stop) == 2
    cut = ours.generate(**inputs, max_new_tokens=12, eos_token_id=[], stop_strings=[stop], tokenizer=tokenizer,
                        pad_token_id=PAD)
    first = [t for t in cut[0].tolist()]
    ends = next(k for k in range(1, 13) if stop in tokenizer.decode(plain[0, :k].tolist(), skip_special_tokens=True))
    assert first[:ends] == plain[0, :ends].tolist() and set(first[ends:]) <= {PAD}
    with pytest.raises(ValueError, match="tokenizer"):
        ours.generate(**inputs, max_new_tokens=3, stop_strings=["x"])


def test_generation_config_json_sets_generate_defaults(hf_checkpoints, tmp_path):
    """A checkpoint's generation_config.json gives `generate` its defaults (`model.generation_config`), as in
    transformers; keyword arguments still win."""
    directory = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoints["llama"][1], directory)
    (directory / "generation_config.json").write_text(json.dumps({"num_beams": 3, "max_new_tokens": 5,
                                                                  "repetition_penalty": 1.3, "eos_token_id": 9}))
    model = InstructBlipForConditionalGeneration.from_pretrained(directory)
    assert model.generation_config == GenerationConfig(num_beams=3, max_new_tokens=5, repetition_penalty=1.3)
    inputs = make_inputs("llama")
    plain = InstructBlipForConditionalGeneration.from_pretrained(hf_checkpoints["llama"][1])
    assert plain.generation_config == GenerationConfig()
    assert torch.equal(model.generate(**inputs), plain.generate(**inputs, num_beams=3, max_new_tokens=5,
                                                                 repetition_penalty=1.3))
    assert torch.equal(model.generate(**inputs, num_beams=1, max_new_tokens=4),
                       plain.generate(**inputs, max_new_tokens=4, repetition_penalty=1.3))
