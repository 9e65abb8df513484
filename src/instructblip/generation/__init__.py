"""Decoding over a loaded model: one `GenerationConfig`, the logits processors, the token iterator (`Decoding`) with
`generate` / `stream`, beam search, vocabulary ranking, incremental detokenization and image features."""

from instructblip.generation.config import ANSWER, CAPTION, GenerationConfig, default_eos_ids
from instructblip.generation.decode import Decoding, generate, prepare_prompt, stream
from instructblip.generation.detokenize import Detokenizer, incremental_text
from instructblip.generation.features import VisionCache, image_features
from instructblip.generation.rank import RankOutput, rank

__all__ = [
    "ANSWER",
    "CAPTION",
    "Decoding",
    "Detokenizer",
    "GenerationConfig",
    "RankOutput",
    "VisionCache",
    "default_eos_ids",
    "generate",
    "image_features",
    "incremental_text",
    "prepare_prompt",
    "rank",
    "stream",
]
