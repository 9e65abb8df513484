"""Instruction tuning: `TrainConfig` (config.py), the loop `train` (loop.py), its data (data.py) and checkpoints
(checkpointing.py)."""

from instructblip.training.config import TrainConfig, config_from_dict, load_yaml
from instructblip.training.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "config_from_dict", "load_yaml", "train"]
