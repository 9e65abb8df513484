"""Videos and BLIP-2 end to end: a video file (written here with PyAV) through `instructblip.load(...).ask` and
through the server gives the tokens transformers' InstructBLIP-Video classes give on the same frames; the BLIP-2 and
video processors against transformers'; a BLIP-2 OPT checkpoint through `ask`."""

from __future__ import annotations

import base64
import warnings

import httpx
import numpy as np
import pytest
import torch
from assets import photo
from PIL import Image
from test_server import live
from tiny_checkpoint import NUM_QUERY_TOKENS, make_family_checkpoint

import instructblip
from instructblip import Blip2Processor, InstructBlipVideoProcessor
from instructblip.processing.video import frame_indices, read_frames
from instructblip.serving.app import create_app

QUESTION = "What is happening in the video?"
SETTINGS = dict(num_beams=3, max_new_tokens=8, min_new_tokens=1, repetition_penalty=1.5, length_penalty=1.0)


def write_video(path, frames: int = 10, size: tuple[int, int] = (64, 48)) -> None:
    """A small MPEG-4 clip: a square moving over a gradient, so that frames differ."""
    import av

    w, h = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            image = np.zeros((h, w, 3), dtype=np.uint8)
            image[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
            image[..., 2] = 40 * i % 255
            image[8:24, 4 * i:4 * i + 16, 1] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path)
    return path


@pytest.fixture(scope="module")
def video_ckpt(tmp_path_factory):
    return make_family_checkpoint(tmp_path_factory.mktemp("video-t5"), "video", "t5")


def hf_video_inputs(directory, frames: list, question: str) -> dict:
    """What transformers' InstructBlipVideoProcessor builds, from transformers' own tokenizers and image processor
    (its video processor needs torchvision, absent here; for frames already decoded both resize with PIL's bicubic):
    `<video>` x 4 x Q before the prompt, the instruction for the Q-Former, (1, T, 3, H, W) pixels."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    qformer = transformers.AutoTokenizer.from_pretrained(directory / "qformer_tokenizer")
    images = transformers.BlipImageProcessor.from_pretrained(directory)
    text = tokenizer([question])
    video_ids = tokenizer("<video>" * NUM_QUERY_TOKENS * len(frames), add_special_tokens=False)["input_ids"]
    q = qformer([question], return_tensors="pt")
    pixels = images([Image.fromarray(f) for f in frames], return_tensors="pt")["pixel_values"]
    ids = torch.tensor([video_ids + text["input_ids"][0]])
    return dict(pixel_values=pixels[None], input_ids=ids, attention_mask=torch.ones_like(ids),
                qformer_input_ids=q["input_ids"], qformer_attention_mask=q["attention_mask"])


def hf_answer(directory, vlm, frames: list, question: str) -> str:
    import transformers

    theirs = transformers.InstructBlipVideoForConditionalGeneration.from_pretrained(directory).eval()
    inputs = hf_video_inputs(directory, frames, question)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        tokens = theirs.generate(**inputs, use_cache=False, **SETTINGS)[:, 1:]  # (T5: without the start token)
    return vlm.processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()


def test_frames_are_sampled_uniformly(video):
    frames = read_frames(video, 4)
    assert len(frames) == 4 and frames[0].shape == (48, 64, 3) and frame_indices(10, 4) == [0, 2, 5, 7]
    assert not np.array_equal(frames[0], frames[1])  # the frames differ
    with pytest.raises(FileNotFoundError):
        read_frames(video.with_name("missing.mp4"), 4)


def test_video_processor_matches_transformers_layout(video_ckpt, video):
    ours = InstructBlipVideoProcessor.from_pretrained(video_ckpt)
    frames = read_frames(video, 4)
    expected = hf_video_inputs(video_ckpt, frames, QUESTION)
    for given in (frames, [frames], video):  # a list of frames, a batch of one, a file
        got = ours(images=given, text=QUESTION, return_tensors="pt")
        assert got["pixel_values"].shape == (1, 4, 3, 224, 224)
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], atol=1e-6, rtol=0)
        for key in ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"):
            assert torch.equal(got[key], expected[key]), key
    assert ours.video_token == "<video>" and ours.video_token_id == 32101
    with pytest.raises(ValueError, match="same number of frames"):
        ours(images=[frames, frames[:3]], text=[QUESTION, QUESTION], padding=True)


def test_video_through_ask_and_the_server_matches_transformers(video_ckpt, video):
    """The video file through `ask` (4 frames sampled uniformly), the same frames as a list, and the file sent to
    the server as a data: URL: the answer transformers' InstructBlipVideoForConditionalGeneration gives."""
    vlm = instructblip.load(video_ckpt, device="cpu", dtype="float32")
    assert type(vlm.model).__name__ == "InstructBlipVideoForConditionalGeneration"
    frames = read_frames(video, 4)
    expected = hf_answer(video_ckpt, vlm, frames, QUESTION)
    assert expected
    assert vlm.ask(str(video), QUESTION, **SETTINGS) == expected
    assert vlm.ask([frames], QUESTION, **SETTINGS) == [expected]
    # an image and a video in one call: two batches, answers in order
    image = np.ascontiguousarray(photo("chelsea")[::4, ::4])
    both = vlm.ask([image, str(video)], [QUESTION, QUESTION], **SETTINGS)
    assert both[1] == expected and isinstance(both[0], str)

    url = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
    app = create_app(vlm, model_name="tiny", batch_wait=0.01)
    content = [{"type": "text", "text": QUESTION}, {"type": "video_url", "video_url": {"url": url}}]
    with live(app) as base:
        body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8,
                "num_beams": 3, "min_tokens": 1}
        reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"].strip() == expected
        assert reply.json()["usage"]["prompt_tokens"] == len(vlm.processor(videos=[frames], text=[QUESTION])
                                                             ["input_ids"][0])
        bad = {**body, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "?"}, {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}]}
        reply = httpx.post(f"{base}/v1/chat/completions", json=bad, timeout=60)
        assert reply.status_code == 400 and "video_url" in reply.json()["error"]["param"]


# ---------------------------------------------------------------------------------------------------------------------
# BLIP-2


@pytest.fixture(scope="module")
def opt_ckpt(tmp_path_factory):
    return make_family_checkpoint(tmp_path_factory.mktemp("blip2-opt"), "blip2", "opt")


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_blip2_processor_matches_transformers(family, opt_ckpt, tmp_path):
    """No Q-Former tokenizer and no qformer_* outputs; `<image>` x Q before the prompt; max_length counts them."""
    import transformers

    directory = opt_ckpt if family == "opt" else make_family_checkpoint(tmp_path / "t5", "blip2", "t5")
    theirs = transformers.Blip2Processor.from_pretrained(directory)
    ours = Blip2Processor.from_pretrained(directory)
    images = [Image.fromarray(photo(n)[::4, ::4]) for n in ("astronaut", "coffee")]
    texts = ["What is unusual about this image?", "a photo of"]
    for settings in (dict(padding=True), dict(padding="max_length", truncation=True, max_length=12)):
        expected = theirs(images=images, text=texts, return_tensors="pt", **settings)
        got = ours(images=images, text=texts, **settings)
        assert list(got) == ["input_ids", "attention_mask", "pixel_values"]
        for key in ("input_ids", "attention_mask"):
            assert torch.equal(got[key], expected[key]), (key, got[key].tolist(), expected[key].tolist())
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], atol=1e-6, rtol=0)
    ours.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "qformer_tokenizer").exists()
    again = transformers.Blip2Processor.from_pretrained(tmp_path / "saved")
    assert torch.equal(again(images=images, text=texts, padding=True, return_tensors="pt")["input_ids"],
                       ours(images=images, text=texts, padding=True)["input_ids"])


def test_blip2_opt_through_ask_matches_transformers(opt_ckpt):
    """`instructblip.load` reads the config (model_type "blip-2"): BLIP-2 with OPT, no special flags; `ask` and
    `caption` give transformers' tokens."""
    import transformers

    vlm = instructblip.load(opt_ckpt, device="cpu", dtype="float32")
    assert type(vlm.model).__name__ == "Blip2ForConditionalGeneration"
    assert type(vlm.processor).__name__ == "Blip2Processor"
    theirs = transformers.Blip2ForConditionalGeneration.from_pretrained(opt_ckpt).eval()
    processor = transformers.Blip2Processor.from_pretrained(opt_ckpt)
    image = Image.fromarray(photo("chelsea")[::4, ::4])
    question = "Question: what is unusual about this image? Answer:"
    inputs = processor(images=[image], text=[question], return_tensors="pt")
    settings = dict(num_beams=1, max_new_tokens=8, repetition_penalty=1.0, min_new_tokens=1)
    with torch.no_grad():
        tokens = theirs.generate(**inputs, **settings)[:, inputs["input_ids"].shape[1]:]
    expected = processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()
    assert vlm.ask(image, question, **settings) == expected


# ---------------------------------------------------------------------------------------------------------------------
# training and evaluation on BLIP-2: the config says what it is


def test_training_blip2_keeps_the_qformer_free_of_instructions(tmp_path):
    """`train` on a BLIP-2 checkpoint: the batches hold no Q-Former text, the Q-Former, queries and projection move,
    the frozen parts do not, and the export loads in transformers with the same logits."""
    import transformers
    from train_helpers import color_image, one_thread, write_color_dataset

    from instructblip import Blip2ForConditionalGeneration
    from instructblip.training import TrainConfig, train

    directory = make_family_checkpoint(tmp_path / "blip2", "blip2", "t5")
    data = write_color_dataset(tmp_path / "data", 8, "colors")
    config = TrainConfig(model=str(directory), train_data=[str(data)], output_dir=str(tmp_path / "run"), max_steps=3,
                         global_batch_size=4, micro_batch_size=4, lr=1e-3, warmup_steps=1, num_workers=0,
                         checkpoint_every=100, log_every=1, val_every=1000)
    with one_thread():
        result = train(config)
    assert result.final_loss is not None and np.isfinite(result.final_loss)
    before = Blip2ForConditionalGeneration.from_pretrained(directory).state_dict()
    ours = Blip2ForConditionalGeneration.from_pretrained(result.export_dir).eval()
    changed = {n for n, t in ours.state_dict().items() if not torch.equal(t, before[n])}
    assert {"query_tokens", "language_projection.weight", "qformer.layers.0.qkv.weight"} <= changed
    assert not any(n.startswith(("vision_model.layers", "language_model.")) for n in changed)
    assert not (tmp_path / "run" / "model" / "qformer_tokenizer").exists()
    theirs = transformers.Blip2ForConditionalGeneration.from_pretrained(result.export_dir).eval()
    inputs = Blip2Processor.from_pretrained(result.export_dir)(images=color_image("red", 1), text="What colour?")
    assert "qformer_input_ids" not in inputs
    inputs["decoder_input_ids"] = torch.tensor([[0, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=0)


def test_evaluating_blip2_on_images_and_videos(tmp_path):
    """`evaluate` (`instructblip eval --model <blip2>`) on an image benchmark and a video one: the prompts reach
    the LLM, no instruction reaches the Q-Former, the videos go through the models' video path."""
    from eval_fixtures import write_gqa, write_msvd

    from instructblip.evaluation.runner import build_inputs, evaluate

    directory = make_family_checkpoint(tmp_path / "blip2", "blip2", "opt")
    vlm = instructblip.load(directory, device="cpu", dtype="float32")
    (tmp_path / "gqa").mkdir()
    (tmp_path / "msvd").mkdir()
    gqa = evaluate(vlm, "gqa", write_gqa(tmp_path / "gqa"), batch_size=2, limit=2)
    assert gqa["num_samples"] == 2 and 0 <= gqa["score"] <= 100
    msvd = write_msvd(tmp_path / "msvd")
    results = evaluate(vlm, "msvd-qa", msvd)
    assert results["num_samples"] == 2
    frames = [read_frames(p, 4) for p in sorted((msvd / "YouTubeClips").glob("*"))][:1]
    inputs = build_inputs(vlm, frames, ["Question: what? Answer:"])
    assert inputs["image_features"].shape[:2] == (1, 4 * NUM_QUERY_TOKENS) and "qformer_input_ids" not in inputs
