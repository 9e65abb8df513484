"""Output records of the models: plain dataclasses with the field names transformers uses, so that code written for
transformers (`out.logits`, `out.loss`, `out.last_hidden_state`, `out[0]`) works unchanged."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor


class _Output:
    """Attribute access plus transformers-style indexing over the fields that are set."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None)

    def __getitem__(self, key: int | str) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


@dataclass
class EncoderOutput(_Output):
    last_hidden_state: Tensor
    pooler_output: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None


@dataclass
class ImageFeaturesOutput(_Output):
    """`pooler_output`: the projected query outputs, shape (B, num_query_tokens, text hidden size)."""

    pooler_output: Tensor
    vision_outputs: EncoderOutput | None = None
    qformer_outputs: EncoderOutput | None = None

    @property
    def image_features(self) -> Tensor:
        return self.pooler_output


@dataclass
class InstructBlipOutput(_Output):
    loss: Tensor | None = None
    logits: Tensor | None = None
    last_hidden_state: Tensor | None = None  # InstructBlipModel: the language model's last hidden state
    encoder_last_hidden_state: Tensor | None = None  # T5 only
    vision_outputs: EncoderOutput | None = None
    qformer_outputs: EncoderOutput | None = None
