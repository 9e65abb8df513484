"""Logits processors and warpers with transformers' semantics, in the order they run at each step: repetition
penalty, no-repeat n-grams, minimum length (eos masked), then, when sampling, temperature -> top-k -> top-p.

Scores are (N, V) float32, one row per sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def apply_repetition_penalty(scores: Tensor, ids: Tensor, penalty: float | Tensor, ignore: Tensor | None = None
                             ) -> Tensor:
    """CTRL-style penalty on every id in `ids` (N, S): negative scores are multiplied, positive ones divided.

    `penalty`: one for every row, or one per row (N, 1). `ignore` (N,): per row, the number of leading positions of
    `ids` not to count (left padding).
    """
    if (not isinstance(penalty, Tensor) and penalty == 1.0) or ids.shape[1] == 0:
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


def with_prefix(prefix: Tensor, generated: Tensor) -> Tensor:
    """The ids the penalties look at: the prefix (T5's start token, or the prompt with penalty_scope "all") and the
    generated tokens, (N, P + t)."""
    return torch.cat([prefix, generated], 1) if prefix.shape[1] else generated


def process(scores: Tensor, history: Tensor, ignore: Tensor | None, n_generated: int, s, min_tokens_to_keep: int,
            eos: Tensor) -> Tensor:
    """Every processor of one step in transformers' order, for rows that share the settings `s` (a
    `generation.config.Settings`). `eos`: its eos ids within the vocabulary (`in_vocabulary`)."""
    scores = apply_repetition_penalty(scores, history, s.repetition_penalty, ignore)
    scores = ban_repeated_ngrams(scores, history, s.no_repeat_ngram_size)
    if n_generated < s.min_new_tokens:
        scores = suppress_tokens(scores, eos, checked=True)
    if s.do_sample:
        scores = warp(scores, s.temperature, s.top_k, s.top_p, min_tokens_to_keep)
    return scores
