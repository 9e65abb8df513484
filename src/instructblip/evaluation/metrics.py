"""The metrics of the InstructBLIP paper's held-out benchmarks (docs/recipe.md#metrics), one small function each.

Every function returns a fraction (CIDEr may exceed 1); the benchmarks report 100x, as the paper's Table 1 does.

- `normalize_answer`: the official VQA answer normalisation (punctuation, number words -> digits, articles,
  contractions), as `lavis/common/vqa_tools/vqa_eval.py` (a copy of the official VQA evaluation) applies it.
- `vqa_accuracy`: min(#humans that gave the answer / 3, 1), averaged over the leave-one-out subsets of the human
  answers (TextVQA, VizWiz).
- `exact_match`: normalised prediction == normalised answer (GQA, VSR, IconQA, MSVD-QA, MSRVTT-QA, easy-vqa).
- `ivqa_accuracy`: min(#annotators that gave the answer / 2, 1) (iVQA, "Just Ask", Yang et al. 2021).
- `caption_metrics`: CIDEr-D and BLEU-4 from pycocoevalcap after its PTB tokenizer (Java) (NoCaps, Flickr30K).
- `roc_auc`: ROC AUC from scikit-learn (HatefulMemes).
- `mean_reciprocal_rank` / `rank_of`: MRR of the ground-truth option among the 100 candidates (Visual Dialog).
- `top1_accuracy`: the fraction of predictions equal to their labels.

pycocoevalcap and scikit-learn come with the `eval` extra and are imported only where they are used.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping, Sequence

# ---------------------------------------------------------------------------------------------------------------------
# the official VQA answer normalisation (tables as in the VQA evaluation code)

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
# Kept exactly as the official code has them: the "lookbehind" is really a lookahead for the text "<=digit", so a
# period is removed unless a digit follows it; and `sub` is called with re.UNICODE (32) in the count position, so
# at most 32 periods are removed.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`: a punctuation mark next to a space (or any text with a digit-comma-digit
    group) is deleted, otherwise replaced by a space; periods not followed by a digit are deleted."""
    out = text
    comma_group = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or comma_group:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lowercase, number words -> digits, drop articles, restore contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """A model's answer as the VQA evaluation compares it: whitespace, punctuation, then digits/articles."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


# ---------------------------------------------------------------------------------------------------------------------
# answer accuracies


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of one prediction against the human answers (10 in VQAv2, TextVQA and VizWiz).

    As the reference code computes it: the prediction is normalised (`normalize_answer`); the human answers are
    taken as written, with only `process_punctuation` applied and only when they are not all the same; for each
    human answer left out in turn, min(#other humans that gave the prediction / 3, 1); the mean over the subsets.
    """
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
    pred = normalize_answer(prediction)
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    matches = sum(a == pred for a in gts)
    # leaving out answer i: the matches among the others are `matches` minus one if answer i itself matches
    return sum(min(1.0, (matches - (a == pred)) / 3) for a in gts) / len(gts)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the prediction equals the answer after `normalize_answer` on both, else 0.0 (GQA-style)."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def ivqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """iVQA: min(#annotators (of 5) that gave the prediction / 2, 1), both sides normalised (`normalize_answer`).

    As "Just Ask" (Yang et al., ICCV 2021) defines it: an answer given by two annotators or more is fully correct,
    one given by a single annotator half correct.
    """
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
    pred = normalize_answer(prediction)
    return min(1.0, sum(normalize_answer(a) == pred for a in answers) / 2)


def top1_accuracy(predictions: Sequence, labels: Sequence) -> float:
    """The fraction of predictions equal to their label."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("no predictions to score")
    return sum(p == t for p, t in zip(predictions, labels, strict=True)) / len(labels)


# ---------------------------------------------------------------------------------------------------------------------
# ranking and classification


def rank_of(scores: Sequence[float], index: int) -> int:
    """The 1-based rank of candidate `index` when the candidates are sorted by score, highest first; ties count in
    its favour (rank = 1 + the number of candidates scoring strictly higher)."""
    if not 0 <= index < len(scores):
        raise ValueError(f"index {index} is outside the {len(scores)} candidates")
    target = scores[index]
    if math.isnan(target):
        raise ValueError("the ground-truth candidate's score is NaN")
    return 1 + sum(s > target for s in scores)


def mean_reciprocal_rank(ranks: Sequence[int]) -> float:
    """Mean of 1 / rank over the ground-truth ranks (1 = best), as Visual Dialog reports MRR."""
    if not ranks:
        raise ValueError("no ranks to score")
    if any(r < 1 for r in ranks):
        raise ValueError("ranks start at 1")
    return sum(1.0 / r for r in ranks) / len(ranks)


def recall_at(ranks: Sequence[int], k: int) -> float:
    """The fraction of ground truths ranked within the top k."""
    if not ranks:
        raise ValueError("no ranks to score")
    return sum(r <= k for r in ranks) / len(ranks)


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve of `scores` (higher = more likely positive) for binary `labels`, by scikit-learn."""
    roc_auc_score = _need("sklearn.metrics", "scikit-learn").roc_auc_score
    if len(set(labels)) < 2:
        raise ValueError("ROC AUC needs both positive and negative labels among the samples")
    return float(roc_auc_score(list(labels), list(scores)))


# ---------------------------------------------------------------------------------------------------------------------
# captioning


def caption_metrics(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> dict:
    """CIDEr-D ("CIDEr" in pycocoevalcap) and BLEU-1..4 of one caption per image against its references.

    As the COCO caption evaluation (and LAVIS' `coco_caption_eval`) computes them: every caption goes through
    the Stanford PTB tokenizer (lowercased, punctuation removed; needs `java` on the PATH), then pycocoevalcap's
    `Bleu(4)` and `Cider()` score the corpus. Returns {"CIDEr", "Bleu_1", ..., "Bleu_4"}; ROUGE/METEOR/SPICE are
    not computed (the paper reports CIDEr).
    """
    import shutil

    Bleu = _need("pycocoevalcap.bleu.bleu", "pycocoevalcap").Bleu
    Cider = _need("pycocoevalcap.cider.cider", "pycocoevalcap").Cider
    PTBTokenizer = _need("pycocoevalcap.tokenizer.ptbtokenizer", "pycocoevalcap").PTBTokenizer
    if set(predictions) != set(references):
        missing, extra = set(references) - set(predictions), set(predictions) - set(references)
        raise ValueError(f"predictions and references cover different images (missing {sorted(map(str, missing))[:5]},"
                         f" extra {sorted(map(str, extra))[:5]})")
    if not predictions:
        raise ValueError("no captions to score")
    if any(not refs or isinstance(refs, str) for refs in references.values()):
        raise ValueError("every image needs a non-empty list of reference captions")
    if shutil.which("java") is None:
        raise FileNotFoundError("caption metrics need Java (the PTB tokenizer of pycocoevalcap runs on it); install "
                                "a JRE, e.g. `apt-get install default-jre-headless`")
    keys = list(references)
    # one tokenizer run (one JVM) for references and predictions; an empty caption would be dropped by the
    # tokenizer's line splitting, so it is written as a lone "." (removed as punctuation: it stays empty)
    captions = {("ref", i): [{"caption": c} for c in references[k]] for i, k in enumerate(keys)}
    captions |= {("pred", i): [{"caption": predictions[k].strip() or "."}] for i, k in enumerate(keys)}
    tokenized = PTBTokenizer().tokenize(captions)
    gts = {i: tokenized[("ref", i)] for i in range(len(keys))}
    res = {i: tokenized[("pred", i)] for i in range(len(keys))}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"CIDEr": float(cider), **{f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}}


def _need(module: str, package: str):
    """Import an optional dependency of the `eval` extra, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"this metric needs {package}: pip install 'instructblip[eval]'") from None
