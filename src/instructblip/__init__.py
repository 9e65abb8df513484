"""InstructBLIP in plain PyTorch, speaking the Hugging Face checkpoint layout.

The public names match transformers' (`InstructBlipConfig`, `InstructBlipForConditionalGeneration`, ...), so code
written for transformers runs with only its import line changed.
"""

from .checkpoint import CheckpointError
from .config import (
    ConfigError,
    InstructBlipConfig,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    T5Config,
)
from .hub import CheckpointNotFoundError
from .image_processing import BlipImageProcessor, InstructBlipImageProcessor
from .model import IGNORE_INDEX, InstructBlipForConditionalGeneration, InstructBlipModel, build_labels
from .pipeline import InstructBlip, load
from .processor import BatchFeature, InstructBlipProcessor
from .qformer import InstructBlipQFormerModel
from .tokenization import Tokenizer
from .vision import InstructBlipVisionModel

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
