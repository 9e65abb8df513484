"""Beam search, a port of transformers 5.23's vectorised beam search (`GenerationMixin._beam_search`), on the same
decoder interface (`prefill` / `step` / `reorder_beams`) and logits processors as sampling and greedy decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from instructblip.generation.config import Settings
from instructblip.generation.logits import in_vocabulary, process, with_prefix

_NEG = -1.0e9  # transformers' "very negative" score in beam search


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


def beam_search(lm, state, logits: Tensor, prefix: Tensor, ignore: Tensor | None, s: Settings) -> Tensor:
    """transformers 5.23's beam search (`GenerationMixin._beam_search`), over the generated tokens: `BeamSearch`
    run to its end. Returns (B * num_return_sequences, new_len), best first per item."""
    search = BeamSearch(lm, state, logits, prefix, ignore, s)
    while not search.step():
        pass
    return search.result()


class BeamSearch:
    """transformers 5.23's beam search, one step per `step()` (a server interleaves them with other work).

    Each step keeps the top `2 * num_beams` continuations (more with several eos ids) of all beams of an item; the
    best `num_beams` of them that did not stop keep running, and those among the first `num_beams` that stopped (eos
    or the length limit) compete for the `num_beams` finished slots with score `sum log p / n ** length_penalty`,
    n = generated tokens (eos included). `early_stopping`: True stops an item once `num_beams` are finished; False
    stops when the best running beam, at its current length, cannot beat the worst finished one; "never" assumes the
    most favourable length.

    Args: the decoder (`lm`) and what `decode.prefill` returns for the prompts copied `num_beams` times each (state,
    first logits (B * K, V), penalty prefix, ignore), and the settings.
    """

    def __init__(self, lm, state, logits: Tensor, prefix: Tensor, ignore: Tensor | None, s: Settings):
        K, T, V = s.num_beams, s.max_new_tokens, logits.shape[-1]
        B = logits.shape[0] // K
        device = logits.device
        self.lm, self.state, self.logits, self.prefix, self.ignore, self.s = lm, state, logits, prefix, ignore, s
        self.B, self.K, self.T, self.V = B, K, T, V
        self.eos = in_vocabulary(s.eos, V)  # for suppressing; stopping checks every id of s.eos
        self.width = max(2, 1 + s.eos.numel()) * K  # candidates kept per step
        self.top_beams = torch.arange(self.width, device=device) < K  # (width,) only these may enter the finished set
        self.running = torch.full((B, K, T), s.pad, dtype=torch.long, device=device)  # running beams' tokens
        self.running_scores = torch.zeros(B, K, device=device)  # sum of log-probs; only beam 0 starts
        self.running_scores[:, 1:] = _NEG
        self.finished = torch.full((B, K, T), s.pad, dtype=torch.long, device=device)
        self.finished_scores = torch.full((B, K), _NEG, device=device)
        self.finished_len = torch.zeros(B, K, dtype=torch.long, device=device)
        self.is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
        self.improvable = torch.ones(B, 1, dtype=torch.bool, device=device)  # transformers' early-stop heuristic
        self.item_offset = torch.arange(B, device=device)[:, None] * K  # (B, 1)
        self.t = 0
        self.done = T == 0

    def step(self) -> bool:
        """One step of every beam; True once the search is over."""
        if self.done:
            return True
        s, t, B, K, T, V, width = self.s, self.t, self.B, self.K, self.T, self.V, self.width
        lp = s.length_penalty
        logits = self.logits if t == 0 else self.lm.step(self.state, self.running[:, :, t - 1].reshape(B * K))
        self.logits = None
        log_probs = F.log_softmax(logits, dim=-1)  # (B*K, V)
        history = with_prefix(self.prefix, self.running.reshape(B * K, T)[:, :t])
        log_probs = process(log_probs, history, self.ignore, t, s, max(2, s.eos.numel() + 1), self.eos)
        accumulated = (log_probs.view(B, K, V) + self.running_scores[:, :, None]).view(B, K * V)

        # a. the best `width` continuations over all beams of an item
        if s.do_sample:
            picked = torch.multinomial(F.softmax(accumulated, dim=-1), width, generator=s.generator)  # (B, width)
            cand_scores = accumulated.gather(1, picked)
        else:
            cand_scores, picked = _topk_over_beams(accumulated.view(B, K, V), width)
        source = picked // V  # (B, width) beam each continuation extends
        cand = self.running.take_along_dim(source[:, :, None], 1)  # (B, width, T)
        cand[:, :, t] = picked % V
        stops = torch.isin(cand[:, :, t], s.eos) | (t + 1 >= T)  # (B, width)

        # b. the best `K` continuations that did not stop keep running
        live_scores = cand_scores + stops.float() * _NEG
        keep = torch.topk(live_scores, K)[1]  # (B, K)
        self.running = cand.take_along_dim(keep[:, :, None], 1)
        self.running_scores = live_scores.gather(1, keep)
        running_source = source.gather(1, keep)

        # c. stopped continuations among the first K enter the finished set if they beat its worst
        just_finished = stops & self.top_beams[None, :]
        scores = cand_scores / ((t + 1) ** lp)
        full = self.is_finished.all(-1, keepdim=True) & (s.early_stopping is True)
        scores += full.float() * _NEG
        scores += (~self.improvable).float() * _NEG
        scores += (~just_finished) * _NEG
        merged_scores = torch.cat([self.finished_scores, scores], 1)  # (B, K + width)
        best = torch.topk(merged_scores, K)[1]
        self.finished = torch.cat([self.finished, cand], 1).take_along_dim(best[:, :, None], 1)
        self.finished_scores = merged_scores.gather(1, best)
        self.finished_len = torch.cat([self.finished_len, torch.full_like(cand_scores, t + 1, dtype=torch.long)],
                                      1).gather(1, best)
        self.is_finished = torch.cat([self.is_finished, just_finished], 1).gather(1, best)

        # d. the cache follows the running beams; decide whether to go on
        index = (running_source + self.item_offset).view(-1)
        if not torch.equal(index, torch.arange(index.shape[0], device=index.device)):  # else every beam extends itself
            self.state.reorder_beams(index)
        n = self.t = t + 1
        best_length = T if s.early_stopping == "never" and lp > 0.0 else n
        best_running = self.running_scores[:, :1] / (best_length**lp)
        worst_finished = torch.where(self.is_finished, self.finished_scores.min(1, keepdim=True)[0], _NEG)
        self.improvable = self.improvable & (best_running > worst_finished).any(-1, keepdim=True)
        all_full = bool(self.is_finished.all()) and s.early_stopping is True
        self.done = not bool(self.improvable.any()) or all_full or bool(stops.all()) or n >= T
        return self.done

    def result(self) -> Tensor:
        """(B * num_return_sequences, new_len), best first per item, padded after each end."""
        B, T, s = self.B, self.T, self.s
        R = s.num_return_sequences
        out = self.finished[:, :R].reshape(B * R, T)  # (B, R, T) -> (B*R, T)
        new_len = int(self.finished_len[:, :R].max())
        positions = torch.arange(T, device=out.device)[None, :]
        out = out.masked_fill(positions >= self.finished_len[:, :R].reshape(B * R, 1), s.pad)  # pad after each end
        return out[:, :new_len]
