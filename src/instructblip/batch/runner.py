"""`instructblip batch`: answer every record of an input, resumably, in one process or in each rank of torchrun.

    run(BatchConfig(input="records.jsonl", output="answers.jsonl"))

The loop: check the paths (before the model loads), find what the output holds, count what is left, load the
model, then answer batches from the data loader and append one whole line per record with one write(2) on an
O_APPEND descriptor, so that a kill never leaves half a record and a rerun continues where it stopped. Under
torchrun each rank writes its own part file and rank 0 merges them at the end (`shards.py`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from instructblip.batch.loader import RecordStream, make_loader
from instructblip.batch.records import OutputIndex, check_output, cut_torn_tail, input_kind
from instructblip.batch.shards import (
    Dist,
    all_sum,
    barrier,
    close_distributed,
    init_distributed,
    merge,
    part_files,
    part_path,
)
from instructblip.progress import wanted


@dataclass
class BatchConfig:
    input: str  # records.jsonl, a folder of images or a parquet file
    output: str  # answers.jsonl, appended to
    instruction: str | None = None  # the question for a folder's images, or for records without one
    batch_size: int = 8  # records per forward pass
    num_workers: int = 0  # processes decoding images ahead of the model (0: the main process does it)
    retry_failed: bool = False  # answer again the records whose last output line is an error
    progress: bool = True  # a progress bar on stderr, when it is a terminal (rank 0, all ranks' records)
    model: str | None = None  # None: the model shipped inside
    device: str = "auto"
    dtype: str = "auto"
    quantize: str | None = None
    quantize_vision: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)  # keyword arguments for `InstructBlip.ask`


@dataclass
class Summary:
    records: int  # in the input (all ranks)
    done_before: int  # answered in the output already
    answered: int  # answered now
    failed: int  # records whose output line is an error: failed now, or earlier and not retried
    merged: int | None = None  # part files merged into the output, when a merge ran


def check(config: BatchConfig) -> None:
    """Everything about the paths and numbers that can be wrong, before anything is loaded (a ValueError each)."""
    if config.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.num_workers < 0:
        raise ValueError(f"--num-workers must be 0 or more, got {config.num_workers}")
    input_kind(config.input, config.instruction)
    check_output(config.input, config.output)


def run(config: BatchConfig, log=None) -> Summary:
    """Answer what the output lacks; under torchrun this rank's share, then rank 0 merges. `log`: one-line messages
    (default: stderr)."""
    log = log or _log
    check(config)
    place = init_distributed()
    try:
        return _run(config, place, log)
    finally:
        close_distributed(place)


def _log(text: str) -> None:
    # one write per line: the ranks share stderr, and print's two writes (text, newline) interleave
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _run(config: BatchConfig, place: Dist, log) -> Summary:
    mine = config.output if place.world == 1 else part_path(config.output, place.rank, place.world)
    cut_torn_tail(mine)  # only the file this process appends to; readers skip torn lines of the others
    index = OutputIndex.scan([config.output, *part_files(config.output)])
    stream = RecordStream(config.input, config.instruction, None, place.rank, place.world, index,
                          config.retry_failed)
    plan = stream.plan()
    who = f"rank {place.rank} of {place.world}: " if place.world > 1 else ""
    retried = " (failed ones retried)" if config.retry_failed else ""
    log(f"{who}{plan.records} records, {plan.done} already answered in {config.output}, {plan.todo} to do{retried}")
    # the work of all ranks, and each part file's size before anyone writes (the progress bar counts lines past it)
    sizes = [0] * place.world
    sizes[place.rank] = os.path.getsize(mine) if os.path.exists(mine) else 0
    todo_all, *sizes = all_sum(place, [plan.todo, *sizes])
    bar = Progress(config, place, todo_all, sizes)
    try:
        answered, failed = _answer_all(config, place, stream, mine, bar) if plan.todo else (0, 0)
        bar.wait_for_others()  # every rank has finished its part: rank 0 may merge
    finally:
        bar.close()
    failed += plan.failed_before
    summary = Summary(*all_sum(place, [plan.records, plan.done, answered, failed]))
    if place.rank == 0 and part_files(config.output):
        summary.merged = merge(config.output).parts
    # the ranks leave together: a rank that tore its process group down while rank 0 still merged sometimes died
    # at exit (std::terminate in a gloo thread), failing a run whose output was complete
    barrier(place)
    return summary


class Progress:
    """tqdm's bar (records/s, ETA) on rank 0 for the records of all ranks: its own as it writes them, the other
    ranks' read off the growth of their part files (new bytes only; a shared file system, as the merge needs).
    Shown as `instructblip.progress` decides (stderr a terminal, INSTRUCTBLIP_PROGRESS, --no-progress); other ranks
    stay quiet."""

    POLL = 0.5  # seconds between looks at the other ranks' part files

    def __init__(self, config: BatchConfig, place: Dist, total: int, sizes: list[int]):
        self.place = place
        self.shown = place.rank == 0 and total > 0 and wanted(config.progress)
        self.bar = None
        if self.shown:
            try:
                from tqdm import tqdm
            except ImportError:
                print("(no progress bar: pip install tqdm)", file=sys.stderr)
                self.shown = False
            else:
                self.bar = tqdm(total=total, unit="rec", dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
        # the other ranks' part files: path -> bytes already counted
        self.others = {part_path(config.output, r, place.world): sizes[r] for r in range(1, place.world)}
        self.last_poll = 0.0

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self._poll()

    def _poll(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.others or (not force and now - self.last_poll < self.POLL):
            return
        self.last_poll = now
        lines = 0
        for path, offset in self.others.items():
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            cut = data.rfind(b"\n") + 1  # whole lines only; a line being written is counted next time
            lines += data.count(b"\n", 0, cut)
            self.others[path] = offset + cut
        self.bar.update(lines)

    def wait_for_others(self) -> None:
        """The barrier before the merge; rank 0 keeps its bar moving while the other ranks finish."""
        if self.place.world <= 1:
            return
        import torch.distributed as dist

        if self.bar is None:
            barrier(self.place)
            return
        work = dist.barrier(async_op=True)
        while not work.is_completed():
            time.sleep(self.POLL)
            self._poll()
        work.wait()
        self._poll(force=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _answer_all(config: BatchConfig, place: Dist, stream: RecordStream, path: str, bar: Progress
                ) -> tuple[int, int]:
    """Load the model and answer this rank's records into `path`: (answered, failed)."""
    from instructblip.api import load

    device = config.device
    if place.world > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():  # one GPU per rank on its machine
            device = f"cuda:{place.local_rank}"
    vlm = load(config.model, device=device, dtype=config.dtype, quantize=config.quantize,
               quantize_vision=config.quantize_vision)
    stream.preprocess = vlm.processor.image_processor.preprocess_one  # small: goes to the workers, not the model
    loader = make_loader(stream, config.batch_size, config.num_workers)
    answered = failed = 0
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for batch in loader:
            lines = list(batch.failed)
            if batch.records:
                lines += answer(vlm, batch.records, batch.pixels, config.generation)
            for line in lines:
                write_line(fd, output_line(line))
                failed += "error" in line
                answered += "error" not in line
            bar.update(len(lines))
    finally:
        os.close(fd)
    return answered, failed


def answer(vlm, records: list[dict], pixels, generation: dict) -> list[dict]:
    """The records with an `answer` (or an `error`), answered as one batch; when the batch fails on a bad input
    (a ValueError), one by one to isolate it."""
    try:
        answers = vlm.ask_preprocessed(pixels, [r["instruction"] for r in records], **generation)
        return [{**r, "answer": a} for r, a in zip(records, answers, strict=True)]
    except ValueError as e:
        if len(records) == 1:
            return [{**records[0], "error": str(e)}]
    return [line for i, r in enumerate(records) for line in answer(vlm, [r], pixels[i:i + 1], generation)]


def output_line(record: dict) -> dict:
    """The line written for a record: id, image (a path; not encoded bytes), instruction, then answer or error."""
    line = {"id": record["id"]}
    if isinstance(record.get("image"), str):
        line["image"] = record["image"]
    for name in ("instruction", "answer", "error"):
        if name in record:
            line[name] = record[name]
    return line


def write_line(fd: int, record: dict) -> None:
    """One whole line per write(2) on an O_APPEND descriptor, so a kill never leaves half a record."""
    os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
