"""EVA ViT-g/14 image encoder, as BLIP-2 and InstructBLIP use it.

Pre-norm transformer blocks with exact GELU, no pre-LayerNorm and no layer-scale; one `qkv` projection whose bias is
`[q_bias | 0 | v_bias]` (EVA/BEiT style, no key bias); a LayerNorm after the last block (`ln_vision` in LAVIS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from instructblip.models.config import InstructBlipVisionConfig
from instructblip.models.outputs import EncoderOutput

CPU_CHUNK_ROWS = 1100  # rows (images x tokens) per pass through the blocks on CPU; see forward


def _join(chunks: tuple[Tensor, ...]) -> Tensor:
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


class VisionAttention(nn.Module):
    def __init__(self, config: InstructBlipVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, H, N, hd) -> (B, N, D)


class VisionBlock(nn.Module):
    def __init__(self, config: InstructBlipVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class InstructBlipVisionModel(nn.Module):
    """pixel_values (B, 3, H, W) -> last_hidden_state (B, 1 + patches, D), post-LayerNorm applied."""

    main_input_name = "pixel_values"

    def __init__(self, config: InstructBlipVisionConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.patch_size = config.patch_size
        self.patch_embed = nn.Conv2d(3, D, kernel_size=config.patch_size, stride=config.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, D))
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_patches + 1, D))
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def position_embeddings(self, height: int, width: int, interpolate: bool) -> Tensor:
        """The learned positions, bicubically resized to a (height/patch x width/patch) grid when asked."""
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        n = self.position_embedding.shape[1] - 1
        if not interpolate:
            if grid_h * grid_w != n:
                raise ValueError(
                    f"pixel_values are {height}x{width} but the model was trained on "
                    f"{self.config.image_size}x{self.config.image_size}; resize the image or pass "
                    "interpolate_pos_encoding=True"
                )
            return self.position_embedding
        if grid_h * grid_w == n and height == width:
            return self.position_embedding
        side = int(n**0.5)
        D = self.position_embedding.shape[-1]
        grid = self.position_embedding[:, 1:].reshape(1, side, side, D).permute(0, 3, 1, 2)  # (1, D, side, side)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, D)  # (1, grid_h*grid_w, D)
        return torch.cat([self.position_embedding[:, :1], grid], dim=1)

    def embed(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape (batch, 3, height, width), got {tuple(pixel_values.shape)}")
        B, _, H, W = pixel_values.shape
        weight = self.patch_embed.weight  # the pixels come to this encoder's device (a device_map may split a model)
        dtype = weight.dtype
        patches = self.patch_embed(pixel_values.to(weight.device, dtype)).flatten(2).transpose(1, 2)  # (B, P, D)
        cls = self.class_embedding.to(dtype).expand(B, 1, -1)
        x = torch.cat([cls, patches], dim=1)  # (B, 1 + P, D)
        return x + self.position_embeddings(H, W, interpolate_pos_encoding).to(dtype)

    def blocks(self, x: Tensor, output_hidden_states: bool = False) -> tuple[Tensor, list[Tensor]]:
        """The transformer blocks: (output, [input, output of each block] if output_hidden_states else [])."""
        hidden_states = [x] if output_hidden_states else []
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            if output_hidden_states:
                hidden_states.append(x)
        return x, hidden_states

    def forward(
        self,
        pixel_values: Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        **_: object,
    ) -> EncoderOutput:
        x = self.embed(pixel_values, interpolate_pos_encoding)
        # On CPU a batch goes through the blocks a few images at a time (at most CPU_CHUNK_ROWS rows): at batch 8 a
        # ViT-g block's largest temporaries are 35-50 MB, above glibc's mmap threshold (at most 32 MB), so the kernel
        # would map and zero-fill them afresh in every block; four 224-px images (1028 rows) keep the largest, fc1's
        # output, at 25 MB, which reuses the heap. One image at a time (257 rows) did that too, but MKL's GEMMs run
        # faster at 1028 rows (Zen 3: batch 8 39 s against 44 s, transformers 38 s). The images do not interact, so
        # the result is the same.
        step = max(1, CPU_CHUNK_ROWS // x.shape[1]) if x.device.type == "cpu" else x.shape[0]
        outs, states = zip(*(self.blocks(c, output_hidden_states) for c in x.split(step)), strict=True)
        x = _join(outs)
        hidden_states = [_join(h) for h in zip(*states, strict=True)] if output_hidden_states else None
        x = self.post_layernorm(x)
        return EncoderOutput(
            last_hidden_state=x,
            pooler_output=self.post_layernorm(x[:, 0]),  # normalised twice, as in transformers (unused here)
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        )


Blip2VisionModel = InstructBlipVisionModel  # the same encoder under BLIP-2's and the video model's names
InstructBlipVideoVisionModel = InstructBlipVisionModel
