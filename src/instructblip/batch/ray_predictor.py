"""InstructBLIP on Ray Data: one model per actor of an actor pool.

    import ray
    from instructblip.batch import InstructBlipPredictor

    ds = ray.data.read_json("records.jsonl", lines=True)       # columns id, image, instruction
    answers = ds.map_batches(InstructBlipPredictor, fn_constructor_kwargs={"model": None, "base_dir": "/data"},
                             compute=ray.data.ActorPoolStrategy(size=4), batch_size=8,
                             num_cpus=1)                        # num_gpus=1 on GPU nodes
    answers.write_json("answers/")                             # columns id, image, instruction, answer, error

Each actor holds a CPU (or a GPU) for as long as the pool lives: leave the reading some, or read with num_cpus=0.

`instructblip batch INPUT -o OUT --ray [ADDRESS]` does the same from the command line: Ray reads the input
(read_json or read_parquet, on the cluster), the records the output holds are dropped, and the driver appends each
answer to OUT as it arrives, with the same whole-line writes and resume as a single process. Image paths must be
readable where the actors run (a shared file system on a real cluster).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import numpy as np

from instructblip.batch.loader import collate, decode
from instructblip.batch.records import (
    OutputIndex,
    check_output,
    checked_record,
    cut_torn_tail,
    id_key,
    image_names,
    input_kind,
)
from instructblip.batch.runner import BatchConfig, Summary, answer, output_line, write_line
from instructblip.batch.shards import part_files


class InstructBlipPredictor:
    """A callable class for `Dataset.map_batches`: loads the model once per actor, then answers batches of
    {"id", "image", "instruction"} columns (numpy batch format), adding "answer" and "error" (one of them None per
    row: a bad row gets an error, the rest of its batch is answered).

    Args:
        model, device, dtype, quantize, quantize_vision: as `instructblip.load` (model None: the shipped one).
        base_dir: the folder relative image paths are read from (the input file's).
        instruction: the question for rows without one.
        generation: keyword arguments for `InstructBlip.ask` (e.g. {"num_beams": 1}).
    """

    def __init__(self, model: str | None = None, device: str = "auto", dtype: str = "auto",
                 quantize: str | None = None, quantize_vision: str | None = None, base_dir: str | None = None,
                 instruction: str | None = None, generation: dict[str, Any] | None = None):
        from instructblip.api import load

        self.vlm = load(model, device=device, dtype=dtype, quantize=quantize, quantize_vision=quantize_vision)
        self.base_dir = os.path.abspath(base_dir or os.getcwd())
        self.instruction = instruction
        self.generation = generation or {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(batch.values()))) if batch else 0
        column = lambda name: batch[name].tolist() if name in batch else [None] * n  # noqa: E731
        rows = zip(column("id"), column("image"), column("instruction"), strict=True)
        records = [checked_record({"image": image, "instruction": text}, rid, f"id {rid!r}", self.instruction,
                            self.base_dir) for rid, image, text in rows]
        ready = [decode(r, self.vlm.processor.image_processor.preprocess_one) for r in records]
        good = [i for i, item in enumerate(ready) if "error" not in item["record"]]
        out = [item["record"] for item in ready]
        if good:
            batch = collate([ready[i] for i in good])
            for i, line in zip(good, answer(self.vlm, batch.records, batch.pixels, self.generation), strict=True):
                out[i] = line
        return {
            "id": _objects([r["id"] for r in out]),
            "image": _objects([r.get("image") if isinstance(r.get("image"), str) else None for r in out]),
            "instruction": _objects([r.get("instruction") for r in out]),
            "answer": _objects([r.get("answer") for r in out]),
            "error": _objects([r.get("error") for r in out]),
        }


def _objects(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _present(value) -> bool:
    """None comes back from Ray as None, or as NaN where a column was all None."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


class _Unanswered:
    """A `map_batches` function that drops the rows the output holds (keeps failed ones with `retry_failed`)."""

    def __init__(self, index: OutputIndex, retry_failed: bool):
        self.index, self.retry_failed = index, retry_failed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "id" not in batch or not len(self.index):
            return batch
        keep = []
        for rid in batch["id"].tolist():
            status = self.index.status(id_key(rid))
            keep.append(status is None or (status == "failed" and self.retry_failed))
        mask = np.array(keep, dtype=bool)
        return {name: values[mask] for name, values in batch.items()}


def run_ray(config: BatchConfig, address: str | None, actors: int = 1, log=None) -> Summary:
    """`instructblip batch --ray [ADDRESS]`: the records the output lacks, answered by `actors` model actors on the
    Ray cluster at `address` (None or "local": a local cluster started here), appended to the output by this
    driver."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    if actors < 1:
        raise ValueError(f"--ray-actors must be at least 1, got {actors}")
    kind = input_kind(config.input, config.instruction)
    check_output(config.input, config.output)
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install 'instructblip[ray]'") from None
    if part_files(config.output):
        raise ValueError(f"{config.output} has part files of a torchrun run; merge them first: "
                         f"instructblip batch --merge {config.output}")
    cut_torn_tail(config.output)
    index = OutputIndex.scan([config.output])
    if not ray.is_initialized():
        ray.init(address=None if address in (None, "local") else address, log_to_driver=False)
    path = os.path.abspath(config.input)
    # reading takes no CPU of its own: the actors hold one CPU each, and a read waiting for a free CPU would wait
    # for ever when there are as many actors as CPUs (the decoding is the actors' work)
    if kind == "jsonl":  # any file name: `instructblip batch` does not ask for .jsonl
        ds = ray.data.read_json(path, lines=True, file_extensions=None, num_cpus=0)
    elif kind == "parquet":
        ds = ray.data.read_parquet(path, file_extensions=None, num_cpus=0)
    else:
        ds = ray.data.from_items([{"id": name, "image": os.path.join(path, name)} for name in image_names(path)])
    ds = ds.map_batches(_Unanswered(index, config.retry_failed), batch_format="numpy")
    kwargs = {"model": config.model, "device": config.device, "dtype": config.dtype, "quantize": config.quantize,
              "quantize_vision": config.quantize_vision, "base_dir": os.path.dirname(path) if kind != "folder"
              else path, "instruction": config.instruction, "generation": config.generation}
    ds = ds.map_batches(InstructBlipPredictor, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(
        size=actors), batch_size=config.batch_size, batch_format="numpy", num_cpus=1)
    log(f"{len(index)} records already in {config.output}; the rest on Ray with {actors} model actor(s)")
    answered = failed = 0
    fd = os.open(config.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            columns = {name: values.tolist() for name, values in batch.items()}
            for i in range(len(columns["id"])):
                row = {name: values[i] for name, values in columns.items() if _present(values[i])}
                write_line(fd, output_line(row))
                failed += "error" in row
                answered += "error" not in row
    finally:
        os.close(fd)
    after = OutputIndex.scan([config.output])  # failed: the output's records whose last line is an error
    return Summary(records=len(after), done_before=int((~index.failed).sum()), answered=answered,
                   failed=int(after.failed.sum()))
