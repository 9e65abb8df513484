"""Image features for a prompt, with an optional cache of vision-encoder outputs.

The vision encoder's output depends on the image alone; the Q-Former's depends on the instruction too. So a cache
keyed by the image's pixels lets several instructions about one image (`InstructBlip.ask` with a list, a chat, the
server's requests) run the vision encoder once and only the Q-Former again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import Tensor

from instructblip.models.outputs import EncoderOutput


class VisionCache:
    """A bounded LRU cache of vision-encoder outputs keyed by a hash of each image's pixel values."""

    def __init__(self, max_images: int):
        self.max_images = max_images
        self.entries: OrderedDict[tuple, Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(pixels: Tensor, interpolate: bool) -> tuple:
        data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return hashlib.sha1(data).hexdigest(), tuple(pixels.shape), interpolate

    def encode(self, vision_model, pixel_values: Tensor, interpolate: bool) -> EncoderOutput:
        keys = [self.key(p, interpolate) for p in pixel_values]
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            unique = list(dict.fromkeys(keys[i] for i in missing))  # the same image twice in a batch: encode once
            first = [keys.index(k) for k in unique]
            out = vision_model(pixel_values[first], interpolate_pos_encoding=interpolate).last_hidden_state
            fresh = dict(zip(unique, out, strict=True))
        rows = []
        for k in keys:
            row = fresh.get(k)
            if row is None:
                row = self.entries[k]
                self.entries.move_to_end(k)
            rows.append(row)
        for k, row in fresh.items():
            self.entries[k] = row
            if len(self.entries) > self.max_images:
                self.entries.popitem(last=False)
        stacked = torch.stack(rows)  # (B, 1 + patches, D_vision)
        return EncoderOutput(last_hidden_state=stacked, pooler_output=vision_model.post_layernorm(stacked[:, 0]))


def image_features(model, pixel_values: Tensor, qformer_input_ids: Tensor | None = None,
                   qformer_attention_mask: Tensor | None = None, interpolate_pos_encoding: bool = False,
                   cache: VisionCache | None = None) -> Tensor:
    """The projected query outputs (B, Q, D) for these images and instructions, (B, T * Q, D) for videos
    (`pixel_values` (B, T, 3, H, W)); the vision encoder's part comes from `cache` where it holds the image (or
    frame; used only without gradients)."""
    vision = None
    if cache is not None and not torch.is_grad_enabled():
        frames = pixel_values.flatten(0, 1) if pixel_values.dim() == 5 else pixel_values  # (N, 3, H, W)
        vision = cache.encode(model.vision_model, frames, interpolate_pos_encoding)
    return model.get_image_features(pixel_values, qformer_input_ids, qformer_attention_mask, interpolate_pos_encoding,
                                    vision_outputs=vision).pooler_output
