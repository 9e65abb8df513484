"""LLaMA / Vicuna decoder: RMSNorm, rotary positions, SwiGLU, multi-head or grouped-query attention, a KV cache.

The model takes input embeddings (the composite model puts image features among them) and returns hidden states;
`logits()` applies the LM head. q, k and v share one projection, as do gate and up (the checkpoint loader splits and
joins them).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from instructblip.models.config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps)  # x * x: one cheap op, pow(x, 2)'s result
        return self.weight * x.to(dtype)


class KVCache:
    """Keys and values of every layer, preallocated to `max_length` positions: (B, H_kv, max_length, head_dim).

    `length` positions are filled. Beam search reorders the batch rows with `reorder`.
    """

    def __init__(self, num_layers: int, batch: int, num_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, num_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0
        self.max_length = max_length
        self.rope: tuple[Tensor, Tensor] | None = None  # LLaMA: cos, sin tables (max_length, 1, head_dim), see rope()

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H_kv, T, hd) after the filled positions; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} positions; {end} were asked for")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def relayout(self, drop: int, capacity: int) -> None:
        """New buffers of `capacity` positions holding the filled positions after the first `drop` (columns that
        are padding in every row), so that a long-running batch neither runs out of room nor keeps dead columns."""
        keep = self.length - drop
        capacity = max(capacity, keep)
        for cache in (self.keys, self.values):
            for i, t in enumerate(cache):
                out = t.new_zeros(t.shape[0], t.shape[1], capacity, t.shape[3])
                out[:, :, :keep] = t[:, :, drop:self.length]
                cache[i] = out
        self.length, self.max_length = keep, capacity
        self.rope = None

    def join(self, other: KVCache, room: int, index: Tensor | None = None, drop: int = 0) -> tuple[int, int]:
        """Append the rows of `other` after this cache's rows `index` (all when None), without this cache's first
        `drop` columns (padding in every kept row). The filled positions of both end at one column, the shorter side
        getting padding columns in front, and `room` positions follow. Returns (padding columns in front of this
        cache's rows, of other's).

        The kept positions are copied once. The new buffers are allocated empty and only the padding in front is
        zeroed: the positions after the filled ones are written before anything reads them, and a buffer of a
        running batch is mostly such room."""
        mine = self.length - drop
        length = max(mine, other.length)
        front, other_front = length - mine, length - other.length
        capacity = length + room
        for ours, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
                kept = a[:, :, drop:self.length]
                if index is not None:
                    kept = kept.index_select(0, index)
                n = kept.shape[0]
                out = a.new_empty(n + b.shape[0], a.shape[1], capacity, a.shape[3])  # (Na + Nb, H, C, hd)
                out[:n, :, :front].zero_()
                out[:n, :, front:length] = kept
                out[n:, :, :other_front].zero_()
                out[n:, :, other_front:length] = b[:, :, : other.length]
                ours[i] = out
        self.length, self.max_length = length, capacity
        self.rope = None
        return front, other_front

    def reorder(self, index: Tensor) -> None:
        """Row i becomes old row index[i] (beam search reorders; expanding for beams may change the batch size).

        Each buffer is gathered whole into a new one: index_select over a contiguous tensor takes a fast path that a
        slice of the filled positions (strided) does not, and writing in place needs a temporary as well. Measured at
        5 beams, 4 layers, 140 positions of which ~100 filled: 0.5 ms per step against 0.9 ms for the filled
        positions gathered in place."""
        for cache in (self.keys, self.values):
            for i, t in enumerate(cache):
                cache[i] = t.index_select(0, index)


def rotary(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and signed sin, each (B, T, 1, head_dim), for the given positions (B, T); computed in fp32.

    The sin's first half is negated: `_rotate` multiplies it with the halves swapped, so that
    x * cos + swap(x) * sin is the usual x * cos + cat(-x2, x1) * sin, the same numbers (a sign flip is exact)."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[..., None, :]  # (B, T, 1, hd)
    sin = emb.sin()
    sin[..., : head_dim // 2].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


def rope(cache: KVCache, position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """`rotary` for positions below `cache.max_length`, read from tables the cache keeps (made on first use): one
    lookup per decoding step instead of the ten small ops that compute them."""
    if cache.rope is None or cache.rope[0].dtype != dtype:  # (the cache and its tables are on the model's device)
        positions = torch.arange(cache.max_length, device=position_ids.device)
        cache.rope = rotary(positions, head_dim, theta, dtype)  # (max_length, 1, hd) each
    cos, sin = cache.rope
    return cos[position_ids], sin[position_ids]  # (B, T, 1, hd)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., hd) rotated by the positions of cos and the signed sin of `rotary`."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin  # roll: (x2, x1)


def causal_mask(attention_mask: Tensor | None, B: int, T: int, past: int, device: torch.device) -> Tensor | None:
    """A boolean (B, 1, T, past + T) mask for T new queries after `past` cached positions, or None when plain causal
    attention (or none, T == 1) will do. attention_mask (B, past + T): 1 for real tokens, 0 for padding."""
    S = past + T
    if attention_mask is not None and attention_mask.shape != (B, S):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(B, S)}")
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (past == 0 or T == 1):
        return None  # SDPA's is_causal (prefill) or no mask (one new token attends to everything)
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(past)  # key s visible to query t if s <= past+t
    mask = causal[None, None].expand(B, 1, T, S)
    if padded:
        mask = mask & attention_mask.bool()[:, None, None, :]
        # a query that is itself padding sees nothing; let it see itself so the softmax stays finite
        itself = torch.arange(S, device=device)[None, :] == torch.arange(past, S, device=device)[:, None]  # (T, S)
        mask = mask | itself[None, None]
    return mask


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        """The attention output projected back to (B, T, D)."""
        B, T, _ = x.shape
        H, H_kv = self.num_heads, self.num_kv_heads
        qkv = self.qkv(x).view(B, T, H + 2 * H_kv, self.head_dim)  # (B, T, H + 2 H_kv, hd)
        qk = _rotate(qkv[:, :, :H + H_kv], cos, sin)  # q and k rotated in one pass: (B, T, H + H_kv, hd)
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, hd)
        k = qk[:, :, H:].transpose(1, 2)  # (B, H_kv, T, hd)
        v = qkv[:, :, H + H_kv:].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H_kv, S, hd)
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,  # causal_mask is None for several queries only when past == 0
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, H * hd) -> (B, T, D)


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = LlamaAttention(config, layer)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class DecoderOnly(nn.Module):
    """The decoder interface generation uses, shared by the decoder-only models (LLaMA, OPT; T5 implements the same
    methods over its encoder-decoder): a subclass provides `embed_tokens`, `lm_head` (None when tied to the input
    embeddings), `new_cache()` and `forward(inputs_embeds, attention_mask, position_ids, cache)` -> hidden states."""

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden) if self.lm_head is not None else F.linear(hidden, self.embed_tokens.weight)

    def prefill(self, inputs_embeds: Tensor, attention_mask: Tensor, max_new_tokens: int
                ) -> tuple[LlamaDecodeState, Tensor]:
        """Run the prompt (B, L, D) once into a cache with room for `max_new_tokens` more; returns the state and the
        float32 logits for the first new token (B, V). Positions are `cumsum(mask) - 1` as in transformers'
        generate, so left padding gives the positions an unpadded prompt would have."""
        *_, done = self.prefill_chunks(inputs_embeds, attention_mask, max_new_tokens, inputs_embeds.shape[1])
        return done

    def prefill_chunks(self, inputs_embeds: Tensor, attention_mask: Tensor, max_new_tokens: int, chunk: int
                       ) -> Iterator[tuple[LlamaDecodeState, Tensor] | None]:
        """`prefill`, `chunk` prompt positions per `next()` (a server interleaves them with the decoding steps of
        a running batch): None after each chunk but the last, then (state, logits)."""
        B, L, _ = inputs_embeds.shape
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (B, L)
        cache = self.new_cache(B, L + max_new_tokens)
        for start in range(0, L, max(1, chunk)):
            end = min(L, start + max(1, chunk))
            hidden = self(inputs_embeds[:, start:end], attention_mask[:, :end], positions[:, start:end], cache)
            if end < L:
                yield None
        state = LlamaDecodeState(cache, attention_mask, positions[:, -1], padded=not bool(attention_mask.all()))
        yield state, self.logits(hidden[:, -1]).float()

    def step(self, state: LlamaDecodeState, tokens: Tensor) -> Tensor:
        """Feed one token per row (N,); returns the float32 logits for the next one (N, V)."""
        mask = None  # no padding: one new token attends to every position, no mask needed
        if state.padded:
            ones = state.attention_mask.new_ones(tokens.shape[0], 1)
            state.attention_mask = mask = torch.cat([state.attention_mask, ones], 1)  # (N, filled + 1)
        state.positions = state.positions + 1
        hidden = self(self.embed_tokens(tokens[:, None]), mask, state.positions[:, None], state.cache)
        return self.logits(hidden[:, -1]).float()

    def prompt_memory(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """What `continuation_hidden` reads of a prompt: for a decoder-only model, the prompt embeddings."""
        return inputs_embeds

    def continuation_hidden(self, memory: Tensor, attention_mask: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
        """Teacher forcing of `targets` (R, n) after the prompts (R, L, D) (rows left-aligned, `valid` marks real
        target tokens): hidden states (R, n, D), position i predicting target i."""
        L = attention_mask.shape[1]
        embeds = torch.cat([memory, self.embed_tokens(targets)], 1)  # (R, L + n, D)
        mask = torch.cat([attention_mask, valid.to(attention_mask.dtype)], 1)  # (R, L + n)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return self(embeds, mask, positions)[:, L - 1 : L - 1 + targets.shape[1]]


class Llama(DecoderOnly):
    """Decoder-only language model over input embeddings. `lm_head` is None in the base `InstructBlipModel` and when
    tied to the input embeddings (then `logits()` uses `embed_tokens.weight`)."""

    def __init__(self, config: LlamaConfig, lm_head: bool = True):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.has_lm_head = lm_head
        untied = lm_head and not config.tie_word_embeddings
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if untied else None
        self.gradient_checkpointing = False

    def new_cache(self, batch: int, max_length: int, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        w = self.embed_tokens.weight
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, max_length, c.head_dim, dtype or w.dtype,
                       w.device)

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """inputs_embeds (B, T, D) -> hidden states (B, T, D) after the final norm.

        attention_mask (B, past + T): 1 for real tokens, 0 for padding, over the cached and the new positions.
        position_ids (B, T): default `past .. past + T - 1`, as transformers' forward (its generate uses
        `cumsum(mask) - 1`; the generation functions pass those explicitly).
        """
        B, T, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None].expand(B, T)
        c = self.config
        if cache is not None:
            cos, sin = rope(cache, position_ids, c.head_dim, c.rope_theta, inputs_embeds.dtype)
        else:
            cos, sin = rotary(position_ids, c.head_dim, c.rope_theta, inputs_embeds.dtype)
        mask = causal_mask(attention_mask, B, T, past, inputs_embeds.device)
        x = inputs_embeds
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointed:
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.norm(x)


def leading_padding(mask: Tensor) -> int:
    """How many leading columns of `mask` (N, filled) are padding in every row (all of them when N is 0)."""
    used = mask.any(0)  # (filled,)
    return int(used.int().argmax()) if bool(used.any()) else mask.shape[1]


class LlamaDecodeState:
    """What a decoder-only (LLaMA, OPT) decoding run carries between steps: the KV cache, the mask over the cached
    positions (kept only when the prompt has padding; without, steps need no mask), and each row's last position."""

    def __init__(self, cache: KVCache, attention_mask: Tensor, positions: Tensor, padded: bool):
        self.cache = cache
        self.attention_mask = attention_mask  # (N, filled)
        self.positions = positions  # (N,)
        self.padded = padded

    def select(self, index: Tensor) -> None:
        """Row i becomes old row index[i]: copies for beams or returned sequences, or the rows still running."""
        self.cache.reorder(index)
        self.positions = self.positions.index_select(0, index)
        self.attention_mask = self.attention_mask.index_select(0, index)

    def _mask(self) -> Tensor:
        """The mask over the filled positions (N, filled); without padding it is not kept up to date, so made."""
        if self.padded:
            return self.attention_mask
        return self.attention_mask.new_ones(self.positions.shape[0], self.cache.length)

    def extend(self, other: LlamaDecodeState, room: int, index: Tensor | None = None) -> None:
        """Append the rows of `other` (continuous batching: requests join a running batch) after this state's rows
        `index` (all when None; the others are dropped in the same copy). The rows keep their own positions; the
        shorter side's filled positions get masked padding in front, and leading positions that are padding in
        every row are dropped. `room`: positions needed after the filled ones."""
        a, b = self._mask(), other._mask()
        positions = self.positions
        if index is not None:
            a, positions = a.index_select(0, index), positions.index_select(0, index)
        drop = leading_padding(a)
        front, other_front = self.cache.join(other.cache, room, index, drop)
        self.attention_mask = torch.cat([F.pad(a[:, drop:], (front, 0)), F.pad(b, (other_front, 0))])  # (N, filled)
        self.positions = torch.cat([positions, other.positions])
        self.padded = not bool(self.attention_mask.all())

    def compact(self, room: int) -> None:
        """Drop leading positions that are padding in every row (rows that left), and make room for `room` more."""
        mask = self._mask()
        drop = leading_padding(mask)
        if drop or self.cache.length + room > self.cache.max_length:
            self.cache.relayout(drop, self.cache.length - drop + room)
            self.attention_mask = mask[:, drop:]
            self.padded = not bool(self.attention_mask.all())

    def reorder_beams(self, index: Tensor) -> None:
        """Beam search: row i continues old row index[i] of the same item, whose mask and position are the same."""
        self.cache.reorder(index)
