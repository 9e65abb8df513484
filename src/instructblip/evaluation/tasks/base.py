"""What every benchmark adapter shares: `Sample`, the `Benchmark` base class, the paper's prompts and LAVIS'
generation settings (docs/recipe.md#prompts, docs/recipe.md#generation-settings), and small file helpers that fail
with a message naming the expected files and where to get them."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructblip.evaluation.metrics import normalize_answer

# ---------------------------------------------------------------------------------------------------------------------
# the paper's zero-shot instructions (appendix E; docs/recipe.md#prompts); the captioning one, CAPTION_PROMPT, lives in
# processing/templates.py. "<Image>" in the paper: the query tokens first.

VQA_PROMPT = "Question: {question} Short answer:"
TEXTVQA_PROMPT = "OCR tokens: {ocr}. Question: {question} Short answer:"
ICONQA_PROMPT = "Question: {question} Options: {options}. Short answer:"
SCIENCEQA_PROMPT = "Context: {context} Question: {question} Options: {options}. Answer:"
SCIENCEQA_PROMPT_NO_CONTEXT = "Question: {question} Options: {options}. Answer:"
HATEFUL_MEMES_PROMPT = 'This is an image with: "{text}" written on it. Is it hateful? Answer:'
VSR_PROMPT = 'Based on the image, is this statement true or false? "{caption}" Answer:'
VISDIAL_PROMPT = "Dialog history: {history}\n Question: {question} Short answer:"

# ---------------------------------------------------------------------------------------------------------------------
# LAVIS' generation settings, in LAVIS' terms (max_len / min_len); `generate_kwargs` turns them into ours.
# Beam search throughout; repetition_penalty 1.5 is the model default LAVIS never overrode in May 2023.

CAPTION_GENERATION = dict(num_beams=5, max_len=80, min_len=10, length_penalty=1.0, repetition_penalty=1.5)
VQA_GENERATION = dict(num_beams=5, max_len=10, min_len=1, length_penalty=-1.0, repetition_penalty=1.5)

# binary tasks: the labels expanded into verbalizer sets (paper p. 5)
POSITIVE_WORDS = ("yes", "true")
NEGATIVE_WORDS = ("no", "false")


def generate_kwargs(settings: dict, is_encoder_decoder: bool) -> dict:
    """LAVIS' settings as `generate` arguments. LAVIS passes `max_len` as new tokens for both families; `min_len`
    goes to transformers' `min_length`, which for T5 counts the decoder start token (so min_len - 1 new tokens)
    and for Vicuna, generating from embeddings only, counts new tokens."""
    return {
        "num_beams": settings["num_beams"],
        "max_new_tokens": settings["max_len"],
        "min_new_tokens": max(settings["min_len"] - 1, 0) if is_encoder_decoder else settings["min_len"],
        "length_penalty": settings["length_penalty"],
        "repetition_penalty": settings["repetition_penalty"],
    }


def binary_candidates() -> list[str]:
    return [*POSITIVE_WORDS, *NEGATIVE_WORDS]


def positive_probability(scores: list[float]) -> float:
    """P(positive) from ranking scores (log-likelihoods) over `binary_candidates()`: the likelihoods of each
    verbalizer set are summed, then normalised over the two sets."""
    k = len(POSITIVE_WORDS)
    pos, neg = _logsumexp(scores[:k]), _logsumexp(scores[k:])
    return 1.0 / (1.0 + math.exp(neg - pos)) if neg - pos < 700 else 0.0


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


def parse_binary(answer: str) -> int | None:
    """1 / 0 when a generated answer starts with a positive / negative verbalizer (after VQA normalisation)."""
    words = normalize_answer(answer).split()
    if words and words[0] in POSITIVE_WORDS:
        return 1
    if words and words[0] in NEGATIVE_WORDS:
        return 0
    return None


def format_options(options: list[str]) -> str:
    """Options as LAVIS writes them into the prompt: `(a) first (b) second ...`."""
    return " ".join(f"({chr(ord('a') + i)}) {option}" for i, option in enumerate(options))


# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One evaluation item."""

    id: str  # unique within the benchmark's split; the key of the prediction lines
    media: str  # an image file; for video benchmarks a video file or a folder of frames
    prompt: str  # the instruction, given to the Q-Former and to the LLM (LAVIS feeds both the same text)
    target: Any  # the ground truth, in the form the benchmark's metric needs
    candidates: list[str] | None = None  # ranking mode: the answers scored (often one list shared by all samples)
    info: dict = field(default_factory=dict)  # extra fields written into the prediction line


class MissingDataError(FileNotFoundError):
    """A benchmark's files are not where they are expected."""


class Benchmark:
    """A held-out benchmark: reads the dataset's own files, builds the paper's prompts, scores predictions.

    Subclasses set the class attributes and implement `_load` and `score`; ranking benchmarks may override `record`.
    """

    name = ""  # the CLI name, e.g. "gqa"
    title = ""  # the column in the paper's Table 1
    metric = "accuracy"  # the headline metric (the first key `score` returns)
    mode = "generate"  # default inference mode: "generate" (open-ended) or "rank" (vocabulary ranking)
    modes: tuple[str, ...] = ("generate",)  # the modes it supports
    splits: tuple[str, ...] = ("test",)  # the first is the default (the split the paper reports)
    video = False  # media are videos: `num_frames` frames each
    num_frames = 4
    prompt = ""  # the instruction template
    generation = VQA_GENERATION  # LAVIS terms; see `generate_kwargs`
    layout = ""  # the files expected in the data directory, one line
    source = ""  # where to get them

    def __init__(self, mode: str | None = None):
        mode = mode or type(self).mode
        if mode not in self.modes:
            raise ValueError(f"{self.name} supports --mode {' or '.join(self.modes)}, not {mode!r}")
        self.mode = mode

    def load(self, data_dir: str | os.PathLike | None, split: str | None = None) -> list[Sample]:
        """The samples of `split` (default: the paper's), in the dataset's order."""
        split = split or self.splits[0]
        if split not in self.splits:
            raise ValueError(f"{self.name} has splits {', '.join(self.splits)}; got {split!r}")
        if data_dir is None:
            raise ValueError(f"{self.name} needs --data DIR holding {self.layout} (get it from {self.source})")
        root = Path(data_dir)
        if not root.is_dir():
            raise self.missing(root, f"the data directory {root}")
        samples = self._load(root, split)
        if not samples:
            raise ValueError(f"{self.name}: the {split} split in {root} holds no samples")
        ids = [s.id for s in samples]
        assert len(set(ids)) == len(ids), f"{self.name}: duplicate sample ids"
        return samples

    def _load(self, root: Path, split: str) -> list[Sample]:
        raise NotImplementedError

    def record(self, sample: Sample, answer: str | None = None, scores: list[float] | None = None) -> dict:
        """The prediction line's content for a generated `answer` or for ranking `scores` (one per candidate)."""
        if answer is not None:
            return {"prediction": answer}
        assert sample.candidates is not None and scores is not None and len(scores) == len(sample.candidates)
        best = max(range(len(scores)), key=scores.__getitem__)
        return {"prediction": sample.candidates[best]}

    def score(self, results: list[tuple[Sample, dict]]) -> dict[str, float]:
        """Metrics (percentages, as in Table 1) over (sample, prediction line) pairs; the headline metric first."""
        raise NotImplementedError

    def generation_settings(self, is_encoder_decoder: bool) -> dict:
        return generate_kwargs(self.generation, is_encoder_decoder)

    def settings(self, is_encoder_decoder: bool) -> dict:
        """What the results file records about how the benchmark was run."""
        out: dict[str, Any] = {"mode": self.mode, "prompt": self.prompt}
        if self.mode == "generate":
            out["generation"] = {"lavis": dict(self.generation), **self.generation_settings(is_encoder_decoder)}
        if self.video:
            out["frames"] = (f"{self.num_frames} sampled uniformly, each through the vision encoder and the Q-Former; "
                             "the query outputs concatenated")
        return out

    # ---- helpers for subclasses ----

    def missing(self, root: Path, what: str) -> MissingDataError:
        return MissingDataError(f"{self.name}: {what} not found. Expected in {root}: {self.layout}. "
                                f"Get it from {self.source}")

    def need(self, root: Path, *names: str) -> Path:
        """The first of `names` (relative to root) that exists, else MissingDataError naming the first."""
        for name in names:
            if (root / name).exists():
                return root / name
        raise self.missing(root, str(root / names[0]))

    def find(self, root: Path, name: str, folders: tuple[str, ...]) -> str:
        """`name` inside the first of `folders` (relative to root; "" = root itself) that holds it; when none does,
        the path in the first folder (the runner reports it as missing when it reads the media)."""
        for folder in folders:
            path = root / folder / name
            if path.exists():
                return str(path)
        return str(root / folders[0] / name)


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n} is not valid JSON: {e}") from None
    return rows
