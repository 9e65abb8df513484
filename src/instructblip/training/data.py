"""Instruction-tuning data: records, data sources, the paper's balanced mixture, and the collate that builds labels.

Read top to bottom, this is the path of one training sample:

1. **Records.** A source is a JSONL file (one JSON object per line), or, with the optional `datasets` package, a
   local parquet file/folder or an image folder. A record holds an image and text fields:

       {"image": "images/1.jpg", "task": "vqa", "question": "What is on the table?", "answers": ["cake", "a cake"],
        "ocr_tokens": ["SALE"], "options": ["cake", "pie"]}
       {"image": "images/2.jpg", "task": "caption", "caption": "A dog on a couch."}
       {"image": "images/3.jpg", "task": "instruction", "instruction": "Describe the image in detail.",
        "answer": "..."}

   `image` is relative to the JSONL file. The target is `answer` / `answers` (one is drawn per sample; duplicated
   answers are therefore drawn more often, as VQAv2's 10 annotations intend), `caption` / `captions`, or LAVIS's
   `text_output`; `text_input` is accepted for `instruction`. A "vqg" record needs `question` (the target) and an
   answer. Records that cannot be used (bad JSON, empty answer, missing question...) are counted and skipped when a
   source is opened, or raise at once with `strict`.
2. **Mixture** (paper §2.4): dataset d is sampled with probability p_d = w_d sqrt(S_d) / sum_i w_i sqrt(S_i), S_d its
   number of usable records, w_d an optional manual weight (the paper raises OKVQA and lowers A-OKVQA). Sampling is
   per sample (each slot of a global batch picks its dataset), and each dataset is walked through in a fresh random
   order every epoch of its own.
3. **Plan.** `MixturePlan` decides, from the seed alone, which record fills each slot of each global batch, and which
   random numbers (template, answer, crop) that slot uses. So the data does not depend on the number of processes,
   DataLoader workers or restarts: a run on 2 processes sees the same global batches as on 1, and a resumed run the
   same as an uninterrupted one. Its state (the per-dataset positions) is the "data position" in a checkpoint.
4. **Example.** `InstructionDataset` loads the image (a missing or corrupt image is counted and replaced by the next
   readable record of the same dataset; `strict` raises instead), applies the optional random-resized crop, and
   formats the instruction with a random template of the record's task (`templates.py`).
5. **Collate** (LAVIS `blip2_vicuna_instruct.py` / `blip2_t5_instruct.py`): the instruction, left-truncated to 128
   tokens, goes to the Q-Former and to the LLM; the answer is right-truncated to 256 tokens (eos included):
   - decoder-only (LLaMA/Vicuna): `[<image> x Q][bos prompt][answer eos][pad...]`, right-padded; labels are -100 on
     the image tokens, the prompt and the padding, so only `answer eos` is learned. Legacy checkpoints
     (`image_token_index` None) get no `<image>` tokens; the model prepends the image features and the labels have
     the text length.
   - T5: the encoder gets `[<image> x Q][prompt </s>][pad...]`; the decoder targets are `answer </s>`, padding -100.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from instructblip.models.instructblip import IGNORE_INDEX
from instructblip.processing.image import load_image
from instructblip.processing.templates import build_instruction, canonical_task

MAX_REPLACEMENTS = 20  # consecutive unreadable images tolerated before a dataset is declared broken
_ANSWER_KEYS = ("answers", "answer", "captions", "caption", "text_output")
_INSTRUCTION_KEYS = ("instruction", "text_input")
_GENERIC_NAMES = ("train", "val", "valid", "validation", "test", "dev", "data", "annotations")


class DataError(ValueError):
    """A record, an image or a data source that cannot be used."""


# ----------------------------------------------------------------------------------------------------------------------
# Records


@dataclass
class Record:
    """One training or validation sample before templating. `image` is a path, raw bytes or a PIL image."""

    image: Any
    task: str
    answers: list[str]
    question: str | None = None
    instruction: str | None = None
    ocr_tokens: list[str] | None = None
    options: list[str] | None = None
    where: str = ""

    @property
    def references(self) -> list[str]:
        """What a prediction is compared with: the answers, or for question generation the question."""
        return [self.question] if self.task == "vqg" and self.question else self.answers


def _strings(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise DataError(f"'{key}' must be a string or a list of strings, got {type(value).__name__}")


def parse_record(obj: Any, base_dir: str = "", task: str | None = None, where: str = "",
                 need_image: bool = True) -> Record:
    """A `Record` from a JSON object (or a `datasets` row); `DataError` naming the problem if it is unusable.
    A relative image path is resolved against `base_dir` (the JSONL file's folder). `task` (the source's) overrides
    the record's own "task"; without either, it is guessed: "instruction" if there is an instruction, "vqa" if there
    is a question, else "caption"."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    task = task or obj.get("task")
    if task is None:
        task = "instruction" if any(obj.get(k) for k in _INSTRUCTION_KEYS) else "vqa" if obj.get("question") \
            else "caption"
    try:
        task = canonical_task(task)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    image = obj.get("image")
    if need_image:
        if image is None or (isinstance(image, str) and not image.strip()):
            raise DataError(f"{where}: no 'image'")
        if isinstance(image, str) and not os.path.isabs(image):
            image = os.path.join(base_dir, image)
        if isinstance(image, dict):  # a datasets Image column read without decoding: {"bytes", "path"}
            image = image.get("bytes") or (os.path.join(base_dir, image["path"]) if image.get("path") else None)
            if image is None:
                raise DataError(f"{where}: the image column holds neither bytes nor a path")
    answers = []
    for key in _ANSWER_KEYS:
        if obj.get(key) is not None:
            answers = [a.strip() for a in _strings(obj[key], key)]
            break
    answers = [a for a in answers if a]
    question = obj.get("question")
    question = question.strip() if isinstance(question, str) else None
    instruction = next((obj[k] for k in _INSTRUCTION_KEYS if isinstance(obj.get(k), str) and obj[k].strip()), None)
    if task == "vqg":
        if not question:
            raise DataError(f"{where}: a 'vqg' record needs a 'question' (the target)")
        if not answers:
            raise DataError(f"{where}: a 'vqg' record needs the answer its question is about")
    else:
        if not answers:
            raise DataError(f"{where}: empty answer (give 'answer', 'answers' or 'caption')")
        if task == "vqa" and not question:
            raise DataError(f"{where}: a 'vqa' record needs a 'question'")
        if task == "instruction" and not instruction:
            raise DataError(f"{where}: an 'instruction' record needs an 'instruction'")
    return Record(image=image, task=task, answers=answers, question=question, instruction=instruction,
                  ocr_tokens=_strings(obj.get("ocr_tokens"), "ocr_tokens") or None,
                  options=_strings(obj.get("options"), "options") or None, where=where)


def make_prompt_and_target(record: Record, rng: random.Random) -> tuple[str, str]:
    """Draw a template and a target for one sample: (instruction, target text)."""
    if record.task == "vqg":
        answer = rng.choice(record.answers)
        return build_instruction("vqg", rng, answer=answer, ocr_tokens=record.ocr_tokens), record.question
    target = rng.choice(record.answers)
    prompt = build_instruction(record.task, rng, question=record.question, instruction=record.instruction,
                               ocr_tokens=record.ocr_tokens, options=record.options)
    return prompt, target


# ----------------------------------------------------------------------------------------------------------------------
# Sources


@dataclass
class DataSource:
    """One dataset of the mixture (YAML: a mapping with these keys, or just the path as a string).

    path: a JSONL file; with the `datasets` package also a parquet file / folder of parquet files, or an image folder
        (images + metadata.jsonl, read by `datasets`' imagefolder builder).
    name: shown in the mixture table and the metrics (default: the file or folder name without its suffix; for
        generic names such as train.jsonl or val.jsonl, the folder's name). Names must be unique in a mixture.
    task: the task of every record of this source ("caption", "vqa", "vqg", "instruction"), overriding the records'
        own "task" (so one VQA file can serve as a "vqg" source too); unset: each record's "task".
    weight: manual factor on the sqrt-size sampling probability (1.0 = the paper's plain balancing).
    format: "auto" (by suffix: .jsonl/.json -> jsonl, .parquet or a folder of them -> parquet, other folders ->
        imagefolder), "jsonl", "parquet" or "imagefolder".
    split: the `datasets` split to read (parquet / imagefolder).
    columns: renames for `datasets` columns, ours -> theirs, e.g. {"answer": "caption_text", "image": "img"}.
    max_samples: use only the first N usable records.
    """

    path: str
    name: str | None = None
    task: str | None = None
    weight: float = 1.0
    format: str = "auto"
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)
    max_samples: int | None = None

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"a data source needs a path, got {self.path!r}")
        if self.name is None:
            path = os.path.normpath(self.path)
            base = os.path.basename(path)
            self.name = base.rsplit(".", 1)[0] if "." in base else base
            if self.name.lower() in _GENERIC_NAMES and os.path.basename(os.path.dirname(os.path.abspath(path))):
                self.name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        if self.task is not None:
            self.task = canonical_task(self.task)
        if not isinstance(self.weight, (int, float)) or isinstance(self.weight, bool) or not self.weight > 0:
            raise ValueError(f"data source {self.name}: weight must be a positive number, got {self.weight!r}")
        if self.format not in ("auto", "jsonl", "parquet", "imagefolder"):
            raise ValueError(f"data source {self.name}: format must be auto, jsonl, parquet or imagefolder, "
                             f"got {self.format!r}")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ValueError(f"data source {self.name}: max_samples must be positive, got {self.max_samples}")


class JsonlSource:
    """A JSONL file, scanned once: usable records are kept as byte offsets and parsed again when read, so a
    multi-million-line file costs a few bytes per record in memory."""

    def __init__(self, spec: DataSource, strict: bool = False):
        self.spec = spec
        self.name = spec.name
        self.path = os.path.abspath(spec.path)
        self.base_dir = os.path.dirname(self.path)
        self.skipped: list[str] = []
        offsets = []
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"data file not found: {spec.path}")
        with open(self.path, "rb") as f:
            offset = 0
            for lineno, line in enumerate(f, 1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                where = f"{spec.path}:{lineno}"
                try:
                    obj = json.loads(line)
                    parse_record(obj, self.base_dir, spec.task, where)
                except (DataError, json.JSONDecodeError, UnicodeDecodeError) as e:
                    message = str(e) if isinstance(e, DataError) else f"{where}: not valid JSON ({e})"
                    if strict:
                        raise DataError(message) from None
                    self.skipped.append(message)
                    continue
                offsets.append(start)
                if spec.max_samples is not None and len(offsets) >= spec.max_samples:
                    break
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> Record:
        if self._file is None or self._pid != os.getpid():  # one handle per (worker) process
            self._file, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115 - kept open for reads
        self._file.seek(int(self.offsets[index]))
        line = self._file.readline()
        return parse_record(json.loads(line), self.base_dir, self.spec.task, f"{self.spec.path} record {index}")

    def __getstate__(self):  # DataLoader workers: reopen the file there
        return {**self.__dict__, "_file": None}


class HFDatasetSource:
    """A local parquet file/folder or image folder read with Hugging Face `datasets` (optional dependency).

    Text columns are checked once (without decoding images); rows that cannot be used are counted and skipped."""

    def __init__(self, spec: DataSource, strict: bool = False):
        try:
            import datasets
        except ImportError:
            raise ValueError(
                f"data source {spec.name}: reading {spec.path} needs the `datasets` package "
                "(pip install 'instructblip[datasets]'), or convert it to JSONL"
            ) from None
        self.spec = spec
        self.name = spec.name
        path = spec.path
        if not os.path.exists(path):
            raise FileNotFoundError(f"data path not found: {path}")
        fmt = spec.format
        if fmt == "auto":
            fmt = _guess_format(path)
        if fmt == "parquet":
            files = path if os.path.isfile(path) else sorted(
                os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
            if not files:
                raise FileNotFoundError(f"no .parquet files in {path}")
            ds = datasets.load_dataset("parquet", data_files=files, split=spec.split)
            self.base_dir = os.path.dirname(os.path.abspath(path if os.path.isfile(path) else files[0]))
        else:
            ds = datasets.load_dataset("imagefolder", data_dir=path, split=spec.split)
            self.base_dir = os.path.abspath(path)
        rename = {theirs: ours for ours, theirs in spec.columns.items() if theirs != ours}
        missing = [c for c in rename if c not in ds.column_names]
        if missing:
            raise DataError(f"data source {spec.name}: no column(s) {missing}; columns are {ds.column_names}")
        if rename:
            ds = ds.rename_columns(rename)
        if "image" not in ds.column_names:
            raise DataError(f"data source {spec.name}: no 'image' column (columns: {ds.column_names}); "
                            "map one with columns: {{image: NAME}}")
        self.dataset = ds
        self.skipped: list[str] = []
        keep = []
        text = ds.remove_columns(["image"])
        for i, row in enumerate(text):
            try:
                parse_record(row, self.base_dir, spec.task, f"{path} row {i}", need_image=False)
            except DataError as e:
                if strict:
                    raise
                self.skipped.append(str(e))
                continue
            keep.append(i)
            if spec.max_samples is not None and len(keep) >= spec.max_samples:
                break
        self.rows = np.asarray(keep, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Record:
        row = int(self.rows[index])
        where = f"{self.spec.path} row {row}"
        try:
            obj = self.dataset[row]  # decodes the image: a corrupt one raises here
        except Exception as e:  # noqa: BLE001 - any decoding failure is a bad image
            raise DataError(f"{where}: cannot read the row ({type(e).__name__}: {e})") from None
        return parse_record(obj, self.base_dir, self.spec.task, where)


def _guess_format(path: str) -> str:
    if os.path.isfile(path):
        if path.endswith((".jsonl", ".json")):
            return "jsonl"
        if path.endswith(".parquet"):
            return "parquet"
        raise ValueError(f"cannot tell the format of {path} from its name; set format: jsonl or parquet")
    if os.path.isdir(path):
        return "parquet" if any(f.endswith(".parquet") for f in os.listdir(path)) else "imagefolder"
    raise FileNotFoundError(f"data path not found: {path}")


def open_source(spec: DataSource, strict: bool = False) -> JsonlSource | HFDatasetSource:
    """Open one data source (see `DataSource`); FileNotFoundError / DataError for unusable ones."""
    fmt = spec.format if spec.format != "auto" else _guess_format(spec.path)
    source = JsonlSource(spec, strict) if fmt == "jsonl" else HFDatasetSource(spec, strict)
    if len(source) == 0:
        reasons = f" (first problem: {source.skipped[0]})" if source.skipped else ""
        raise DataError(f"data source {spec.name} ({spec.path}) has no usable records{reasons}")
    return source


# ----------------------------------------------------------------------------------------------------------------------
# Mixture


def mixture_probabilities(sizes: Sequence[int], weights: Sequence[float] | None = None,
                          balance: str = "sqrt") -> list[float]:
    """Sampling probability of each dataset: "sqrt" (paper: proportional to sqrt(size)), "size" (proportional to
    size, i.e. concatenation) or "uniform"; each then multiplied by its manual weight and normalised."""
    if not sizes:
        raise ValueError("no datasets to mix")
    weights = [1.0] * len(sizes) if weights is None else list(weights)
    if balance == "sqrt":
        raw = [w * math.sqrt(s) for s, w in zip(sizes, weights, strict=True)]
    elif balance == "size":
        raw = [w * s for s, w in zip(sizes, weights, strict=True)]
    elif balance == "uniform":
        raw = list(weights)
    else:
        raise ValueError(f"balance must be 'sqrt', 'size' or 'uniform', got {balance!r}")
    total = sum(raw)
    return [r / total for r in raw]


def mixture_table(sources: Sequence, probabilities: Sequence[float], samples: int | None = None) -> str:
    """The start-up report: one row per dataset with size, skipped records, weight and probability (and, given the
    number of samples the run will draw, how many epochs of each dataset that is)."""
    header = ["dataset", "records", "skipped", "weight", "p", "p sqrt-only"]
    plain = mixture_probabilities([len(s) for s in sources])
    rows = []
    for source, p, q in zip(sources, probabilities, plain, strict=True):
        row = [source.name, f"{len(source):,}", f"{len(source.skipped):,}", f"{source.spec.weight:g}", f"{p:.4f}",
               f"{q:.4f}"]
        if samples is not None:
            row.append(f"{p * samples / len(source):.2f}")
        rows.append(row)
    if samples is not None:
        header.append("epochs")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in  # noqa: E731
                               enumerate(zip(r, widths, strict=True)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


# ----------------------------------------------------------------------------------------------------------------------
# The plan: which record fills which slot, from the seed alone


SampleKey = tuple[int, int, int, int]  # (source index, record index, step, slot); step -1 = validation


class MixturePlan:
    """Draws the global batches of a run, deterministically from `seed`.

    Step s: `global_batch_size` slots; slot j's dataset is drawn with a generator seeded by (seed, s), and the dataset's
    next record (in its own per-epoch random order) fills it. `counters[d]` = records of dataset d drawn so far: the
    data position saved in checkpoints (`state()`, restored with `MixturePlan(..., state=...)`).
    """

    def __init__(self, sizes: Sequence[int], probabilities: Sequence[float], global_batch_size: int, seed: int,
                 state: dict | None = None, shuffle: bool = True):
        self.sizes = list(sizes)
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.next_step = 0
        self.counters = [0] * len(self.sizes)
        if state is not None:
            if len(state["counters"]) != len(self.sizes):
                raise ValueError(f"the saved data position has {len(state['counters'])} datasets; this run has "
                                 f"{len(self.sizes)}")
            self.next_step = int(state["next_step"])
            self.counters = [int(c) for c in state["counters"]]
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    def state(self) -> dict:
        return {"next_step": self.next_step, "counters": list(self.counters)}

    def _order(self, d: int, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        cached = self._orders.get(d)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, 0xDA7A, d, epoch]).permutation(self.sizes[d]))
            self._orders[d] = cached
        return cached[1]

    def next_global_batch(self) -> list[SampleKey]:
        """The keys of step `next_step`'s global batch (then advances)."""
        step = self.next_step
        rng = np.random.default_rng([self.seed, 0x5EED, step])
        choices = rng.choice(len(self.sizes), size=self.global_batch_size, p=self.probabilities)
        keys = []
        for slot, d in enumerate(choices.tolist()):
            n = self.sizes[d]
            epoch, position = divmod(self.counters[d], n)
            order = self._order(d, epoch)
            keys.append((d, int(order[position]) if order is not None else position, step, slot))
            self.counters[d] += 1
        self.next_step += 1
        return keys


class TrainBatches:
    """The DataLoader's batch sampler: this rank's micro-batches, `accumulation` per step, from `start_step` on.

    Rank r takes slots [r * G / W, (r + 1) * G / W) of every global batch. The plan state after each generated step is
    remembered (the DataLoader runs ahead of training), so a checkpoint can store the position after the step it
    saves: `state_after(step)`."""

    def __init__(self, plan: MixturePlan, max_steps: int, micro_batch_size: int, rank: int = 0, world_size: int = 1):
        G = plan.global_batch_size
        if G % (micro_batch_size * world_size):
            raise ValueError(f"global_batch_size {G} is not a multiple of micro_batch_size x processes "
                             f"({micro_batch_size} x {world_size})")
        self.plan = plan
        self.max_steps = max_steps
        self.micro = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.accumulation = G // (micro_batch_size * world_size)
        self._after: dict[int, dict] = {plan.next_step - 1: plan.state()}

    def __len__(self) -> int:
        return max(0, self.max_steps - self.plan.next_step) * self.accumulation

    def __iter__(self) -> Iterator[list[SampleKey]]:
        per_rank = self.plan.global_batch_size // self.world_size
        while self.plan.next_step < self.max_steps:
            step = self.plan.next_step
            keys = self.plan.next_global_batch()
            self._after[step] = self.plan.state()
            mine = keys[self.rank * per_rank:(self.rank + 1) * per_rank]
            for i in range(0, per_rank, self.micro):
                yield mine[i:i + self.micro]

    def state_after(self, step: int) -> dict:
        """The data position once `step` is done; forgets older positions."""
        state = self._after[step]
        for s in [s for s in self._after if s < step]:
            del self._after[s]
        return state


def validation_batches(sizes: Sequence[int], batch_size: int, max_samples: int | None = None, rank: int = 0,
                       world_size: int = 1) -> list[list[SampleKey]]:
    """Validation keys: the first `max_samples` records of every source in order, record i on rank i % W."""
    keys = [(d, i, -1, i) for d, n in enumerate(sizes) for i in range(min(n, max_samples or n))]
    mine = keys[rank::world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


# ----------------------------------------------------------------------------------------------------------------------
# Examples


def sample_rng(seed: int, key: SampleKey) -> random.Random:
    """The random numbers of one sample (template, answer, crop): a function of the seed and its slot only."""
    d, index, step, slot = key
    return random.Random(f"{seed}:val:{d}:{index}" if step < 0 else f"{seed}:{step}:{slot}")


def random_resized_crop(image, rng: random.Random, scale: tuple[float, float] = (0.5, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box choice (without the resize, which the image processor does), on a PIL
    image: LAVIS's `blip2_image_train` uses scale (0.5, 1). No horizontal flip: it contradicts "left"/"right"."""
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return image.crop((left, top, left + w, top + h))
    return image  # fall back to the whole image, as torchvision's center-crop fallback roughly does


class InstructionDataset(torch.utils.data.Dataset):
    """Maps a `SampleKey` to an example dict: pixel values, instruction, target, references, bookkeeping.

    A record whose image is missing or unreadable is counted in the example's `skipped` list and replaced by the next
    record of the same source (so the global batch keeps its size and stays the same on any number of processes);
    with `strict` it raises `DataError` at once."""

    def __init__(self, sources: Sequence, image_processor, seed: int, augment: bool = False, strict: bool = False):
        self.sources = list(sources)
        self.image_processor = image_processor
        self.seed = seed
        self.augment = augment
        self.strict = strict

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __getitem__(self, key: SampleKey) -> dict:
        d, index, _, _ = key
        source = self.sources[d]
        skipped = []
        for attempt in range(MAX_REPLACEMENTS + 1):
            i = (index + attempt) % len(source)
            try:
                record = source[i]
                image = record.image if not isinstance(record.image, (str, bytes, bytearray, os.PathLike)) \
                    else load_image(record.image)
                image = image.convert("RGB") if hasattr(image, "convert") else image
                break
            except (DataError, ValueError, OSError) as e:  # missing (FileNotFoundError is an OSError) or corrupt
                message = f"{source.name}: {e}"
                if self.strict:
                    raise DataError(message) from None
                skipped.append(message)
        else:
            raise DataError(f"{source.name}: {MAX_REPLACEMENTS + 1} consecutive records from #{index} have unreadable "
                            f"images (last: {skipped[-1]}); is the image folder right?")
        rng = sample_rng(self.seed, key)
        if self.augment and key[2] >= 0:
            image = random_resized_crop(image, rng)
        pixels = torch.from_numpy(np.ascontiguousarray(self.image_processor.preprocess_one(image)))
        prompt, target = make_prompt_and_target(record, rng)
        return {"pixel_values": pixels, "prompt": prompt, "target": target, "references": record.references,
                "task": record.task, "source": d, "skipped": skipped}


# ----------------------------------------------------------------------------------------------------------------------
# Collate


class Collator:
    """Examples -> model inputs and labels (see the module docstring for the layouts).

    Args:
        processor: `InstructBlipProcessor` (its tokenizers and image-token settings are used); with a
            `Blip2Processor` (no Q-Former tokenizer: BLIP-2's Q-Former reads no instruction) the batches hold no
            `qformer_*` inputs.
        is_encoder_decoder: True for Flan-T5.
        max_prompt_length: instruction tokens kept (special tokens included), cut from the left (LAVIS 128).
        max_answer_length: target tokens kept, eos included, cut from the right (LAVIS 256).
        generation_inputs: also return `gen_input_ids` / `gen_attention_mask`, the prompt alone (left-padded,
            image tokens first, as the processor builds it), for validation by generation.
    """

    def __init__(self, processor, is_encoder_decoder: bool, max_prompt_length: int = 128,
                 max_answer_length: int = 256, generation_inputs: bool = False):
        self.tokenizer = processor.tokenizer
        self.qformer_tokenizer = processor.qformer_tokenizer
        self.is_encoder_decoder = is_encoder_decoder
        self.max_prompt_length = max_prompt_length
        self.max_answer_length = max_answer_length
        self.generation_inputs = generation_inputs
        self.image_ids: list[int] = []
        if processor.insert_image_tokens:
            if processor.num_query_tokens is None or processor.image_token_id is None:
                raise ValueError("the processor inserts image tokens but has no num_query_tokens / <image> id")
            self.image_ids = [processor.image_token_id] * processor.num_query_tokens
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the LLM tokenizer has no eos token; the answers could not be terminated")
        self.eos_id = eos
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else eos  # padded positions are masked and ignored anyway
        if max_answer_length < 2 or max_prompt_length < 2:
            raise ValueError("max_prompt_length and max_answer_length must be at least 2")

    def _encode(self, tokenizer, texts: list[str], max_length: int, side: str, special: bool) -> list[list[int]]:
        saved = tokenizer.truncation_side
        tokenizer.truncation_side = side
        try:
            out = tokenizer(texts, add_special_tokens=special, truncation=True, max_length=max_length,
                            return_token_type_ids=False)
        finally:
            tokenizer.truncation_side = saved
        return out["input_ids"]

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        prompts = [e["prompt"] for e in examples]
        prompt_ids = self._encode(self.tokenizer, prompts, self.max_prompt_length, "left", True)
        answer_ids = self._encode(self.tokenizer, [e["target"] for e in examples], self.max_answer_length - 1,
                                  "right", False)
        answer_ids = [ids + [self.eos_id] for ids in answer_ids]
        batch: dict[str, Any] = {"pixel_values": torch.stack([e["pixel_values"] for e in examples])}
        if self.qformer_tokenizer is not None:
            qformer_ids = self._encode(self.qformer_tokenizer, prompts, self.max_prompt_length, "left", True)
            qformer_pad = self.qformer_tokenizer.pad_token_id or 0
            batch["qformer_input_ids"], batch["qformer_attention_mask"] = _pad(qformer_ids, qformer_pad, "right")
        if self.is_encoder_decoder:  # encoder: image + prompt; decoder targets: answer + eos
            encoder = [self.image_ids + p for p in prompt_ids]
            batch["input_ids"], batch["attention_mask"] = _pad(encoder, self.pad_id, "right")
            labels, mask = _pad(answer_ids, IGNORE_INDEX, "right")
            batch["labels"], batch["decoder_attention_mask"] = labels, mask
            gen = encoder
        else:  # one sequence: image + prompt + answer + eos, loss on the answer part only
            rows = [self.image_ids + p + a for p, a in zip(prompt_ids, answer_ids, strict=True)]
            targets = [[IGNORE_INDEX] * (len(self.image_ids) + len(p)) + a
                       for p, a in zip(prompt_ids, answer_ids, strict=True)]
            batch["input_ids"], batch["attention_mask"] = _pad(rows, self.pad_id, "right")
            batch["labels"], _ = _pad(targets, IGNORE_INDEX, "right")
            gen = [self.image_ids + p for p in prompt_ids]
        if self.generation_inputs:
            side = "right" if self.is_encoder_decoder else "left"
            batch["gen_input_ids"], batch["gen_attention_mask"] = _pad(gen, self.pad_id, side)
        batch["num_targets"] = int((batch["labels"] != IGNORE_INDEX).sum())
        batch["meta"] = {
            "references": [e["references"] for e in examples],
            "tasks": [e["task"] for e in examples],
            "sources": [e["source"] for e in examples],
            "skipped": [m for e in examples for m in e["skipped"]],
        }
        return batch


def _pad(rows: list[list[int]], value: int, side: str) -> tuple[Tensor, Tensor]:
    """Pad lists of ids to one length -> (ids, attention mask), (B, T) int64."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), value, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if side == "right":
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        else:
            ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, length - len(row):] = 1
    return ids, mask
