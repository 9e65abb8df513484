"""The records one process answers, with their images decoded and preprocessed ahead of the model.

`RecordStream` is a `torch.utils.data.IterableDataset`: it reads the input, keeps the records of this rank (id key
% world size) that the output does not hold yet, and decodes each one's image into pixel values. A `DataLoader`
over it with `num_workers` > 0 runs that in worker processes, each reading every n-th position of the input (split
before parsing, so no line is parsed twice), while the main process runs the model; batches are `batch_size`
records, formed in the workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from instructblip.batch.records import OutputIndex, id_key, read_records


@dataclass
class Plan:
    """The records of this rank: how many the input has, how many the output holds answered, how many it holds
    failed and skipped (without --retry-failed), and how many are to do."""

    records: int = 0
    done: int = 0
    failed_before: int = 0
    todo: int = 0


@dataclass
class Batch:
    """Records with their pixel values (B, 3, H, W), and the records that failed before the model (a bad line, an
    image that cannot be read), each with its `error`."""

    records: list[dict] = field(default_factory=list)
    pixels: torch.Tensor | list | None = None
    failed: list[dict] = field(default_factory=list)


class RecordStream(IterableDataset):
    """This rank's unfinished records of `path`, each as (record, pixel values) or (record with an error).

    Args:
        path, instruction: the input (`records.read_records`).
        preprocess: image -> pixel values (`InstructBlip.preprocess`); None: records only, no pixels (planning).
        rank, world: this process's share: the records whose id key % world == rank.
        index: what the output holds (`records.OutputIndex`); its records are skipped, except with `retry_failed`
            those whose last line is an error.
    """

    def __init__(self, path: str, instruction: str | None, preprocess: Callable | None, rank: int = 0,
                 world: int = 1, index: OutputIndex | None = None, retry_failed: bool = False):
        self.path, self.instruction, self.preprocess = path, instruction, preprocess
        self.rank, self.world = rank, world
        self.index = index if index is not None else OutputIndex(np.zeros(0, np.uint64), np.zeros(0, bool))
        self.retry_failed = retry_failed

    def _mine(self, select: Callable[[int], bool] | None = None) -> Iterator[tuple[dict, str | None]]:
        """(record, its status in the output) for the records of this rank."""
        for record in read_records(self.path, self.instruction, select):
            key = id_key(record["id"])
            if key % self.world == self.rank:
                yield record, self.index.status(key) if len(self.index) else None

    def _wanted(self, status: str | None) -> bool:
        return status is None or (status == "failed" and self.retry_failed)

    def plan(self) -> Plan:
        """Count this rank's records without decoding anything (one pass over the input)."""
        plan = Plan()
        for _, status in self._mine():
            plan.records += 1
            plan.done += status == "done"
            plan.failed_before += status == "failed" and not self.retry_failed
            plan.todo += self._wanted(status)
        return plan

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        select = None if info is None or info.num_workers == 1 else (
            lambda i, w=info.id, n=info.num_workers: i % n == w)
        for record, status in self._mine(select):
            if self._wanted(status):
                yield decode(record, self.preprocess)


def decode(record: dict, preprocess: Callable | None) -> dict:
    """{"record", "pixels"} or {"record"} with an `error` in the record when its image cannot be read."""
    if "error" in record or preprocess is None:
        return {"record": record}
    try:
        return {"record": record, "pixels": preprocess(record["image"])}
    except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
        return {"record": {**record, "error": str(e)}}


def collate(items: list[dict]) -> Batch:
    """Items -> a `Batch`; the pixels stacked into one tensor (shared memory between processes, not pickled)."""
    batch = Batch()
    arrays = []
    for item in items:
        if "error" in item["record"]:
            batch.failed.append(item["record"])
        else:
            batch.records.append(item["record"])
            arrays.append(item.get("pixels"))
    if arrays and all(a is not None for a in arrays):
        if len({a.shape for a in arrays}) == 1:
            batch.pixels = torch.from_numpy(np.stack(arrays))
        else:  # an image processor that does not resize: `ask_preprocessed` takes a list too
            batch.pixels = [torch.from_numpy(a) for a in arrays]
    return batch


def make_loader(stream: RecordStream, batch_size: int, num_workers: int) -> DataLoader:
    """Batches of `batch_size` records; with `num_workers` > 0 decoded by that many processes, two batches each
    ahead of the model."""
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                      prefetch_factor=2 if num_workers else None)
