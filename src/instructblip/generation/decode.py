"""Generation and vocabulary ranking as free functions over `InstructBlipForConditionalGeneration`.

Building blocks, in the order they run:
- `prepare_prompt`: image features (computed once per call), merged into the prompt embeddings;
- `prefill` / `decode_step` / `expand` / `reorder`: one forward over the prompt, then one token per step with a KV
  cache (LLaMA: preallocated `KVCache`; T5: the encoder runs once and the cross-attention keys/values are computed
  once, in `T5Cache`);
- logits processors in transformers' order: repetition penalty, no-repeat n-grams, minimum length (eos masked), then,
  when sampling, the warpers temperature -> top-k -> top-p;
- the searches: `_sample_tokens` (greedy and multinomial sampling, an iterator of tokens) and `_beam_search` (a port
  of transformers 5.23's vectorised beam search);
- the public entry points `generate`, `stream` and `rank`.

What `generate` returns: the generated tokens only, (B * num_return_sequences, new_len), for both families: no prompt
for decoder-only models (transformers 5.x returns prompt + new tokens) and no decoder start token for T5
(transformers returns [start] + new tokens). Rows that finished early are filled with `pad_token_id` after their eos.

Lengths, as transformers 5.x counts them (so that `max_length=256, min_length=1` means what it meant there):
- decoder-only: `max_length` / `min_length` count the whole language-model input (image tokens or prepended image
  features, padding and prompt) plus the new tokens;
- T5: they count the decoder tokens, the start token included;
- `max_new_tokens` / `min_new_tokens` count new tokens only and take precedence; with neither `max_new_tokens` nor
  `max_length`, 20 new tokens (for LLaMA at most up to `max_position_embeddings`).

Stopping: on any of `eos_token_id` (int or list), by default `default_eos_ids(config)`.

Repetition penalty and no-repeat n-grams, `penalty_scope`:
- "generated" (default; LAVIS and transformers 4.x, which passed only `inputs_embeds`): decoder-only models penalise
  the generated tokens only, never the prompt or the `<image>` placeholders;
- "all" (transformers 5.x, which also passes `input_ids`): the prompt ids count too (left padding excluded from the
  repetition penalty, as transformers does).
T5 always works on the decoder ids, the start token included (transformers and LAVIS agree there).

Decoder-only prompts may be padded on either side: rows are left-aligned internally, and positions are
`cumsum(attention_mask) - 1` as in transformers' `generate` (not `forward`'s arange), so a left-padded batch gives the
tokens transformers gives.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from instructblip.accel.cpu_linear import pack_for_decoding
from instructblip.models.llama import KVCache, Llama
from instructblip.models.t5 import T5, T5Cache

DEFAULT_MAX_NEW_TOKENS = 20  # transformers' default max_length (20) counted on top of the prompt
DEFAULT_TOP_K = 50  # transformers' default top_k, active only when sampling
_NEG = -1.0e9  # transformers' "very negative" score in beam search


# ---------------------------------------------------------------------------------------------------------------------
# special tokens


def default_eos_ids(config) -> list[int]:
    """The eos ids generation stops on when none are passed: the text config's `eos_token_id` (int or list).

    Exception, the Vicuna quirk: the InstructBLIP Vicuna configs carry decapoda-LLaMA ids (bos 0, eos 1) while the
    tokenizer LAVIS trained with uses `</s>` = 2 as eos (and bos). Stopping on id 1 (`<s>`) would never happen, so for
    a LLaMA config with bos 0 / eos 1 this returns [2]. `config`: an `InstructBlipConfig` or its text config.
    """
    text = getattr(config, "text_config", config)
    eos = text.eos_token_id
    ids = [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]
    if not text.is_encoder_decoder and text.bos_token_id == 0 and ids == [1]:
        return [2]
    return ids


def _caption_bos(config, eos: list[int]) -> int:
    """The token after the image tokens when no prompt is given (transformers: the text config's bos).

    Vicuna quirk as in `default_eos_ids`: bos 0 in the config, `</s>` = 2 in LAVIS' tokenizer -> 2. T5 configs may
    have no bos: then eos, which is what LAVIS' T5 tokenizer gives for an empty prompt.
    """
    text = config.text_config
    if not text.is_encoder_decoder and text.bos_token_id == 0 and text.eos_token_id == 1:
        return 2
    if text.bos_token_id is not None:
        return int(text.bos_token_id)
    if not eos:
        raise ValueError("the text config has no bos_token_id and no eos_token_id; pass input_ids")
    return eos[0]


# ---------------------------------------------------------------------------------------------------------------------
# logits processors and warpers (transformers' semantics; scores are (N, V) float32)


def apply_repetition_penalty(scores: Tensor, ids: Tensor, penalty: float, ignore: Tensor | None = None) -> Tensor:
    """CTRL-style penalty on every id in `ids` (N, S): negative scores are multiplied, positive ones divided.

    `ignore` (N,): per row, the number of leading positions of `ids` not to count (left padding).
    """
    if penalty == 1.0 or ids.shape[1] == 0:
        return scores
    V = scores.shape[-1]
    ids = ids.clamp(max=V)  # ids beyond the head's vocabulary go to a spare column
    if ignore is not None:
        positions = torch.arange(ids.shape[1], device=ids.device)
        ids = ids.masked_fill(positions[None, :] < ignore[:, None], V)
    seen = torch.zeros(scores.shape[0], V + 1, dtype=torch.bool, device=scores.device)
    seen.scatter_(1, ids, True)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen[:, :V], penalised, scores)


def ban_repeated_ngrams(scores: Tensor, ids: Tensor, n: int) -> Tensor:
    """-inf for every token that would complete an n-gram already present in `ids` (N, S)."""
    S = ids.shape[1]
    if n <= 0 or S < n:
        return scores
    prefix = ids[:, S + 1 - n :]  # (N, n - 1): the n-gram the next token would complete starts with these
    windows = ids.unfold(1, n, 1)  # (N, S - n + 1, n)
    matches = (windows[..., :-1] == prefix[:, None]).all(-1)  # (N, S - n + 1)
    V = scores.shape[-1]
    banned = torch.zeros(scores.shape[0], V + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)
    return scores.masked_fill(banned[:, :V], -math.inf)


def in_vocabulary(token_ids: Tensor, vocab_size: int) -> Tensor:
    """The ids of `token_ids` (1-D) that index a score among `vocab_size`."""
    return token_ids[(token_ids >= 0) & (token_ids < vocab_size)]


def suppress_tokens(scores: Tensor, token_ids: Tensor, checked: bool = False) -> Tensor:
    """-inf for `token_ids` (1-D), e.g. eos before the minimum length is reached. Ids outside the vocabulary do
    nothing; `checked`: the caller has already dropped them (`in_vocabulary`, once per generation, not per step)."""
    if token_ids.numel() == 0:
        return scores
    if not checked:
        token_ids = in_vocabulary(token_ids, scores.shape[-1])
    return scores.index_fill(-1, token_ids, -math.inf)  # (a vocabulary-wide isin cost ~0.3 ms per step)


def top_k_filter(scores: Tensor, top_k: int, min_tokens_to_keep: int = 1) -> Tensor:
    """Keep the `top_k` highest scores (ties with the k-th included), -inf elsewhere; 0 disables."""
    if top_k <= 0:
        return scores
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, -math.inf)


def top_p_filter(scores: Tensor, top_p: float, min_tokens_to_keep: int = 1) -> Tensor:
    """Nucleus filtering: keep the smallest set of top tokens whose probability reaches `top_p`, -inf elsewhere."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(-1).cumsum(-1)
    remove = cumulative <= 1 - top_p  # the low tail whose mass stays within 1 - top_p
    remove[..., -min_tokens_to_keep:] = False
    remove = remove.scatter(1, order, remove)  # back to vocabulary order
    return scores.masked_fill(remove, -math.inf)


def warp(scores: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
         min_tokens_to_keep: int = 1) -> Tensor:
    """The sampling warpers in transformers' order: temperature, top-k, top-p."""
    if temperature != 1.0:
        scores = scores / temperature
    scores = top_k_filter(scores, top_k, min_tokens_to_keep)
    return top_p_filter(scores, top_p, min_tokens_to_keep)


def sample(scores: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row (N,) drawn from softmax(scores) (N, V)."""
    probs = F.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------------
# settings


@dataclass
class GenerationSettings:
    """The validated knobs of one `generate` call; lengths are in new tokens."""

    max_new_tokens: int
    min_new_tokens: int  # eos is suppressed while fewer tokens than this have been generated
    eos: Tensor  # (n_eos,) long
    pad: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    num_beams: int
    num_return_sequences: int
    length_penalty: float
    early_stopping: bool | str
    repetition_penalty: float
    no_repeat_ngram_size: int
    penalty_scope: str
    generator: torch.Generator | None


def _check_options(num_beams, do_sample, temperature, top_k, top_p, num_return_sequences, repetition_penalty,
                   no_repeat_ngram_size, early_stopping, penalty_scope, max_new_tokens, min_new_tokens) -> None:
    """ValueError, naming the parameter and its value, for an option outside its range."""
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if do_sample and (temperature is None or temperature <= 0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be an integer >= 1, got {num_return_sequences!r}")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})")
    if num_beams == 1 and not do_sample and num_return_sequences > 1:
        raise ValueError(
            f"num_return_sequences={num_return_sequences} with greedy decoding would repeat one sequence; "
            "use do_sample=True or num_beams >= num_return_sequences"
        )
    if repetition_penalty is None or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty!r}")
    if no_repeat_ngram_size is None or no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if penalty_scope not in ("generated", "all"):
        raise ValueError(f"penalty_scope must be 'generated' or 'all', got {penalty_scope!r}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if min_new_tokens is not None and min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens!r}")


def _lengths(model, prompt_length: int, max_new_tokens, max_length, min_new_tokens, min_length) -> tuple[int, int]:
    """(max new tokens, min new tokens) from transformers-style length arguments; see the module docstring."""
    text = model.config.text_config
    # the tokens max_length / min_length count besides the new ones: the LM input, or T5's decoder start token
    prefix = 1 if text.is_encoder_decoder else prompt_length
    context = None if text.is_encoder_decoder else text.max_position_embeddings
    if context is not None and prompt_length >= context:
        raise ValueError(
            f"the prompt has {prompt_length} positions (image tokens and padding included), which leaves no room "
            f"in the language model's context (max_position_embeddings={context})"
        )
    if max_new_tokens is not None:
        max_new = max_new_tokens
    elif max_length is not None:
        max_new = max_length - prefix
        if max_new < 1:
            what = "the decoder start token" if text.is_encoder_decoder else "the prompt (image tokens included)"
            raise ValueError(
                f"max_length={max_length} leaves no new tokens: it counts {what}, {prefix} tokens here; "
                "raise it or pass max_new_tokens"
            )
    else:
        max_new = DEFAULT_MAX_NEW_TOKENS
        if context is not None:
            max_new = min(max_new, context - prompt_length)
    if context is not None and prompt_length + max_new > context:
        warnings.warn(
            f"prompt ({prompt_length}) + max new tokens ({max_new}) exceed the context "
            f"(max_position_embeddings={context}); positions beyond it were never trained",
            stacklevel=3,
        )
    if min_new_tokens is not None:
        min_new = min_new_tokens
    else:
        min_new = max((min_length or 0) - prefix, 0)
    return max_new, min_new


# ---------------------------------------------------------------------------------------------------------------------
# the prompt


@dataclass
class Prompt:
    """The language model's input for one batch: embeddings with the image features in place, the mask, and the
    prompt ids (None when only embeddings were given) for `penalty_scope="all"`."""

    inputs_embeds: Tensor  # (B, L, D)
    attention_mask: Tensor  # (B, L)
    input_ids: Tensor | None  # (B, L_ids); L_ids = L, or L - Q in the legacy prepend scheme
    ignore: Tensor | None  # (B,) leading padding positions in input_ids (excluded from the repetition penalty)


def _left_align(embeds: Tensor, mask: Tensor, ids: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Rotate each row so that its last real position is the last column (trailing padding moves to the front)."""
    B, L = mask.shape
    columns = torch.arange(L, device=mask.device)
    last_real = torch.where(mask.bool(), columns, -1).amax(1)  # (B,)
    shift = L - 1 - last_real.clamp(min=0)  # (B,) trailing pad positions
    if not bool(shift.any()):
        return embeds, mask, ids
    index = (columns[None, :] - shift[:, None]) % L  # (B, L): new column j reads old column j - shift
    embeds = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
    mask = mask.gather(1, index)
    if ids is not None:
        Li = ids.shape[1]
        ids = ids.gather(1, (torch.arange(Li, device=ids.device)[None, :] - shift[:, None]) % Li)
    return embeds, mask, ids


@torch.no_grad()
def prepare_prompt(model, pixel_values: Tensor | None = None, qformer_input_ids: Tensor | None = None,
                   qformer_attention_mask: Tensor | None = None, input_ids: Tensor | None = None,
                   attention_mask: Tensor | None = None, inputs_embeds: Tensor | None = None,
                   interpolate_pos_encoding: bool = False, image_features: Tensor | None = None,
                   caption_token: int | None = None) -> Prompt:
    """Image features (computed once) merged into the prompt. Without `input_ids` and `inputs_embeds` (captioning),
    the prompt is `[<image>] * Q + [caption_token]` (legacy prepend scheme: `[caption_token]`), as transformers does."""
    if image_features is None:
        if pixel_values is None:
            raise ValueError("pass pixel_values (or precomputed image_features)")
        image_features = model.get_image_features(pixel_values, qformer_input_ids, qformer_attention_mask,
                                                  interpolate_pos_encoding).pooler_output  # (B, Q, D)
    elif pixel_values is not None:
        raise ValueError("pass either pixel_values or precomputed image_features, not both")
    B, Q = image_features.shape[:2]
    if input_ids is None and inputs_embeds is None:
        if caption_token is None:
            caption_token = _caption_bos(model.config, default_eos_ids(model.config))
        start = [caption_token]
        if model.config.image_token_index is not None:
            start = [model.config.image_token_index] * Q + start
        input_ids = torch.tensor([start], dtype=torch.long, device=image_features.device).repeat(B, 1)  # (B, L)
        attention_mask = None
    embeds, mask = model.merge_image_features(image_features, input_ids, attention_mask, inputs_embeds)
    ids = input_ids  # None when only embeddings were given
    if not model.config.text_config.is_encoder_decoder:
        embeds, mask, ids = _left_align(embeds, mask, ids)
    ignore = None
    if ids is not None:
        # legacy prepend scheme: the ids are the text part, the last L_ids columns of the input
        ids_mask = mask[:, mask.shape[1] - ids.shape[1]:]  # (B, L_ids)
        ignore = (ids_mask != 0).int().argmax(1)  # first real position, as transformers computes it
    return Prompt(embeds, mask, ids, ignore)


# ---------------------------------------------------------------------------------------------------------------------
# cached decoding


@dataclass
class DecodeState:
    """What one decoding run carries between steps."""

    lm: Llama | T5
    cache: KVCache | T5Cache
    attention_mask: Tensor  # LLaMA: (N, filled) over the cached positions (the prompt's only, if not padded)
    positions: Tensor | None  # LLaMA: (N,) position of the last token fed; T5: None
    padded: bool = True  # LLaMA: whether the prompt has padding; without, the steps need no mask (one check here)
    stepped: bool = False  # whether decode_step has run (its first call settles the weights' layout)


def prefill(model, prompt: Prompt, max_new_tokens: int) -> tuple[DecodeState, Tensor]:
    """Run the prompt once; returns the state and the float32 logits for the first new token (B, V)."""
    lm = model.language_model
    embeds, mask = prompt.inputs_embeds, prompt.attention_mask
    B, L, _ = embeds.shape
    if isinstance(lm, T5):
        encoder_hidden = lm.encode(embeds, mask)  # (B, L, D)
        cache = lm.new_cache(encoder_hidden, max_length=max_new_tokens + 1)  # cross-attention K/V computed here
        start = torch.full((B, 1), lm.config.decoder_start_token_id, dtype=torch.long, device=embeds.device)
        hidden = lm.decode(start, None, mask, None, cache)  # (B, 1, D)
        state = DecodeState(lm, cache, mask, None)
    else:
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, L), transformers' generate
        cache = lm.new_cache(B, L + max_new_tokens)
        hidden = lm(embeds, mask, positions, cache)  # (B, L, D)
        state = DecodeState(lm, cache, mask, positions[:, -1], padded=not bool(mask.all()))
    return state, lm.logits(hidden[:, -1]).float()


def decode_step(state: DecodeState, tokens: Tensor) -> Tensor:
    """Feed one token per row (N,); returns the float32 logits for the next one (N, V)."""
    lm = state.lm
    if not state.stepped:  # the first step has the most rows (rows only ever leave): 3+ pack the decoder (ops.py)
        pack_for_decoding(lm, tokens.shape[0])
        state.stepped = True
    if isinstance(lm, T5):
        hidden = lm.decode(tokens[:, None], None, state.attention_mask, None, state.cache)  # (N, 1, D)
    else:
        mask = None  # no padding: one new token attends to every position, no mask needed
        if state.padded:
            ones = state.attention_mask.new_ones(tokens.shape[0], 1)
            state.attention_mask = mask = torch.cat([state.attention_mask, ones], 1)  # (N, filled + 1)
        state.positions = state.positions + 1
        hidden = lm(lm.embed_tokens(tokens[:, None]), mask, state.positions[:, None], state.cache)
    return lm.logits(hidden[:, -1]).float()


def expand(state: DecodeState, index: Tensor) -> None:
    """Make row i a copy of row index[i] (one row per beam or per returned sequence), cache included."""
    if isinstance(state.cache, T5Cache):
        state.cache.reorder(index, cross=True)
    else:
        state.cache.reorder(index)
        state.positions = state.positions.index_select(0, index)
    state.attention_mask = state.attention_mask.index_select(0, index)


def reorder(state: DecodeState, index: Tensor) -> None:
    """Beam search: row i continues old row index[i], a row of the same batch item. Masks, positions and the
    cross-attention keys/values are equal within an item, so only the self-attention cache moves."""
    if torch.equal(index, torch.arange(index.shape[0], device=index.device)):
        return  # every beam extends itself: nothing to copy
    if isinstance(state.cache, T5Cache):
        state.cache.reorder(index, cross=False)
    else:
        state.cache.reorder(index)


# ---------------------------------------------------------------------------------------------------------------------
# searches


def _history(prefix: Tensor, generated: Tensor) -> Tensor:
    """The ids the penalties look at: (N, P + t)."""
    return torch.cat([prefix, generated], 1) if prefix.shape[1] else generated


def _process(scores: Tensor, history: Tensor, ignore: Tensor | None, n_generated: int, s: GenerationSettings,
             min_tokens_to_keep: int, eos: Tensor) -> Tensor:
    """All logits processors for one step, in transformers' order. `eos`: `s.eos` within the vocabulary."""
    scores = apply_repetition_penalty(scores, history, s.repetition_penalty, ignore)
    scores = ban_repeated_ngrams(scores, history, s.no_repeat_ngram_size)
    if n_generated < s.min_new_tokens:
        scores = suppress_tokens(scores, eos, checked=True)
    if s.do_sample:
        scores = warp(scores, s.temperature, s.top_k, s.top_p, min_tokens_to_keep)
    return scores


def _sample_tokens(state: DecodeState, logits: Tensor, prefix: Tensor, ignore: Tensor | None,
                   s: GenerationSettings) -> Iterator[Tensor]:
    """Greedy or multinomial decoding; yields the new token of every row (N,) per step. Finished rows get pad."""
    N = logits.shape[0]
    generated = torch.empty(N, 0, dtype=torch.long, device=logits.device)  # (N, t)
    unfinished = torch.ones(N, dtype=torch.bool, device=logits.device)
    eos = in_vocabulary(s.eos, logits.shape[-1])
    pad = torch.full((N,), s.pad, dtype=torch.long, device=logits.device)  # what finished rows get
    for t in range(s.max_new_tokens):
        if t > 0:
            logits = decode_step(state, generated[:, -1])
        scores = _process(logits, _history(prefix, generated), ignore, t, s, 1, eos)
        token = sample(scores, s.generator) if s.do_sample else scores.argmax(-1)  # (N,)
        token = torch.where(unfinished, token, pad)
        generated = torch.cat([generated, token[:, None]], 1)
        unfinished &= ~torch.isin(token, s.eos)
        yield token
        if not bool(unfinished.any()):
            return


def _topk_over_beams(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk(scores.view(B, K * V), k) for scores (B, K, V), in two passes: the best k of each beam (B * K rows of
    V, which torch spreads over the threads), then the best k of those K * k. One pass over a row of K * V runs on
    one thread, about 2x slower at 5 beams of a 32000-token vocabulary. Same values; equal scores may come in
    another order."""
    B, K, V = scores.shape
    values, index = torch.topk(scores, min(k, V))  # (B, K, k)
    index = index + torch.arange(K, device=scores.device)[:, None] * V  # positions in the (K * V) row
    best, pick = torch.topk(values.view(B, -1), k)  # (B, k)
    return best, index.view(B, -1).gather(1, pick)


def _beam_search(state: DecodeState, logits: Tensor, prefix: Tensor, ignore: Tensor | None,
                 s: GenerationSettings) -> Tensor:
    """transformers 5.23's beam search (`GenerationMixin._beam_search`), over the generated tokens.

    Each step keeps the top `2 * num_beams` continuations (more with several eos ids) of all beams of an item; the
    best `num_beams` of them that did not stop keep running, and those among the first `num_beams` that stopped (eos
    or the length limit) compete for the `num_beams` finished slots with score `sum log p / n ** length_penalty`,
    n = generated tokens (eos included). `early_stopping`: True stops an item once `num_beams` are finished; False
    stops when the best running beam, at its current length, cannot beat the worst finished one; "never" assumes the
    most favourable length. Returns (B * num_return_sequences, new_len), best first per item.
    """
    K, T, V = s.num_beams, s.max_new_tokens, logits.shape[-1]
    B = logits.shape[0] // K
    device = logits.device
    n_eos = s.eos.numel()
    eos = in_vocabulary(s.eos, V)  # for suppressing; stopping checks every id of s.eos
    width = max(2, 1 + n_eos) * K  # candidates kept per step
    top_beams = torch.arange(width, device=device) < K  # (width,) only these may enter the finished set
    lp = s.length_penalty

    running = torch.full((B, K, T), s.pad, dtype=torch.long, device=device)  # running beams' tokens
    running_scores = torch.zeros(B, K, device=device)  # sum of log-probs; only beam 0 starts, so beams differ
    running_scores[:, 1:] = _NEG
    finished = torch.full((B, K, T), s.pad, dtype=torch.long, device=device)
    finished_scores = torch.full((B, K), _NEG, device=device)
    finished_len = torch.zeros(B, K, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)  # transformers' early-stop heuristic
    item_offset = torch.arange(B, device=device)[:, None] * K  # (B, 1)

    for t in range(T):
        if t > 0:
            logits = decode_step(state, running[:, :, t - 1].reshape(B * K))
        log_probs = F.log_softmax(logits, dim=-1)  # (B*K, V)
        history = _history(prefix, running.reshape(B * K, T)[:, :t])
        log_probs = _process(log_probs, history, ignore, t, s, max(2, n_eos + 1), eos)
        accumulated = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)

        # a. the best `width` continuations over all beams of an item
        if s.do_sample:
            picked = torch.multinomial(F.softmax(accumulated, dim=-1), width, generator=s.generator)  # (B, width)
            cand_scores = accumulated.gather(1, picked)
        else:
            cand_scores, picked = _topk_over_beams(accumulated.view(B, K, V), width)
        source = picked // V  # (B, width) beam each continuation extends
        cand = running.take_along_dim(source[:, :, None], 1)  # (B, width, T)
        cand[:, :, t] = picked % V
        stops = torch.isin(cand[:, :, t], s.eos) | (t + 1 >= T)  # (B, width)

        # b. the best `K` continuations that did not stop keep running
        live_scores = cand_scores + stops.float() * _NEG
        keep = torch.topk(live_scores, K)[1]  # (B, K)
        running = cand.take_along_dim(keep[:, :, None], 1)
        running_scores = live_scores.gather(1, keep)
        running_source = source.gather(1, keep)

        # c. stopped continuations among the first K enter the finished set if they beat its worst
        just_finished = stops & top_beams[None, :]
        scores = cand_scores / ((t + 1) ** lp)
        full = is_finished.all(-1, keepdim=True) & (s.early_stopping is True)
        scores += full.float() * _NEG
        scores += (~improvable).float() * _NEG
        scores += (~just_finished) * _NEG
        merged_scores = torch.cat([finished_scores, scores], 1)  # (B, K + width)
        best = torch.topk(merged_scores, K)[1]
        finished = torch.cat([finished, cand], 1).take_along_dim(best[:, :, None], 1)
        finished_scores = merged_scores.gather(1, best)
        finished_len = torch.cat([finished_len, torch.full_like(cand_scores, t + 1, dtype=torch.long)], 1).gather(
            1, best)
        is_finished = torch.cat([is_finished, just_finished], 1).gather(1, best)

        # d. the cache follows the running beams; decide whether to go on
        reorder(state, (running_source + item_offset).view(-1))
        n = t + 1
        best_length = T if s.early_stopping == "never" and lp > 0.0 else n
        best_running = running_scores[:, :1] / (best_length**lp)
        worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True)[0], _NEG)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        all_full = bool(is_finished.all()) and s.early_stopping is True
        if not bool(improvable.any()) or all_full or bool(stops.all()):
            break

    R = s.num_return_sequences
    out = finished[:, :R].reshape(B * R, T)  # (B, R, T) -> (B*R, T)
    new_len = int(finished_len[:, :R].max())
    positions = torch.arange(T, device=device)[None, :]
    out = out.masked_fill(positions >= finished_len[:, :R].reshape(B * R, 1), s.pad)  # pad after each end
    return out[:, :new_len]


# ---------------------------------------------------------------------------------------------------------------------
# public entry points


@dataclass
class _Run:
    state: DecodeState
    logits: Tensor  # (N, V) for the first new token
    prefix: Tensor  # (N, P) ids the penalties see before the generated ones
    ignore: Tensor | None  # (N,)
    settings: GenerationSettings


def _start(model, pixel_values=None, qformer_input_ids=None, qformer_attention_mask=None, input_ids=None,
           attention_mask=None, inputs_embeds=None, interpolate_pos_encoding=False, image_features=None,
           max_new_tokens=None, max_length=None, min_new_tokens=None, min_length=None, do_sample=False,
           temperature=1.0, top_k=None, top_p=1.0, num_beams=1, length_penalty=1.0, early_stopping=False,
           num_return_sequences=1, repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=None,
           pad_token_id=None, penalty_scope="generated", generator=None, **unused: Any) -> _Run:
    """Validate the options, build the prompt, prefill, and expand to one row per beam / returned sequence."""
    ignored = {k for k, v in unused.items() if v is not None}
    ignored.discard("use_cache")  # transformers' flag; the cache is always used here
    if ignored:
        warnings.warn(f"generate ignores the arguments {sorted(ignored)}", stacklevel=3)
    _check_options(num_beams, do_sample, temperature, top_k, top_p, num_return_sequences, repetition_penalty,
                   no_repeat_ngram_size, early_stopping, penalty_scope, max_new_tokens, min_new_tokens)
    config = model.config
    if eos_token_id is None:
        eos = default_eos_ids(config)
    else:
        eos = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]
    if pad_token_id is None:
        pad_token_id = config.text_config.pad_token_id
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    prompt = prepare_prompt(model, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids,
                            attention_mask, inputs_embeds, interpolate_pos_encoding, image_features)
    B, L = prompt.attention_mask.shape
    max_new, min_new = _lengths(model, L, max_new_tokens, max_length, min_new_tokens, min_length)
    device = prompt.inputs_embeds.device
    settings = GenerationSettings(
        max_new_tokens=max_new, min_new_tokens=min_new, eos=torch.tensor(eos, dtype=torch.long, device=device),
        pad=int(pad_token_id), do_sample=do_sample, temperature=float(temperature),
        top_k=DEFAULT_TOP_K if top_k is None else top_k, top_p=1.0 if top_p is None else float(top_p),
        num_beams=num_beams, num_return_sequences=num_return_sequences, length_penalty=float(length_penalty),
        early_stopping=early_stopping, repetition_penalty=float(repetition_penalty),
        no_repeat_ngram_size=no_repeat_ngram_size, penalty_scope=penalty_scope, generator=generator,
    )
    # the ids the penalties see before the generated tokens (see the module docstring)
    ignore = None
    if config.text_config.is_encoder_decoder:
        prefix = torch.full((B, 1), config.text_config.decoder_start_token_id, dtype=torch.long, device=device)
    elif penalty_scope == "all" and prompt.input_ids is not None:
        prefix, ignore = prompt.input_ids, prompt.ignore
    else:
        prefix = torch.empty(B, 0, dtype=torch.long, device=device)

    state, logits = prefill(model, prompt, max_new)
    copies = max(num_beams, num_return_sequences)
    if copies > 1:  # prefill once per item, then copy the rows (cache included)
        index = torch.arange(B, device=device).repeat_interleave(copies)  # (B * copies,)
        expand(state, index)
        logits, prefix = logits.index_select(0, index), prefix.index_select(0, index)
        ignore = ignore.index_select(0, index) if ignore is not None else None
    return _Run(state, logits, prefix, ignore, settings)


@torch.no_grad()
def generate(model, pixel_values: Tensor | None = None, qformer_input_ids: Tensor | None = None,
             qformer_attention_mask: Tensor | None = None, input_ids: Tensor | None = None,
             attention_mask: Tensor | None = None, inputs_embeds: Tensor | None = None,
             interpolate_pos_encoding: bool = False, image_features: Tensor | None = None,
             max_new_tokens: int | None = None, max_length: int | None = None, min_new_tokens: int | None = None,
             min_length: int | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float = 1.0, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, num_return_sequences: int = 1, repetition_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, penalty_scope: str = "generated",
             generator: torch.Generator | None = None, streamer: Any = None, **unused: Any) -> Tensor:
    """Generate text tokens for a batch of images and prompts; returns the NEW tokens only,
    (B * num_return_sequences, new_len), rows of one item adjacent, padded with `pad_token_id` after eos.

    Inputs as for `model.forward` (the processor's output): `pixel_values` (or precomputed `image_features`),
    `qformer_input_ids`/`qformer_attention_mask`, and `input_ids`/`attention_mask` (or `inputs_embeds`); without a
    prompt, the image tokens plus bos (captioning). Decoding: greedy (default), sampling (`do_sample`, with
    `temperature`, `top_k` (default 50 when sampling, 0 disables), `top_p`, a seeded `generator`), beam search
    (`num_beams`, `length_penalty`, `early_stopping` True/False/"never", `num_return_sequences`), beam sampling
    (both). Lengths, eos and pad defaults, and `penalty_scope`: see the module docstring.
    `streamer`: an object with `put(tokens)` and `end()` (transformers' streamer protocol), called with the new
    token (a (1,) tensor) of each step; batch size 1 without beam search. See also `stream`.

    The search runs in `torch.inference_mode` (each small op of a decoding step dispatches faster than under
    `no_grad`: about 0.7 ms of a 7 ms step of the benchmark's 45M LLaMA); the tokens are copied out of it, so the
    result is an ordinary tensor.
    """
    with torch.inference_mode():
        out = _generate(
            model, pixel_values=pixel_values, qformer_input_ids=qformer_input_ids,
            qformer_attention_mask=qformer_attention_mask, input_ids=input_ids, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, interpolate_pos_encoding=interpolate_pos_encoding,
            image_features=image_features, max_new_tokens=max_new_tokens, max_length=max_length,
            min_new_tokens=min_new_tokens, min_length=min_length, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, num_beams=num_beams, length_penalty=length_penalty,
            early_stopping=early_stopping, num_return_sequences=num_return_sequences,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, penalty_scope=penalty_scope, generator=generator,
            streamer=streamer, **unused,
        )
    return out.clone()  # outside inference mode: an ordinary tensor (in-place edits and autograd work on it)


def _generate(model, streamer: Any = None, **kwargs: Any) -> Tensor:
    run = _start(model, **kwargs)
    s = run.settings
    if s.num_beams > 1:
        if streamer is not None:
            raise ValueError("streaming works with greedy decoding or sampling, not with num_beams > 1")
        return _beam_search(run.state, run.logits, run.prefix, run.ignore, s)
    if streamer is not None and run.logits.shape[0] != 1:
        raise ValueError(f"streaming needs a single sequence; this call makes {run.logits.shape[0]}")
    tokens = []
    for token in _sample_tokens(run.state, run.logits, run.prefix, run.ignore, s):
        tokens.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
    if streamer is not None:
        streamer.end()
    return torch.stack(tokens, 1)  # (N, new_len)


def incremental_text(tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    """Text pieces for a stream of token ids whose concatenation is `tokenizer.decode(all_ids,
    skip_special_tokens=True)`: the whole sequence is decoded at every step and the new suffix yielded; a suffix
    that ends in an incomplete character ('\\ufffd', a byte-level or sentencepiece byte token split) or that would
    rewrite text already yielded is held back until more tokens arrive (or the end)."""
    ids: list[int] = []
    emitted = ""
    for token in tokens:
        ids.append(int(token))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(emitted):
            continue
        if len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > len(emitted):
        yield text[len(emitted):] if text.startswith(emitted) else text[_common_prefix(text, emitted):]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@torch.inference_mode()
def stream(model, tokenizer, **kwargs: Any) -> Iterator[str]:
    """Like `generate` (same arguments) for one sequence, yielding text pieces as tokens are produced.

    `tokenizer`: anything with `decode(ids, skip_special_tokens=True)`. Greedy or sampling only (beam search needs
    the whole search before any token is final: ValueError); batch size 1 and num_return_sequences 1. Generation
    stops at eos, which is not part of the text.
    """
    if kwargs.get("num_beams", 1) != 1:
        raise ValueError(f"stream works with greedy decoding or sampling, not num_beams={kwargs['num_beams']}")
    if kwargs.get("streamer") is not None:
        raise ValueError("stream() is itself the streamer; do not pass streamer=")
    run = _start(model, **kwargs)
    if run.logits.shape[0] != 1:
        raise ValueError(f"stream needs a single sequence; this call makes {run.logits.shape[0]}")
    s = run.settings
    eos = set(s.eos.tolist())

    def tokens() -> Iterator[int]:
        for token in _sample_tokens(run.state, run.logits, run.prefix, run.ignore, s):
            if int(token) in eos:
                return
            yield int(token)

    yield from incremental_text(tokenizer, tokens())


# ---------------------------------------------------------------------------------------------------------------------
# vocabulary ranking


@dataclass
class RankOutput:
    """`scores` (B, C): per candidate, the sum (or mean) of its tokens' log-probabilities; -inf pads per-sample
    candidate lists shorter than the longest. `best` (B,): the index of the highest-scoring candidate."""

    scores: Tensor
    best: Tensor


def _tokenize_candidates(candidates, tokenizer) -> list[list[int]]:
    out = []
    for c in candidates:
        if isinstance(c, str):
            if tokenizer is None:
                raise ValueError(f"candidate {c!r} is a string; pass tokenizer= (or token ids)")
            encoded = tokenizer.encode(c, add_special_tokens=False)
            c = encoded.ids if hasattr(encoded, "ids") else encoded
        c = [int(i) for i in c]
        if not c:
            raise ValueError("a candidate has no tokens")
        out.append(c)
    return out


@torch.no_grad()
def rank(model, inputs: dict, candidates: Sequence, reduction: str = "sum", batch_size: int | None = None,
         tokenizer=None, append_eos: bool | None = None) -> RankOutput:
    """Vocabulary ranking (the paper's closed-set inference): score each candidate answer by its log-likelihood
    given the image and the prompt, and pick the best.

    `inputs`: what `generate` takes (pixel_values or image_features, qformer ids/mask, input_ids/attention_mask or
    inputs_embeds). `candidates`: one list shared by every sample, or one list per sample; each candidate is a list
    of token ids without special tokens, or a string when `tokenizer` is given (tokenised without special tokens).
    `append_eos`: add the eos id to every candidate; default True for T5 (LAVIS' T5 targets end with `</s>`, so
    the probability of stopping counts) and False for decoder-only models (LAVIS appends nothing to Vicuna
    candidates). `reduction`: "sum" (LAVIS) or "mean" (per-token average, a length-normalised variant).
    `batch_size`: (sample, candidate) rows per language-model forward (default: all at once).

    The image features are computed once and the prompt is encoded once (T5) or embedded once (LLaMA); the
    candidates go after the prompt (LLaMA, rows left-aligned, positions cumsum(mask) - 1) or into the decoder
    (T5, teacher forcing).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    inputs = {k: v for k, v in inputs.items() if k in (
        "pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask",
        "inputs_embeds", "interpolate_pos_encoding", "image_features")}
    prompt = prepare_prompt(model, **inputs)
    B = prompt.inputs_embeds.shape[0]
    # one list per sample: its elements are candidates themselves (strings or token lists)
    per_sample = len(candidates) > 0 and all(
        isinstance(c, (list, tuple)) and len(c) > 0 and isinstance(c[0], (str, list, tuple)) for c in candidates)
    if per_sample:
        if len(candidates) != B:
            raise ValueError(f"{len(candidates)} candidate lists for {B} samples")
        lists = [_tokenize_candidates(c, tokenizer) for c in candidates]
    else:
        if len(candidates) == 0:
            raise ValueError("no candidates")
        shared = _tokenize_candidates(candidates, tokenizer)
        lists = [shared] * B
    lm = model.language_model
    is_t5 = isinstance(lm, T5)
    if append_eos is None:
        append_eos = is_t5
    if append_eos:
        eos = default_eos_ids(model.config)
        if not eos:
            raise ValueError("append_eos needs an eos id in the text config")
        lists = [[c + [eos[0]] for c in cands] for cands in lists]

    rows = [(b, c) for b in range(B) for c in range(len(lists[b]))]  # one LM row per (sample, candidate)
    C = max(len(cands) for cands in lists)
    device = prompt.inputs_embeds.device
    scores = torch.full((B, C), -math.inf, device=device)
    encoder_hidden = lm.encode(prompt.inputs_embeds, prompt.attention_mask) if is_t5 else None  # (B, L, D)
    step = batch_size or len(rows)
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        sample_index = torch.tensor([b for b, _ in chunk], device=device)  # (R,)
        tokens = [lists[b][c] for b, c in chunk]
        n_max = max(len(t) for t in tokens)
        targets = torch.zeros(len(chunk), n_max, dtype=torch.long, device=device)  # (R, n_max), right-padded
        valid = torch.zeros(len(chunk), n_max, dtype=torch.bool, device=device)
        for i, t in enumerate(tokens):
            targets[i, : len(t)] = torch.tensor(t, device=device)
            valid[i, : len(t)] = True
        mask = prompt.attention_mask.index_select(0, sample_index)  # (R, L)
        if is_t5:
            decoder_input_ids = lm.shift_right(targets.masked_fill(~valid, -100))  # (R, n_max)
            hidden = lm.decode(decoder_input_ids, encoder_hidden.index_select(0, sample_index), mask)
        else:
            L = mask.shape[1]
            embeds = torch.cat([prompt.inputs_embeds.index_select(0, sample_index), lm.embed_tokens(targets)], 1)
            full_mask = torch.cat([mask, valid.to(mask.dtype)], 1)  # (R, L + n_max)
            positions = (full_mask.long().cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
            hidden = lm(embeds, full_mask, positions)[:, L - 1 : L - 1 + n_max]  # position i predicts token i + 1
        log_probs = F.log_softmax(lm.logits(hidden).float(), dim=-1)  # (R, n_max, V)
        token_log_probs = log_probs.gather(-1, targets[..., None]).squeeze(-1).masked_fill(~valid, 0.0)
        total = token_log_probs.sum(1)  # (R,)
        if reduction == "mean":
            total = total / valid.sum(1)
        for (b, c), value in zip(chunk, total, strict=True):
            scores[b, c] = value
    return RankOutput(scores=scores, best=scores.argmax(1))
