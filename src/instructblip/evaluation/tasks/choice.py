"""Closed-set benchmarks, answered by vocabulary ranking (paper p. 5): IconQA, ScienceQA (image subset),
HatefulMemes and Visual Dialog. Each candidate's log-likelihood given the image and the prompt is computed and
the best one taken (`instructblip.generation.decode.rank`; sums of token log-probabilities, as LAVIS)."""

from __future__ import annotations

from pathlib import Path

from instructblip.evaluation.metrics import (
    exact_match,
    mean_reciprocal_rank,
    rank_of,
    recall_at,
    roc_auc,
    top1_accuracy,
)
from instructblip.evaluation.tasks.base import (
    HATEFUL_MEMES_PROMPT,
    ICONQA_PROMPT,
    SCIENCEQA_PROMPT,
    SCIENCEQA_PROMPT_NO_CONTEXT,
    VISDIAL_PROMPT,
    Benchmark,
    Sample,
    binary_candidates,
    format_options,
    positive_probability,
    read_json,
    read_jsonl,
)


class IconQA(Benchmark):
    """IconQA, multi-text-choice sub-task ("choose_txt"), test: 6,316 questions about abstract diagrams.

    Ranking over the question's own options (the option texts; `--mode generate` generates and compares the text
    instead). Files from https://iconqa.github.io (iconqa_data.zip): `iconqa/test/choose_txt/<pid>/data.json`
    (`question`, `choices`, `answer`: the index of the right choice) and `image.png` beside it; with
    `problems.json` and `pid_splits.json` (`choose_txt_test`) present, those are read instead of the data.json files.
    """

    name = "iconqa"
    title = "IconQA"
    mode = "rank"
    modes = ("rank", "generate")
    splits = ("test", "val", "train")
    prompt = ICONQA_PROMPT
    layout = "iconqa/test/choose_txt/<pid>/{data.json,image.png} (optionally problems.json + pid_splits.json)"
    source = "https://iconqa.github.io (iconqa_data.zip)"

    def _load(self, root: Path, split: str) -> list[Sample]:
        folder = root / "iconqa" / split / "choose_txt"
        if (root / "problems.json").exists() and (root / "pid_splits.json").exists():
            problems = read_json(root / "problems.json")
            pids = read_json(root / "pid_splits.json")[f"choose_txt_{split}"]
            items = [(str(pid), problems[str(pid)]) for pid in pids]
        else:
            if not folder.is_dir():
                raise self.missing(root, str(folder))
            dirs = sorted((d for d in folder.iterdir() if (d / "data.json").exists()),
                          key=lambda d: (len(d.name), d.name))
            items = [(d.name, read_json(d / "data.json")) for d in dirs]
        samples = []
        for pid, p in items:
            choices = [str(c) for c in p["choices"]]
            samples.append(Sample(
                id=pid, media=str(folder / pid / "image.png"),
                prompt=ICONQA_PROMPT.format(question=p["question"], options=format_options(choices)),
                target=choices[int(p["answer"])], candidates=choices if self.mode == "rank" else None,
                info={"question": p["question"]},
            ))
        return samples

    def score(self, results: list[tuple[Sample, dict]]) -> dict[str, float]:
        return {"accuracy": 100 * sum(exact_match(r["prediction"], s.target) for s, r in results) / len(results)}


class ScienceQA(Benchmark):
    """ScienceQA, test questions with an image ("IMG", 2,017): ranking over the option letters "(a)".."(e)".

    The author's recipe (LAVIS #326): `Context: {hint} Question: {q} Options: (a) .. (b) ... Answer:`, the textual
    context (the problem's `hint`) when there is one (without it the `Context:` part is left out), candidates
    "(a)", "(b)", ... mapped back to the options. Files from https://scienceqa.github.io (the GitHub repository's
    data/scienceqa/): `problems.json`, `pid_splits.json`, and the images `images/test/<pid>/image.png`.
    """

    name = "scienceqa"
    title = "SciQA"
    mode = "rank"
    modes = ("rank",)
    splits = ("test", "val", "train", "minival", "minitest")
    prompt = SCIENCEQA_PROMPT
    layout = "problems.json, pid_splits.json and images/test/<pid>/image.png"
    source = "https://scienceqa.github.io (https://github.com/lupantech/ScienceQA, data/scienceqa)"

    def _load(self, root: Path, split: str) -> list[Sample]:
        problems = read_json(self.need(root, "problems.json"))
        pids = read_json(self.need(root, "pid_splits.json"))[split]
        samples = []
        for pid in map(str, pids):
            p = problems[pid]
            if not p.get("image"):
                continue  # the paper evaluates the image subset
            options, hint = format_options(p["choices"]), (p.get("hint") or "").strip()
            prompt = (SCIENCEQA_PROMPT.format(context=hint, question=p["question"], options=options) if hint
                      else SCIENCEQA_PROMPT_NO_CONTEXT.format(question=p["question"], options=options))
            letters = [f"({chr(ord('a') + i)})" for i in range(len(p["choices"]))]
            samples.append(Sample(id=pid, media=self.find(root, f"{pid}/{p['image']}", (f"images/{split}", split)),
                                  prompt=prompt, target=int(p["answer"]), candidates=letters,
                                  info={"choices": p["choices"]}))
        return samples

    def record(self, sample: Sample, answer: str | None = None, scores: list[float] | None = None) -> dict:
        choice = max(range(len(scores)), key=scores.__getitem__)
        return {"prediction": sample.candidates[choice], "choice": choice}

    def score(self, results: list[tuple[Sample, dict]]) -> dict[str, float]:
        return {"accuracy": 100 * top1_accuracy([r["choice"] for _, r in results], [s.target for s, _ in results])}


class HatefulMemes(Benchmark):
    """Hateful Memes, dev_seen (500 memes; also test_seen, dev_unseen, test_unseen): ROC AUC of P(hateful).

    Ranking over the verbalizers {yes, true} vs {no, false}: P(hateful) = the likelihood of the positive set
    normalised over both sets. Files from https://ai.meta.com/tools/hatefulmemes/ (the DrivenData release):
    `dev_seen.jsonl` (lines with `id`, `img`, `label`, `text`) and the images `img/<id>.png` it names.
    """

    name = "hatefulmemes"
    title = "HM"
    metric = "AUC"
    mode = "rank"
    modes = ("rank",)
    splits = ("dev_seen", "test_seen", "dev_unseen", "test_unseen")
    prompt = HATEFUL_MEMES_PROMPT
    layout = "dev_seen.jsonl (or test_seen.jsonl, ...) and img/<id>.png"
    source = "https://ai.meta.com/tools/hatefulmemes/"

    def _load(self, root: Path, split: str) -> list[Sample]:
        rows = read_jsonl(self.need(root, f"{split}.jsonl", f"data/{split}.jsonl"))
        if any("label" not in row for row in rows):
            raise ValueError(f"{self.name}: {split}.jsonl has no labels (an unlabelled release); use dev_seen")
        candidates = binary_candidates()
        return [Sample(id=str(row["id"]), media=self.find(root, row["img"], ("", "data")),
                       prompt=HATEFUL_MEMES_PROMPT.format(text=row["text"]), target=int(row["label"]),
                       candidates=candidates, info={"text": row["text"]})
                for row in rows]

    def record(self, sample: Sample, answer: str | None = None, scores: list[float] | None = None) -> dict:
        p = positive_probability(scores)
        return {"prediction": "yes" if p > 0.5 else "no", "p_hateful": p}

    def score(self, results: list[tuple[Sample, dict]]) -> dict[str, float]:
        labels = [s.target for s, _ in results]
        return {"AUC": 100 * roc_auc(labels, [r["p_hateful"] for _, r in results]),
                "accuracy": 100 * top1_accuracy([int(r["p_hateful"] > 0.5) for _, r in results], labels)}


class VisualDialog(Benchmark):
    """Visual Dialog v1.0 val: 2,064 dialogs x 10 rounds, each ranking its 100 answer options; MRR of the right one.

    The prompt carries the dialog so far: the caption, then the earlier rounds as "question? answer." (the
    ground-truth history, as the VisDial protocol has it; the paper does not spell out the history format). Files
    from https://visualdialog.org/data: `visdial_1.0_val.json` and the images
    `VisualDialog_val2018/VisualDialog_val2018_<image_id:012d>.jpg`.
    """

    name = "visdial"
    title = "Visdial"
    metric = "MRR"
    mode = "rank"
    modes = ("rank",)
    splits = ("val",)
    prompt = VISDIAL_PROMPT
    layout = "visdial_1.0_val.json and VisualDialog_val2018/VisualDialog_val2018_<image_id:012d>.jpg"
    source = "https://visualdialog.org/data"

    def _load(self, root: Path, split: str) -> list[Sample]:
        data = read_json(self.need(root, "visdial_1.0_val.json"))["data"]
        questions, answers = data["questions"], data["answers"]
        samples = []
        for dialog in data["dialogs"]:
            image = f"VisualDialog_val2018_{dialog['image_id']:012d}.jpg"
            media = self.find(root, image, ("VisualDialog_val2018", "images", ""))
            history = [_sentence(dialog["caption"])]
            for r, turn in enumerate(dialog["dialog"]):
                question = _question(questions[turn["question"]])
                samples.append(Sample(
                    id=f"{dialog['image_id']}_{r + 1}", media=media,
                    prompt=VISDIAL_PROMPT.format(history=" ".join(history), question=question),
                    target=int(turn["gt_index"]), candidates=[answers[i] for i in turn["answer_options"]],
                    info={"question": question},
                ))
                history.append(f"{question} {_sentence(answers[turn['answer']])}")
        return samples

    def record(self, sample: Sample, answer: str | None = None, scores: list[float] | None = None) -> dict:
        best = max(range(len(scores)), key=scores.__getitem__)
        return {"prediction": sample.candidates[best], "gt_rank": rank_of(scores, sample.target)}

    def score(self, results: list[tuple[Sample, dict]]) -> dict[str, float]:
        ranks = [r["gt_rank"] for _, r in results]
        return {"MRR": 100 * mean_reciprocal_rank(ranks), "R@1": 100 * recall_at(ranks, 1),
                "R@5": 100 * recall_at(ranks, 5), "R@10": 100 * recall_at(ranks, 10),
                "mean rank": sum(ranks) / len(ranks)}


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _question(text: str) -> str:
    text = text.strip()
    return text if text.endswith("?") else text + "?"
