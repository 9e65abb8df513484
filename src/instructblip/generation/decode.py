"""The one token iterator, and `generate` / `stream` on it.

A decoding run, in the order it happens:
1. `prepare_prompt`: the image features (computed once per call, or passed in) merged into the prompt embeddings;
2. the language model's `prefill` (one forward over the prompt into a KV cache; T5: the encoder once, the
   cross-attention keys/values once); the rows are copied for beams or several returned sequences;
3. per step: logits -> processors (`logits.process`, transformers' order) -> next tokens -> the model's `step`
   (the KV cache grows by one position). Every row has its own settings (`Settings`: lengths, eos, penalties,
   sampling and its generator, stop strings) and stops on its own: eos, its length, a stop string, or its caller.

`Decoding` is that loop, one step per `next()`; `generate`, `stream`, the server's scheduler and evaluation all run
on it. Beam search (`beam.py`) is the other strategy on the same decoder interface (`prefill` / `step` /
`reorder_beams`, which LLaMA and T5 both implement) and the same processors.

What `generate` returns: the generated tokens only, (B * num_return_sequences, new_len), for both families: no prompt
for decoder-only models (transformers 5.x returns prompt + new tokens) and no decoder start token for T5
(transformers returns [start] + new tokens). Rows that finished early are filled with `pad_token_id` after their eos
(or after the token that completed a stop string, which stays, as in transformers). Lengths, eos and pad defaults
and `penalty_scope`: see `generation/config.py`.

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

from instructblip.generation.beam import beam_search
from instructblip.generation.config import (
    GenerationConfig,
    Settings,
    caption_bos,
    default_eos_ids,
    settle,
)
from instructblip.generation.detokenize import Detokenizer, incremental_text
from instructblip.generation.logits import apply_repetition_penalty, ban_repeated_ngrams, in_vocabulary, process, sample

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
            caption_token = caption_bos(model.config, default_eos_ids(model.config))
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


def penalty_prefix(model, prompt: Prompt, scope: str) -> tuple[Tensor, Tensor | None]:
    """(ids the penalties see before the generated tokens (B, P), leading padding per row (B,) or None): T5's
    decoder start token; with penalty_scope "all" the prompt's ids; else nothing."""
    B = prompt.attention_mask.shape[0]
    device = prompt.inputs_embeds.device
    if model.config.text_config.is_encoder_decoder:
        start = model.config.text_config.decoder_start_token_id
        return torch.full((B, 1), start, dtype=torch.long, device=device), None
    if scope == "all" and prompt.input_ids is not None:
        return prompt.input_ids, prompt.ignore
    return torch.empty(B, 0, dtype=torch.long, device=device), None


def prefill(lm, prompt: Prompt, max_new_tokens: int, copies: Sequence[int], prefix: Tensor, ignore: Tensor | None
            ) -> tuple[object, Tensor, Tensor, Tensor | None]:
    """Run the prompt once per item, then copy each item's row `copies[b]` times (beams, several sequences), its
    cache included: (decoder state, first logits (N, V), penalty prefix (N, P), ignore (N,) or None)."""
    *_, done = prefill_chunks(lm, prompt, max_new_tokens, copies, prefix, ignore, prompt.attention_mask.shape[1])
    return done


def prefill_chunks(lm, prompt: Prompt, max_new_tokens: int, copies: Sequence[int], prefix: Tensor,
                   ignore: Tensor | None, chunk: int) -> Iterator[tuple | None]:
    """`prefill`, `chunk` prompt positions per `next()` where the model can (decoder-only): None after each chunk
    but the last, then what `prefill` returns."""
    for done in lm.prefill_chunks(prompt.inputs_embeds, prompt.attention_mask, max_new_tokens, chunk):
        if done is None:
            yield None
    state, logits = done
    B = logits.shape[0]
    if list(copies) != [1] * B:
        index = torch.repeat_interleave(torch.arange(B, device=logits.device),
                                        torch.tensor(list(copies), device=logits.device))  # (N,)
        state.select(index)
        logits, prefix = logits.index_select(0, index), prefix.index_select(0, index)
        ignore = ignore.index_select(0, index) if ignore is not None else None
    yield state, logits, prefix, ignore


# ---------------------------------------------------------------------------------------------------------------------
# the token iterator


@dataclass
class TokenLogprobs:
    """A generated token's log-probability under the model (the log-softmax of its logits, before penalties,
    temperature and filtering: what the model thinks, whatever the sampler did) and the `k` most likely tokens'."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class Decoding:
    """One greedy / sampling run over a batch: prefill once, then one step per `next()`, yielding each row's new
    token (N,) (finished rows get their pad). Rows come in groups of adjacent rows that share one `Settings`.

    Args:
        model: an `InstructBlipForConditionalGeneration` (its `language_model` implements the decoder interface).
        prompt: the batch's prompt (`prepare_prompt`), one item per row of `settings`.
        settings: per prompt item, its settled options; items that share one object are processed together.
        copies: per prompt item, how many rows decode it (sampling several sequences), default 1 each.
        prefix, ignore: the ids the penalties see before the generated ones (`penalty_prefix`), per item.
        tokenizer: needed for stop strings (`decode(ids, skip_special_tokens=True)`).
        detokenize: per prompt item, whether its rows keep their text up to date (`text[i]`, a `Detokenizer`, for
            streaming); rows with stop strings always do.
        logprobs: per prompt item, None, or how many top tokens to report with each generated token's
            log-probability (`logprobs[i]` after each step, a `TokenLogprobs`).
        prefilled: what `prefill_chunks` gave for this prompt (the caller ran the prefill in chunks), else None.

    Between steps a caller may `finish(i, reason)` a row (its client went away), `keep(rows)` to drop finished
    rows from the batch (the KV cache is compacted), so that they cost nothing more, and `admit(other)` to add the
    rows of another run that has not taken its first step (continuous batching). Every row keeps its own step
    count, so rows that joined late get the tokens they get alone.
    """

    def __init__(self, model, prompt: Prompt, settings: Sequence[Settings], copies: Sequence[int] | None = None,
                 prefix: Tensor | None = None, ignore: Tensor | None = None, tokenizer=None,
                 detokenize: Sequence[bool] | None = None, logprobs: Sequence[int | None] | None = None,
                 prefilled: tuple | None = None):
        B = prompt.attention_mask.shape[0]
        if len(settings) != B:
            raise ValueError(f"{len(settings)} settings for {B} prompts")
        copies = list(copies) if copies is not None else [1] * B
        live = [bool(s.stop_strings) or bool(d) for s, d in zip(settings, detokenize or [False] * B, strict=True)]
        if any(live) and tokenizer is None:
            raise ValueError("stop strings (and streamed text) need the tokenizer: pass tokenizer=")
        if prefix is None:
            prefix, ignore = penalty_prefix(model, prompt, "generated")
        self.lm = model.language_model
        self.tokenizer = tokenizer
        if prefilled is None:
            longest = max(s.max_new_tokens for s in settings)
            prefilled = prefill(self.lm, prompt, longest, copies, prefix, ignore)
        self.state, logits, prefix, ignore = prefilled
        device = logits.device
        self.logits: Tensor | None = logits  # (N, V) for the next token; None once consumed
        self.vocab_size = logits.shape[-1]

        def per_row(values: Sequence) -> list:
            return [v for v, c in zip(values, copies, strict=True) for _ in range(c)]

        self.settings = per_row(settings)
        self.history = prefix  # (N, P + t): the penalties' ids
        self.ignore = ignore
        N = len(self.settings)
        self.steps = [0] * N  # steps taken by each row (rows that joined a running batch started later)
        self.count = [0] * N  # tokens generated per row, eos included
        self.reason: list[str | None] = [None] * N  # "stop" (eos, a stop string) or "length" once finished
        self.text = [Detokenizer(tokenizer, s.stop_strings) if x else None
                     for s, x in zip(self.settings, per_row(live), strict=True)]
        self.top_logprobs: list[int | None] = per_row(logprobs or [None] * B)
        self.logprobs: list[TokenLogprobs | None] = [None] * N  # this step's, for rows that asked
        self._unfinished = torch.ones(N, dtype=torch.bool, device=device)
        self._regroup()

    def _regroup(self) -> None:
        """Spans of adjacent rows that share one `Settings` (processed in one call), and per-row pad and eos."""
        self.spans: list[tuple[int, int, Settings, Tensor]] = []
        start = 0
        for i in range(1, len(self.settings) + 1):
            if i == len(self.settings) or self.settings[i] is not self.settings[start]:
                s = self.settings[start]
                self.spans.append((start, i, s, in_vocabulary(s.eos, self.vocab_size)))
                start = i
        device = self._unfinished.device
        self._pad = torch.tensor([s.pad for s in self.settings], dtype=torch.long, device=device)
        self._want_logprobs = [i for i, k in enumerate(self.top_logprobs) if k is not None]
        # greedy spans that differ only in their repetition penalty and minimum length (a server's requests) run as
        # one group: per-row values in tensors instead of a dozen small ops per span and step
        self._groups: list[_GreedyGroup] = []
        self._alone = list(self.spans)
        if len(self.spans) > 1:
            by_kind: dict[tuple, list] = {}
            for span in self.spans:
                s = span[2]
                if not s.do_sample:
                    by_kind.setdefault((s.no_repeat_ngram_size, tuple(s.eos.tolist())), []).append(span)
            grouped = [spans for spans in by_kind.values() if len(spans) > 1]
            self._groups = [_GreedyGroup.of(spans, device) for spans in grouped]
            in_groups = {id(span) for spans in grouped for span in spans}
            self._alone = [span for span in self.spans if id(span) not in in_groups]
        eos_sets = {tuple(span[2].eos.tolist()) for span in self.spans}
        self._eos = self.spans[0][2].eos if len(eos_sets) == 1 and self.spans else None  # every row's, if one

    @property
    def rows(self) -> int:
        return len(self.settings)

    def done(self) -> bool:
        return all(r is not None for r in self.reason)

    def __iter__(self) -> Decoding:
        return self

    def __next__(self) -> Tensor:
        """One step: the new token of every row (N,); StopIteration once every row has finished."""
        if self.done():
            raise StopIteration
        logits = self._next_logits()
        self.logits = None
        if len(self.spans) == 1:  # one group (a generate call): no slicing
            _, _, s, eos = self.spans[0]
            scores = process(logits, self.history, self.ignore, self.steps[0], s, 1, eos)
            tokens = sample(scores, s.generator) if s.do_sample else scores.argmax(-1)
        else:
            tokens = torch.empty(self.rows, dtype=torch.long, device=logits.device)
            for group in self._groups:
                rows = group.rows
                ignore = self.ignore.index_select(0, rows) if self.ignore is not None else None
                steps = torch.tensor([self.steps[i] for i in group.first], device=logits.device)
                steps = steps.repeat_interleave(group.sizes)  # (R,)
                scores = group.process(logits.index_select(0, rows), self.history.index_select(0, rows), ignore,
                                       steps)
                tokens.index_copy_(0, rows, scores.argmax(-1))
            for start, end, s, eos in self._alone:
                rows = slice(start, end)
                ignore = self.ignore[rows] if self.ignore is not None else None
                scores = process(logits[rows], self.history[rows], ignore, self.steps[start], s, 1, eos)
                tokens[rows] = sample(scores, s.generator) if s.do_sample else scores.argmax(-1)
        tokens = torch.where(self._unfinished, tokens, self._pad)
        if self._want_logprobs:
            self._logprobs(logits, tokens)
        self.history = torch.cat([self.history, tokens[:, None]], 1)
        self.steps = [t + 1 for t in self.steps]
        self._finish_rows(tokens)
        return tokens

    def _next_logits(self) -> Tensor:
        """The logits for the next token (N, V): the prefill's, or one step of the model on the last tokens."""
        if self.logits is None:
            self.logits = self.lm.step(self.state, self.history[:, -1])
        return self.logits

    def _logprobs(self, logits: Tensor, tokens: Tensor) -> None:
        rows = self._want_logprobs
        index = torch.tensor(rows, device=logits.device)
        logp = torch.log_softmax(logits.index_select(0, index).float(), -1)  # (R, V)
        chosen = logp.gather(1, tokens.index_select(0, index)[:, None])[:, 0].tolist()
        k = max(self.top_logprobs[i] for i in rows)
        top_values, top_ids = logp.topk(k, -1) if k else (logp[:, :0], logp[:, :0].long())
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        self.logprobs = [None] * self.rows
        for j, i in enumerate(rows):
            if self.reason[i] is None:
                k_i = self.top_logprobs[i]
                self.logprobs[i] = TokenLogprobs(chosen[j], top_ids[j][:k_i], top_values[j][:k_i])

    def _finish_rows(self, tokens: Tensor) -> None:
        """Mark the rows this step finished: eos, their length, a stop string."""
        if self._eos is not None:
            stopped = torch.isin(tokens, self._eos)
        else:
            stopped = torch.cat([torch.isin(tokens[a:b], s.eos) for a, b, s, _ in self.spans])
        stopped = (stopped & self._unfinished).tolist()
        ids = tokens.tolist() if any(t is not None for t in self.text) else None
        finished = False
        for i in range(self.rows):
            if self.reason[i] is not None:
                continue
            self.count[i] += 1
            if stopped[i]:
                self.reason[i], finished = "stop", True
                continue
            text = self.text[i]
            if text is not None:
                text.add(ids[i])
                cut = text.stop_at()
                if cut is not None:
                    text.cut(cut)
                    self.reason[i], finished = "stop", True
                    continue
            if self.count[i] >= self.settings[i].max_new_tokens:
                self.reason[i], finished = "length", True
        if finished:
            self._unfinished = torch.tensor([r is None for r in self.reason], device=tokens.device)

    def finish(self, row: int, reason: str) -> None:
        """End a row from outside (its caller went away, a deadline passed)."""
        if self.reason[row] is None:
            self.reason[row] = reason
            self._unfinished[row] = False

    _PER_ROW = ("settings", "steps", "count", "reason", "text", "top_logprobs", "logprobs")

    def room(self) -> int:
        """Decoder positions the rows may still need: the most new tokens any row may still take."""
        return max((s.max_new_tokens - t for s, t in zip(self.settings, self.steps, strict=True)), default=0) + 1

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows, in this order (drop finished ones): the KV cache and every per-row list follow."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.history.device)
        self.state.select(index)
        if self.logits is not None:
            self.logits = self.logits.index_select(0, index)
        self._take(rows, index)
        self._regroup()
        if hasattr(self.state, "compact"):  # positions only the rows that left needed go
            self.state.compact(self.room())

    def _take(self, rows: Sequence[int], index: Tensor) -> None:
        """`keep` for everything but the model state and the logits."""
        self.history = self.history.index_select(0, index)
        self.ignore = self.ignore.index_select(0, index) if self.ignore is not None else None
        self._unfinished = self._unfinished.index_select(0, index)
        for name in self._PER_ROW:
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in rows])

    def admit(self, other: Decoding, keep: Sequence[int] | None = None) -> None:
        """Append the rows of `other`, a run over other prompts (its own prefill) that has not taken a step: from
        the next step on they decode with these rows. The running rows take their pending model step first, on
        their own, so that every row then has the logits of its next token. `keep`: the rows of this run that stay,
        in order (default all); the others (finished) leave in the same copy of the cache."""
        if other.logits is None:
            raise ValueError("admit() takes a run before its first step")
        if self.rows and not self.done():
            mine = self._next_logits()
        else:
            mine = other.logits.new_zeros(self.rows, other.logits.shape[1])  # finished rows: never used
        index = None
        if keep is not None and list(keep) != list(range(self.rows)):
            index = torch.tensor(list(keep), dtype=torch.long, device=self.history.device)
            mine = mine.index_select(0, index)
            self._take(keep, index)
        self.state.extend(other.state, max(self.room(), other.room()), index)
        self.logits = torch.cat([mine, other.logits])
        pad = self.vocab_size  # the penalties' spare column: a padding id that matches no token
        width = max(self.history.shape[1], other.history.shape[1])
        fronts = (width - self.history.shape[1], width - other.history.shape[1])
        self.history = torch.cat([F.pad(h, (f, 0), value=pad)
                                  for h, f in zip((self.history, other.history), fronts, strict=True)])
        if self.ignore is not None or other.ignore is not None:  # leading prompt padding moves with the front
            zeros = torch.zeros(self.history.shape[0], dtype=torch.long, device=self.history.device)
            mine, theirs = (x.ignore if x.ignore is not None else zeros[: x.rows] for x in (self, other))
            self.ignore = torch.cat([mine + fronts[0], theirs + fronts[1]])
        self._unfinished = torch.cat([self._unfinished, other._unfinished])
        for name in self._PER_ROW:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self._regroup()


@dataclass
class _GreedyGroup:
    """Greedy spans of a `Decoding` with one no-repeat n-gram size and one eos set, processed together: the
    repetition penalty and the minimum length per row. The same operations per row as `logits.process`, so the same
    tokens."""

    rows: Tensor  # (R,) the rows, span after span
    first: list[int]  # each span's first row (its rows share a step count)
    sizes: Tensor  # (spans,) rows per span
    penalty: Tensor  # (R, 1)
    min_new: Tensor  # (R,)
    ngram: int
    eos: Tensor  # the eos ids within the vocabulary

    @classmethod
    def of(cls, spans: list, device) -> _GreedyGroup:
        rows = [i for start, end, _, _ in spans for i in range(start, end)]
        sizes = [end - start for start, end, _, _ in spans]

        def per_row(values: list) -> list:
            return [v for v, n in zip(values, sizes, strict=True) for _ in range(n)]

        settings = [span[2] for span in spans]
        penalty = torch.tensor(per_row([s.repetition_penalty for s in settings]), device=device)  # (R,)
        return cls(rows=torch.tensor(rows, device=device), first=[span[0] for span in spans],
                   sizes=torch.tensor(sizes, device=device), penalty=penalty[:, None],
                   min_new=torch.tensor(per_row([s.min_new_tokens for s in settings]), device=device),
                   ngram=settings[0].no_repeat_ngram_size, eos=spans[0][3])

    def process(self, scores: Tensor, history: Tensor, ignore: Tensor | None, steps: Tensor) -> Tensor:
        scores = apply_repetition_penalty(scores, history, self.penalty, ignore)
        scores = ban_repeated_ngrams(scores, history, self.ngram)
        if self.eos.numel():
            early = steps < self.min_new  # (R,) rows whose eos is still suppressed
            if bool(early.any()):
                columns = scores.index_select(1, self.eos)
                scores = scores.index_copy(1, self.eos, columns.masked_fill(early[:, None], -math.inf))
        return scores


# ---------------------------------------------------------------------------------------------------------------------
# public entry points


@torch.no_grad()
def generate(model, pixel_values: Tensor | None = None, qformer_input_ids: Tensor | None = None,
             qformer_attention_mask: Tensor | None = None, input_ids: Tensor | None = None,
             attention_mask: Tensor | None = None, inputs_embeds: Tensor | None = None,
             interpolate_pos_encoding: bool = False, image_features: Tensor | None = None,
             generator: torch.Generator | None = None, streamer: Any = None, tokenizer=None,
             **kwargs: Any) -> Tensor:
    """Generate text tokens for a batch of images and prompts; returns the NEW tokens only,
    (B * num_return_sequences, new_len), rows of one item adjacent, padded with `pad_token_id` after eos.

    Inputs as for `model.forward` (the processor's output): `pixel_values` (or precomputed `image_features`),
    `qformer_input_ids`/`qformer_attention_mask`, and `input_ids`/`attention_mask` (or `inputs_embeds`); without a
    prompt, the image tokens plus bos (captioning). Decoding options: the fields of `GenerationConfig` as keyword
    arguments (transformers' names: `max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `num_beams`,
    `length_penalty`, `early_stopping`, `num_return_sequences`, `repetition_penalty`, `no_repeat_ngram_size`,
    `eos_token_id`, `pad_token_id`, `stop_strings` with `tokenizer=`, ...) or `generation_config=`; greedy by
    default. `generator`: a seeded `torch.Generator` for sampling.
    `streamer`: an object with `put(tokens)` and `end()` (transformers' streamer protocol), called with the new
    token (a (1,) tensor) of each step; batch size 1 without beam search. See also `stream`.

    The search runs in `torch.inference_mode` (each small op of a decoding step dispatches faster than under
    `no_grad`); the tokens are copied out of it, so the result is an ordinary tensor.
    """
    config, unused = GenerationConfig.from_kwargs(getattr(model, "generation_config", None), **kwargs)
    ignored = {k for k, v in unused.items() if v is not None}
    ignored.discard("use_cache")  # transformers' flag; the cache is always used here
    if ignored:
        warnings.warn(f"generate ignores the arguments {sorted(ignored)}", stacklevel=3)
    inputs = dict(pixel_values=pixel_values, qformer_input_ids=qformer_input_ids,
                  qformer_attention_mask=qformer_attention_mask, input_ids=input_ids, attention_mask=attention_mask,
                  inputs_embeds=inputs_embeds, interpolate_pos_encoding=interpolate_pos_encoding,
                  image_features=image_features)
    with torch.inference_mode():
        out = _generate(model, config, inputs, generator, streamer, tokenizer)
    return out.clone()  # outside inference mode: an ordinary tensor (in-place edits and autograd work on it)


def _start(model, config: GenerationConfig, inputs: dict, generator: torch.Generator | None
           ) -> tuple[Prompt, Settings, Tensor, Tensor | None]:
    """Validate, build the prompt and settle the options: (prompt, settings, penalty prefix, ignore)."""
    config.validate()
    prompt = prepare_prompt(model, **inputs)
    settings = settle(config, model.config, prompt.attention_mask.shape[1], prompt.inputs_embeds.device, generator)
    prefix, ignore = penalty_prefix(model, prompt, config.penalty_scope)
    return prompt, settings, prefix, ignore


def _generate(model, config: GenerationConfig, inputs: dict, generator, streamer, tokenizer) -> Tensor:
    prompt, s, prefix, ignore = _start(model, config, inputs, generator)
    B = prompt.attention_mask.shape[0]
    if s.num_beams > 1:
        if streamer is not None:
            raise ValueError("streaming works with greedy decoding or sampling, not with num_beams > 1")
        if config.stop_strings:
            raise ValueError("stop_strings work with greedy decoding or sampling, not with num_beams > 1")
        lm = model.language_model
        copies = [max(s.num_beams, s.num_return_sequences)] * B
        return beam_search(lm, *prefill(lm, prompt, s.max_new_tokens, copies, prefix, ignore), s)
    run = Decoding(model, prompt, [s] * B, [s.num_return_sequences] * B, prefix, ignore, tokenizer)
    if streamer is not None and run.rows != 1:
        raise ValueError(f"streaming needs a single sequence; this call makes {run.rows}")
    tokens = []
    for token in run:
        tokens.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
    if streamer is not None:
        streamer.end()
    return torch.stack(tokens, 1)  # (N, new_len)


@torch.inference_mode()
def stream(model, tokenizer, generator: torch.Generator | None = None, **kwargs: Any) -> Iterator[str]:
    """Like `generate` (same arguments) for one sequence, yielding text pieces as tokens are produced.

    `tokenizer`: anything with `decode(ids, skip_special_tokens=True)`. Greedy or sampling only (beam search needs
    the whole search before any token is final: ValueError); batch size 1 and num_return_sequences 1. Generation
    stops at eos, which is not part of the text.
    """
    if kwargs.get("num_beams", 1) != 1:
        raise ValueError(f"stream works with greedy decoding or sampling, not num_beams={kwargs['num_beams']}")
    if kwargs.get("streamer") is not None:
        raise ValueError("stream() is itself the streamer; do not pass streamer=")
    names = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask",
             "inputs_embeds", "interpolate_pos_encoding", "image_features")
    inputs = {k: kwargs.pop(k) for k in names if k in kwargs}
    config, _ = GenerationConfig.from_kwargs(getattr(model, "generation_config", None), **kwargs)
    prompt, s, prefix, ignore = _start(model, config, inputs, generator)
    B = prompt.attention_mask.shape[0]
    run = Decoding(model, prompt, [s] * B, [s.num_return_sequences] * B, prefix, ignore, tokenizer)
    if run.rows != 1:
        raise ValueError(f"stream needs a single sequence; this call makes {run.rows}")
    eos = set(s.eos.tolist())

    def tokens() -> Iterator[int]:
        for token in run:
            if int(token) in eos:
                return
            yield int(token)

    yield from incremental_text(tokenizer, tokens())
