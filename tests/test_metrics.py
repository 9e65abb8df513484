"""The metrics against their reference implementations: LAVIS' copy of the official VQA evaluation (loaded by path
from the `salesforce-lavis` package, installed `--no-deps` as a test-only oracle), pycocoevalcap's COCO caption
evaluation run the usual way, and scikit-learn."""

import importlib.util
import itertools
import json
import random
from pathlib import Path

import pytest

from instructblip.evaluation import metrics


def _lavis_vqa_eval():
    """lavis/common/vqa_tools/vqa_eval.py, imported by path (importing the lavis package would pull in its whole
    dependency tree)."""
    spec = importlib.util.find_spec("lavis")
    assert spec is not None and spec.submodule_search_locations, (
        "the oracle is missing: .venv/bin/pip install --no-deps salesforce-lavis==1.0.2")
    path = Path(next(iter(spec.submodule_search_locations))) / "common" / "vqa_tools" / "vqa_eval.py"
    module_spec = importlib.util.spec_from_file_location("lavis_vqa_eval", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.VQAEval


class _QA:  # the two methods of lavis' VQA objects that VQAEval uses
    def __init__(self, qa):
        self.qa = qa

    def getQuesIds(self):  # noqa: N802 (lavis' name)
        return list(self.qa)


WORDS = ["two", "Two", "none", "zero", "ten", "one", "a", "an", "The", "the", "dog", "dogs", "cat's", "dont", "isnt",
         "whats", "yall", "Im", "Ive", "oclock", "red", "blue", "yes", "No", "left", "3", "10", "1,000", "3.5", "2.",
         "U.S.A.", "e-mail", "t-shirt", "rock'n'roll", "50%", "$5", "#1", "mr.", "it's", "he'd", "can't", "oranges",
         "A/C", "(left)", "[blue]", "one-way", "hot dog", "x", "...", "@home", "a+b", "under_score", "x=y", "<3"]
PUNCT = ["", "", "", ".", "?", "!", ",", ";", " .", " ,", " !", ":", "'", '"', "-", "/", "\\", "`"]


def _answer(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
    text = " ".join(words) + rng.choice(PUNCT)
    if rng.random() < 0.2:
        text = rng.choice([" ", "\t", "\n", "  "]) + text + rng.choice([" ", "\n", ""])
    if rng.random() < 0.15:
        text = text.upper()
    return text


def _cases(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """n (prediction, 10 human answers) pairs: answers drawn from a small pool of variants so that they overlap,
    predictions often one of them (possibly re-punctuated) and sometimes unrelated."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        pool = [_answer(rng) for _ in range(rng.randint(1, 4))]
        answers = [rng.choice(pool) for _ in range(10)]
        if rng.random() < 0.5:
            answers = [metrics.normalize_answer(a) for a in answers]  # the official data are mostly normalised
        prediction = rng.choice([rng.choice(pool), rng.choice(pool) + rng.choice(PUNCT), _answer(rng),
                                 rng.choice(pool).title(), metrics.normalize_answer(rng.choice(pool))])
        cases.append((prediction, answers))
    return cases


def test_answer_normalisation_matches_lavis():
    VQAEval = _lavis_vqa_eval()
    ref = VQAEval()
    texts = [p for p, _ in _cases(400)] + [a for _, answers in _cases(100, seed=1) for a in answers]
    texts += ["1,000,000 dollars", "a.b.c 3.5", "Yes.", "don t", "it's 3.00 o'clock", "no. 5", ". . .", ""]
    assert len(set(texts)) > 300
    for text in texts:
        cleaned = text.replace("\n", " ").replace("\t", " ").strip()
        assert metrics.process_punctuation(text) == ref.processPunctuation(text), text
        assert metrics.normalize_answer(text) == ref.processDigitArticle(ref.processPunctuation(cleaned)), text
    # the quirks kept on purpose: periods before digits survive, contractions are restored, number words -> digits
    assert metrics.normalize_answer("The Two Dogs.") == "2 dogs"
    assert metrics.normalize_answer("dont know") == "don't know"
    assert metrics.normalize_answer("3.5 m") == "3.5 m"
    assert metrics.normalize_answer("1,000") == "1000"


def test_vqa_accuracy_matches_lavis_on_hundreds_of_answers():
    VQAEval = _lavis_vqa_eval()
    cases = _cases(500, seed=2)
    gts = {i: {"answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(answers)],
               "question_type": "what", "answer_type": "other"} for i, (_, answers) in enumerate(cases)}
    res = {i: {"answer": prediction} for i, (prediction, _) in enumerate(cases)}
    evaluator = VQAEval(_QA(gts), _QA(res), n=12)
    evaluator.evaluate()  # prints a progress bar
    ours = [metrics.vqa_accuracy(p, a) for p, a in cases]
    assert [round(100 * acc, 12) for acc in ours] == [evaluator.evalQA[i] for i in range(len(cases))]
    assert len({round(a, 4) for a in ours}) >= 4  # 0, 0.3, 0.6, 0.9, 1 all occur: the cases are varied
    assert sum(ours) / len(ours) * 100 == pytest.approx(evaluator.accuracy["overall"], abs=0.006)
    # the textbook values
    assert metrics.vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)  # 3 of 9 others, or 2 of 9
    assert metrics.vqa_accuracy("2", ["two"] * 10) == 0.0  # the human answers are not digit-normalised
    assert metrics.vqa_accuracy("Yes!", ["yes"] * 10) == 1.0
    assert metrics.vqa_accuracy("no", ["yes"] * 10) == 0.0
    with pytest.raises(ValueError):
        metrics.vqa_accuracy("yes", [])


def test_exact_match_agrees_with_lavis_gqa_task():
    """LAVIS' gqa task normalises the prediction only. The two agree wherever the answer is already in normal form
    (most GQA answers); where it is not (hyphens: "t-shirt"), LAVIS can never match it and we can."""
    VQAEval = _lavis_vqa_eval()
    ref = VQAEval()
    answers = ["yes", "no", "left", "right", "man", "white", "2", "table", "tennis racket", "cat", "t-shirt"]
    predictions = ["Yes", "yes.", "the man", "A man", "two", "Left!", "tennis racket", "table ", "t-shirt", "cats"]
    for prediction, answer in itertools.product(predictions, answers):
        lavis = float(ref.processDigitArticle(ref.processPunctuation(prediction)) == answer)
        if metrics.normalize_answer(answer) == answer:
            assert metrics.exact_match(prediction, answer) == lavis, (prediction, answer)
    assert metrics.exact_match("t-shirt", "t-shirt") == 1.0
    assert ref.processDigitArticle(ref.processPunctuation("t-shirt")) != "t-shirt"  # LAVIS: 0
    assert metrics.exact_match("The Man.", "man") == 1.0 and metrics.exact_match("woman", "man") == 0.0


def test_ivqa_accuracy_counts_annotators_over_two():
    answers = ["knife", "knife", "spoon", "fork", "knife"]
    assert metrics.ivqa_accuracy("knife", answers) == 1.0
    assert metrics.ivqa_accuracy("A spoon.", answers) == 0.5
    assert metrics.ivqa_accuracy("plate", answers) == 0.0
    assert metrics.ivqa_accuracy("fork", ["fork", "fork"] + ["x"] * 3) == 1.0


def test_top1_mrr_and_ranks():
    assert metrics.top1_accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert metrics.rank_of([0.1, 0.9, 0.5], 2) == 2
    assert metrics.rank_of([0.5, 0.5, 0.1], 1) == 1  # ties count in the ground truth's favour
    assert metrics.mean_reciprocal_rank([1, 2, 4]) == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert metrics.recall_at([1, 2, 6, 11], 5) == 0.5
    with pytest.raises(ValueError):
        metrics.mean_reciprocal_rank([0])


def test_roc_auc_matches_sklearn_and_the_pairwise_definition():
    from sklearn.metrics import roc_auc_score

    rng = random.Random(3)
    labels = [rng.randint(0, 1) for _ in range(300)]
    scores = [round(rng.random() * (0.6 + 0.4 * y), 2) for y in labels]  # rounded: ties occur
    auc = metrics.roc_auc(labels, scores)
    assert auc == roc_auc_score(labels, scores)
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    pairwise = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auc == pytest.approx(pairwise, abs=1e-12) and 0.6 < auc < 0.9
    with pytest.raises(ValueError, match="both"):
        metrics.roc_auc([1, 1], [0.2, 0.3])


class _Skipped:
    """Stands in for METEOR/ROUGE/SPICE in the reference run (SPICE downloads Stanford models)."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "skipped"


def test_cider_and_bleu_match_pycocoevalcap(tmp_path, monkeypatch):
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    rng = random.Random(4)
    subjects = ["a man", "a woman", "two dogs", "a cat", "a red car", "the children", "an old bus"]
    verbs = ["riding", "sitting on", "walking past", "looking at", "standing next to", "playing with"]
    objects = ["a bicycle.", "a wooden bench", "the beach!", "a large building, at night", "a frisbee", "snow"]

    def sentence():
        text = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"
        return text.capitalize() if rng.random() < 0.5 else text

    references = {i: [sentence() for _ in range(rng.randint(3, 5))] for i in range(25)}
    predictions = {i: (rng.choice(refs) if rng.random() < 0.3 else sentence()) for i, refs in references.items()}
    ours = metrics.caption_metrics(predictions, references)

    annotations = {"info": {}, "licenses": [], "type": "captions", "images": [{"id": i} for i in references],
                   "annotations": [{"image_id": i, "id": 100 * i + k, "caption": c}
                                   for i, refs in references.items() for k, c in enumerate(refs)]}
    (tmp_path / "gt.json").write_text(json.dumps(annotations))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in predictions.items()]))
    for name in ("Meteor", "Rouge", "Spice"):
        monkeypatch.setattr(coco_eval, name, _Skipped)
    coco = COCO(str(tmp_path / "gt.json"))
    reference = coco_eval.COCOEvalCap(coco, coco.loadRes(str(tmp_path / "res.json")))
    reference.evaluate()
    assert ours["CIDEr"] == pytest.approx(reference.eval["CIDEr"], abs=1e-12)
    for n in range(1, 5):
        assert ours[f"Bleu_{n}"] == pytest.approx(reference.eval[f"Bleu_{n}"], abs=1e-12)
    assert 0.2 < ours["CIDEr"] < 5 and 0 < ours["Bleu_4"] < 1


def test_caption_metrics_edge_cases():
    scores = metrics.caption_metrics({"a": "", "b": "a cat on a mat"}, {"a": ["a dog"], "b": ["a cat on a mat"]})
    assert scores["CIDEr"] > 0 and scores["Bleu_1"] > 0  # an empty caption scores nothing but breaks nothing
    with pytest.raises(ValueError, match="different images"):
        metrics.caption_metrics({"a": "x"}, {"b": ["x"]})
