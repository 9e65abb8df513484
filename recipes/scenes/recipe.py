"""The scenes recipe's building blocks: data, tokenizers, models, the four training stages, evaluation.

`ablation.py` chains them into the ablation (`make scenes-ablation`, `make scenes-quick`); the YAML files next to
this one hold every number. The recipe is the easy-vqa one (`recipes/easyvqa/`, whose tokenizer, model-writing and
Q-Former-tokenizer functions it imports) on a world where the question decides what must be seen:

- **Stage 0** (the ViT's pre-training, standing in for EVA-CLIP): the ViT and a linear head on each grid cell's
  patches learn what the cell holds (shape or empty, colour, size). The head is dropped; the ViT is frozen after.
- **Stage 0b** (the LLM's pre-training on text, standing in for Vicuna): the LLM alone reads a scene written where
  the query tokens will stand, **one object per position**: the sum of the embeddings of its five words (colour,
  shape, size, row, column), the other positions holding the embedding of "." (nothing). Scenes of 1-6 objects in
  2-8 positions, questions of every type in every phrasing, in the paper's VQA templates (those that the ablation
  holds out excepted); the loss is on the answer. So a query token carries about one object for the frozen LLM:
  a scene of 3-6 objects does not fit in 2 or 4 of them, and the Q-Former has to choose which objects to pass on.
- **Stage 1** (BLIP-2 stand-in): ViT and LLM frozen, the Q-Former (blind to the instruction) learns to write the
  image's objects where the LLM reads them, on every question type asked plainly.
- **Stage 2** (instruction tuning): the same, the Q-Former now reading the instruction (or not: ablation (b)).

Stages 1 and 2 run the trainer's own pieces (`instructblip.training`: its `TrainConfig` from the stage YAML, the
frozen/trained split, AdamW groups, learning-rate schedule, sqrt mixture and `MixturePlan`, the `Collator`), in a
loop of the recipe's that computes the frozen ViT's output once per image instead of in every step, which would
otherwise add the ViT's forward pass to each one (docs/instruction-ablation.md says how much). The ViT's output is
cached before its final LayerNorm, which stays trained as in the trainer (LAVIS' `ln_vision`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import scenes as S  # noqa: E402 - the generator, next to this file


def _load_easyvqa():
    """recipes/easyvqa/recipe.py, as module easyvqa_recipe (its own name, `recipe`, is this file's too)."""
    if "easyvqa_recipe" not in sys.modules:
        spec = importlib.util.spec_from_file_location("easyvqa_recipe", HERE.parent / "easyvqa" / "recipe.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["easyvqa_recipe"] = module
        spec.loader.exec_module(module)
    return sys.modules["easyvqa_recipe"]


E = _load_easyvqa()  # recipes/easyvqa/recipe.py: tokenizers, initial model, Q-Former tokenizer switch, helpers
load_yaml, Timer, render, sha256 = E.load_yaml, E.Timer, E.render, E.sha256

FILLER = "."  # the word of an empty query position in stage 0b's text scenes
MAX_SLOTS = 8  # stage 0b's text scenes use 2..8 positions: every query count of the ablation is in range

# ----------------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Split:
    """Scenes, their pictures (N, 72, 72, 3) uint8, and the questions as (scene index, question)."""

    scenes: list[S.Scene]
    images: np.ndarray
    questions: list[tuple[int, S.Question]]


def make_split(seed: int, split: str, n_scenes: int, per_type: dict[str, int] | None = None) -> Split:
    data = S.make_split(seed, split, n_scenes, per_type)
    scenes = [scene for scene, _ in data]
    images = np.stack([np.asarray(S.render(scene)) for scene in scenes])
    questions = [(i, q) for i, (_, qs) in enumerate(data) for q in qs]
    return Split(scenes, images, questions)


def text_corpus(questions: list[S.Question]) -> list[str]:
    """What the tokenizers are trained on: every question and answer word, the phrasings and the templates."""
    from instructblip.evaluation.tasks.base import VQA_PROMPT
    from instructblip.processing.templates import VQA_TEMPLATES

    lines = sorted({q.text for q in questions})
    lines += list(S.WORDS) + [FILLER]
    lines += [p.replace("{", "").replace("}", "") for ps in S.PHRASINGS.values() for p in ps]
    lines += [t.replace("{Question}", "") for t in VQA_TEMPLATES] + [VQA_PROMPT.replace("{question}", "")]
    return lines


def make_tokenizers(directory: Path, corpus: list[str], spec: dict) -> Path:
    """LLM tokenizer (`directory/llm`) and Q-Former vocabulary (`directory/qformer_vocab.txt`, returned); kept."""
    vocab_file = directory / "qformer_vocab.txt"
    if not vocab_file.is_file():
        E.train_llm_tokenizer(corpus, spec["llm_vocab_size"], directory / "llm")
        vocab = E.train_qformer_vocab(corpus, spec["qformer_vocab_size"])
        vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return vocab_file


def word_ids(tokenizer, words) -> dict[str, int]:
    """{word: its one LLM token id} (the word as it follows a space); ValueError for a word of several tokens."""
    out = {}
    for w in words:
        ids = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{w!r} is {len(ids)} tokens for the LLM tokenizer; raise llm_vocab_size in model.yaml")
        out[w] = ids[0]
    return out


def write_model(directory: Path, spec: dict, num_query_tokens: int, tokenizers: Path, vocab_file: Path, seed: int,
                vision_from: Path | None = None, llm_from: Path | None = None) -> Path:
    """An initial model with `num_query_tokens` queries (random, seeded; Q-Former blind to the instruction), its ViT
    taken from `vision_from` and its LLM from `llm_from` when given (the pre-trained ones). Kept if already there."""
    from instructblip import InstructBlipForConditionalGeneration

    if (directory / "model.safetensors").is_file():
        return directory
    vocab = vocab_file.read_text(encoding="utf-8").splitlines()
    tmp = directory.with_name(directory.name + ".tmp")
    E.write_initial_model(tmp, dict(spec, num_query_tokens=num_query_tokens), tokenizers / "llm", vocab, seed,
                          reads_instruction=False)
    if vision_from is not None or llm_from is not None:
        model = InstructBlipForConditionalGeneration.from_pretrained(str(tmp))
        for part, source in (("vision_model", vision_from), ("language_model", llm_from)):
            if source is not None:
                trained = InstructBlipForConditionalGeneration.from_pretrained(str(source))
                getattr(model, part).load_state_dict(getattr(trained, part).state_dict())
        model.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def pixels(model_dir: Path, images: np.ndarray) -> torch.Tensor:
    """(N, 3, H, W) float32: the images through the model's image processor."""
    from PIL import Image

    from instructblip.processing.image import InstructBlipImageProcessor

    processor = InstructBlipImageProcessor.from_pretrained(str(model_dir))
    return torch.stack([torch.from_numpy(processor.preprocess_one(Image.fromarray(a))) for a in images])


# ----------------------------------------------------------------------------------------------------------------------
# Stage 0: the ViT's pre-training


def cell_targets(scenes: list[S.Scene]) -> torch.Tensor:
    """(N, 9, 3) long: per grid cell, shape (0 empty, 1.. SHAPES), colour (0 none, 1.. COLORS), size (0, 1, 2)."""
    out = torch.zeros(len(scenes), S.GRID * S.GRID, 3, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            cell = o.row * S.GRID + o.column
            out[i, cell] = torch.tensor([1 + S.SHAPES.index(o.shape), 1 + S.COLORS.index(o.color),
                                         1 + S.SIZES.index(o.size)])
    return out


def cell_features(hidden: torch.Tensor) -> torch.Tensor:
    """ViT output (B, 1 + P*P, D) -> the mean of each grid cell's patches (B, 9, D)."""
    B, T, D = hidden.shape
    P = math.isqrt(T - 1)
    k = P // S.GRID  # patches per cell side
    grid = hidden[:, 1:].reshape(B, S.GRID, k, S.GRID, k, D)  # (B, row, patch row, column, patch column, D)
    return grid.mean((2, 4)).reshape(B, S.GRID * S.GRID, D)


def pretrain_vision(model_dir: Path, train: Split, out_dir: Path, settings: dict, seed: int) -> Path:
    """Stage 0: the ViT and a linear head on each cell's mean patch feature learn the cell's shape, colour and size
    (cross-entropy on each). Writes `out_dir/model` (the head dropped) and returns it; skipped when it exists."""
    from instructblip import InstructBlipForConditionalGeneration

    out = out_dir / "model"
    if (out / "model.safetensors").is_file():
        return out
    images = pixels(model_dir, train.images)
    targets = cell_targets(train.scenes)
    model = InstructBlipForConditionalGeneration.from_pretrained(str(model_dir))
    vision = model.vision_model
    vision.train()
    torch.manual_seed(seed)
    sizes = (1 + len(S.SHAPES), 1 + len(S.COLORS), 1 + len(S.SIZES))
    head = torch.nn.Linear(vision.config.hidden_size, sum(sizes))
    optimizer = torch.optim.AdamW([*vision.parameters(), *head.parameters()], lr=settings["lr"],
                                  weight_decay=settings["weight_decay"])
    steps, batch = settings["max_steps"], settings["batch_size"]
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        lr = E.warmup_cosine(settings["lr"], step, settings["warmup_steps"], steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(images), (batch,), generator=generator)
        logits = head(cell_features(vision(images[index]).last_hidden_state)).split(sizes, -1)  # 3 x (B, 9, n)
        loss = sum(torch.nn.functional.cross_entropy(lg.flatten(0, 1), targets[index][..., k].flatten())
                   for k, lg in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % settings["log_every"] == 0 or step + 1 == steps:
            with torch.no_grad():
                right = torch.stack([lg.argmax(-1) == targets[index][..., k] for k, lg in enumerate(logits)])
                cell = right.all(0).float().mean().item()  # (3, B, 9) -> every attribute of a cell right
                shape, color, size = right.float().mean((1, 2)).tolist()
            print(f"[stage 0] step {step + 1}/{steps} | loss {loss.item():.4f} | cells right {cell:.3f} (shape "
                  f"{shape:.3f}, colour {color:.3f}, size {size:.3f}) | lr {lr:.3g}", flush=True)
    return E.write_stage_model(model, model_dir, out)


# ----------------------------------------------------------------------------------------------------------------------
# Stage 0b: the LLM's pre-training on text scenes


def text_batch(rng: random.Random, n: int, templates: list[str], kinds: tuple[str, ...],
               max_objects: int = S.MAX_OBJECTS, word_share: float = 0.0) -> list[tuple]:
    """`n` text examples: (slots, prompt, answer, kind); slots: a list of 2..MAX_SLOTS entries, each an object's
    five words or None (nothing), in random order; scenes of 1..max_objects objects. A `word_share` of the examples
    ask with one bare word, a colour or a shape: is it in the scene (yes / no, equally likely)?"""
    out = []
    while len(out) < n:
        scene = S.sample_scene(rng, rng.randint(1, max_objects))
        count = rng.randint(max(len(scene.objects), 2), MAX_SLOTS)
        slots: list[Any] = [o.facts for o in scene.objects] + [None] * (count - len(scene.objects))
        rng.shuffle(slots)
        if rng.random() < word_share:
            values = S.COLORS if rng.random() < 0.5 else S.SHAPES
            present = {w for o in scene.objects for w in o.facts} & set(values)
            absent = set(values) - present
            answer = "yes" if not absent or (present and rng.random() < 0.5) else "no"
            out.append((slots, rng.choice(sorted(present if answer == "yes" else absent)), answer, "word"))
            continue
        try:
            question = S.ask(scene, rng.choice(kinds), rng)
        except ValueError:  # a relation question about a scene without two objects apart
            continue
        out.append((slots, render(rng.choice(templates), question.text), question.answer, question.type))
    return out


def text_inputs(examples: list[tuple], tokenizer, image_id: int, ids: dict[str, int]) -> dict[str, torch.Tensor]:
    """Token ids `[<image> x slots][bos prompt][answer eos][pad]` (right-padded), labels on `answer eos`, and the
    words of each slot: slot_words (B, MAX_SLOTS, 5), -1 where there is none (`slot_embeddings` sums them)."""
    from instructblip.models.instructblip import IGNORE_INDEX

    rows, labels = [], []
    slot_words = torch.full((len(examples), MAX_SLOTS, 5), -1, dtype=torch.long)
    for b, (slots, prompt, answer, _) in enumerate(examples):
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = [ids[answer], tokenizer.eos_token_id]
        rows.append([image_id] * len(slots) + prompt_ids + answer_ids)
        labels.append([IGNORE_INDEX] * (len(slots) + len(prompt_ids)) + answer_ids)
        for k, words in enumerate(slots):
            if words is None:
                slot_words[b, k, 0] = ids[FILLER]
            else:
                slot_words[b, k] = torch.tensor([ids[w] for w in words])
    length = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    label_ids = torch.tensor([r + [IGNORE_INDEX] * (length - len(r)) for r in labels])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_ids, "slot_words": slot_words}


def slot_embeddings(embed: torch.nn.Embedding, input_ids: torch.Tensor, slot_words: torch.Tensor,
                    image_id: int) -> torch.Tensor:
    """The LLM's input embeddings with each `<image>` position holding its slot: the sum of its words' embeddings."""
    vectors = (embed(slot_words.clamp(min=0)) * (slot_words >= 0)[..., None]).sum(2)  # (B, MAX_SLOTS, D)
    where = input_ids == image_id  # (B, L): the first slots(b) positions of row b
    used = torch.arange(MAX_SLOTS)[None] < where.sum(1, keepdim=True)  # (B, MAX_SLOTS)
    return embed(input_ids).masked_scatter(where[..., None], vectors[used])


def pretrain_language_model(model_dir: Path, out_dir: Path, settings: dict, templates: list[str],
                            seed: int) -> Path:
    """Stage 0b: the LLM alone on text scenes (module docstring); writes `out_dir/model`, skipped when it exists."""
    from instructblip import InstructBlipForConditionalGeneration, InstructBlipProcessor
    from instructblip.models.instructblip import IGNORE_INDEX

    out = out_dir / "model"
    if (out / "model.safetensors").is_file():
        return out
    model = InstructBlipForConditionalGeneration.from_pretrained(str(model_dir))
    tokenizer = InstructBlipProcessor.from_pretrained(str(model_dir)).tokenizer
    ids = word_ids(tokenizer, (*S.WORDS, FILLER))
    image_id = model.config.image_token_index
    lm = model.language_model
    lm.train()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    rng = random.Random(f"{seed}:llm")
    torch.manual_seed(seed)
    steps = settings["max_steps"]
    right: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for step in range(steps):
        lr = E.warmup_cosine(settings["lr"], step, settings["warmup_steps"], steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # curriculum: scenes of one object first (each question then reads one slot), more objects as it goes
        ramp = settings.get("curriculum_steps", 0)
        max_objects = S.MAX_OBJECTS if step >= ramp else 1 + step * S.MAX_OBJECTS // ramp
        examples = text_batch(rng, settings["batch_size"], templates, S.TYPES, max_objects,
                              settings.get("word_share", 0.0))
        batch = text_inputs(examples, tokenizer, image_id, ids)
        embeds = slot_embeddings(lm.embed_tokens, batch["input_ids"], batch["slot_words"], image_id)
        logits = lm.logits(lm(embeds, batch["attention_mask"]))
        loss = model._loss(logits, batch["labels"], is_t5=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # answer token right, per type, since the last log line
            labels = batch["labels"]
            first = (labels != IGNORE_INDEX).int().argmax(1)  # (B,) position of the answer token
            rows = torch.arange(len(labels))
            hits = (logits[rows, first - 1].argmax(-1) == labels[rows, first]).tolist()
            for (_, _, _, kind), hit in zip(examples, hits, strict=True):
                right[kind][0] += hit
                right[kind][1] += 1
        if (step + 1) % settings["log_every"] == 0 or step + 1 == steps:
            per_type = " ".join(f"{k} {c / max(n, 1):.2f}" for k, (c, n) in sorted(right.items()))
            print(f"[stage 0b] step {step + 1}/{steps} | loss {loss.item():.4f} | lr {lr:.3g} | answer right: "
                  f"{per_type}", flush=True)
            right.clear()
    return E.write_stage_model(model, model_dir, out)


# ----------------------------------------------------------------------------------------------------------------------
# Stages 1 and 2: the Q-Former, with the frozen ViT's output computed once


@torch.no_grad()
def vision_features(model_dir: Path, images: np.ndarray, batch_size: int = 128) -> torch.Tensor:
    """(N, 1 + patches, D) float32: the frozen ViT's output for each image, before its final LayerNorm (which stages
    1 and 2 train)."""
    from instructblip import InstructBlipForConditionalGeneration

    model = InstructBlipForConditionalGeneration.from_pretrained(str(model_dir))
    vision = model.vision_model.eval()
    vision.post_layernorm = torch.nn.Identity()
    x = pixels(model_dir, images)
    return torch.cat([vision(x[i:i + batch_size]).last_hidden_state for i in range(0, len(x), batch_size)])


def example(prompt: str, answer: str) -> dict:
    """One example as the trainer's `Collator` takes it; no image (the ViT's output is cached), a placeholder."""
    return {"prompt": prompt, "target": answer, "pixel_values": torch.zeros(1), "references": [answer],
            "task": "vqa", "source": "scenes", "skipped": []}


def image_features(model, features: torch.Tensor, batch: dict) -> torch.Tensor:
    """The Q-Former's projected query outputs (B, Q, D_llm) for cached ViT outputs `features` (B, T, D)."""
    vision = SimpleNamespace(last_hidden_state=model.vision_model.post_layernorm(features))
    return model.get_image_features(qformer_input_ids=batch["qformer_input_ids"],
                                    qformer_attention_mask=batch["qformer_attention_mask"],
                                    vision_outputs=vision).pooler_output


def train_qformer(model_dir: Path, out_dir: Path, stage: dict, features: torch.Tensor,
                  questions: list[tuple[int, S.Question]], templates: list[str], seed: int) -> Path:
    """One Q-Former stage (1 or 2): `stage` holds TrainConfig keys (the stage YAML; `balance` among them); the
    question types are the mixture's datasets. Writes `out_dir/model` and `out_dir/log.json`; skipped when done."""
    from instructblip import InstructBlipForConditionalGeneration, InstructBlipProcessor
    from instructblip.training import config_from_dict
    from instructblip.training.data import Collator, MixturePlan, mixture_probabilities
    from instructblip.training.loop import freeze, learning_rate, optimizer_groups, set_modes

    out = out_dir / "model"
    if (out / "model.safetensors").is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    # the trainer's config, for its schedule and groups; the data goes through the loop below, not a path
    config = config_from_dict({**stage, "model": str(model_dir), "train_data": ["(in memory)"],
                               "output_dir": str(out_dir), "seed": seed}, where=f"stage in {out_dir}")
    if config.micro_batch_size != config.global_batch_size or config.train_vision or config.train_language_model:
        raise ValueError("the scenes recipe's Q-Former stages take one micro-batch per step and a frozen ViT and LLM")
    by_type: dict[str, list[tuple[int, S.Question]]] = defaultdict(list)
    for scene, question in questions:
        by_type[question.type].append((scene, question))
    kinds = sorted(by_type)
    sizes = [len(by_type[k]) for k in kinds]
    probabilities = mixture_probabilities(sizes, balance=config.balance)
    plan = MixturePlan(sizes, probabilities, config.global_batch_size, seed)

    model = InstructBlipForConditionalGeneration.from_pretrained(str(model_dir))
    processor = InstructBlipProcessor.from_pretrained(str(model_dir))
    collate = Collator(processor, is_encoder_decoder=False, max_prompt_length=config.max_prompt_length,
                       max_answer_length=config.max_answer_length)
    freeze(model, config)
    optimizer = torch.optim.AdamW(optimizer_groups(model, config), lr=config.warmup_lr,
                                  betas=(config.beta1, config.beta2), eps=config.eps)
    set_modes(model, config)
    torch.manual_seed(seed)
    rng = random.Random(f"{seed}:templates")
    log, start, losses = [], time.time(), []
    print(f"[stage] {out_dir.name}: {config.max_steps} steps of {config.global_batch_size}; balance "
          f"{config.balance}: " + ", ".join(f"{k} {n} ({p:.2f})" for k, n, p in zip(kinds, sizes, probabilities,
                                                                                    strict=True)), flush=True)
    for step in range(config.max_steps):
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        keys = plan.next_global_batch()
        picked = [by_type[kinds[d]][r] for d, r, _, _ in keys]
        examples = [example(render(rng.choice(templates), q.text), q.answer) for _, q in picked]
        batch = collate(examples)
        scenes = torch.tensor([s for s, _ in picked])
        feats = image_features(model, features[scenes], batch)
        loss = model(image_features=feats, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % config.log_every == 0 or step + 1 == config.max_steps:
            mean = sum(losses) / len(losses)
            log.append({"step": step + 1, "loss": mean, "lr": lr, "seconds": round(time.time() - start, 1)})
            print(f"[stage] {out_dir.name} step {step + 1}/{config.max_steps} | loss {mean:.4f} | lr {lr:.3g} | "
                  f"{time.time() - start:.0f} s", flush=True)
            losses.clear()
    model.eval()
    E.write_stage_model(model, model_dir, out)
    (out_dir / "log.json").write_text(json.dumps(log, indent=1) + "\n")
    return out


def with_instruction(model_dir: Path, out: Path, vocab_file: Path, reads_instruction: bool) -> Path:
    """A copy of `model_dir` whose Q-Former reads the instruction (or not); kept if already there."""
    if not (out / "model.safetensors").is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model_dir, tmp)
        (tmp / "train_config.json").unlink(missing_ok=True)
        E.set_qformer_instruction(tmp, vocab_file, reads_instruction=reads_instruction)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model_dir: Path, features: torch.Tensor, items: list[tuple[int, S.Question, str]],
             batch_size: int = 128) -> dict:
    """Accuracy (%) on `items` (scene index, question, prompt): "greedy", the most likely next token of the whole
    vocabulary after the prompt is the answer's (every answer is one token; greedy decoding's first token), and
    "rank", the answer is the most likely of its type's candidates (`scenes.ANSWERS`); also greedy per type."""
    from instructblip import InstructBlipForConditionalGeneration, InstructBlipProcessor
    from instructblip.training.data import Collator

    model = InstructBlipForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    processor = InstructBlipProcessor.from_pretrained(str(model_dir))
    collate = Collator(processor, is_encoder_decoder=False, max_prompt_length=64, max_answer_length=4,
                       generation_inputs=True)
    ids = word_ids(processor.tokenizer, S.WORDS)
    greedy, ranked = [], []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        batch = collate([example(p, q.answer) for _, q, p in chunk])
        feats = image_features(model, features[torch.tensor([s for s, _, _ in chunk])], batch)
        input_ids, mask = batch["gen_input_ids"], batch["gen_attention_mask"]  # left-padded prompts
        embeds, mask = model.merge_image_features(feats, input_ids, mask)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        lm = model.language_model
        logits = lm.logits(lm(embeds, mask, positions)[:, -1])  # (B, V): the first answer token
        for row, (_, q, _) in zip(logits, chunk, strict=True):
            greedy.append(int(row.argmax()) == ids[q.answer])
            candidates = S.ANSWERS[q.type]
            ranked.append(candidates[int(row[[ids[a] for a in candidates]].argmax())] == q.answer)
    per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for (_, q, _), hit in zip(items, greedy, strict=True):
        per_type[q.type][0] += hit
        per_type[q.type][1] += 1
    return {"greedy": 100 * sum(greedy) / len(items), "rank": 100 * sum(ranked) / len(items), "n": len(items),
            "per_type": {k: round(100 * c / n, 1) for k, (c, n) in sorted(per_type.items())}}
