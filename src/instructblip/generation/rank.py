"""Vocabulary ranking (the paper's closed-set inference): score candidate answers by their log-likelihood given the
image and the prompt, on the decoder interface's `prompt_memory` / `continuation_hidden`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from instructblip.generation.config import default_eos_ids
from instructblip.generation.decode import prepare_prompt


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
    if append_eos is None:
        append_eos = bool(model.config.text_config.is_encoder_decoder)
    if append_eos:
        eos = default_eos_ids(model.config)
        if not eos:
            raise ValueError("append_eos needs an eos id in the text config")
        lists = [[c + [eos[0]] for c in cands] for cands in lists]

    rows = [(b, c) for b in range(B) for c in range(len(lists[b]))]  # one LM row per (sample, candidate)
    C = max(len(cands) for cands in lists)
    device = prompt.inputs_embeds.device
    scores = torch.full((B, C), -math.inf, device=device)
    memory = lm.prompt_memory(prompt.inputs_embeds, prompt.attention_mask)  # (B, L, D): T5's encoder output
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
        hidden = lm.continuation_hidden(memory.index_select(0, sample_index), mask, targets, valid)  # (R, n_max, D)
        log_probs = F.log_softmax(lm.logits(hidden).float(), dim=-1)  # (R, n_max, V)
        token_log_probs = log_probs.gather(-1, targets[..., None]).squeeze(-1).masked_fill(~valid, 0.0)
        total = token_log_probs.sum(1)  # (R,)
        if reduction == "mean":
            total = total / valid.sum(1)
        for (b, c), value in zip(chunk, total, strict=True):
            scores[b, c] = value
    return RankOutput(scores=scores, best=scores.argmax(1))
