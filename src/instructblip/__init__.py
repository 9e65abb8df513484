"""InstructBLIP in plain PyTorch, speaking the Hugging Face checkpoint layout; with the family it belongs to:
BLIP-2 (OPT or Flan-T5) and InstructBLIP-Video.

The public names match transformers' (`InstructBlipConfig`, `InstructBlipForConditionalGeneration`,
`Blip2ForConditionalGeneration`, `InstructBlipVideoProcessor`, `pipeline`, ...), so code written for transformers runs
with only its import line changed.
"""

from instructblip.api import InstructBlip, load, pipeline
from instructblip.hub import CheckpointNotFoundError
from instructblip.modeling import (
    Blip2ForConditionalGeneration,
    Blip2Model,
    InstructBlipForConditionalGeneration,
    InstructBlipModel,
    InstructBlipVideoForConditionalGeneration,
    InstructBlipVideoModel,
)
from instructblip.models.config import (
    Blip2Config,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    ConfigError,
    InstructBlipConfig,
    InstructBlipQFormerConfig,
    InstructBlipVideoConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    OPTConfig,
    T5Config,
)
from instructblip.models.instructblip import IGNORE_INDEX, build_labels
from instructblip.models.qformer import Blip2QFormerModel, InstructBlipQFormerModel
from instructblip.models.vision import Blip2VisionModel, InstructBlipVisionModel
from instructblip.processing.image import BlipImageProcessor, InstructBlipImageProcessor
from instructblip.processing.processor import (
    BatchFeature,
    Blip2Processor,
    InstructBlipProcessor,
    InstructBlipVideoProcessor,
)
from instructblip.processing.tokenizers import Tokenizer
from instructblip.weights.checkpoint import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "BatchFeature",
    "Blip2Config",
    "Blip2ForConditionalGeneration",
    "Blip2Model",
    "Blip2Processor",
    "Blip2QFormerConfig",
    "Blip2QFormerModel",
    "Blip2VisionConfig",
    "Blip2VisionModel",
    "InstructBlipVideoConfig",
    "InstructBlipVideoForConditionalGeneration",
    "InstructBlipVideoModel",
    "InstructBlipVideoProcessor",
    "OPTConfig",
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
