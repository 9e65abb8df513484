"""InstructBLIP in plain PyTorch, speaking the Hugging Face checkpoint layout.

The public names match transformers' (`InstructBlipConfig`, `InstructBlipForConditionalGeneration`, `pipeline`, ...),
so code written for transformers runs with only its import line changed.
"""

from instructblip.api import InstructBlip, load, pipeline
from instructblip.hub import CheckpointNotFoundError
from instructblip.modeling import InstructBlipForConditionalGeneration, InstructBlipModel
from instructblip.models.config import (
    ConfigError,
    InstructBlipConfig,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    T5Config,
)
from instructblip.models.instructblip import IGNORE_INDEX, build_labels
from instructblip.models.qformer import InstructBlipQFormerModel
from instructblip.models.vision import InstructBlipVisionModel
from instructblip.processing.image import BlipImageProcessor, InstructBlipImageProcessor
from instructblip.processing.processor import BatchFeature, InstructBlipProcessor
from instructblip.processing.tokenizers import Tokenizer
from instructblip.weights.checkpoint import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "BatchFeature",
    "BlipImageProcessor",
    "InstructBlip",
    "InstructBlipImageProcessor",
    "InstructBlipProcessor",
    "Tokenizer",
    "load",
    "pipeline",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "InstructBlipConfig",
    "InstructBlipForConditionalGeneration",
    "InstructBlipModel",
    "InstructBlipQFormerConfig",
    "InstructBlipQFormerModel",
    "InstructBlipVisionConfig",
    "InstructBlipVisionModel",
    "LlamaConfig",
    "T5Config",
    "build_labels",
]
