"""InstructBlipProcessor against transformers 5.23 `InstructBlipProcessor` built from the same files (Flan-T5 and a
Vicuna-style LLaMA tokenizer, the bert-base-uncased Q-Former tokenizer, real photos), save/load both ways, legacy
checkpoints and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from assets import encode, make_checkpoint_dir, photo
from PIL import Image
from transformers import InstructBlipProcessor as HFProcessor

from instructblip.processing.processor import BatchFeature, InstructBlipProcessor
from instructblip.processing.tokenizers import Tokenizer

KEYS = ["qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask", "pixel_values"]
TEXTS = ["What is unusual about this image?", "Describe the image in detail, please.", ""]
SETTINGS = [
    dict(padding=True),
    dict(padding=True, truncation=True, max_length=40),
    dict(padding="max_length", truncation=True, max_length=48),
    dict(padding="longest", max_length=36, truncation=True),
    dict(padding=True, pad_to_multiple_of=8),
]


@pytest.fixture(scope="module")
def images():
    return [Image.fromarray(photo(name)) for name in ("astronaut", "chelsea", "coffee")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: make_checkpoint_dir(root / family, family) for family in ("t5", "llama")}


@pytest.fixture(scope="module")
def processors(checkpoints):
    return {family: (HFProcessor.from_pretrained(d), InstructBlipProcessor.from_pretrained(d))
            for family, d in checkpoints.items()}


def assert_same_outputs(expected, actual) -> None:
    assert isinstance(actual, BatchFeature)
    assert list(actual) == list(expected.keys())
    for key, value in expected.items():
        if key == "pixel_values":
            assert actual[key].dtype == torch.float32
            torch.testing.assert_close(actual[key], value, atol=1e-6, rtol=0)
        else:
            assert actual[key].dtype == torch.long, key
            assert torch.equal(actual[key], value), (key, value.tolist(), actual[key].tolist())


# ----------------------------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("family", ["t5", "llama"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_images_and_text_match_transformers(family, settings, processors, images):
    hf, ours = processors[family]
    expected = hf(images=images, text=TEXTS, return_tensors="pt", **settings)
    actual = ours(images=images, text=TEXTS, **settings)
    assert list(actual) == KEYS
    assert_same_outputs(expected, actual)
    image_id = ours.image_token_id
    assert (actual["input_ids"][:, :32] == image_id).all() and (actual["input_ids"][:, 32:] != image_id).all()


def test_padding_layout_per_family(processors, images):
    t5 = processors["t5"][1](images=images[:2], text=TEXTS[:2], padding=True)
    llama = processors["llama"][1](images=images[:2], text=TEXTS[:2], padding=True)
    # T5 rows: <image>x32 prompt </s> <pad>...; LLaMA rows: <image>x32 [PAD]... </s> prompt (left padding)
    assert t5["input_ids"][0, 32:].tolist()[-1] == 0 and 1 in t5["input_ids"][0].tolist()
    assert llama["input_ids"][0, 32].item() == 32000 and llama["input_ids"][1, 32].item() == 2
    assert llama["attention_mask"][0, :32].all() and not llama["attention_mask"][0, 32]
    # the Q-Former text is right padded for both
    assert t5["qformer_attention_mask"][0, -1] == 0 and llama["qformer_attention_mask"][0, -1] == 0


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_text_only_images_only_and_captioning_match_transformers(family, processors, images):
    hf, ours = processors[family]
    assert_same_outputs(hf(text=TEXTS, padding=True, return_tensors="pt"), ours(text=TEXTS, padding=True))
    assert_same_outputs(hf(images=images, return_tensors="pt"), ours(images=images))
    assert list(ours(images=images[0])) == ["pixel_values"]
    caption = ours(images=images[0], text="")
    assert_same_outputs(hf(images=images[0], text="", return_tensors="pt"), caption)
    bos = {"t5": [1], "llama": [2]}[family]  # T5 appends </s>; Vicuna's bos is </s> too
    assert caption["input_ids"][0].tolist() == [ours.image_token_id] * 32 + bos
    assert caption["qformer_input_ids"][0].tolist() == [101, 102]
    lists = ours(images=images[:2], text=TEXTS[:2], return_tensors=None)
    assert isinstance(lists["input_ids"][0], list) and len(lists["pixel_values"]) == 2


def test_padding_side_in_the_llm_tokenizer_config_also_pads_the_qformer_text(tmp_path, images):
    """transformers 5.x passes tokenizer_config keys such as padding_side to both tokenizers."""
    directory = make_checkpoint_dir(tmp_path / "llama", "llama")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["padding_side"] = "left"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    hf, ours = HFProcessor.from_pretrained(directory), InstructBlipProcessor.from_pretrained(directory)
    actual = ours(images=images, text=TEXTS, padding=True)
    assert_same_outputs(hf(images=images, text=TEXTS, padding=True, return_tensors="pt"), actual)
    assert actual["qformer_attention_mask"][2, 0] == 0  # left padded
    right = ours(images=images, text=TEXTS, padding=True, padding_side="right")
    assert_same_outputs(hf(images=images, text=TEXTS, padding=True, padding_side="right", return_tensors="pt"), right)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_image_token_is_added_when_the_tokenizer_lacks_it(family, tmp_path, images):
    directory = make_checkpoint_dir(tmp_path / family, family, image_token=False)
    assert Tokenizer.from_pretrained(directory).convert_tokens_to_ids("<image>") != (32100 if family == "t5" else 32001)
    hf, ours = HFProcessor.from_pretrained(directory), InstructBlipProcessor.from_pretrained(directory)
    assert ours.image_token_id == hf.tokenizer.convert_tokens_to_ids("<image>") == (32100 if family == "t5" else 32001)
    assert len(ours.tokenizer) == len(hf.tokenizer)
    assert_same_outputs(hf(images=images, text=TEXTS, padding=True, return_tensors="pt"),
                        ours(images=images, text=TEXTS, padding=True))


# ----------------------------------------------------------------------------------------------------------------------
# Saving and loading


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_save_pretrained_round_trips_with_transformers(family, checkpoints, images, tmp_path):
    hf = HFProcessor.from_pretrained(checkpoints[family])
    ours = InstructBlipProcessor.from_pretrained(checkpoints[family])
    ours.save_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "hf")  # 5.x layout: image settings inside processor_config.json
    assert not (tmp_path / "hf" / "preprocessor_config.json").exists()
    reloaded = {
        "hf<-ours": HFProcessor.from_pretrained(tmp_path / "ours"),
        "ours<-hf": InstructBlipProcessor.from_pretrained(tmp_path / "hf"),
        "ours<-ours": InstructBlipProcessor.from_pretrained(tmp_path / "ours"),
    }
    expected = hf(images=images, text=TEXTS, padding=True, truncation=True, max_length=40, return_tensors="pt")
    for name, processor in reloaded.items():
        assert processor.num_query_tokens == 32, name
        got = processor(images=images, text=TEXTS, padding=True, truncation=True, max_length=40, return_tensors="pt")
        assert_same_outputs(expected, BatchFeature(got) if name.startswith("hf") else got)
    saved = json.loads((tmp_path / "ours" / "processor_config.json").read_text())
    assert saved == {"num_query_tokens": 32, "processor_class": "InstructBlipProcessor"}
    assert (tmp_path / "ours" / "qformer_tokenizer" / "tokenizer.json").is_file()


def test_legacy_checkpoint_gets_no_image_tokens(tmp_path, images):
    directory = make_checkpoint_dir(tmp_path / "old", "llama", legacy=True)
    ours = InstructBlipProcessor.from_pretrained(directory)
    assert ours.insert_image_tokens is False and ours.num_query_tokens == 32
    out = ours(images=images, text=TEXTS, padding=True, max_length=6, truncation=True)
    plain = ours.tokenizer(TEXTS, padding=True, max_length=6, truncation=True, return_tensors="pt")
    assert torch.equal(out["input_ids"], plain["input_ids"]) and out["input_ids"].shape[1] == 6
    assert ours.image_token_id not in out["input_ids"].tolist()[0]
    assert len(ours.tokenizer) == len(Tokenizer.from_pretrained(directory))
    ours.save_pretrained(tmp_path / "saved")
    assert "num_query_tokens" not in json.loads((tmp_path / "saved" / "processor_config.json").read_text())


def test_tokenizer_that_does_not_match_the_config_is_refused(tmp_path):
    directory = make_checkpoint_dir(tmp_path / "t5", "t5")
    (directory / "config.json").write_text(json.dumps({"num_query_tokens": 32, "image_token_index": 32001}))
    with pytest.raises(ValueError, match="image token id is 32001"):
        InstructBlipProcessor.from_pretrained(directory)


# ----------------------------------------------------------------------------------------------------------------------
# Output object, decoding


def test_batch_feature_moves_and_casts(processors, images):
    ours = processors["t5"][1]
    out = ours(images=images[:2], text=TEXTS[:2], padding=True)
    same = out.to("cpu")
    assert same is out and out.input_ids is out["input_ids"]
    out.to(torch.float16)
    assert out["pixel_values"].dtype == torch.float16 and out["input_ids"].dtype == torch.long
    out.to(device="cpu", dtype=torch.bfloat16)
    assert out["pixel_values"].dtype == torch.bfloat16 and out["attention_mask"].dtype == torch.long
    with pytest.raises(ValueError, match="device and/or a dtype"):
        out.to(3.5)
    with pytest.raises(AttributeError):
        _ = out.labels


def test_decode_delegates_to_the_llm_tokenizer(processors):
    hf, ours = processors["llama"]
    ids = hf(text=TEXTS[:2], padding=True, return_tensors="pt")["input_ids"]
    assert ours.batch_decode(ids, skip_special_tokens=True) == hf.batch_decode(ids, skip_special_tokens=True)
    assert ours.decode(ids[0]) == hf.decode(ids[0])


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise_clear_errors(processors, images):
    ours = processors["t5"][1]
    with pytest.raises(ValueError, match="images, text or both"):
        ours()
    with pytest.raises(ValueError, match=r'text is empty \(""\) and no images'):
        ours(text="")
    with pytest.raises(ValueError, match="empty list"):
        ours(images=images[0], text=[])
    with pytest.raises(ValueError, match="string or a list of strings"):
        ours(text=[1, 2])
    with pytest.raises(ValueError, match="2 images but 3 texts"):
        ours(images=images[:2], text=TEXTS, padding=True)
    with pytest.raises(ValueError, match="not an image"):
        ours(images=b"GIF89a but not really", text="hi")
    with pytest.raises(ValueError, match="truncated"):
        ours(images=encode(images[0], "JPEG")[:3000], text="hi")
    with pytest.raises(ValueError, match="must exceed num_query_tokens=32"):
        ours(images=images[0], text="hi", max_length=32)
    with pytest.raises(ValueError, match="padding=True"):
        ours(images=images[:2], text=TEXTS[:2])
    with pytest.raises(ValueError, match="return_tensors"):
        ours(text="hi", return_tensors="tf")
    with pytest.raises(TypeError, match="unexpected arguments"):
        ours(text="hi", colour="blue")
    missing = InstructBlipProcessor(ours.image_processor, ours.tokenizer, ours.qformer_tokenizer, None)
    with pytest.raises(ValueError, match="num_query_tokens"):
        missing(images=images[0], text="hi")


def test_missing_qformer_tokenizer_is_reported(tmp_path):
    directory = make_checkpoint_dir(tmp_path / "t5", "t5")
    for path in sorted((directory / "qformer_tokenizer").iterdir()):
        path.unlink()
    (directory / "qformer_tokenizer").rmdir()
    with pytest.raises(FileNotFoundError, match="qformer_tokenizer"):
        InstructBlipProcessor.from_pretrained(directory)
