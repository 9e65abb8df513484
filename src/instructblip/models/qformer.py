"""The instruction-aware Q-Former: a BERT-base encoder over [learned queries; instruction tokens].

Every layer: bidirectional self-attention over all positions (queries and instruction read each other), then, every
`cross_attention_frequency` layers, cross-attention from the query slice only to the image features, then separate
feed-forward networks for the query slice and the text slice. Post-LayerNorm (BERT) throughout.
Only the query outputs go on to the language model.

BLIP-2's Q-Former (`config.reads_instruction` False, `Blip2QFormerModel`) is the same over the queries alone: it has
no word or position embeddings and no text feed-forward networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from instructblip.models.config import InstructBlipQFormerConfig
from instructblip.models.outputs import EncoderOutput


def _heads(x: Tensor, num_heads: int) -> Tensor:
    B, T, D = x.shape
    return x.view(B, T, num_heads, D // num_heads).transpose(1, 2)  # (B, H, T, hd)


def _merge(x: Tensor) -> Tensor:
    B, H, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, D)


class FeedForward(nn.Module):
    """BERT intermediate + output: LayerNorm(x + fc2(gelu(fc1(x))))."""

    def __init__(self, config: InstructBlipQFormerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = config.hidden_dropout_prob

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(self.fc2(self.act(self.fc1(x))), self.dropout, self.training)
        return self.norm(h + x)


class QFormerLayer(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig, has_cross_attention: bool):
        super().__init__()
        D = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.attn_dropout = config.attention_probs_dropout_prob
        self.dropout = config.hidden_dropout_prob
        self.qkv = nn.Linear(D, 3 * D)  # self-attention query | key | value
        self.attn_out = nn.Linear(D, D)
        self.attn_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.has_cross_attention = has_cross_attention
        if has_cross_attention:
            self.cross_q = nn.Linear(D, D)
            self.cross_kv = nn.Linear(config.encoder_hidden_size, 2 * D)  # key | value over the image features
            self.cross_out = nn.Linear(D, D)
            self.cross_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.query_ffn = FeedForward(config)
        self.text_ffn = FeedForward(config) if config.reads_instruction else None

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        H = self.num_heads
        p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(_heads(q, H), _heads(k, H), _heads(v, H), attn_mask=mask, dropout_p=p)
        return _merge(out)

    def forward(self, x: Tensor, mask: Tensor | None, image: Tensor | None, image_mask: Tensor | None,
                num_queries: int) -> Tensor:
        # x: (B, Q + T, D); mask: (B, 1, 1, Q + T) bool or None; image: (B, N, D_vision)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = self._attend(q, k, v, mask)
        x = self.attn_norm(F.dropout(self.attn_out(h), self.dropout, self.training) + x)
        if x.shape[1] > num_queries and self.text_ffn is None:
            raise ValueError("this Q-Former (BLIP-2's) reads the learned queries only, not text")
        if num_queries == 0:
            return self.text_ffn(x)
        queries = x[:, :num_queries]
        if self.has_cross_attention:
            if image is None:
                raise ValueError("the Q-Former needs encoder_hidden_states (image features) for cross-attention")
            k, v = self.cross_kv(image).chunk(2, dim=-1)
            h = self._attend(self.cross_q(queries), k, v, image_mask)
            queries = self.cross_norm(F.dropout(self.cross_out(h), self.dropout, self.training) + queries)
        queries = self.query_ffn(queries)
        if x.shape[1] == num_queries:
            return queries
        return torch.cat([queries, self.text_ffn(x[:, num_queries:])], dim=1)  # (B, Q + T, D)


class InstructBlipQFormerModel(nn.Module):
    """(query_embeds, instruction ids, image features) -> last_hidden_state (B, Q + T, D)."""

    main_input_name = "input_ids"

    def __init__(self, config: InstructBlipQFormerConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        if config.reads_instruction:
            self.word_embeddings = nn.Embedding(config.vocab_size, D, padding_idx=config.pad_token_id)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, D)
        self.embed_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(config, config.has_cross_attention(i)) for i in range(config.num_hidden_layers)
        )
        self.gradient_checkpointing = False

    def embed(self, input_ids: Tensor | None, query_embeds: Tensor | None, position_ids: Tensor | None) -> Tensor:
        if input_ids is None:
            x = query_embeds
        elif not self.config.reads_instruction:
            raise ValueError("this Q-Former (BLIP-2's) reads the learned queries only; pass no input_ids")
        else:
            T = input_ids.shape[1]
            if T > self.config.max_position_embeddings:
                raise ValueError(
                    f"the Q-Former instruction is {T} tokens long; at most {self.config.max_position_embeddings} "
                    "fit (truncate it, e.g. max_length=128 as LAVIS does)"
                )
            if position_ids is None:
                position_ids = torch.arange(T, device=input_ids.device)[None]  # text positions start at 0
            x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
            if query_embeds is not None:
                x = torch.cat([query_embeds.to(x.dtype), x], dim=1)  # (B, Q + T, D): queries get no position
        x = self.embed_norm(x.to(self.embed_norm.weight.dtype))
        return F.dropout(x, self.config.hidden_dropout_prob, self.training)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        query_embeds: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        output_hidden_states: bool = False,
        **_: object,
    ) -> EncoderOutput:
        """`attention_mask` (B, Q + T) covers queries and text (1 = attend); None means all positions are valid."""
        if input_ids is None and query_embeds is None:
            raise ValueError("the Q-Former needs query_embeds, input_ids, or both")
        num_queries = query_embeds.shape[1] if query_embeds is not None else 0
        x = self.embed(input_ids, query_embeds, position_ids)
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != x.shape[:2]:
                raise ValueError(
                    f"Q-Former attention_mask has shape {tuple(attention_mask.shape)}; expected {tuple(x.shape[:2])} "
                    "(queries + instruction tokens)"
                )
            if not bool(attention_mask.all()):
                mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Q + T): key padding, bidirectional
        image_mask = None
        if encoder_attention_mask is not None and not bool(encoder_attention_mask.all()):
            image_mask = encoder_attention_mask.bool()[:, None, None, :]  # (B, 1, 1, N)
        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, encoder_hidden_states, image_mask, num_queries, use_reentrant=False)
            else:
                x = layer(x, mask, encoder_hidden_states, image_mask, num_queries)
            if hidden_states is not None:
                hidden_states.append(x)
        return EncoderOutput(
            last_hidden_state=x,
            pooler_output=x[:, 0],
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        )


class Blip2QFormerModel(InstructBlipQFormerModel):
    """BLIP-2's Q-Former, built from a `Blip2QFormerConfig`: `query_embeds` and image features -> (B, Q, D)."""

    main_input_name = "query_embeds"

    def forward(
        self,
        query_embeds: Tensor,
        query_length: int | None = None,
        attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        output_hidden_states: bool = False,
        **_: object,
    ) -> EncoderOutput:
        """transformers' argument order: the queries first. `query_length` is the query count (all positions)."""
        return super().forward(attention_mask=attention_mask, query_embeds=query_embeds,
                               encoder_hidden_states=encoder_hidden_states,
                               encoder_attention_mask=encoder_attention_mask, output_hidden_states=output_hidden_states)
