"""Open-ended VQA on images: GQA, VSR, TextVQA, VizWiz, and easy-vqa (the project's own small benchmark).
Generation with `Question: {} Short answer:`-style prompts and LAVIS' VQA settings (beam 5, at most 10 tokens,
length penalty -1)."""

from __future__ import annotations

import os
from pathlib import Path

from instructblip.evaluation.metrics import exact_match, top1_accuracy, vqa_accuracy
from instructblip.evaluation.tasks.base import (
    TEXTVQA_PROMPT,
    VQA_PROMPT,
    VSR_PROMPT,
    Benchmark,
    MissingDataError,
    Sample,
    binary_candidates,
    parse_binary,
    positive_probability,
    read_json,
    read_jsonl,
)


class GQA(Benchmark):
    """GQA test-dev, balanced: 12,578 questions; exact match after the VQA answer normalisation (LAVIS' gqa task).

    Files: `testdev_balanced_questions.json` (a dict question id -> {`imageId`, `question`, `answer`, ...}) from
    "Questions 1.2" and the images `images/<imageId>.jpg` from https://cs.stanford.edu/people/dorarud/gqa/download.html.
    """

    name = "gqa"
    title = "GQA"
    splits = ("testdev", "val")
    prompt = VQA_PROMPT
    layout = "testdev_balanced_questions.json (or val_balanced_questions.json) and images/<imageId>.jpg"
    source = "https://cs.stanford.edu/people/dorarud/gqa/download.html (Questions 1.2, Images 1.2)"

    def _load(self, root: Path, split: str) -> list[Sample]:
        name = f"{split}_balanced_questions.json"
        data = read_json(self.need(root, name, f"questions/{name}"))
        return [
            Sample(id=str(qid), media=self.find(root, f"{q['imageId']}.jpg", ("images", "")),
                   prompt=VQA_PROMPT.format(question=q["question"]), target=q["answer"],
                   info={"question": q["question"]})
            for qid, q in data.items()
        ]

    def score(self, results: list[tuple[Sample, dict]]) -> dict[str, float]:
        return {"accuracy": 100 * sum(exact_match(r["prediction"], s.target) for s, r in results) / len(results)}


class VSR(Benchmark):
    """Visual Spatial Reasoning, zero-shot split, test: is a caption about two objects' spatial relation true?

    Generation (the paper does not list VSR among its ranking datasets); the answer counts as true when it starts
    with "true"/"yes" and as false with "false"/"no" (anything else is wrong). `--mode rank` scores the verbalizers
    {yes, true} vs {no, false} instead.
    Files: `test.jsonl` (and `dev.jsonl`, `train.jsonl`) of `data/splits/zeroshot/` in
    https://github.com/cambridgeltl/visual-spatial-reasoning (lines with `image`, `caption`, `label`), and the COCO
    2017 images they name, in `images/` (or `train2017/`, `val2017/`).
    """

    name = "vsr"
    title = "VSR"
    modes = ("generate", "rank")
    splits = ("test", "dev", "train")
    prompt = VSR_PROMPT
    layout = "test.jsonl (data/splits/zeroshot/ of the VSR repository) and images/<image> (COCO 2017 images)"
    source = "https://github.com/cambridgeltl/visual-spatial-reasoning (splits; images: https://cocodataset.org)"

    def _load(self, root: Path, split: str) -> list[Sample]:
        rows = read_jsonl(self.need(root, f"{split}.jsonl", f"splits/zeroshot/{split}.jsonl"))
        candidates = binary_candidates() if self.mode == "rank" else None
        return [
            Sample(id=str(i), media=self.find(root, row["image"], ("images", "train2017", "val2017", "")),
                   prompt=VSR_PROMPT.format(caption=row["caption"]), target=int(row["label"]), candidates=candidates,
                   info={"caption": row["caption"]})
            for i, row in enumerate(rows)
        ]

    def record(self, sample: Sample, answer: str | None = None, scores: list[float] | None = None) -> dict:
        if answer is not None:
            return {"prediction": answer, "label": parse_binary(answer)}
        p = positive_probability(scores)
        return {"prediction": "true" if p > 0.5 else "false", "label": int(p > 0.5), "p_true": p}

    def score(self, results: list[tuple[Sample, dict]]) -> dict[str, float]:
        return {"accuracy": 100 * top1_accuracy([r["label"] for _, r in results], [s.target for s, _ in results])}


class _VQAAccuracy(Benchmark):
    def score(self, results: list[tuple[Sample, dict]]) -> dict[str, float]:
        return {"accuracy": 100 * sum(vqa_accuracy(r["prediction"], s.target) for s, r in results) / len(results)}


class TextVQA(_VQAAccuracy):
    """TextVQA val (5,000 questions; the test answers are private): VQA accuracy over 10 human answers.

    The prompt carries the image's OCR tokens (at most 30, joined by ", ", as LAVIS does); they go to the Q-Former
    too. Files from https://textvqa.org/dataset: `TextVQA_0.5.1_val.json` (`data`: `question`, `image_id`,
    `answers`, `question_id`), the Rosetta OCR `TextVQA_Rosetta_OCR_v0.2_val.json` (`data`: `image_id`,
    `ocr_tokens`; not needed when the question entries carry `ocr_tokens`), and the images
    `train_images/<image_id>.jpg` (val images are in train_val_images.zip).
    """

    name = "textvqa"
    title = "TextVQA"
    splits = ("val", "train")
    prompt = TEXTVQA_PROMPT
    max_ocr_tokens = 30
    layout = ("TextVQA_0.5.1_val.json, TextVQA_Rosetta_OCR_v0.2_val.json and train_images/<image_id>.jpg "
              "(from train_val_images.zip)")
    source = "https://textvqa.org/dataset"

    def _load(self, root: Path, split: str) -> list[Sample]:
        questions = read_json(self.need(root, f"TextVQA_0.5.1_{split}.json"))["data"]
        ocr: dict[str, list[str]] = {}
        if not all("ocr_tokens" in q for q in questions):
            for entry in read_json(self.need(root, f"TextVQA_Rosetta_OCR_v0.2_{split}.json"))["data"]:
                ocr[entry["image_id"]] = entry["ocr_tokens"]
        samples = []
        for q in questions:
            tokens = q["ocr_tokens"] if "ocr_tokens" in q else ocr.get(q["image_id"], [])
            tokens = [str(t) for t in tokens[: self.max_ocr_tokens]]
            prompt = TEXTVQA_PROMPT.format(ocr=", ".join(tokens), question=q["question"])
            samples.append(Sample(id=str(q["question_id"]),
                                  media=self.find(root, f"{q['image_id']}.jpg", ("train_images", "images", "")),
                                  prompt=prompt, target=q["answers"], info={"question": q["question"]}))
        return samples


class VizWiz(_VQAAccuracy):
    """VizWiz-VQA val (4,319 questions from blind users; the paper's number is from the evaluation server): VQA
    accuracy over 10 answers, "unanswerable" included.

    Files from https://vizwiz.org/tasks-and-datasets/vqa/: `Annotations/val.json` (a list of {`image`,
    `question`, `answers`: [{`answer`, ...}]}) and the images `val/<image>`.
    """

    name = "vizwiz"
    title = "VizWiz"
    splits = ("val", "train")
    prompt = VQA_PROMPT
    layout = "Annotations/val.json and val/<image>.jpg"
    source = "https://vizwiz.org/tasks-and-datasets/vqa/"

    def _load(self, root: Path, split: str) -> list[Sample]:
        rows = read_json(self.need(root, f"Annotations/{split}.json", f"annotations/{split}.json", f"{split}.json"))
        return [
            Sample(id=Path(row["image"]).stem, prompt=VQA_PROMPT.format(question=row["question"]),
                   target=[a["answer"] for a in row["answers"]], info={"question": row["question"]},
                   media=self.find(root, row["image"], (split, f"images/{split}", "images")))
            for row in rows
        ]


class EasyVQA(Benchmark):
    """easy-vqa (PyPI `easy-vqa`): 64 px images of one coloured shape, 13 answers; the project's own small models.

    Generation, or (`--mode rank`) ranking over the 13 answers; accuracy by exact match. The data come with the
    package (no --data needed); a directory with the package's layout (`answers.txt`, `<split>/questions.json`,
    `<split>/images/<id>.png`) may be given instead. `prompt`: the instruction template, with `{question}`.
    """

    name = "easy-vqa"
    title = "easy-vqa"
    modes = ("generate", "rank")
    splits = ("test", "train")
    prompt = VQA_PROMPT
    layout = "answers.txt, test/questions.json and test/images/<id>.png (the easy-vqa package's data/ folder)"
    source = "pip install easy-vqa"

    def __init__(self, mode: str | None = None, prompt: str | None = None):
        super().__init__(mode)
        if prompt is not None:
            if "{question}" not in prompt:
                raise ValueError(f"the easy-vqa prompt must contain {{question}}, got {prompt!r}")
            self.prompt = prompt

    def load(self, data_dir: str | os.PathLike | None, split: str | None = None) -> list[Sample]:
        if data_dir is not None:
            return super().load(data_dir, split)
        split = split or self.splits[0]
        if split not in self.splits:
            raise ValueError(f"{self.name} has splits {', '.join(self.splits)}; got {split!r}")
        try:
            import easy_vqa
        except ImportError:
            raise MissingDataError("easy-vqa: the easy-vqa package is not installed; pip install easy-vqa") from None
        if split == "test":
            questions, paths = easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
        else:
            questions, paths = easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
        return self._samples(zip(*questions, strict=True), paths, easy_vqa.get_answers())

    def _load(self, root: Path, split: str) -> list[Sample]:
        answers = self.need(root, "answers.txt").read_text(encoding="utf-8").split()
        questions = read_json(self.need(root, f"{split}/questions.json"))
        paths = {image_id: str(root / split / "images" / f"{image_id}.png") for _, _, image_id in questions}
        return self._samples(questions, paths, answers)

    def _samples(self, questions, paths: dict[int, str], answers: list[str]) -> list[Sample]:
        candidates = list(answers) if self.mode == "rank" else None
        return [
            Sample(id=str(i), media=paths[image_id], prompt=self.prompt.format(question=question), target=answer,
                   candidates=candidates, info={"question": question})
            for i, (question, answer, image_id) in enumerate(questions)
        ]

    def score(self, results: list[tuple[Sample, dict]]) -> dict[str, float]:
        return {"accuracy": 100 * sum(exact_match(r["prediction"], s.target) for s, r in results) / len(results)}
