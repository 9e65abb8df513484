"""The scenes task (issue 36, recipes/scenes/): the generator is deterministic for a seed, every answer is right
(checked against the scene read back from the picture's pixels and a second, separately written answer function),
and the recipe's first steps and the quick mode's plumbing run at a reduced size."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPE_DIR = ROOT / "recipes" / "scenes"
sys.path.insert(0, str(RECIPE_DIR))
import scenes as S  # noqa: E402 - recipes/scenes/scenes.py


def _load(name: str):
    """recipes/scenes/<name>.py as module scenes_<name> (`recipe` is also the easy-vqa recipe's module name)."""
    if f"scenes_{name}" not in sys.modules:
        spec = importlib.util.spec_from_file_location(f"scenes_{name}", RECIPE_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"scenes_{name}"] = module
        spec.loader.exec_module(module)
    return sys.modules[f"scenes_{name}"]


# ----------------------------------------------------------------------------------------------------------------------
# The generator


def test_generator_is_deterministic_for_a_seed():
    a = S.make_split(7, "train", 12)
    b = S.make_split(7, "train", 12)
    assert a == b
    for (scene, _), (again, _) in zip(a, b, strict=True):
        assert np.array_equal(np.asarray(S.render(scene)), np.asarray(S.render(again)))
    # scene i depends on (seed, split, i) alone, not on how many are drawn
    assert S.make_split(7, "train", 5) == a[:5]
    other = S.make_split(8, "train", 12)
    assert [s for s, _ in other] != [s for s, _ in a]
    assert [s for s, _ in S.make_split(7, "test", 12)] != [s for s, _ in a]


# A second reading of a scene: from the picture's pixels. Object pixels have their palette colour exactly; a grid
# cell holds at most one object; the shape is told from the object's mask by its own geometry.
CELL = 24
ROW_WORDS = ("top", "middle", "bottom")
COLUMN_WORDS = ("left", "center", "right")
NUMBER_WORDS = ("zero", "one", "two", "three")


def read_scene(image) -> list[dict]:
    pixels = np.asarray(image).astype(int)
    out = []
    for name, rgb in S.PALETTE.items():
        mask = (pixels == np.array(rgb)).all(-1)
        for row in range(3):
            for column in range(3):
                m = mask[row * CELL:(row + 1) * CELL, column * CELL:(column + 1) * CELL]
                if not m.any():
                    continue
                ys, xs = np.nonzero(m)
                box = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
                extent = max(box.shape)
                assert extent <= 14 or extent >= 17, f"an object of {extent} px is neither small nor big"
                out.append({"color": name, "row": row, "column": column, "size": "small" if extent <= 14 else "big",
                            "shape": classify(box)})
    return out


def classify(box: np.ndarray) -> str:
    h, w = box.shape
    widths = box.sum(1)

    def runs(line) -> int:
        return len(re.findall("1+", "".join("1" if v else "0" for v in line)))

    if box.mean() > 0.97:
        return "square"
    if widths[-1] >= 0.9 * w and widths[0] <= 0.4 * w:  # a point on top, a full base
        return "triangle"
    if len(set(widths.tolist())) == 2 and len(set(box.sum(0).tolist())) == 2:  # arms and bar: two widths each way
        return "cross"
    if runs(box[-1]) == 2:  # two feet
        return "star"
    return "diamond" if box.mean() < 0.65 else "circle"


def second_answer(question: str, objects: list[dict]) -> str:
    """The answer to `question`, worked out from its words and the objects read from the pixels."""
    words = re.findall(r"[a-z]+", question.lower())
    shapes = [w for w in words if w in S.SHAPES]
    colors = [w for w in words if w in S.PALETTE]
    named = [next(o for o in objects if o["shape"] == s) if any(o["shape"] == s for o in objects) else None
             for s in shapes]
    yes_no = lambda v: "yes" if v else "no"  # noqa: E731
    if "many" in words or "count" in words or "number" in words:
        return NUMBER_WORDS[sum(o["color"] == colors[0] for o in objects)]
    if len(shapes) == 2 and "left" in words:
        return yes_no(named[0]["column"] < named[1]["column"])
    if len(shapes) == 2:  # above, higher, further up
        return yes_no(named[0]["row"] < named[1]["row"])
    if colors:  # is there a <colour> <shape>?
        return yes_no(any(o["color"] == colors[0] and o["shape"] == shapes[0] for o in objects))
    if "size" in words or "big" in words:
        return named[0]["size"]
    if "color" in words:
        return named[0]["color"]
    row = next(ROW_WORDS.index(w) for w in words if w in ROW_WORDS)
    column = next(COLUMN_WORDS.index(w) for w in words if w in COLUMN_WORDS)
    return next(o["shape"] for o in objects if o["row"] == row and o["column"] == column)


def test_answers_match_a_second_computation_from_the_pixels():
    per_type = dict.fromkeys(S.TYPES, 3)
    data = S.make_split(3, "check", 150, per_type)
    kinds, phrasings = Counter(), Counter()
    for scene, questions in data:
        objects = read_scene(S.render(scene))
        assert len(objects) == len(scene.objects) and 3 <= len(objects) <= 6
        assert len({o["shape"] for o in objects}) == len(objects)
        for q in questions:
            assert q.answer == second_answer(q.text, objects), (q, S.describe(scene))
            assert q.answer in S.ANSWERS[q.type]
            kinds[q.type] += 1
            phrasings[(q.type, q.phrasing)] += 1
    assert set(kinds) == set(S.TYPES)
    assert len(phrasings) == sum(len(p) for p in S.PHRASINGS.values())  # every phrasing was asked
    # yes and no equally likely in the yes / no types
    yes = Counter(q.type for _, qs in data for q in qs if q.answer == "yes")
    for kind in ("exists", "left_of", "above"):
        assert 0.35 < yes[kind] / kinds[kind] < 0.65, (kind, yes[kind], kinds[kind])


def test_more_facts_than_queries_and_a_textured_background():
    scene = S.sample_scene(S.rng_for(0, "x", 0, "scene"), 6)
    assert len(scene.objects) * len(scene.objects[0].facts) == 30
    background = S.draw_background(scene.background)
    spread = background.max(-1).astype(int) - background.min(-1)
    assert background.max() <= 200 and spread.max() <= 60  # never an object's colour
    with pytest.raises(ValueError, match="unknown question type"):
        S.questions_for(scene, S.rng_for(0, "x", 0, "q"), {"colour": 1})


# ----------------------------------------------------------------------------------------------------------------------
# The recipe


def test_cell_features_pool_each_cells_patches():
    R = _load("recipe")
    hidden = torch.zeros(1, 1 + 81, 2)
    for p in range(81):
        r, c = divmod(p, 9)
        hidden[0, 1 + p, 0] = (r // 3) * 3 + c // 3  # the cell the patch is in
        hidden[0, 1 + p, 1] = p
    pooled = R.cell_features(hidden)  # (1, 9, 2)
    assert pooled[0, :, 0].tolist() == list(range(9))
    assert pooled[0, 4, 1].item() == pytest.approx(np.mean([30, 31, 32, 39, 40, 41, 48, 49, 50]))


def test_text_scene_slots_hold_the_sum_of_an_objects_words():
    R = _load("recipe")
    rng = __import__("random").Random(0)
    examples = R.text_batch(rng, 6, ["Question: {Question} Short answer:"], S.TYPES)
    ids = {w: i + 10 for i, w in enumerate((*S.WORDS, R.FILLER))}

    class Tok:  # a stand-in: one id per word, <s> first
        eos_token_id, pad_token_id = 2, 0

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1] + [7] * len(text.split())}

    batch = R.text_inputs(examples, Tok(), 3, ids)
    embed = torch.nn.Embedding(len(ids) + 10, 4)
    out = R.slot_embeddings(embed, batch["input_ids"], batch["slot_words"], 3)
    for b, (slots, _, answer, _) in enumerate(examples):
        assert 2 <= len(slots) <= R.MAX_SLOTS and (batch["input_ids"][b, :len(slots)] == 3).all()
        for k, words in enumerate(slots):
            want = embed.weight[ids[R.FILLER]] if words is None else embed.weight[[ids[w] for w in words]].sum(0)
            assert torch.allclose(out[b, k], want)
        labelled = batch["labels"][b][batch["labels"][b] != -100].tolist()
        assert labelled == [ids[answer], 2]


def test_quick_mode_plumbing_at_reduced_size(tmp_path, capsys):
    A = _load("ablation")
    argv = ["--quick", "--work-dir", str(tmp_path), "--train-scenes", "24", "--test-scenes", "3", "--stage0-steps", "2",
            "--stage0-llm-steps", "2", "--stage1-steps", "2", "--stage2-steps", "2", "--batch-size", "8",
            "--threads", "1"]
    out = A.main(argv)
    printed = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"gap: -?\d+\.\d points", printed[-1]), printed[-3:]
    full, blind = out["results"]["q2 seed0 full"], out["results"]["q2 seed0 no_instruction"]
    assert full["held_in"]["n"] == blind["held_in"]["n"] > 0
    gap = float(printed[-1].split()[1])
    assert gap == pytest.approx(full["held_in"]["greedy"] - blind["held_in"]["greedy"], abs=0.05)
    # (a) reads the instruction, (b) does not: the Q-Former tokenizers differ, nothing else does
    a_dir, b_dir = tmp_path / "q2" / "seed0" / "full", tmp_path / "q2" / "seed0" / "no_instruction"
    assert (a_dir / "init" / "qformer_tokenizer" / "vocab.txt").is_file()
    assert not (b_dir / "init" / "qformer_tokenizer" / "vocab.txt").is_file()
    assert (a_dir / "stage2" / "model" / "model.safetensors").is_file()
    assert "| 2 | (a) full |" in (tmp_path / "ablation.md").read_text()
    # a rerun takes every result from the work directory
    assert A.main(argv)["results"] == out["results"]
