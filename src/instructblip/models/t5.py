"""T5 v1.1 / Flan-T5 encoder-decoder: RMS LayerNorm without mean, relative position buckets (computed once per
stack, shared by its layers), unscaled attention, gated-GELU feed-forward; KV cache for decoding with the
cross-attention keys/values computed once per encoder output.

The encoder reads input embeddings (the composite model puts image features among them). `logits()` applies the
`d_model**-0.5` rescale only when the config says so (tied T5), never for Flan-T5's untied head.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from instructblip.models.config import T5Config
from instructblip.models.llama import KVCache, leading_padding

_ACT = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class T5LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """T5's log-spaced buckets of (key - query) offsets."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -relative_position.clamp(max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    scale = (num_buckets - max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (torch.log(relative_position.float() / max_exact) * scale).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position, large)


class T5Attention(nn.Module):
    """Self-attention (q, k, v in one projection) or cross-attention (q alone, k and v in one projection)."""

    def __init__(self, config: T5Config, cross: bool):
        super().__init__()
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.cross = cross
        if cross:
            self.q = nn.Linear(config.d_model, inner, bias=False)
            self.kv = nn.Linear(config.d_model, 2 * inner, bias=False)
        else:
            self.qkv = nn.Linear(config.d_model, 3 * inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.dropout = config.dropout_rate

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.d_kv).transpose(1, 2)  # (B, H, T, d_kv)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x: Tensor, bias: Tensor, kv: tuple[Tensor, Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0) -> Tensor:
        # bias: (B or 1, H, T, S) float, position bias plus mask (-inf where not allowed); scores are unscaled
        B, T, _ = x.shape
        if self.cross:
            q = self._heads(self.q(x))
            k, v = kv
        else:
            q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
            if cache is not None:
                k, v = cache.update(layer, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), scale=1.0, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, H * d_kv) -> (B, T, D)


class T5FeedForward(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.gated = config.is_gated_act
        self.d_ff = config.d_ff
        self.wi = nn.Linear(config.d_model, (2 if self.gated else 1) * config.d_ff, bias=False)  # wi_0 | wi_1
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = _ACT[config.dense_act_fn]
        self.dropout = config.dropout_rate

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            gate, linear = self.wi(x).chunk(2, dim=-1)
            h = self.act(gate) * linear
        else:
            h = self.act(self.wi(x))
        if self.training:
            h = F.dropout(h, self.dropout, True)
        if isinstance(self.wo, nn.Linear):  # (a quantized layer of accel.quantize takes any float dtype)
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    return F.dropout(x, p, True) if training and p > 0 else x  # (no call at all in eval: 12 per decoding step)


def _clamp_fp16(x: Tensor) -> Tensor:
    """transformers' guard against fp16 overflow in T5 blocks."""
    if x.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        x = torch.where(torch.isinf(x).any(), x.clamp(-limit, limit), x)
    return x


class T5Block(nn.Module):
    def __init__(self, config: T5Config, is_decoder: bool, layer: int):
        super().__init__()
        self.layer = layer
        self.is_decoder = is_decoder
        self.attn_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.attn = T5Attention(config, cross=False)
        if is_decoder:
            self.cross_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
            self.cross = T5Attention(config, cross=True)
        self.ffn_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.ffn = T5FeedForward(config)
        self.dropout = config.dropout_rate

    def forward(self, x: Tensor, bias: Tensor, cross_kv: tuple[Tensor, Tensor] | None = None,
                cross_bias: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        p, training = self.dropout, self.training
        x = _clamp_fp16(x + _dropout(self.attn(self.attn_norm(x), bias, cache=cache, layer=self.layer), p, training))
        if self.is_decoder:
            x = _clamp_fp16(x + _dropout(self.cross(self.cross_norm(x), cross_bias, kv=cross_kv), p, training))
        return _clamp_fp16(x + _dropout(self.ffn(self.ffn_norm(x)), p, training))


def _padding_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, S) 1/0 mask -> (B, 1, 1, S) additive bias: 0 where allowed, the dtype's minimum where not."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def cross_attention_bias(memory_mask: Tensor | None, memory_length: int, device: torch.device) -> Tensor:
    """(B or 1, 1, 1, S_mem) additive bias over the encoder positions."""
    bias = _padding_bias(memory_mask, torch.float32)
    return bias if bias is not None else torch.zeros(1, 1, 1, memory_length, device=device)


class T5Stack(nn.Module):
    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        self.config = config
        self.is_decoder = is_decoder
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.layers = nn.ModuleList(T5Block(config, is_decoder, i) for i in range(n))
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.final_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.gradient_checkpointing = False

    def self_bias(self, attention_mask: Tensor | None, B: int, T: int, past: int, device: torch.device) -> Tensor:
        """(B or 1, H, T, S) self-attention bias: relative positions, the causal mask (decoder), padding."""
        S = past + T
        bias = self.position_bias(T, S, past, device).float()
        if self.is_decoder:
            causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(past)
            bias = bias.masked_fill(~causal, torch.finfo(torch.float32).min)
        padding = _padding_bias(attention_mask, torch.float32)
        if padding is not None:
            if attention_mask.shape != (B, S):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(B, S)}")
            bias = bias + padding
        return bias

    def position_bias(self, query_length: int, key_length: int, past: int, device: torch.device) -> Tensor:
        """(1, H, T, S) relative position bias for queries past..past+T-1 over keys 0..S-1."""
        context = torch.arange(past, past + query_length, device=device)[:, None]
        memory = torch.arange(key_length, device=device)[None, :]
        buckets = relative_position_bucket(
            memory - context,
            bidirectional=not self.is_decoder,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (T, S, H) -> (1, H, T, S)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, memory: Tensor | None = None,
                memory_mask: Tensor | None = None, cross_kv: list[tuple[Tensor, Tensor]] | None = None,
                cache: KVCache | None = None, bias: Tensor | None = None, cross_bias: Tensor | None = None) -> Tensor:
        """`bias` and `cross_bias` may come precomputed (a decoding step: `T5Cache.step_biases`)."""
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if bias is None:
            bias = self.self_bias(attention_mask, B, T, past, x.device)
        if self.is_decoder:
            if cross_kv is None:
                cross_kv = [layer.cross.project_kv(memory) for layer in self.layers]
            if cross_bias is None:
                cross_bias = cross_attention_bias(memory_mask, cross_kv[0][0].shape[2], x.device)
        for i, layer in enumerate(self.layers):
            kv = cross_kv[i] if cross_kv is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, bias, kv, cross_bias, cache, use_reentrant=False)
            else:
                x = layer(x, bias, kv, cross_bias, cache)
        if cache is not None:
            cache.length += T
        return F.dropout(self.final_norm(x), self.config.dropout_rate, self.training)


class T5Cache:
    """Decoder self-attention cache plus the cross-attention keys/values of one encoder output."""

    def __init__(self, self_attention: KVCache, cross_kv: list[tuple[Tensor, Tensor]]):
        self.self_attention = self_attention
        self.cross_kv = cross_kv
        self._distance_bias: Tensor | None = None  # (1, H, 1, max_length): see step_biases
        self._cross_bias: tuple[Tensor | None, Tensor] | None = None  # (the mask it was made from, the bias)

    def step_biases(self, decoder: T5Stack, encoder_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The biases of a one-token decoding step, sliced from tensors made once per generation instead of
        rebuilt at every step (about 25 small ops). The relative-position bias of a query at position p over keys
        0..p depends on p - key only, so one row made for the last position, (1, H, 1, L), holds every step's:
        its last p + 1 entries. No causal mask is needed: a step's query sees every filled position."""
        L, p = self.self_attention.max_length, self.self_attention.length
        if self._distance_bias is None or self._distance_bias.shape[-1] != L:  # (made again after a relayout)
            device = self.self_attention.keys[0].device
            self._distance_bias = decoder.position_bias(1, L, L - 1, device).float()
        if self._cross_bias is None or self._cross_bias[0] is not encoder_mask:  # a new mask (expanded for beams)
            bias = cross_attention_bias(encoder_mask, self.cross_kv[0][0].shape[2], self._distance_bias.device)
            self._cross_bias = (encoder_mask, bias)
        return self._distance_bias[..., L - 1 - p:], self._cross_bias[1]

    @property
    def length(self) -> int:
        return self.self_attention.length

    def reorder(self, index: Tensor, cross: bool = True) -> None:
        """Keep batch rows `index`. Beam search may pass cross=False: beams never leave their own encoder output."""
        self.self_attention.reorder(index)
        if cross:
            self.cross_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv]


class T5(nn.Module):
    """Encoder-decoder language model. `lm_head` is None in the base `InstructBlipModel` and when tied to
    `shared` (then `logits()` uses the embedding matrix)."""

    def __init__(self, config: T5Config, lm_head: bool = True):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.has_lm_head = lm_head
        untied = lm_head and not config.tie_word_embeddings
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False) if untied else None

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.shared

    def encode(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.encoder(F.dropout(inputs_embeds, self.config.dropout_rate, self.training), attention_mask)

    def new_cache(self, encoder_hidden: Tensor, max_length: int, batch: int | None = None) -> T5Cache:
        c = self.config
        cross_kv = [layer.cross.project_kv(encoder_hidden) for layer in self.decoder.layers]
        self_cache = KVCache(c.num_decoder_layers, batch or encoder_hidden.shape[0], c.num_heads, max_length,
                             c.d_kv, encoder_hidden.dtype, encoder_hidden.device)
        return T5Cache(self_cache, cross_kv)

    def decode(self, decoder_input_ids: Tensor, encoder_hidden: Tensor | None, encoder_mask: Tensor | None = None,
               decoder_attention_mask: Tensor | None = None, cache: T5Cache | None = None) -> Tensor:
        """Decoder hidden states (B, T, D). With a cache, only the new tokens are passed."""
        x = F.dropout(self.shared(decoder_input_ids), self.config.dropout_rate, self.training)
        bias = cross_bias = None
        if cache is not None and decoder_input_ids.shape[1] == 1 and decoder_attention_mask is None:
            bias, cross_bias = cache.step_biases(self.decoder, encoder_mask)
        return self.decoder(
            x,
            attention_mask=decoder_attention_mask,
            memory=encoder_hidden,
            memory_mask=encoder_mask,
            cross_kv=cache.cross_kv if cache is not None else None,
            cache=cache.self_attention if cache is not None else None,
            bias=bias,
            cross_bias=cross_bias,
        )

    def logits(self, hidden: Tensor) -> Tensor:
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.d_model**-0.5
        return self.lm_head(hidden) if self.lm_head is not None else F.linear(hidden, self.shared.weight)

    def shift_right(self, labels: Tensor) -> Tensor:
        """Decoder inputs for teacher forcing: [decoder_start, labels[:-1]], with -100 replaced by pad."""
        start = self.config.decoder_start_token_id
        shifted = torch.full_like(labels, start)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    # ---- the decoder interface generation uses (LLaMA implements the same four methods) ----

    def prefill(self, inputs_embeds: Tensor, attention_mask: Tensor, max_new_tokens: int
                ) -> tuple[T5DecodeState, Tensor]:
        """Encode the prompt (B, L, D) once, compute every layer's cross-attention keys/values once, and feed the
        decoder start token; returns the state and the float32 logits for the first new token (B, V)."""
        B = inputs_embeds.shape[0]
        encoder_hidden = self.encode(inputs_embeds, attention_mask)  # (B, L, D)
        cache = self.new_cache(encoder_hidden, max_length=max_new_tokens + 1)
        start = torch.full((B, 1), self.config.decoder_start_token_id, dtype=torch.long, device=inputs_embeds.device)
        hidden = self.decode(start, None, attention_mask, None, cache)  # (B, 1, D)
        return T5DecodeState(cache, attention_mask), self.logits(hidden[:, -1]).float()

    def prefill_chunks(self, inputs_embeds: Tensor, attention_mask: Tensor, max_new_tokens: int, chunk: int
                       ) -> Iterator[tuple[T5DecodeState, Tensor]]:
        """`prefill` as an iterator like LLaMA's; the encoder attends both ways, so the prompt is one chunk."""
        yield self.prefill(inputs_embeds, attention_mask, max_new_tokens)

    def step(self, state: T5DecodeState, tokens: Tensor) -> Tensor:
        """Feed one token per row (N,); returns the float32 logits for the next one (N, V)."""
        if state.decoder_mask is None:
            hidden = self.decode(tokens[:, None], None, state.encoder_mask, None, state.cache)  # (N, 1, D)
            return self.logits(hidden[:, -1]).float()
        # rows that joined a running batch: their decoder positions have padding in front (T5DecodeState.extend)
        cache = state.cache
        state.decoder_mask = torch.cat([state.decoder_mask, state.decoder_mask.new_ones(tokens.shape[0], 1)], 1)
        bias, cross_bias = cache.step_biases(self.decoder, state.encoder_mask)
        bias = bias + _padding_bias(state.decoder_mask, torch.float32)  # (N, H, 1, filled + 1)
        x = F.dropout(self.shared(tokens[:, None]), self.config.dropout_rate, self.training)
        hidden = self.decoder(x, memory_mask=state.encoder_mask, cross_kv=cache.cross_kv, cache=cache.self_attention,
                              bias=bias, cross_bias=cross_bias)
        return self.logits(hidden[:, -1]).float()

    def prompt_memory(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """What `continuation_hidden` reads of a prompt: the encoder's output (B, L, D)."""
        return self.encode(inputs_embeds, attention_mask)

    def continuation_hidden(self, memory: Tensor, attention_mask: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
        """Teacher forcing of `targets` (R, n) in the decoder over the encoder outputs (R, L, D): hidden states
        (R, n, D), position i predicting target i."""
        decoder_input_ids = self.shift_right(targets.masked_fill(~valid, -100))  # (R, n)
        return self.decode(decoder_input_ids, memory, attention_mask)


class T5DecodeState:
    """What a T5 decoding run carries between steps: the decoder's cache (self-attention keys/values and the
    cross-attention ones), the encoder's mask, and the decoder's mask once rows with different numbers of decoded
    positions share the batch (None before)."""

    def __init__(self, cache: T5Cache, encoder_mask: Tensor):
        self.cache = cache
        self.encoder_mask = encoder_mask  # (N, L)
        self.decoder_mask: Tensor | None = None  # (N, filled)

    def select(self, index: Tensor) -> None:
        """Row i becomes old row index[i]: copies for beams or returned sequences, or the rows still running."""
        self.cache.reorder(index, cross=True)
        self.encoder_mask = self.encoder_mask.index_select(0, index)
        if self.decoder_mask is not None:
            self.decoder_mask = self.decoder_mask.index_select(0, index)

    def _decoder_mask(self) -> Tensor:
        if self.decoder_mask is not None:
            return self.decoder_mask
        return self.encoder_mask.new_ones(self.encoder_mask.shape[0], self.cache.length)

    def extend(self, other: T5DecodeState, room: int, index: Tensor | None = None) -> None:
        """Append the rows of `other` (continuous batching) after this state's rows `index` (all when None).
        Decoder positions: the shorter side gets masked padding in front (relative position biases see the same
        distances); encoder positions: the shorter side's keys, values and mask are padded at the end. `room`:
        decoder positions needed after the filled ones."""
        if index is not None:
            self.select(index)
        a, b = self._decoder_mask(), other._decoder_mask()
        cache, theirs = self.cache, other.cache
        front, other_front = cache.self_attention.join(theirs.self_attention, room)
        mask = torch.cat([F.pad(a, (front, 0)), F.pad(b, (other_front, 0))])  # (Na + Nb, filled)
        self.decoder_mask = None if bool(mask.all()) else mask
        L = max(self.encoder_mask.shape[1], other.encoder_mask.shape[1])

        def widen(t: Tensor) -> Tensor:  # (N, H, L_enc, d) -> (N, H, L, d)
            return F.pad(t, (0, 0, 0, L - t.shape[2]))

        cache.cross_kv = [(torch.cat([widen(ka), widen(kb)]), torch.cat([widen(va), widen(vb)]))
                          for (ka, va), (kb, vb) in zip(cache.cross_kv, theirs.cross_kv, strict=True)]
        self.encoder_mask = torch.cat([F.pad(self.encoder_mask, (0, L - self.encoder_mask.shape[1])),
                                       F.pad(other.encoder_mask, (0, L - other.encoder_mask.shape[1]))])

    def compact(self, room: int) -> None:
        """Drop leading decoder positions that are padding in every row, and make room for `room` more."""
        own = self.cache.self_attention
        mask = self._decoder_mask()
        drop = leading_padding(mask)
        if drop or own.length + room > own.max_length:
            own.relayout(drop, own.length - drop + room)
            mask = mask[:, drop:]
            self.decoder_mask = None if bool(mask.all()) else mask

    def reorder_beams(self, index: Tensor) -> None:
        """Beam search: row i continues old row index[i] of the same item; the cross-attention keys/values and the
        mask are equal within an item, so only the self-attention cache moves."""
        self.cache.reorder(index, cross=False)
