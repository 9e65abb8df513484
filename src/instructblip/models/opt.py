"""OPT decoder (Zhang et al. 2022), BLIP-2's decoder-only language model: learned absolute positions (offset by 2,
as in fairseq), pre-LayerNorm blocks (post-LayerNorm for `do_layer_norm_before=False`, OPT-350M), ReLU feed-forward,
biases everywhere, an LM head tied to the token embeddings; embeddings narrower than the blocks
(`word_embed_proj_dim`) are projected in before the first block and out after the last.

The model takes input embeddings (the composite model puts image features among them) and returns hidden states;
`logits()` applies the LM head. q, k and v share one projection (the checkpoint loader splits and joins them). The
KV cache, the decoding state and the decoder interface generation uses are LLaMA's (`models/llama.py`): only the
positions differ, learned embeddings read at `cumsum(mask) - 1` instead of rotations.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from instructblip.models.config import OPTConfig
from instructblip.models.llama import DecoderOnly, KVCache, causal_mask

POSITION_OFFSET = 2  # fairseq kept rows 0 and 1 of the position table for padding; position p reads row p + 2
_ACT = {"relu": F.relu, "gelu": F.gelu}


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        D = config.hidden_size
        self.qkv = nn.Linear(D, 3 * D, bias=config.enable_bias)
        self.out_proj = nn.Linear(D, D, bias=config.enable_bias)

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H, S, hd)
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,  # causal_mask is None for several queries only when past == 0
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, H, T, hd) -> (B, T, D)


class OPTBlock(nn.Module):
    def __init__(self, config: OPTConfig, layer: int):
        super().__init__()
        D, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.pre_norm = config.do_layer_norm_before
        self.attn_norm = nn.LayerNorm(D, elementwise_affine=affine)
        self.attn = OPTAttention(config, layer)
        self.mlp_norm = nn.LayerNorm(D, elementwise_affine=affine)
        self.fc1 = nn.Linear(D, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, D, bias=config.enable_bias)
        self.act = _ACT[config.activation_function]
        self.dropout = config.dropout

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, True) if self.training and self.dropout > 0 else x

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        if self.pre_norm:
            x = x + self._drop(self.attn(self.attn_norm(x), mask, cache))
            return x + self._drop(self.fc2(self.act(self.fc1(self.mlp_norm(x)))))
        x = self.attn_norm(x + self._drop(self.attn(x, mask, cache)))  # post-LayerNorm (OPT-350M)
        return self.mlp_norm(x + self._drop(self.fc2(self.act(self.fc1(x)))))


class OPT(DecoderOnly):
    """Decoder-only language model over input embeddings (of width `word_embed_proj_dim`). `lm_head` is None when
    tied to the input embeddings (every OPT: then `logits()` uses `embed_tokens.weight`)."""

    def __init__(self, config: OPTConfig, lm_head: bool = True):
        super().__init__()
        self.config = config
        D, E = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, E, padding_idx=config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, D)
        self.project_in = nn.Linear(E, D, bias=False) if E != D else None
        self.layers = nn.ModuleList(OPTBlock(config, i) for i in range(config.num_hidden_layers))
        affine = config.layer_norm_elementwise_affine
        self.final_norm = nn.LayerNorm(D, elementwise_affine=affine) if config.has_final_layer_norm else None
        self.project_out = nn.Linear(D, E, bias=False) if E != D else None
        self.has_lm_head = lm_head
        untied = lm_head and not config.tie_word_embeddings
        self.lm_head = nn.Linear(E, config.vocab_size, bias=False) if untied else None
        self.gradient_checkpointing = False

    def new_cache(self, batch: int, max_length: int, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        w = self.embed_positions.weight
        return KVCache(c.num_hidden_layers, batch, c.num_attention_heads, max_length, c.head_dim, dtype or w.dtype,
                       w.device)

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """inputs_embeds (B, T, E) -> hidden states (B, T, E) after the final norm and the projection out.

        attention_mask (B, past + T): 1 for real tokens, 0 for padding, over the cached and the new positions.
        position_ids (B, T): default, as transformers' OPT: `cumsum(mask) * mask - 1` over the new positions (padding
        reads position -1, the table's row 1), or `past .. past + T - 1` without a mask. Positions past
        `max_position_embeddings` read the last row (`generation.config` warns of prompts that reach there).
        """
        B, T, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                mask = attention_mask.long()
                position_ids = ((mask.cumsum(-1) * mask) - 1)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None].expand(B, T)
        rows = (position_ids + POSITION_OFFSET).clamp(max=self.embed_positions.num_embeddings - 1)
        x = inputs_embeds if self.project_in is None else self.project_in(inputs_embeds)
        x = x + self.embed_positions(rows).to(x.dtype)  # (B, T, D)
        mask = causal_mask(attention_mask, B, T, past, inputs_embeds.device)
        training = self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if training and self.config.layerdrop > 0 and random.random() < self.config.layerdrop:
                continue  # LayerDrop (Fan et al. 2019); 0 in the released OPTs
            if self.gradient_checkpointing and training:
                x = checkpoint(layer, x, mask, cache, use_reentrant=False)
            else:
                x = layer(x, mask, cache)
        if cache is not None:
            cache.length += T
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x if self.project_out is None else self.project_out(x)
