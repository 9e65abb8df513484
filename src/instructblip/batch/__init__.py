"""Batch inference over many records: `instructblip batch` in one process, in every rank of torchrun, or on Ray.

- `records.py`: the input readers (JSONL, a folder of images, parquet), id keys, the index of an output's ids;
- `loader.py`: the records of one process with their images decoded ahead of the model (a torch DataLoader);
- `shards.py`: ranks, part files and the merge into one output;
- `runner.py`: the loop: `run(BatchConfig(...))`;
- `ray_predictor.py`: `InstructBlipPredictor` for Ray Data's `map_batches`, and `--ray`.
"""

from instructblip.batch.ray_predictor import InstructBlipPredictor
from instructblip.batch.runner import BatchConfig, Summary, run
from instructblip.batch.shards import merge

__all__ = ["BatchConfig", "InstructBlipPredictor", "Summary", "merge", "run"]
