"""Instruction-tuning data: templates, records, sources, the sqrt mixture, the sampling plan, the collate's labels."""

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_helpers import color_image, one_thread, tiny_checkpoint, write_color_dataset

from instructblip import IGNORE_INDEX, InstructBlipForConditionalGeneration, InstructBlipProcessor
from instructblip.processing.templates import (
    CAPTION_TEMPLATES,
    VQA_TEMPLATES,
    VQG_TEMPLATES,
    build_instruction,
    canonical_task,
    ocr_prefix,
)
from instructblip.training.data import (
    Collator,
    DataError,
    DataSource,
    InstructionDataset,
    MixturePlan,
    TrainBatches,
    make_prompt_and_target,
    mixture_probabilities,
    mixture_table,
    open_source,
    parse_record,
    random_resized_crop,
    validation_batches,
)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


# ----------------------------------------------------------------------------------------------------------------------
# Templates


def test_templates_are_the_papers_table_5():
    assert len(CAPTION_TEMPLATES) == 13 and len(VQA_TEMPLATES) == 10 and len(VQG_TEMPLATES) == 6
    assert CAPTION_TEMPLATES[1] == "A short image description:"
    assert VQA_TEMPLATES[4] == "Question: {Question} Short answer:"
    assert all("{Question}" in t for t in VQA_TEMPLATES) and all("{Answer}" in t for t in VQG_TEMPLATES)
    assert canonical_task("Question-Generation") == "vqg" and canonical_task("llava") == "instruction"
    with pytest.raises(ValueError, match="unknown task"):
        canonical_task("segmentation")


def test_instruction_is_drawn_uniformly_and_filled():
    rng = random.Random(0)
    seen = [build_instruction("vqa", rng, question="What is this?") for _ in range(2000)]
    counts = {t.replace("{Question}", "What is this?"): 0 for t in VQA_TEMPLATES}
    for text in seen:
        counts[text] += 1
    assert min(counts.values()) > 150 and max(counts.values()) < 250  # 10 templates, ~200 each
    assert build_instruction("vqg", rng, answer="two", template=VQG_TEMPLATES[0]) == (
        "Given the image, generate a question whose answer is: two. Question:")
    # OCR tokens go first (right after the image), at most 30; options are rendered (a) x (b) y into the question
    ocr = [f"w{i}" for i in range(40)]
    text = build_instruction("vqa", rng, question="Which brand?", ocr_tokens=ocr, options=["nike", "puma"],
                             template="Question: {Question} Short answer:")
    assert text == (f"OCR tokens: {', '.join(ocr[:30])}. Question: Which brand? Options: (a) nike (b) puma. "
                    "Short answer:")
    assert ocr_prefix([]) == "" and build_instruction("instruction", rng, instruction=" Describe it. ") == \
        "Describe it."


def test_vqg_target_is_the_question():
    record = parse_record({"image": "x.png", "task": "vqg", "question": "How many cats?", "answer": "2"})
    prompt, target = make_prompt_and_target(record, random.Random(1))
    assert target == "How many cats?" and "2" in prompt and record.references == ["How many cats?"]


# ----------------------------------------------------------------------------------------------------------------------
# Records and sources


def test_jsonl_source_resolves_images_and_counts_bad_records(tmp_path):
    data = tmp_path / "data"
    path = write_color_dataset(data, 3, "mix", extra_records=[
        {"image": "images/mix-0.png", "task": "caption", "captions": ["a red square", "red box"]},
        {"image": "images/mix-1.png", "instruction": "Describe the picture.", "answer": "A green square."},
        {"image": "images/mix-2.png", "task": "vqa", "question": "Color?", "answer": "  "},  # empty answer
        {"image": "images/mix-2.png", "task": "vqa", "answers": ["blue"]},  # no question
        {"image": "images/mix-2.png", "task": "segmentation", "answer": "x"},  # unknown task
        {"task": "caption", "caption": "no image"},
    ])
    with open(path, "a") as f:
        f.write("{not json\n\n")
    source = open_source(DataSource(str(path)))
    assert source.name == "mix" and len(source) == 5
    assert len(source.skipped) == 5
    assert any("empty answer" in m for m in source.skipped) and any("not valid JSON" in m for m in source.skipped)
    assert any(":6:" in m for m in source.skipped)  # messages name the line
    record = source[0]
    assert record.image == str(data / "images" / "mix-0.png") and record.answers == ["red"] * 3
    assert source[3].answers == ["a red square", "red box"] and source[4].task == "instruction"
    with pytest.raises(DataError, match="empty answer"):
        open_source(DataSource(str(path)), strict=True)
    with pytest.raises(FileNotFoundError):
        open_source(DataSource(str(tmp_path / "missing.jsonl")))
    assert len(open_source(DataSource(str(path), max_samples=2))) == 2


def test_bad_images_are_replaced_and_counted_or_fail_in_strict_mode(tmp_path):
    path = write_color_dataset(tmp_path, 4, "imgs")
    (tmp_path / "images" / "imgs-1.png").unlink()  # missing
    (tmp_path / "images" / "imgs-2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt
    processor = InstructBlipProcessor.from_pretrained(tiny_checkpoint("t5"))
    source = open_source(DataSource(str(path)))
    dataset = InstructionDataset([source], processor.image_processor, seed=0)
    example = dataset[(0, 1, 0, 0)]  # 1 missing, 2 corrupt -> record 3
    assert len(example["skipped"]) == 2 and "not found" in example["skipped"][0]
    assert example["references"] == ["yellow"] * 3 and example["pixel_values"].shape == (3, 224, 224)
    assert dataset[(0, 0, 0, 0)]["skipped"] == []
    with pytest.raises(DataError, match="not found"):
        InstructionDataset([source], processor.image_processor, seed=0, strict=True)[(0, 1, 0, 0)]


def test_examples_depend_only_on_seed_and_slot(tmp_path):
    path = write_color_dataset(tmp_path, 4, "c", task="caption")
    processor = InstructBlipProcessor.from_pretrained(tiny_checkpoint("t5"))
    dataset = InstructionDataset([open_source(DataSource(str(path)))], processor.image_processor, seed=3,
                                 augment=True)
    a, b = dataset[(0, 2, 7, 5)], dataset[(0, 2, 7, 5)]
    assert a["prompt"] == b["prompt"] and torch.equal(a["pixel_values"], b["pixel_values"])
    prompts = {dataset[(0, 2, step, 0)]["prompt"] for step in range(40)}
    assert len(prompts) > 5 and prompts <= set(CAPTION_TEMPLATES)
    crop = random_resized_crop(color_image("red", 0, size=100), random.Random(0))
    assert 50 * 0.5 < crop.width * crop.height / 100 < 100 * 1.0 + 1e-9


def test_hf_datasets_parquet_and_imagefolder(tmp_path):
    import datasets  # optional for the library (the [datasets] extra); the tests need it
    images = [color_image(c, i) for i, c in enumerate(["red", "green", "blue"])]
    ds = datasets.Dataset.from_dict({
        "img": images, "question": ["Color?", "Color?", "Color?"], "answer": ["red", "green", ""],
    }, features=datasets.Features({"img": datasets.Image(), "question": datasets.Value("string"),
                                   "answer": datasets.Value("string")}))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    source = open_source(DataSource(str(tmp_path / "train.parquet"), task="vqa", columns={"image": "img"}))
    assert len(source) == 2 and len(source.skipped) == 1  # the empty answer
    record = source[1]
    assert record.answers == ["green"] and record.question == "Color?" and record.image.size == (64, 64)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "caption": f"a {c} square"}) + "\n"
        for i, c in enumerate(["red", "green", "blue"])))
    source = open_source(DataSource(str(folder), task="caption"))
    assert source.name == "folder" and len(source) == 3
    assert source[2].answers == ["a blue square"] and source[2].image.size == (64, 64)


# ----------------------------------------------------------------------------------------------------------------------
# Collate: layouts and labels


def _examples(prompts, targets):
    return [{"pixel_values": torch.zeros(3, 224, 224), "prompt": p, "target": t, "references": [t], "task": "vqa",
             "source": 0, "skipped": []} for p, t in zip(prompts, targets, strict=True)]


PROMPTS = ["Question: What color is the square? Short answer:", "A short image description:"]
TARGETS = ["red", "a big green square on a grey background"]


def test_decoder_only_layout_and_labels():
    processor = InstructBlipProcessor.from_pretrained(tiny_checkpoint("llama"))
    tok = processor.tokenizer
    batch = Collator(processor, is_encoder_decoder=False, generation_inputs=True)(_examples(PROMPTS, TARGETS))
    Q, image = 4, processor.image_token_id
    for b, (prompt, target) in enumerate(zip(PROMPTS, TARGETS, strict=True)):
        prompt_ids = tok(prompt)["input_ids"]
        answer_ids = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert prompt_ids[0] == tok.bos_token_id == 2  # Vicuna's bos is </s>
        row = [image] * Q + prompt_ids + answer_ids
        n = len(row)
        assert batch["input_ids"][b, :n].tolist() == row  # [image tokens][bos prompt][answer eos][pad...]
        assert batch["input_ids"][b, n:].eq(tok.pad_token_id).all() and batch["attention_mask"][b].sum() == n
        labels = batch["labels"][b]
        assert labels[:Q + len(prompt_ids)].eq(IGNORE_INDEX).all() and labels[n:].eq(IGNORE_INDEX).all()
        assert labels[Q + len(prompt_ids):n].tolist() == answer_ids
        # the prompt part is exactly what the processor gives at inference (so training and inference agree)
        single = processor(images=np.zeros((32, 32, 3), np.uint8), text=prompt)
        assert single["input_ids"][0].tolist() == row[:Q + len(prompt_ids)]
        assert batch["qformer_input_ids"][b, :single["qformer_input_ids"].shape[1]].tolist() == \
            single["qformer_input_ids"][0].tolist()
        # generation inputs: the prompt alone, left-padded like the processor's batches
        gen = batch["gen_input_ids"][b][batch["gen_attention_mask"][b].bool()]
        assert gen.tolist() == row[:Q + len(prompt_ids)]
    assert batch["num_targets"] == int((batch["labels"] != IGNORE_INDEX).sum())


def test_encoder_decoder_layout_and_labels():
    processor = InstructBlipProcessor.from_pretrained(tiny_checkpoint("t5"))
    tok = processor.tokenizer
    batch = Collator(processor, is_encoder_decoder=True)(_examples(PROMPTS, TARGETS))
    for b, (prompt, target) in enumerate(zip(PROMPTS, TARGETS, strict=True)):
        single = processor(images=np.zeros((32, 32, 3), np.uint8), text=prompt)
        n = single["input_ids"].shape[1]
        assert batch["input_ids"][b, :n].tolist() == single["input_ids"][0].tolist()  # [image x4][prompt </s>]
        assert batch["attention_mask"][b].sum() == n
        answer = tok(target)["input_ids"]  # T5 appends </s>
        assert answer[-1] == tok.eos_token_id == 1
        assert batch["labels"][b, :len(answer)].tolist() == answer
        assert batch["labels"][b, len(answer):].eq(IGNORE_INDEX).all()
        assert batch["decoder_attention_mask"][b].sum() == len(answer)


def test_truncation_prompt_from_the_left_answer_from_the_right():
    processor = InstructBlipProcessor.from_pretrained(tiny_checkpoint("llama"))
    tok = processor.tokenizer
    prompt = " ".join(f"word{i}" for i in range(60)) + " Short answer:"
    answer = " ".join(f"token{i}" for i in range(60))
    batch = Collator(processor, False, max_prompt_length=16, max_answer_length=8)(_examples([prompt], [answer]))
    ids = batch["input_ids"][0].tolist()
    prompt_ids, answer_ids = ids[4:4 + 16], ids[4 + 16:]
    assert prompt_ids[0] == tok.bos_token_id and tok.decode(prompt_ids[1:]).endswith("Short answer:")  # left cut
    assert answer_ids[-1] == tok.eos_token_id and len(answer_ids) == 8
    assert tok.decode(answer_ids[:-1]).startswith("token0 token1")  # right cut, eos kept
    qformer = batch["qformer_input_ids"][0].tolist()
    assert len(qformer) == 16 and qformer[0] == 101 and qformer[-1] == 102  # [CLS] ... answer: [SEP]
    assert processor.qformer_tokenizer.decode(qformer[-4:-1]) == "short answer :"


@pytest.mark.parametrize("family, legacy", [("llama", False), ("llama", True), ("t5", False)])
def test_model_loss_is_cross_entropy_over_answer_tokens_only(family, legacy):
    directory = tiny_checkpoint(family, legacy=legacy)
    model = InstructBlipForConditionalGeneration.from_pretrained(directory)
    processor = InstructBlipProcessor.from_pretrained(directory)
    assert (model.config.image_token_index is None) == legacy and processor.insert_image_tokens != legacy
    batch = Collator(processor, model.config.is_encoder_decoder)(_examples(PROMPTS, TARGETS))
    inputs = {k: batch[k] for k in ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "input_ids",
                                    "attention_mask", "labels", "decoder_attention_mask") if k in batch}
    with torch.no_grad():
        out = model(**inputs)
    logits = out.logits
    losses = []
    for b in range(2):
        if family == "t5":
            n = int(batch["decoder_attention_mask"][b].sum())
            losses.append(F.cross_entropy(logits[b, :n], batch["labels"][b, :n], reduction="sum"))
            continue
        offset = 4 if legacy else 0  # legacy: the model prepended 4 image features, labels have the text length
        labels = batch["labels"][b]
        where = (labels != IGNORE_INDEX).nonzero().flatten()
        assert where.min() > 0
        losses.append(F.cross_entropy(logits[b, where + offset - 1], labels[where], reduction="sum"))
    expected = torch.stack(losses).sum() / batch["num_targets"]
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Mixture and plan


class _Sized:
    def __init__(self, name, n, weight=1.0):
        self.name, self.n, self.skipped, self.spec = name, n, [], DataSource(f"{name}.jsonl", weight=weight)

    def __len__(self):
        return self.n


def test_sqrt_balancing_with_manual_weights():
    p = mixture_probabilities([100, 400, 10_000])
    np.testing.assert_allclose(p, np.array([10, 20, 100]) / 130)
    p = mixture_probabilities([100, 400, 10_000], [2.0, 1.0, 0.5])
    np.testing.assert_allclose(p, np.array([20, 20, 50]) / 90)
    np.testing.assert_allclose(mixture_probabilities([1, 3], balance="size"), [0.25, 0.75])
    np.testing.assert_allclose(mixture_probabilities([1, 3], balance="uniform"), [0.5, 0.5])
    with pytest.raises(ValueError, match="balance"):
        mixture_probabilities([1], balance="log")
    table = mixture_table([_Sized("okvqa", 9009, 2.0), _Sized("capfilt", 13_870_000)],
                          mixture_probabilities([9009, 13_870_000], [2.0, 1.0]), samples=1000)
    assert "okvqa" in table and "13,870,000" in table and "epochs" in table


def test_sampling_frequencies_match_the_configured_ratios():
    from scipy.stats import chisquare

    sizes, weights = [50, 800, 20_000], [1.0, 1.0, 0.5]
    p = mixture_probabilities(sizes, weights)
    plan = MixturePlan(sizes, p, global_batch_size=64, seed=123)
    draws = np.array([key[0] for _ in range(2000) for key in plan.next_global_batch()])
    observed = np.bincount(draws, minlength=3)
    n = len(draws)
    result = chisquare(observed, np.asarray(p) * n)
    assert result.pvalue > 1e-3, (observed / n, p)
    np.testing.assert_allclose(observed / n, p, atol=0.005)
    # within a dataset, every record comes once per epoch of that dataset
    first = [key[1] for key in MixturePlan([50], [1.0], 50, seed=1).next_global_batch()]
    assert sorted(first) == list(range(50)) and first != list(range(50))


def test_plan_is_the_same_on_any_number_of_processes_and_after_resume():
    sizes, p = [30, 70], mixture_probabilities([30, 70])

    def run(world_size, start=None, steps=6):
        ranks = []
        for rank in range(world_size):
            plan = MixturePlan(sizes, p, 8, seed=5, state=start)
            ranks.append(list(TrainBatches(plan, steps, micro_batch_size=2, rank=rank, world_size=world_size)))
        per_step = 8 // 2 // world_size
        steps_done = (steps - (start or {"next_step": 0})["next_step"])
        return [[key for r in range(world_size) for mb in ranks[r][s * per_step:(s + 1) * per_step] for key in mb]
                for s in range(steps_done)]

    one, two, four = run(1), run(2), run(4)
    assert one == two == four
    assert [key[2:] for key in one[3]] == [(3, slot) for slot in range(8)]
    batches = TrainBatches(MixturePlan(sizes, p, 8, seed=5), 6, micro_batch_size=4)
    iterator = iter(batches)
    for _ in range(3 * 2):  # 3 steps of 2 micro-batches
        next(iterator)
    resumed = run(1, start=batches.state_after(2))
    assert resumed == one[3:]
    assert validation_batches([3, 2], 2, rank=1, world_size=2) == [[(0, 1, -1, 1), (1, 0, -1, 0)]]
    with pytest.raises(ValueError, match="multiple"):
        TrainBatches(MixturePlan(sizes, p, 8, seed=5), 6, micro_batch_size=3)


def test_source_names_and_task_override(tmp_path):
    assert DataSource("data/okvqa/train.jsonl").name == "okvqa" and DataSource("x/vqa_v2.jsonl").name == "vqa_v2"
    path = write_color_dataset(tmp_path / "colors", 2, "train")
    as_vqg = open_source(DataSource(str(path), task="question_generation"))
    assert as_vqg.name == "colors" and as_vqg[0].task == "vqg"
    prompt, target = make_prompt_and_target(as_vqg[0], random.Random(0))
    assert target == "What color is the square?" and "red" in prompt


def test_dataloader_workers_give_the_same_batches(tmp_path):
    processor = InstructBlipProcessor.from_pretrained(tiny_checkpoint("t5"))
    sources = [open_source(DataSource(str(write_color_dataset(tmp_path, 12, "w"))))]
    dataset = InstructionDataset(sources, processor.image_processor, seed=0, augment=True)
    collate = Collator(processor, is_encoder_decoder=True)

    def batches(workers):
        sampler = TrainBatches(MixturePlan([12], [1.0], 4, seed=0), 3, micro_batch_size=2)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
        return list(loader)

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])
