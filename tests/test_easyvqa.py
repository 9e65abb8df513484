"""easy-vqa (issue 9): the model shipped inside the package answers easy-vqa questions, it is the checkpoint the
recipe (recipes/easyvqa/) produced (its hash and config are recorded in docs/easyvqa.md), and the recipe and the
ablation run their first steps at a reduced size, so that they cannot rot."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
RECIPE_DIR = ROOT / "recipes" / "easyvqa"
DOC = ROOT / "docs" / "easyvqa.md"
sys.path.insert(0, str(RECIPE_DIR))
import recipe as R  # noqa: E402 - recipes/easyvqa/recipe.py

from instructblip.api import default_model_dir  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"easyvqa_{name}", RECIPE_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------------------
# The shipped model


def test_default_model_answers_50_easy_vqa_test_questions():
    import easy_vqa

    import instructblip
    from instructblip.evaluation.metrics import exact_match

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    picks = random.Random(2024).sample(range(len(questions)), 50)
    vlm = instructblip.load()  # the default model, with the pipeline's default generation settings
    predictions = vlm.ask([paths[image_ids[i]] for i in picks], [questions[i] for i in picks])
    wrong = [(questions[i], answers[i], p) for i, p in zip(picks, predictions, strict=True)
             if not exact_match(p, answers[i])]
    # issue 9: at least 45 of 50 (docs/easyvqa.md: the shipped model answers 48 of these)
    assert len(wrong) <= 5, f"{50 - len(wrong)}/50 correct; wrong (question, answer, prediction): {wrong}"


def draw_shape(shape: str, colour: str, rng: random.Random, size: int = 64) -> Image.Image:
    """An easy-vqa-like picture drawn here: one shape in a named colour, random size and place, pale background."""
    from PIL import ImageDraw

    background = tuple(rng.randint(228, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    half = rng.randint(9, 20)
    cx, cy = rng.randint(half + 2, size - half - 3), rng.randint(half + 2, size - half - 3)
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=colour)
    elif shape == "rectangle":
        w, h = half, rng.randint(max(6, half // 2), half)
        draw.rectangle((cx - w, cy - h, cx + w, cy + h), fill=colour)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    return image


def test_default_model_reads_shapes_drawn_here():
    """Pictures that are not from easy-vqa but are drawn the same way: colour and shape, a real threshold."""
    import instructblip

    rng = random.Random(7)
    cases = [(shape, colour) for shape in R.SHAPES for colour in ("red", "blue", "green", "black", "yellow", "teal")]
    images = [draw_shape(shape, colour, rng) for shape, colour in cases]
    vlm = instructblip.load()
    shapes = vlm.ask(images, ["What shape is in the image?"] * len(images))
    colours = vlm.ask(images, ["What color is the shape?"] * len(images))
    right = sum(s == shape for s, (shape, _) in zip(shapes, cases, strict=True))
    right += sum(c == colour for c, (_, colour) in zip(colours, cases, strict=True))
    # measured: 32 of 36 (shape 17 of 18; colour 15 of 18: PIL's "green" is #008000, darker than easy-vqa's green,
    # and is read as black or yellow)
    assert right >= 30, list(zip(cases, shapes, colours, strict=True))


def test_shipped_checkpoint_is_the_one_recorded_in_the_docs():
    text = DOC.read_text(encoding="utf-8")
    recorded = re.search(r"sha256 of `model\.safetensors`: `([0-9a-f]{64})`", text)
    assert recorded, "docs/easyvqa.md records no sha256 of model.safetensors"
    weights = Path(default_model_dir()) / "model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == recorded.group(1)
    config = re.search(r"<!-- config.json -->\s*```json\n(.*?)```", text, re.S)
    assert config, "docs/easyvqa.md records no config.json"
    shipped = json.loads((Path(default_model_dir()) / "config.json").read_text(encoding="utf-8"))
    assert json.loads(config.group(1)) == shipped
    assert "python recipes/easyvqa/run.py" in text and "make easyvqa" in text
    size = sum(f.stat().st_size for f in Path(default_model_dir()).rglob("*") if f.is_file())
    assert size <= 10_000_000
    assert not (Path(default_model_dir()) / "STAND_IN.md").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Recipe pieces


def test_every_easy_vqa_question_has_exactly_one_type():
    for split in ("train", "test"):
        questions, _ = R.load_split(split)
        kinds = {R.question_type(q) for q, _, _ in questions}  # raises for a question of no or several types
        assert kinds == set(R.QUESTION_TYPES)
    with pytest.raises(ValueError):
        R.question_type("how many shapes are there?")


def test_augmentation_keeps_colour_and_the_whole_shape():
    _, paths = R.load_split("train")
    for image_id in sorted(paths)[:24]:
        original = Image.open(paths[image_id]).convert("RGB")
        array = np.asarray(original)
        box = R.shape_box(array)
        colour = _shape_colour(array[box[1]:box[3], box[0]:box[2]], array[0, 0])
        area = _shape_pixels(array)
        for v in range(3):
            out = np.asarray(R.augment_image(original, random.Random(f"test:{image_id}:{v}")))
            x0, y0, x1, y1 = R.shape_box(out)
            assert x0 > 0 and y0 > 0 and x1 < out.shape[1] and y1 < out.shape[0], "the shape touches the border"
            assert (out[0, 0] == array[0, 0]).all() and (out[-1, -1] == array[0, 0]).all(), "background changed"
            assert np.abs(_shape_colour(out[y0:y1, x0:x1], array[0, 0]) - colour).max() <= 12, "colour changed"
            assert 0.4 < _shape_pixels(out) / area < 2.0  # scaled by 0.75-1.3 (small shapes never shrink)


def test_text_examples_of_the_llm_pre_training_are_right_and_balanced():
    """Stage 0b's text-only examples: the answer is the one the imagined image's facts give, the yes/no questions
    (and bare words) are answered yes half of the time, and every question type and both kinds of extra examples
    occur."""
    from instructblip.processing.templates import VQA_TEMPLATES

    questions, _ = R.load_split("train")
    rng = random.Random(0)
    kinds: dict[str, list[str]] = {}
    for _ in range(4000):
        facts, prompt, answer = R.text_example(questions, rng, [VQA_TEMPLATES[0]], caption_share=0.1, word_share=0.2)
        if prompt.rstrip("?") in R.COLORS + R.SHAPES:  # a bare word
            kinds.setdefault("word", []).append(answer)
            assert answer == ("yes" if prompt in facts.values() else "no")
            continue
        if answer == R.caption_of(facts):
            kinds.setdefault("caption", []).append(answer)
            continue
        kind = R.question_type(prompt)
        kinds.setdefault(kind, []).append(answer)
        named = [w for w in prompt.rstrip("?").split() if w in R.COLORS + R.SHAPES]
        if kind in ("color", "shape"):
            assert answer == facts[kind] and all(w in facts.values() for w in named), (prompt, facts)
        else:
            attribute = "color" if kind.startswith("color") else "shape"
            value = next(w for w in named if w in (R.COLORS if attribute == "color" else R.SHAPES))
            assert answer == ("yes" if (value == facts[attribute]) == kind.endswith("present") else "no")
    assert set(kinds) == {*R.QUESTION_TYPES, "word", "caption"}
    for kind, answers in kinds.items():
        if kind not in ("color", "shape", "caption"):
            assert 0.4 < answers.count("yes") / len(answers) < 0.6, (kind, answers.count("yes"), len(answers))
    assert 0.15 < len(kinds["word"]) / 4000 < 0.25


def _shape_colour(region: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Median colour of a shape's core: the pixels at least half as far from the background as the farthest (the
    anti-aliased edge, blended with the background by resampling, left out)."""
    pixels = region.reshape(-1, 3).astype(int)
    distance = np.abs(pixels - background.astype(int)).max(-1)
    return np.median(pixels[distance >= distance.max() / 2], axis=0)


def _qformer_ids(model_dir: Path) -> list[int]:
    from instructblip.processing.tokenizers import Tokenizer

    return Tokenizer.from_pretrained(model_dir / "qformer_tokenizer")("is there a red shape?")["input_ids"]


def _shape_pixels(array: np.ndarray) -> int:
    return int((np.abs(array.astype(int) - array[0, 0]).max(-1) > 24).sum())


def test_qformer_tokenizer_without_instruction_keeps_the_ids(tmp_path):
    from instructblip.processing.tokenizers import Tokenizer

    questions, _ = R.load_split("test")
    vocab = R.train_qformer_vocab(R.text_corpus(questions[:200]), 400)
    R.write_qformer_tokenizer(vocab, tmp_path / "reads", reads_instruction=True)
    R.write_qformer_tokenizer(vocab, tmp_path / "blind", reads_instruction=False)
    reads, blind = Tokenizer.from_pretrained(tmp_path / "reads"), Tokenizer.from_pretrained(tmp_path / "blind")
    assert len(reads) == len(blind) == len(vocab)
    text = "Question: is there a red shape? Short answer:"
    ids = reads(text)["input_ids"]
    assert ids[0] == reads.cls_token_id and ids[-1] == reads.sep_token_id and len(ids) > 8
    assert blind([text, "", "what shape is present?"])["input_ids"] == [[ids[0], ids[-1]]] * 3
    assert blind.pad_token_id == reads.pad_token_id == 0


# ----------------------------------------------------------------------------------------------------------------------
# The recipe and the ablation, first steps at a reduced size


def test_recipe_runs_at_a_reduced_size(tmp_path):
    import instructblip

    run = _load("run")
    summary = run.main(["--work-dir", str(tmp_path), "--max-images", "12", "--variants", "2", "--copies", "1",
                        "--stage0-steps", "2", "--stage0-llm-steps", "4", "--stage1-steps", "2", "--stage2-steps", "2",
                        "--batch-size", "4", "--eval-limit", "6", "--threads", "1"])
    model = Path(summary["model_dir"])
    assert summary["sha256"] == hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    assert set(summary["eval"]) == {"generate", "rank"} and summary["eval"]["rank"]["num_samples"] == 6
    stage1 = json.loads((tmp_path / "stage1" / "model" / "train_config.json").read_text())
    stage2 = json.loads((model / "train_config.json").read_text())
    # stage 0 trains the ViT, stage 0b the LLM (and nothing else), stage 1 the Q-Former with both frozen
    vision, llm, stage1_model = (_weights(tmp_path / d / "model") for d in ("stage0", "stage0-llm", "stage1"))
    init = _weights(tmp_path / "init")
    assert _differ(init, vision) == {"vision_model", "ln_vision"}
    assert _differ(vision, llm) == {"language_model"}
    assert _differ(llm, stage1_model) == {"qformer", "query_tokens", "language_projection", "ln_vision"}
    assert not stage1["train_vision"] and not stage1["train_language_model"] and stage1["max_steps"] == 2
    assert not stage2["train_vision"] and not stage2["train_language_model"] and stage2["balance"] == "sqrt"
    assert {s["name"] for s in stage2["train_data"]} == {*R.QUESTION_TYPES, R.CAPTION}
    # the Q-Former reads the instruction in stage 2 only
    assert len(_qformer_ids(tmp_path / "stage1" / "model")) == 2  # [CLS] [SEP]
    assert len(_qformer_ids(model)) > 4
    # the result is a model the package loads and asks
    answer = instructblip.load(model).ask(R.load_split("test")[1][0], "What color is the shape?", max_new_tokens=3)
    assert isinstance(answer, str)
    # a rerun skips what is done
    again = run.main(["--work-dir", str(tmp_path), "--max-images", "12", "--variants", "2", "--copies", "1",
                      "--stage0-llm-steps", "4", "--stage1-steps", "2", "--stage2-steps", "2", "--batch-size", "4",
                      "--skip-eval", "--threads", "1"])
    assert again["sha256"] == summary["sha256"]


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _differ(a: dict, b: dict) -> set[str]:
    """The parts (vision_model, its post_layernorm = LAVIS' ln_vision, qformer, ...) with at least one tensor
    that changed from a to b."""
    assert a.keys() == b.keys()
    part = {k: "ln_vision" if k.startswith("vision_model.post_layernorm.") else k.split(".")[0] for k in a}
    return {part[k] for k in a if not (a[k] == b[k]).all()}


def test_ablation_runs_at_a_reduced_size(tmp_path):
    ablation = _load("ablation")
    out = ablation.main(["--work-dir", str(tmp_path), "--seeds", "0", "--max-images", "10", "--stage0-steps", "1",
                         "--stage0-llm-steps", "2", "--stage1-steps", "1", "--stage2-steps", "1", "--batch-size", "4",
                         "--eval-limit", "3", "--threads", "1"])
    scores = out["results"]["0"]
    assert set(scores) == {"full", "no_instruction", "no_balancing"}
    assert all(set(s) == set(ablation.COLUMNS) for s in scores.values())
    assert (tmp_path / "ablation.md").read_text().count("± 0.0") >= 12
    seed = tmp_path / "seed0"
    assert json.loads((seed / "no_balancing" / "model" / "train_config.json").read_text())["balance"] == "size"
    assert len(_qformer_ids(seed / "no_instruction" / "model")) == 2
    assert len(_qformer_ids(seed / "full" / "model")) > 4
    held_out = json.loads((seed / "full" / "model" / "train_config.json").read_text())["train_data"]
    assert "shape" not in {s["name"] for s in held_out}


def test_ablation_reuses_a_recipe_run_of_the_same_seed_only(tmp_path):
    ablation = _load("ablation")
    recipe = tmp_path / "recipe"
    with pytest.raises(SystemExit, match="not a finished recipe run"):
        ablation.reuse_recipe_run(recipe, tmp_path / "base", seed=0)
    for name in ablation.REUSED:
        (recipe / name).mkdir(parents=True)
        (recipe / name / "file").write_text(name)
    (recipe / "stage1" / "model").mkdir()
    (recipe / "stage1" / "model" / "model.safetensors").write_text("weights")
    (recipe / "summary.json").write_text(json.dumps({"seed": 1}))
    with pytest.raises(SystemExit, match="seed 1"):
        ablation.reuse_recipe_run(recipe, tmp_path / "base", seed=0)
    (recipe / "summary.json").write_text(json.dumps({"seed": 0}))
    (tmp_path / "base" / "stage0").mkdir(parents=True)  # already there: kept
    ablation.reuse_recipe_run(recipe, tmp_path / "base", seed=0)
    assert (tmp_path / "base" / "stage1" / "model" / "model.safetensors").read_text() == "weights"
    assert not (tmp_path / "base" / "stage0" / "file").exists()
    assert (tmp_path / "base" / "stage0-llm" / "file").read_text() == "stage0-llm"
