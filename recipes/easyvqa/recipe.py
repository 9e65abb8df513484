"""The easy-vqa recipe's building blocks: data, tokenizers, the initial model, the two training stages, evaluation.

`run.py` chains them into the recipe (`make easyvqa`), `ablation.py` into the paper's ablation in miniature; the
YAML files next to this one hold every number. Training goes through `instructblip.training` (its
`TrainConfig` and loop) and evaluation through `instructblip.evaluation.runner` (the easy-vqa adapter); this file only
prepares what they read:

- **Data.** easy-vqa's 38,575 training questions are split by question type (`QUESTION_TYPES`), one JSONL source per
  type, so that the trainer's sqrt balancing treats the types as the paper treats datasets; a caption source
  ("a red circle", derived from each image's answers) is added, as BLIP-2 is pre-trained on captions.
- **Augmentation that keeps colour and shape**, done once, offline: every training image gets `variants - 1`
  transformed copies (horizontal flip, scale, small rotation, translation that keeps the whole shape inside the
  image, background filled with its own colour; no colour change, no crop that could cut the shape), and every
  question is written `copies` times, each copy with another variant. (The trainer's own `augment` is a
  random-resized crop, which can cut a small shape out of a 64 px image and so change the answer.)
- **Tokenizers**, trained with the `tokenizers` library on the dataset's text and the instruction templates: a
  byte-level BPE for the LLM (`tokenizer.json`) and a WordPiece vocabulary for the Q-Former (`vocab.txt`, BERT
  layout). A second Q-Former tokenizer with the same vocabulary turns every instruction into `[CLS] [SEP]`: with it
  the Q-Former does not see the instruction (BLIP-2's Q-Former, stage 1, and ablation (b)).
- **The initial model**: a small InstructBLIP (ViT, Q-Former, LLaMA-style LLM) with random weights (seeded) written
  in the HF layout, with its processor, so that the trainer starts from it as from any checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import string
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------------------------
# Question types

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
_C = "|".join(COLORS)
_S = "|".join(SHAPES)
# every easy-vqa question matches exactly one of these (checked by the tests on the whole training split)
QUESTION_TYPES: dict[str, re.Pattern] = {
    "color": re.compile(r"^what (color is the|is the color of the) (shape|" + _S + r")\?$"),
    "shape": re.compile(r"^what (shape (is in the image|does the image contain|is present)|is the (" + _C
                        + r") shape)\?$"),
    "color_present": re.compile(r"^(is there a (" + _C + r") shape( in the image)?|is a (" + _C
                                + r") shape present|does the image contain a (" + _C + r") shape)\?$"),
    "color_absent": re.compile(r"^(is there not a (" + _C + r") shape( in the image)?|is no (" + _C
                               + r") shape present|does the image not contain a (" + _C + r") shape)\?$"),
    "shape_present": re.compile(r"^(is there an? (" + _S + r")( in the image)?|is an? (" + _S
                                + r") present|does the image contain an? (" + _S + r"))\?$"),
    "shape_absent": re.compile(r"^(is there not an? (" + _S + r")( in the image)?|is no (" + _S
                               + r") present|does the image not contain an? (" + _S + r"))\?$"),
}
CAPTION = "caption"


def question_type(question: str) -> str:
    """The type of an easy-vqa question (a key of `QUESTION_TYPES`); ValueError for anything else."""
    q = question.strip().lower()
    found = [name for name, pattern in QUESTION_TYPES.items() if pattern.match(q)]
    if len(found) != 1:
        raise ValueError(f"question {question!r} matches {found or 'no'} question type(s)")
    return found[0]


def image_facts(questions: Iterable[tuple[str, str, int]]) -> dict[int, dict[str, str]]:
    """{image id: {"color": ..., "shape": ...}} from the answers to an image's questions (for the captions)."""
    facts: dict[int, dict[str, str]] = defaultdict(dict)
    for question, answer, image in questions:
        kind = question_type(question)
        words = question.rstrip("?").split()
        if kind in ("color", "shape"):
            facts[image][kind] = answer
            mentioned = [w for w in words if w in (SHAPES if kind == "color" else COLORS)]
            if mentioned:
                facts[image]["shape" if kind == "color" else "color"] = mentioned[0]
        else:
            attribute = "color" if kind.startswith("color") else "shape"
            value = next(w for w in words if w in (COLORS if attribute == "color" else SHAPES))
            present = (answer == "yes") == kind.endswith("present")
            if present:
                facts[image][attribute] = value
    return dict(facts)


def caption_of(facts: dict[str, str]) -> str | None:
    return f"a {facts['color']} {facts['shape']}" if "color" in facts and "shape" in facts else None


def load_split(split: str) -> tuple[list[tuple[str, str, int]], dict[int, str]]:
    """easy-vqa's (question, answer, image id) triples and {image id: path} for "train" or "test"."""
    import easy_vqa

    if split == "train":
        questions, paths = easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, paths = easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"split must be train or test, got {split!r}")
    return list(zip(*questions, strict=True)), dict(paths)


# ----------------------------------------------------------------------------------------------------------------------
# Augmentation that keeps colour and shape


@dataclass
class AugmentConfig:
    flip: bool = True  # horizontal flip (easy-vqa's triangles point up; a vertical flip would make new shapes)
    scale: tuple[float, float] = (0.75, 1.3)
    rotation: float = 10.0  # degrees, either way
    min_half: float = 3.0  # px: a shape's smaller half-extent is never scaled below this (small shapes stay)
    margin: int = 1  # px kept free between the shape and the border


def shape_box(array: np.ndarray, threshold: int = 24) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the pixels that differ from the background (the corner colour), or None."""
    background = array[0, 0].astype(np.int16)
    diff = np.abs(array.astype(np.int16) - background).max(-1) > threshold
    ys, xs = np.nonzero(diff)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def augment_image(image: Image.Image, rng: random.Random, config: AugmentConfig | None = None) -> Image.Image:
    """A random flip / scale / rotation / translation of `image` about its shape, the shape kept whole inside the
    image and its colour unchanged (bilinear resampling only blends the shape's own edge with the background, as
    the originals' anti-aliased edges do); uncovered area filled with the background colour."""
    config = config or AugmentConfig()
    image = image.convert("RGB")
    if config.flip and rng.random() < 0.5:
        image = ImageOps.mirror(image)
    array = np.asarray(image)
    W, H = image.size
    box = shape_box(array)
    if box is None:
        return image
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half_w, half_h = (x1 - x0) / 2, (y1 - y0) / 2
    radius = math.hypot(half_w, half_h)  # bounds the shape under any rotation
    room = min(W, H) / 2 - config.margin
    low = max(config.scale[0], config.min_half / max(min(half_w, half_h), 1e-6))
    high = min(config.scale[1], room / radius)
    scale = rng.uniform(low, high) if low < high else min(1.0, high)
    angle = math.radians(rng.uniform(-config.rotation, config.rotation))
    cos, sin = math.cos(angle), math.sin(angle)
    # extent of the transformed shape box (rotated corners), then a centre that keeps it inside with the margin
    ext_x = scale * (abs(cos) * half_w + abs(sin) * half_h)
    ext_y = scale * (abs(sin) * half_w + abs(cos) * half_h)
    lo_x, hi_x = ext_x + config.margin, W - ext_x - config.margin
    lo_y, hi_y = ext_y + config.margin, H - ext_y - config.margin
    nx = rng.uniform(lo_x, hi_x) if lo_x < hi_x else W / 2
    ny = rng.uniform(lo_y, hi_y) if lo_y < hi_y else H / 2
    # PIL's affine maps each output pixel to an input one: in = c + R(-a) (out - n) / scale
    a, b = cos / scale, sin / scale
    d, e = -sin / scale, cos / scale
    data = (a, b, cx - a * nx - b * ny, d, e, cy - d * nx - e * ny)
    background = tuple(int(v) for v in array[0, 0])
    return image.transform((W, H), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR,
                           fillcolor=background)


def _write_variants(job: tuple[list[tuple[int, str]], int, int, str]) -> list[tuple[int, list[str]]]:
    items, variants, seed, out_dir = job
    out = []
    for image_id, path in items:
        files = [path]  # variant 0: the original
        with Image.open(path) as opened:
            original = opened.convert("RGB")
        for v in range(1, variants):
            file = os.path.join(out_dir, f"{image_id}-{v}.png")
            if not os.path.exists(file):
                augmented = augment_image(original, random.Random(f"{seed}:{image_id}:{v}"))
                augmented.save(file + ".tmp.png")
                os.replace(file + ".tmp.png", file)
            files.append(file)
        out.append((image_id, files))
    return out


def write_image_variants(paths: dict[int, str], out_dir: str | Path, variants: int, seed: int,
                         workers: int = 2) -> dict[int, list[str]]:
    """{image id: [original path, variant 1, ...]}; variants already on disk are kept (a rerun is cheap)."""
    os.makedirs(out_dir, exist_ok=True)
    items = sorted(paths.items())
    chunks = [items[i::max(workers, 1)] for i in range(max(workers, 1))]
    jobs = [(chunk, variants, seed, str(out_dir)) for chunk in chunks if chunk]
    if workers > 1 and variants > 1 and len(items) > 64:
        with ProcessPoolExecutor(workers) as pool:
            results = [r for part in pool.map(_write_variants, jobs) for r in part]
    else:
        results = [r for job in jobs for r in _write_variants(job)]
    return dict(results)


# ----------------------------------------------------------------------------------------------------------------------
# Training data: one source per question type, plus captions


def render(template: str, question: str) -> str:
    from instructblip.processing.templates import build_instruction

    return build_instruction("vqa", random.Random(0), question=question, template=template)


def stage1_templates(data: dict) -> list[str]:
    """Stage 1's prompts (`data.yaml` stage1_templates: indices into the paper's VQA templates)."""
    from instructblip.processing.templates import VQA_TEMPLATES

    return [VQA_TEMPLATES[i] for i in data["stage1_templates"]]


def write_sources(out_dir: str | Path, questions: list[tuple[str, str, int]], variants: dict[int, list[str]],
                  copies: int, seed: int, types: Iterable[str] | None = None, templates: list[str] | None = None,
                  captions: bool = True, balance_answers: bool = True) -> list[dict]:
    """One JSONL file per question type (and one of captions); returns the trainer's data sources (dicts).

    Each question is written `copies` times, each copy with another image variant. `balance_answers`: within a
    type, a question whose answer is rarer is written proportionally more often (rounded), so that no answer is a
    majority a model can fall back on (easy-vqa's "is there a red shape?" is "no" 88% of the time, "does the image
    not contain a red shape?" "yes" 88%: without this, a small model learns the prior and never looks for the
    colour). `templates` None: "vqa" records,
    whose template the trainer draws per sample from the paper's 10 (`instructblip.processing.templates`); a list: the
    instruction is rendered here with a template drawn from that list ("instruction" records), so that a set of
    templates can be held out. Captions are "caption" records (the paper's 13 caption templates, drawn per sample).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    types = list(QUESTION_TYPES) if types is None else list(types)
    rng = random.Random(f"{seed}:records")
    lines: dict[str, list[str]] = {t: [] for t in types}
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for question, answer, _ in questions:
        counts[question_type(question)][answer] += 1
    for index, (question, answer, image) in enumerate(questions):
        kind = question_type(question)
        if kind not in lines:
            continue
        files = variants[image]
        offset = rng.randrange(len(files))
        repeat = max(1, round(max(counts[kind].values()) / counts[kind][answer])) if balance_answers else 1
        for k in range(copies * repeat):
            record: dict[str, Any] = {"image": files[(offset + k) % len(files)], "id": f"{index}-{k}"}
            if templates is None:
                record.update(task="vqa", question=question, answers=[answer])
            else:
                record.update(task="instruction", instruction=render(rng.choice(templates), question), answer=answer)
            lines[kind].append(json.dumps(record))
    if captions:
        facts = image_facts(questions)
        lines[CAPTION] = []
        for image in sorted(facts):
            caption = caption_of(facts[image])
            if caption is None or image not in variants:
                continue
            files = variants[image]
            offset = rng.randrange(len(files))
            for k in range(copies):
                lines[CAPTION].append(json.dumps({"image": files[(offset + k) % len(files)], "task": "caption",
                                                  "caption": caption}))
    sources = []
    for name, rows in lines.items():
        if not rows:
            continue
        path = out_dir / f"{name}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        sources.append({"path": str(path), "name": name})
    return sources


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers

LLM_SPECIAL = ("<pad>", "<s>", "</s>", "<image>")
QFORMER_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def text_corpus(questions: Iterable[tuple[str, str, int]]) -> list[str]:
    """What the tokenizers are trained on: the questions, answers and captions of the training split, and the
    instruction templates (with their slots removed)."""
    from instructblip.evaluation.tasks.base import VQA_PROMPT
    from instructblip.processing.templates import CAPTION_TEMPLATES, VQA_TEMPLATES

    questions = list(questions)
    lines = sorted({q for q, _, _ in questions} | {a for _, a, _ in questions})
    lines += [caption for f in image_facts(questions).values() if (caption := caption_of(f))]
    lines += [t.replace("{Question}", "") for t in VQA_TEMPLATES] + list(CAPTION_TEMPLATES)
    lines.append(VQA_PROMPT.replace("{question}", ""))
    return lines


def train_llm_tokenizer(corpus: list[str], vocab_size: int, directory: str | Path) -> None:
    """Byte-level BPE (any text can be encoded; lower-cased), `<s>` prepended, `</s>` ends answers; written as
    `tokenizer.json` + `tokenizer_config.json` (class PreTrainedTokenizerFast: the file is used as it is)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=list(LLM_SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "image_token": "<image>", "padding_side": "left", "truncation_side": "left",
              "model_max_length": 128, "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def train_qformer_vocab(corpus: list[str], vocab_size: int) -> list[str]:
    """A WordPiece vocabulary for the Q-Former (BERT layout, `[DEC]` last: LAVIS' bos token): every word of the
    corpus whole, after BERT's normalisation and pre-tokenisation (the `tokenizers` library's), plus every character
    (and every lower-case letter and digit) alone and as a `##` continuation, so that other words are spelled out.
    Built here rather than by `tokenizers`' WordPiece trainer, whose merges between equally frequent pairs change
    from one process to the next: this one is the same on every run (and so are the initial model and the weights)."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words = {w for line in corpus for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(line))}
    chars = sorted({c for w in words for c in w} | set(string.ascii_lowercase + string.digits))
    whole = sorted(words - set(chars), key=lambda w: (len(w), w))
    vocab = [*QFORMER_SPECIAL, *chars, *(f"##{c}" for c in chars), *whole, "[DEC]"]
    if len(vocab) > vocab_size:
        raise ValueError(f"the corpus needs a Q-Former vocabulary of {len(vocab)} tokens; qformer_vocab_size is "
                         f"{vocab_size}: raise it in model.yaml")
    return vocab


def write_qformer_tokenizer(vocab: list[str], directory: str | Path, reads_instruction: bool = True) -> None:
    """The Q-Former tokenizer in `directory`: BERT layout (`vocab.txt`) when it reads the instruction; otherwise
    a `tokenizer.json` over the same vocabulary whose normaliser erases all text, so every instruction becomes
    `[CLS] [SEP]` and the queries learn nothing from it (the Q-Former of BLIP-2, `qformer_text_input=False`)."""
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                "mask_token": "[MASK]", "bos_token": "[DEC]"}
    config: dict[str, Any] = {**specials, "do_lower_case": True, "truncation_side": "left", "model_max_length": 128}
    if reads_instruction:
        (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        config["tokenizer_class"] = "BertTokenizer"
    else:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import WordPiece

        ids = {token: i for i, token in enumerate(vocab)}
        tok = Tokenizer(WordPiece(ids, unk_token="[UNK]"))
        tok.normalizer = normalizers.Replace(Regex(r"[\s\S]+"), "")  # every instruction -> ""
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
        tok.add_special_tokens([AddedToken(t, special=True) for t in (*QFORMER_SPECIAL, "[DEC]")])
        tok.save(str(directory / "tokenizer.json"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config["note"] = "erases every instruction: the Q-Former sees only [CLS] [SEP] (no instruction)"
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def set_qformer_instruction(model_dir: str | Path, vocab_file: str | Path, reads_instruction: bool) -> None:
    """Switch a model directory's Q-Former tokenizer between reading and erasing the instruction (same ids)."""
    vocab = Path(vocab_file).read_text(encoding="utf-8").splitlines()
    write_qformer_tokenizer(vocab, Path(model_dir) / "qformer_tokenizer", reads_instruction)


# ----------------------------------------------------------------------------------------------------------------------
# The initial model


def model_config(spec: dict, llm_tokenizer_dir: str | Path, qformer_vocab_size: int):
    """The `InstructBlipConfig` of `model.yaml`, with the token ids of the trained tokenizers."""
    from instructblip import InstructBlipConfig
    from instructblip.processing.tokenizers import Tokenizer

    tok = Tokenizer.from_pretrained(str(llm_tokenizer_dir))
    ids = {t: tok.backend.token_to_id(t) for t in LLM_SPECIAL}
    vision = dict(spec["vision"], image_size=spec["image_size"], initializer_range=spec["init_std"])
    qformer = dict(spec["qformer"], vocab_size=qformer_vocab_size, pad_token_id=0)
    text = dict(spec["llm"], model_type="llama", vocab_size=len(tok), bos_token_id=ids["<s>"],
                eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    return InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text,
                              num_query_tokens=spec["num_query_tokens"], image_token_index=ids["<image>"],
                              initializer_range=spec["init_std"])


def init_weights(model: torch.nn.Module, std: float, seed: int) -> None:
    """BERT/ViT-style initialisation: linear and embedding weights ~ N(0, std) (truncated at 2 std), biases 0,
    norms 1, learned query tokens and positions ~ N(0, std). Our modules keep PyTorch's defaults otherwise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1:  # biases, LayerNorm / RMSNorm weights
                p.fill_(1.0 if re.search(r"norm\d?\.weight$", name) else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator).clamp_(-2, 2) * std)


def write_initial_model(directory: str | Path, spec: dict, llm_tokenizer_dir: str | Path, qformer_vocab: list[str],
                        seed: int, reads_instruction: bool) -> None:
    """A complete HF-layout checkpoint directory with random (seeded) weights and the recipe's processor."""
    from instructblip import InstructBlipForConditionalGeneration
    from instructblip.processing.image import InstructBlipImageProcessor

    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    config = model_config(spec, llm_tokenizer_dir, len(qformer_vocab))
    model = InstructBlipForConditionalGeneration(config)
    init_weights(model, spec["init_std"], seed)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(llm_tokenizer_dir) / name, directory / name)
    write_qformer_tokenizer(qformer_vocab, directory / "qformer_tokenizer", reads_instruction)
    size = spec["image_size"]
    InstructBlipImageProcessor(size=size).save_pretrained(directory)
    (directory / "processor_config.json").write_text(
        json.dumps({"num_query_tokens": config.num_query_tokens, "processor_class": "InstructBlipProcessor"},
                   indent=2) + "\n", encoding="utf-8")
    from instructblip import InstructBlipProcessor

    # load the processor once: fails here (not in the trainer) if the files disagree
    processor = InstructBlipProcessor.from_pretrained(str(directory))
    assert processor.image_token_id == config.image_token_index


# ----------------------------------------------------------------------------------------------------------------------
# Stages and evaluation


def stage0_settings(steps: int | None = None, batch_size: int | None = None) -> dict:
    """`stage0.yaml`, with max_steps / batch_size overridden when given (reduced-size runs)."""
    stage0 = load_yaml(HERE / "stage0.yaml")
    if steps:
        stage0.update(max_steps=steps, warmup_steps=min(stage0["warmup_steps"], steps))
    if batch_size is not None:
        stage0["batch_size"] = batch_size
    return stage0


def warmup_cosine(peak: float, step: int, warmup: int, steps: int) -> float:
    """The learning rate of stages 0 and 0b at `step` (0-based): linear warm-up times a cosine decay to 0."""
    return peak * min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / steps))


def write_stage_model(model: torch.nn.Module, model_dir: str | Path, out: Path) -> Path:
    """`model_dir`'s files (processor, tokenizers) with `model`'s weights, written to `out` whole or not at all."""
    tmp = out.with_name("model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    model.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def stage0_llm_settings(steps: int | None = None, batch_size: int | None = None) -> dict:
    """`stage0_llm.yaml`, with max_steps / batch_size overridden when given (reduced-size runs)."""
    settings = load_yaml(HERE / "stage0_llm.yaml")
    if steps:
        settings.update(max_steps=steps, warmup_steps=min(settings["warmup_steps"], steps),
                        first_steps=min(settings["first_steps"], steps // 2))
    if batch_size is not None:
        settings["batch_size"] = batch_size
    return settings


def pretrain_vision(model_dir: str | Path, caption_source: str | Path, out_dir: str | Path, settings: dict,
                    seed: int) -> Path:
    """Stage 0, the image encoder's own pre-training (standing in for EVA-CLIP, which BLIP-2 starts from): the ViT
    of `model_dir` and a linear head on its mean-pooled features learn which words each image's caption holds
    (multi-label, one logit per caption word: a bag-of-words image-text objective). Writes the checkpoint with the
    trained ViT to `out_dir/model` (the head is dropped) and returns that directory; skipped when it exists."""
    from instructblip import InstructBlipForConditionalGeneration
    from instructblip.processing.image import InstructBlipImageProcessor

    out = Path(out_dir) / "model"
    if (out / "model.safetensors").is_file():
        print(f"[recipe] {out} exists: stage 0 already done", flush=True)
        return out
    records = [json.loads(line) for line in Path(caption_source).read_text(encoding="utf-8").splitlines()]
    words = sorted({w for r in records for w in r["caption"].split()})
    processor = InstructBlipImageProcessor.from_pretrained(str(model_dir))
    pixels = torch.stack([torch.from_numpy(processor.preprocess_one(Image.open(r["image"]).convert("RGB")))
                          for r in records])  # (N, 3, H, W)
    targets = torch.zeros(len(records), len(words))  # (N, words): multi-hot
    for i, r in enumerate(records):
        for w in r["caption"].split():
            targets[i, words.index(w)] = 1.0

    model = InstructBlipForConditionalGeneration.from_pretrained(str(model_dir))
    vision = model.vision_model
    vision.train()
    torch.manual_seed(seed)
    head = torch.nn.Linear(vision.config.hidden_size, len(words))
    params = [p for p in vision.parameters()] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=settings["weight_decay"])
    steps, batch, warmup = settings["max_steps"], settings["batch_size"], settings["warmup_steps"]
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        lr = warmup_cosine(settings["lr"], step, warmup, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(records), (batch,), generator=generator)
        features = vision(pixels[index]).last_hidden_state.mean(1)  # (B, D)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(features), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % settings["log_every"] == 0 or step + 1 == steps:
            print(f"[stage 0] step {step + 1}/{steps} | loss {loss.item():.4f} | lr {lr:.3g}", flush=True)
    return write_stage_model(model, model_dir, out)


# ----------------------------------------------------------------------------------------------------------------------
# Stage 0b: the language model's own pre-training (standing in for Vicuna / Flan-T5)

FILLERS = (" a", ".", " shape", " the")  # words that fill the query slots of a text "image" beside its two facts


def answer_of(kind: str, facts: dict[str, str], mentioned: str | None) -> str:
    """The answer to a question of type `kind` about an image with `facts`, naming `mentioned` (yes/no types)."""
    if kind in ("color", "shape"):
        return facts[kind]
    attribute = "color" if kind.startswith("color") else "shape"
    return "yes" if (facts[attribute] == mentioned) == kind.endswith("present") else "no"


def text_example(questions: list[tuple[str, str, int]], rng: random.Random, templates: list[str],
                 caption_share: float, word_share: float = 0.0) -> tuple[dict[str, str], str, str]:
    """One text-only example: (facts of an imagined image, prompt, answer). The facts are drawn uniformly from the
    24 colour x shape pairs; a training question is rewritten to name them (colour / shape questions) or, for yes/no
    questions, names the image's value half of the time and another one otherwise, so that "yes" and "no" are equally
    likely and only a comparison answers them."""
    facts = {"color": rng.choice(COLORS), "shape": rng.choice(SHAPES)}
    if rng.random() < caption_share:
        from instructblip.processing.templates import CAPTION_TEMPLATES

        return facts, rng.choice(CAPTION_TEMPLATES), caption_of(facts)
    if rng.random() < word_share:  # the bare word: "red" -> is it the image's colour?
        attribute = rng.choice(("color", "shape"))
        word = _named_value(facts, attribute, rng)
        return facts, word, "yes" if word == facts[attribute] else "no"
    question = rng.choice(questions)[0]
    kind = question_type(question)
    words = question.rstrip("?").split()
    if kind in ("color", "shape"):
        words = [facts["shape"] if w in SHAPES else facts["color"] if w in COLORS else w for w in words]
        mentioned = None
    else:
        attribute = "color" if kind.startswith("color") else "shape"
        mentioned = _named_value(facts, attribute, rng)
        words = [mentioned if w in (COLORS if attribute == "color" else SHAPES) else w for w in words]
    question = " ".join(words) + "?"
    prompt = render(rng.choice(templates), question)
    return facts, prompt, answer_of(kind, facts, mentioned)


def _named_value(facts: dict[str, str], attribute: str, rng: random.Random) -> str:
    """The colour or shape a yes/no example names: the image's own half of the time, another one otherwise."""
    values = COLORS if attribute == "color" else SHAPES
    return facts[attribute] if rng.random() < 0.5 else rng.choice([v for v in values if v != facts[attribute]])


def pretrain_language_model(model_dir: str | Path, questions: list[tuple[str, str, int]], out_dir: str | Path,
                            settings: dict, seed: int) -> Path:
    """Stage 0b, the LLM's own pre-training (standing in for Vicuna / Flan-T5, which InstructBLIP takes pre-trained
    and frozen): the LLM of `model_dir` alone, on text. Each example describes an imagined image in words, written
    where the image's query tokens will stand ("red circle a ." in the 4 query positions, in random order), then
    asks a question about it (or for a caption) in one of the paper's VQA templates (`settings["templates"]`,
    indices; `first_templates` for the first `first_steps` steps); the loss is on the answer. The LLM learns to
    read the facts from the query positions and compare them with the question's words; stage 1 then teaches the
    Q-Former to write the facts of real images there. Writes `out_dir/model` and returns it; skipped when it exists."""
    from instructblip import InstructBlipForConditionalGeneration, InstructBlipProcessor
    from instructblip.models.instructblip import IGNORE_INDEX
    from instructblip.processing.templates import VQA_TEMPLATES
    from instructblip.training.data import Collator

    out = Path(out_dir) / "model"
    if (out / "model.safetensors").is_file():
        print(f"[recipe] {out} exists: LLM pre-training already done", flush=True)
        return out
    model = InstructBlipForConditionalGeneration.from_pretrained(str(model_dir))
    processor = InstructBlipProcessor.from_pretrained(str(model_dir))
    collate = Collator(processor, is_encoder_decoder=False, max_prompt_length=64, max_answer_length=8)
    tokenizer = processor.tokenizer
    Q = model.config.num_query_tokens

    def word_id(word: str) -> int:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]  # the tokenizer keeps every word whole
        if len(ids) != 1:
            raise ValueError(f"{word!r} is {len(ids)} tokens for the LLM tokenizer; the text image needs one")
        return ids[0]

    ids = {w: word_id(" " + w) for w in (*COLORS, *SHAPES)}
    fillers = [word_id(w) for w in FILLERS]
    templates = [VQA_TEMPLATES[i] for i in settings["templates"]]
    first_templates = [VQA_TEMPLATES[i] for i in settings.get("first_templates") or settings["templates"]]
    rng = random.Random(f"{seed}:llm")
    torch.manual_seed(seed)
    dummy = torch.zeros(3, 1, 1)

    def batch_of(n: int, step: int) -> tuple[dict, torch.Tensor]:
        examples, prefixes = [], []
        pool = first_templates if step < settings.get("first_steps", 0) else templates
        for _ in range(n):
            facts, prompt, answer = text_example(questions, rng, pool, settings["caption_share"],
                                                  settings.get("word_share", 0.0))
            slots = [rng.choice(fillers) for _ in range(Q)]
            where = rng.sample(range(Q), 2)
            slots[where[0]], slots[where[1]] = ids[facts["color"]], ids[facts["shape"]]
            examples.append({"prompt": prompt, "target": answer, "pixel_values": dummy, "references": [answer],
                             "task": "text", "source": "text", "skipped": []})
            prefixes.append(slots)
        batch = collate(examples)
        return batch, torch.tensor(prefixes)  # (B, Q)

    lm = model.language_model
    lm.train()
    params = list(lm.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=settings["weight_decay"])
    steps, warmup = settings["max_steps"], settings["warmup_steps"]
    image_token = model.config.image_token_index
    for step in range(steps):
        lr = warmup_cosine(settings["lr"], step, warmup, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch, prefix = batch_of(settings["batch_size"], step)
        input_ids = batch["input_ids"].clone()
        input_ids[input_ids == image_token] = prefix.flatten()  # the text "image" in the query positions
        logits = lm.logits(lm(lm.embed_tokens(input_ids), batch["attention_mask"]))
        loss = model._loss(logits, batch["labels"], is_t5=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % settings["log_every"] == 0 or step + 1 == steps:
            with torch.no_grad():  # first answer token right, on this batch
                labels = batch["labels"]
                first = (labels != IGNORE_INDEX).int().argmax(1)  # (B,) position of the first answer token
                rows = torch.arange(len(labels))
                right = (logits[rows, first - 1].argmax(-1) == labels[rows, first]).float().mean()
            print(f"[stage 0b] step {step + 1}/{steps} | loss {loss.item():.4f} | first-token acc {right:.3f} | "
                  f"lr {lr:.3g}", flush=True)
    return write_stage_model(model, model_dir, out)


def load_yaml(path: str | Path) -> dict:
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def run_stage(stage: dict, model_dir: str | Path, sources: list[dict], output_dir: str | Path, **overrides: Any):
    """One training stage through `instructblip.training`: the stage's YAML values (TrainConfig keys, plus
    `source_weights`: {source name: manual weight on its sqrt-balanced probability}), the starting model, the data
    sources and the output directory; resumes an interrupted stage, skips a finished one."""
    from instructblip.training import config_from_dict, train

    export = Path(output_dir) / "model"
    if (export / "model.safetensors").is_file() and (export / "train_config.json").is_file():
        print(f"[recipe] {export} exists: stage already done", flush=True)
        return None
    stage = dict(stage)
    weights = stage.pop("source_weights", None) or {}  # the recipe's key, not a TrainConfig one
    unknown = set(weights) - {s["name"] for s in sources}
    if unknown:
        raise ValueError(f"source_weights names unknown sources {sorted(unknown)}")
    sources = [dict(s, weight=weights[s["name"]]) if s["name"] in weights else s for s in sources]
    values = {**stage, **overrides, "model": str(model_dir), "train_data": sources, "output_dir": str(output_dir),
              "resume": "latest"}
    config = config_from_dict(values, where="recipe stage")
    return train(config)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def evaluate_model(model_dir: str | Path, mode: str, output_dir: str | Path | None, samples=None,
                   limit: int | None = None, batch_size: int = 64, prompt: str | None = None) -> dict:
    """The evaluation harness's easy-vqa adapter on the test split (`instructblip.evaluation.runner`); `samples`: a
    custom list of its `Sample`s (e.g. other prompts), else the whole split. Adds accuracy per question type."""
    from instructblip.evaluation.metrics import exact_match
    from instructblip.evaluation.runner import evaluate

    results = evaluate(str(model_dir), "easy-vqa", split="test", mode=mode, limit=limit, output_dir=output_dir,
                       batch_size=batch_size, samples=samples, prompt=prompt, progress=False)
    if output_dir is not None:
        records = [json.loads(line) for line in Path(results["predictions"]).read_text().splitlines()]
        results["per_type"] = per_type_accuracy(
            [(r["question"], r["target"], r["prediction"]) for r in records], exact_match)
    return results


def per_type_accuracy(rows: Iterable[tuple[str, str, str]], match) -> dict[str, dict[str, float]]:
    """{question type: {"accuracy": %, "n": count}} from (question, target, prediction) rows."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for question, target, prediction in rows:
        entry = totals[question_type(question)]
        entry[0] += int(bool(match(prediction, target)))
        entry[1] += 1
    return {k: {"accuracy": 100 * c / n, "n": n} for k, (c, n) in sorted(totals.items())}


class Timer:
    def __init__(self):
        self.start = time.time()
        self.marks: dict[str, float] = {}
        self._last = self.start

    def mark(self, name: str) -> float:
        now = time.time()
        self.marks[name] = round(now - self._last, 1)
        self._last = now
        return self.marks[name]

    @property
    def total(self) -> float:
        return round(time.time() - self.start, 1)


def as_dict(obj) -> dict:
    return asdict(obj)
