"""Every benchmark adapter on a fixture in its dataset's real file layout: the exact prompts, candidates, targets and
settings of the paper; generation benchmarks hand `generate` the right settings, ranking benchmarks pick the
candidate the model scores highest, and video benchmarks feed 4 frames x Q query tokens to the LLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_fixtures import WRITERS, tiny_checkpoint, video_frames, write_frame_folder, write_video

import instructblip
from instructblip.evaluation.runner import build_inputs, evaluate, predict
from instructblip.evaluation.tasks import (
    BENCHMARKS,
    HELD_OUT,
    TABLE1,
    MissingDataError,
    frame_indices,
    get_benchmark,
    paper_numbers,
    paper_row,
    read_frames,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    for name, writer in WRITERS.items():
        (root / name).mkdir()
        writer(root / name)
    return root


@pytest.fixture(scope="module")
def vlm():
    return instructblip.load(tiny_checkpoint("t5"), device="cpu")


@pytest.fixture(scope="module")
def vlm_llama():
    return instructblip.load(tiny_checkpoint("llama"), device="cpu")


def load(data, name, **options):
    return get_benchmark(name, **options).load(data / name)


# ---------------------------------------------------------------------------------------------------------------------
# the adapters read the published layouts and write the paper's prompts


def test_registry_and_table1():
    assert set(HELD_OUT) | {"easy-vqa"} == set(BENCHMARKS) and len(HELD_OUT) == 13
    assert [BENCHMARKS[n].title for n in HELD_OUT] == ["NoCaps", "Flickr30K", "GQA", "VSR", "IconQA", "TextVQA",
                                                       "Visdial", "HM", "VizWiz", "SciQA", "MSVD-QA", "MSRVTT-QA",
                                                       "iVQA"]
    assert all(len(row) == 13 for row in TABLE1.values())
    assert paper_numbers("nocaps")["InstructBLIP (Vicuna-7B)"] == 123.1
    assert paper_numbers("hatefulmemes")["Flamingo-80B"] == 46.4 and "Flamingo-80B" not in paper_numbers("gqa")
    assert paper_row("Salesforce/instructblip-flan-t5-xxl") == "InstructBLIP (FlanT5XXL)"
    assert paper_row("/models/instructblip-flan-t5-xl") == "InstructBLIP (FlanT5XL)"
    assert paper_row("my-model") is None
    modes = {n: (c.mode, c.modes) for n, c in BENCHMARKS.items()}
    ranking = {n for n, (mode, _) in modes.items() if mode == "rank"}  # the paper's vocabulary-ranking datasets
    assert ranking == {"iconqa", "scienceqa", "hatefulmemes", "visdial", "msvd-qa", "msrvtt-qa"}


def test_captioning_adapters(data):
    nocaps = load(data, "nocaps")
    assert [s.id for s in nocaps] == ["0", "1", "2"]
    assert {s.prompt for s in nocaps} == {"A short image description:"}
    assert nocaps[1].target == ["A cat lying down.", "An orange tabby cat looking at the camera."]
    assert nocaps[2].info == {"domain": "out-domain"} and nocaps[0].media.endswith("images/0013ea2087020901.jpg")
    flickr = load(data, "flickr30k")
    assert [s.id for s in flickr] == ["1000092795", "1000092796"]  # Karpathy test split only
    assert flickr[0].target == ["A photo number 0.", "Something called astronaut."]
    val = get_benchmark("flickr30k").load(data / "flickr30k", "val")
    assert [s.id for s in val] == ["1000092798"]
    settings = get_benchmark("nocaps").generation_settings(is_encoder_decoder=False)
    assert settings == dict(num_beams=5, max_new_tokens=80, min_new_tokens=10, length_penalty=1.0,
                            repetition_penalty=1.5)
    assert get_benchmark("nocaps").generation_settings(is_encoder_decoder=True)["min_new_tokens"] == 9


def test_vqa_adapters(data):
    gqa = load(data, "gqa")
    assert [(s.id, s.prompt, s.target) for s in gqa] == [
        ("20968379", "Question: What is the woman wearing? Short answer:", "suit"),
        ("20968380", "Question: Is the cat on the left or right? Short answer:", "right"),
        ("201307251", "Question: Are there both flags and helmets? Short answer:", "yes")]
    assert gqa[0].media == gqa[2].media and gqa[0].media.endswith("images/n288870.jpg")
    vsr = load(data, "vsr")
    assert vsr[0].prompt == ('Based on the image, is this statement true or false? "The cat is in front of the '
                             'person." Answer:')
    assert [s.target for s in vsr] == [1, 0] and vsr[0].candidates is None
    assert load(data, "vsr", mode="rank")[0].candidates == ["yes", "true", "no", "false"]
    textvqa = load(data, "textvqa")
    tokens = ", ".join(f"w{i}" for i in range(30))  # at most 30 OCR tokens
    assert textvqa[0].prompt == f"OCR tokens: {tokens}. Question: what brand is this? Short answer:"
    assert textvqa[1].prompt == "OCR tokens: LATTE, ART. Question: what is written on the cup? Short answer:"
    assert textvqa[0].id == "34602" and len(textvqa[0].target) == 10
    vizwiz = load(data, "vizwiz")
    assert vizwiz[1].prompt == "Question: What kind of drink is this? Short answer:"
    assert vizwiz[1].target == ["coffee"] * 6 + ["latte"] * 4 and vizwiz[0].id == "VizWiz_val_00000000"
    for name in ("gqa", "vsr", "textvqa", "vizwiz", "ivqa"):
        assert get_benchmark(name).generation_settings(False) == dict(
            num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0, repetition_penalty=1.5)


def test_choice_adapters(data):
    iconqa = load(data, "iconqa")
    assert [s.id for s in iconqa] == ["17", "102"]  # numeric order
    assert iconqa[0].prompt == ("Question: What has been done to this letter? Options: (a) turn (b) slide (c) flip. "
                                "Short answer:")
    assert iconqa[0].candidates == ["turn", "slide", "flip"] and iconqa[0].target == "slide"
    sqa = load(data, "scienceqa")
    assert [s.id for s in sqa] == ["1", "3"]  # problem 2 has no image: not in the IMG subset
    assert sqa[0].prompt == ("Context: Look at the picture. Question: Which animal is shown? Options: (a) cat "
                             "(b) dog (c) bird. Answer:")
    assert sqa[1].prompt == ("Question: What is in the cup? Options: (a) tea (b) coffee (c) water (d) milk "
                             "(e) juice. Answer:")
    assert sqa[1].candidates == ["(a)", "(b)", "(c)", "(d)", "(e)"] and sqa[1].target == 1
    hm = load(data, "hatefulmemes")
    assert hm[2].prompt == ('This is an image with: "your order comes to $37.50" written on it. Is it hateful? '
                            'Answer:')
    assert hm[0].candidates == ["yes", "true", "no", "false"] and [s.target for s in hm] == [1, 0, 1]
    visdial = load(data, "visdial")
    assert [s.id for s in visdial] == ["185565_1", "185565_2", "185565_3"]
    assert visdial[0].prompt == ("Dialog history: a cat lying on a blanket.\n Question: is the photo in color? "
                                 "Short answer:")
    assert visdial[2].prompt == ("Dialog history: a cat lying on a blanket. is the photo in color? yes. is it a cat? "
                                 "yes.\n Question: what color is it? Short answer:")
    assert visdial[2].candidates[visdial[2].target] == "orange" and len(visdial[0].candidates) == 6


def test_video_adapters(data):
    msvd = load(data, "msvd-qa")
    assert [(s.id, s.prompt, s.target) for s in msvd] == [("0", "Question: who is walking? Short answer:", "man"),
                                                         ("1", "Question: what is lying? Short answer:", "cat")]
    assert msvd[0].media.endswith("YouTubeClips/-4wsuPCjDBc_5_15.avi")  # vid1 via youtube_mapping.txt
    assert msvd[1].media.endswith("YouTubeClips/00jrXRMlZOY_0_10")  # a folder of frames
    assert msvd[0].candidates == ["cat", "man", "woman", "dog"]  # train answers, most frequent first
    assert msvd[0].candidates is msvd[1].candidates  # one shared list
    assert get_benchmark("msvd-qa", mode="generate").generation_settings(False)["max_new_tokens"] == 30
    msrvtt = load(data, "msrvtt-qa")
    assert msrvtt[0].media.endswith("TestVideo/video7010.mp4") and msrvtt[0].candidates == ["woman", "man", "dog"]
    assert get_benchmark("msrvtt-qa", mode="generate").generation_settings(False)["max_new_tokens"] == 10
    ivqa = load(data, "ivqa")
    assert ivqa[0].prompt == "Question: what is the man holding? Short answer:"
    assert ivqa[0].target == ["knife", "knife", "knife", "spoon", "knife"]
    assert ivqa[0].media.endswith("video/-AhXyvqnrIc_12_25.mp4") and ivqa[1].media.endswith("0bTS0GAtF8A_3_11.avi")


def test_easy_vqa_from_the_package():
    import easy_vqa

    samples = get_benchmark("easy-vqa").load(None)
    questions, answers, image_ids = easy_vqa.get_test_questions()
    assert len(samples) == len(questions) == 9673
    assert samples[0].prompt == f"Question: {questions[0]} Short answer:" and samples[0].target == answers[0]
    assert samples[0].media == easy_vqa.get_test_image_paths()[image_ids[0]]
    ranked = get_benchmark("easy-vqa", mode="rank", prompt="Q: {question} A:").load(None)
    assert ranked[5].candidates == easy_vqa.get_answers() and ranked[5].prompt == f"Q: {questions[5]} A:"
    with pytest.raises(ValueError, match="question"):
        get_benchmark("easy-vqa", prompt="no slot")


def test_missing_data_says_what_to_get(tmp_path):
    with pytest.raises(MissingDataError) as e:
        get_benchmark("gqa").load(tmp_path)
    assert "testdev_balanced_questions.json" in str(e.value) and "cs.stanford.edu" in str(e.value)
    with pytest.raises(MissingDataError, match="TextVQA_0.5.1_val.json.*textvqa.org"):
        get_benchmark("textvqa").load(tmp_path)
    with pytest.raises(ValueError, match="splits"):
        get_benchmark("gqa").load(tmp_path, "nope")
    with pytest.raises(ValueError, match="supports --mode"):
        get_benchmark("scienceqa", mode="generate")


# ---------------------------------------------------------------------------------------------------------------------
# generation benchmarks: the settings and inputs `generate` receives


class GenerateSpy:
    """Stands in for `model.generate`: records its arguments, answers `text` for every sample."""

    def __init__(self, tokenizer, text: str):
        self.calls = []
        self.ids = tokenizer.encode(text, add_special_tokens=False) + [1]

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        batch = kwargs["input_ids"].shape[0]
        return torch.tensor([self.ids] * batch)


@pytest.mark.parametrize("name", ["nocaps", "flickr30k", "gqa", "vsr", "textvqa", "vizwiz"])
def test_generation_benchmarks_pass_the_paper_settings(data, vlm, monkeypatch, name):
    bench = get_benchmark(name)
    samples = bench.load(data / name)
    answer = {"gqa": "yes", "vsr": "True.", "textvqa": "latte", "vizwiz": "coffee", "nocaps": "A cat lying down.",
              "flickr30k": "A photo number 0."}[name]
    spy = GenerateSpy(vlm.processor.tokenizer, answer)
    monkeypatch.setattr(vlm.model, "generate", spy)
    results = evaluate(vlm, name, data / name, batch_size=2)
    assert len(spy.calls) == (len(samples) + 1) // 2
    expected = {**bench.generation_settings(is_encoder_decoder=True)}
    for call, batch in zip(spy.calls, [samples[i: i + 2] for i in range(0, len(samples), 2)], strict=True):
        assert {k: call[k] for k in expected} == expected
        # the prompt reaches the LLM (after the Q image tokens) and the Q-Former
        ids = call["input_ids"][:, 4:]
        prompts = vlm.processor.batch_decode(ids, skip_special_tokens=True)
        assert prompts == [s.prompt for s in batch]
        qformer = vlm.processor.qformer_tokenizer.batch_decode(call["qformer_input_ids"], skip_special_tokens=True)
        assert [q.replace(" ", "") for q in qformer] == [s.prompt.lower().replace(" ", "") for s in batch]
        assert call["pixel_values"].shape[1:] == (3, 224, 224)
    scores = {"gqa": 100 / 3, "vsr": 50.0, "textvqa": 50.0, "vizwiz": 50.0}
    if name in scores:
        assert results["score"] == pytest.approx(scores[name])
    else:  # one image is captioned with one of its references
        assert results["metric"] == "CIDEr" and results["score"] > 0
    assert results["settings"]["generation"]["num_beams"] == 5


def test_llama_generation_settings_count_new_tokens(data, vlm_llama, monkeypatch):
    spy = GenerateSpy(vlm_llama.processor.tokenizer, "suit")
    monkeypatch.setattr(vlm_llama.model, "generate", spy)
    evaluate(vlm_llama, "nocaps", data / "nocaps", limit=1)
    assert spy.calls[0]["min_new_tokens"] == 10 and spy.calls[0]["max_new_tokens"] == 80  # LAVIS' Vicuna path


def test_generation_end_to_end_on_the_tiny_model(data, vlm):
    """No spy: the tiny random model really generates (beam 5), and the answers are scored."""
    results = evaluate(vlm, "gqa", data / "gqa", limit=2)
    assert results["num_samples"] == 2 and 0 <= results["score"] <= 100


# ---------------------------------------------------------------------------------------------------------------------
# ranking benchmarks pick the candidate the model scores highest


@pytest.mark.parametrize("name", ["iconqa", "scienceqa", "visdial", "hatefulmemes", "vsr"])
def test_ranking_picks_the_highest_scoring_candidate(data, vlm, name):
    bench = get_benchmark(name, mode="rank")
    samples = bench.load(data / name)
    records = predict(vlm, bench, samples)
    for sample, record in zip(samples, records, strict=True):
        ranking = vlm.rank(sample.media, sample.prompt, sample.candidates)  # one sample at a time, independently
        scores = [ranking.scores[c] for c in sample.candidates]
        if name in ("hatefulmemes", "vsr"):  # verbalizer sets: P(positive) from both sets' likelihoods
            pos = np.logaddexp(scores[0], scores[1])
            neg = np.logaddexp(scores[2], scores[3])
            p = 1 / (1 + np.exp(neg - pos))
            key = "p_hateful" if name == "hatefulmemes" else "p_true"
            assert record[key] == pytest.approx(p, abs=1e-5)
            continue
        assert record["prediction"] == ranking.best
        if name == "scienceqa":
            assert record["choice"] == sample.candidates.index(ranking.best)
        if name == "visdial":
            gt = scores[sample.target]
            assert record["gt_rank"] == 1 + sum(s > gt for s in scores)


def test_ranking_records_follow_the_scores(data, vlm, monkeypatch):
    """With the model's scores fixed, the records and metrics follow them exactly."""
    bench = get_benchmark("visdial")
    samples = bench.load(data / "visdial")
    wanted = {"185565_1": 1, "185565_2": 3, "185565_3": 4}  # the option each sample's scores favour

    def fake_rank(inputs, candidates, **kwargs):
        B, C = len(candidates), len(candidates[0])
        scores = torch.full((B, C), -5.0)
        for i, s in enumerate(samples[:B]):
            scores[i, wanted[s.id]] = -1.0
        return type("R", (), {"scores": scores, "best": scores.argmax(1)})

    monkeypatch.setattr(vlm.model, "rank", fake_rank)
    results = evaluate(vlm, "visdial", data / "visdial", batch_size=3)
    # gt indices 1, 0, 4: ranks 1, 2, 1
    assert results["metrics"]["MRR"] == pytest.approx(100 * (1 + 0.5 + 1) / 3)
    assert results["metrics"]["R@1"] == pytest.approx(200 / 3)


def test_hateful_memes_auc(data, vlm, monkeypatch):
    def fake_rank(inputs, candidates, **kwargs):  # yes/true likely for the 1st and 3rd meme, no/false for the 2nd
        rows = [[-1.0, -2.0, -3.0, -3.0], [-3.0, -3.0, -1.0, -1.5], [-2.0, -2.5, -2.2, -9.0]]
        return type("R", (), {"scores": torch.tensor(rows[: inputs["input_ids"].shape[0]])})

    monkeypatch.setattr(vlm.model, "rank", fake_rank)
    results = evaluate(vlm, "hatefulmemes", data / "hatefulmemes", batch_size=3)
    assert results["metric"] == "AUC" and results["score"] == 100.0  # labels 1, 0, 1: perfectly separated


# ---------------------------------------------------------------------------------------------------------------------
# video: 4 frames, each through the vision encoder and Q-Former, 4 x Q tokens into the LLM


def test_frame_sampling_is_lavis_uniform(tmp_path):
    for total in range(4, 60):
        assert frame_indices(total, 4) == np.arange(0, total, total / 4).astype(int).tolist()
    assert frame_indices(3, 4) == [0, 0, 1, 2] and frame_indices(1, 4) == [0, 0, 0, 0]
    frames = video_frames(10)
    path = write_video(tmp_path / "clip.mp4", frames)
    decoded = read_frames(path, 4)
    assert len(decoded) == 4 and decoded[0].shape == (48, 64, 3)
    for got, index in zip(decoded, [0, 2, 5, 7], strict=True):  # lossy codec: compare brightness
        assert abs(float(got.mean()) - float(frames[index].mean())) < 4
    folder = write_frame_folder(tmp_path / "frames", frames)
    assert [p.rsplit("/", 1)[1] for p in read_frames(folder, 4)] == ["frame_1.png", "frame_3.png", "frame_6.png",
                                                                      "frame_8.png"]
    with pytest.raises(FileNotFoundError):
        read_frames(tmp_path / "nope.mp4", 4)


def test_video_inputs_are_four_frames_of_query_tokens(data, vlm):
    bench = get_benchmark("msvd-qa")
    samples = bench.load(data / "msvd-qa")
    media = [read_frames(s.media, 4) for s in samples]
    inputs = build_inputs(vlm, media, [s.prompt for s in samples])
    Q, D = vlm.model.config.num_query_tokens, vlm.model.config.text_config.hidden_size
    assert inputs["image_features"].shape == (2, 4 * Q, D)
    image_token = vlm.processor.image_token_id
    assert (inputs["input_ids"][:, : 4 * Q] == image_token).all()
    assert (inputs["input_ids"][:, 4 * Q:] != image_token).all()
    for i, (frames, sample) in enumerate(zip(media, samples, strict=True)):
        # each frame alone, with the instruction for the Q-Former, as the processor builds one image's inputs
        one = vlm.processor(images=frames, text=[sample.prompt] * 4, padding=True)
        with torch.no_grad():
            per_frame = vlm.model.get_image_features(one["pixel_values"], one["qformer_input_ids"],
                                                     one["qformer_attention_mask"]).pooler_output  # (4, Q, D)
        torch.testing.assert_close(inputs["image_features"][i], per_frame.reshape(4 * Q, D), rtol=1e-5, atol=1e-5)
    text = vlm.processor.batch_decode(inputs["input_ids"], skip_special_tokens=True)
    assert text == [s.prompt for s in samples]


def test_video_generation_gets_the_concatenated_features(data, vlm, monkeypatch):
    spy = GenerateSpy(vlm.processor.tokenizer, "knife")
    monkeypatch.setattr(vlm.model, "generate", spy)
    results = evaluate(vlm, "ivqa", data / "ivqa", batch_size=2)
    Q = vlm.model.config.num_query_tokens
    call = spy.calls[0]
    assert call["image_features"].shape[:2] == (2, 4 * Q) and "pixel_values" not in call
    assert call["max_new_tokens"] == 10 and call["num_beams"] == 5
    assert results["score"] == pytest.approx(50.0)  # "knife": 4 of 5 annotators, then 0 of 5


def test_video_ranking_on_the_tiny_model(data, vlm, vlm_llama):
    for model in (vlm, vlm_llama):
        results = evaluate(model, "msvd-qa", data / "msvd-qa")
        assert results["num_samples"] == 2 and results["score"] in (0.0, 50.0, 100.0)


def test_legacy_scheme_prepends_the_frames(data):
    """A 2023-style checkpoint (no image tokens): the model prepends the 4 x Q features itself."""
    legacy = instructblip.load(tiny_checkpoint("t5"), device="cpu")
    legacy.model.config.image_token_index = None
    legacy.processor.insert_image_tokens = False
    bench = get_benchmark("msrvtt-qa", mode="generate")
    sample = bench.load(data / "msrvtt-qa")[0]
    inputs = build_inputs(legacy, [read_frames(sample.media, 4)], [sample.prompt])
    assert (inputs["input_ids"] != legacy.processor.image_token_id).all()
    assert legacy.processor.batch_decode(inputs["input_ids"], skip_special_tokens=True) == [sample.prompt]
    records = predict(legacy, bench, [sample])
    assert isinstance(records[0]["prediction"], str)
