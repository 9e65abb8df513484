"""Loading and saving the Hugging Face layout: round trips both ways, sharding, dtypes, strictness, bad files."""

import json
import os
import shutil

import pytest
import torch
from hf_oracle import hf_model
from safetensors import safe_open
from safetensors.torch import save_file
from test_model_parity import make_inputs

from instructblip import CheckpointError, InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipModel
from instructblip.weights.checkpoint import hf_state_dict


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_ours_saved_loads_in_transformers_with_same_logits(hf_checkpoints, family, shard, tmp_path):
    import transformers

    _, directory = hf_checkpoints[family]
    ours = InstructBlipForConditionalGeneration.from_pretrained(directory)
    ours.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    files = sorted(os.listdir(tmp_path))
    if shard:
        assert "model.safetensors.index.json" in files and "model.safetensors" not in files
        assert len([f for f in files if f.startswith("model-")]) > 3
    else:
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    theirs, info = transformers.InstructBlipForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    inputs = make_inputs(family)
    valid = inputs["attention_mask"].bool() if family == "llama" else slice(None)
    torch.testing.assert_close(_logits(theirs.eval(), inputs)[valid], _logits(ours, inputs)[valid], atol=1e-5, rtol=0)
    # every tensor equal, key for key (strict semantics)
    theirs_state = theirs.state_dict()
    for key, tensor in hf_state_dict(ours).items():
        assert torch.equal(theirs_state[key], tensor), key
    # and our own loader reads it back
    again = InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(again, inputs), _logits(ours, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_bf16_round_trip(family, tmp_path):
    import transformers

    bf16_dir = tmp_path / "hf-bf16"
    hf_model(family).to(torch.bfloat16).save_pretrained(bf16_dir)
    ours = InstructBlipForConditionalGeneration.from_pretrained(bf16_dir, dtype="auto")
    assert ours.dtype == torch.bfloat16
    assert ours.query_tokens.dtype == torch.float32  # kept in fp32, as transformers does
    fp32 = InstructBlipForConditionalGeneration.from_pretrained(bf16_dir)  # the CPU default: every tensor converted
    assert fp32.dtype == torch.float32  # (read through one scratch buffer, reused from tensor to tensor)
    with safe_open(os.path.join(bf16_dir, "model.safetensors"), "pt") as f:
        for key, tensor in hf_state_dict(ours).items():
            assert torch.equal(f.get_tensor(key).to(tensor.dtype), tensor), key
        for key, tensor in hf_state_dict(fp32).items():
            assert tensor.dtype == torch.float32 and torch.equal(f.get_tensor(key).float(), tensor), key
    ours.save_pretrained(tmp_path / "ours-bf16")
    with safe_open(os.path.join(tmp_path / "ours-bf16", "model.safetensors"), "pt") as f:
        assert f.get_tensor("language_projection.weight").dtype == torch.bfloat16
    reloaded = transformers.InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "ours-bf16", dtype="auto")
    assert reloaded.language_projection.weight.dtype == torch.bfloat16
    inputs = make_inputs(family)
    valid = inputs["attention_mask"].bool() if family == "llama" else slice(None)
    ours32 = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "ours-bf16", dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded.float().eval(), inputs)[valid], _logits(ours32, inputs)[valid],
                               atol=1e-5, rtol=0)


def test_base_model_reads_a_full_checkpoint_and_saves_its_own_layout(hf_checkpoints, tmp_path):
    import transformers

    _, directory = hf_checkpoints["llama"]
    base = InstructBlipModel.from_pretrained(directory)
    assert base.language_model.lm_head is None
    base.save_pretrained(tmp_path)
    _, info = transformers.InstructBlipModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("name,total,parts", [
    ("Salesforce/instructblip-vicuna-7b", 7_913_726_720, (985_952_256, 185_684_736, 3_149_824, 6_738_939_904)),
    ("Salesforce/instructblip-flan-t5-xl", 4_022_969_088, (985_952_256, 185_684_736, 1_574_912, 2_849_757_184)),
    ("Salesforce/instructblip-vicuna-13b", None, None),
    ("Salesforce/instructblip-flan-t5-xxl", None, None),
])
def test_presets_match_the_real_checkpoints_on_meta(name, total, parts):
    """Sizes of the official checkpoints; keys and shapes one for one with transformers' model of the same config."""
    import transformers

    config = InstructBlipConfig.from_name(name)
    with torch.device("meta"):
        ours = InstructBlipForConditionalGeneration(config)
        theirs = transformers.InstructBlipForConditionalGeneration(
            transformers.InstructBlipConfig.from_dict(config.to_dict())
        )
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    if total is not None:
        # vicuna-7b 7.914 B = vision 986.0 M + Q-Former 185.7 M + projection 3.1 M + LLM 6,738.9 M
        # (docs/checkpoints.md#parameter-counts)
        # flan-t5-xl: the 4.155 B there counts the two aliased T5 embed_tokens; the files hold 4.023 B (16.09 GB fp32)
        assert count(ours) == total
        q = ours.qformer
        assert (count(ours.vision_model), count(q) + ours.query_tokens.numel(), count(ours.language_projection),
                count(ours.language_model)) == parts
    ours_keys = {k: tuple(v.shape) for k, v in hf_state_dict(ours).items()}
    theirs_keys = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    aliases = {"language_model.encoder.embed_tokens.weight", "language_model.decoder.embed_tokens.weight"}
    assert ours_keys == {k: v for k, v in theirs_keys.items() if k not in aliases}
    if "t5" in name:
        assert len(theirs_keys) == len(ours_keys) + 2  # 1365 state_dict entries for flan-t5-xl
    if name.endswith("vicuna-7b"):
        assert len(ours_keys) == 1096


def test_legacy_keys_are_tolerated(hf_checkpoints, tmp_path):
    """position_ids buffers, rotary inv_freq, duplicated T5 embed_tokens, separate vision q_bias / v_bias."""
    _, directory = hf_checkpoints["llama"]
    ref = InstructBlipForConditionalGeneration.from_pretrained(directory)
    state = {k: v.clone() for k, v in hf_state_dict(ref).items()}
    D = ref.config.vision_config.hidden_size
    for i in range(ref.config.vision_config.num_hidden_layers):
        bias = state.pop(f"vision_model.encoder.layers.{i}.self_attn.qkv.bias")
        state[f"vision_model.encoder.layers.{i}.self_attn.q_bias"] = bias[:D].clone()
        state[f"vision_model.encoder.layers.{i}.self_attn.v_bias"] = bias[2 * D:].clone()
    state["qformer.embeddings.position_ids"] = torch.arange(40)[None]
    state["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    shutil.copy(os.path.join(directory, "config.json"), tmp_path / "config.json")
    save_file(state, tmp_path / "model.safetensors")
    legacy = InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
    for i in range(ref.config.vision_config.num_hidden_layers):
        qkv_bias = legacy.vision_model.layers[i].attn.qkv.bias
        assert torch.equal(qkv_bias[D:2 * D], torch.zeros(D))  # no key bias
        assert torch.equal(qkv_bias[:D], ref.vision_model.layers[i].attn.qkv.bias[:D])
        with torch.no_grad():
            ref.vision_model.layers[i].attn.qkv.bias[D:2 * D] = 0  # the random reference had a key bias
    inputs = make_inputs("llama")
    torch.testing.assert_close(_logits(legacy, inputs), _logits(ref, inputs), atol=0, rtol=0)


def test_t5_5x_config_and_4x_config_read_the_same_head(hf_checkpoints, tmp_path):
    """5.x writes tie_word_embeddings: true + scale_decoder_outputs: false; 4.x wrote tie_word_embeddings: false."""
    _, directory = hf_checkpoints["t5"]
    with open(os.path.join(directory, "config.json")) as f:
        saved = json.load(f)["text_config"]
    assert saved["tie_word_embeddings"] is True and saved["scale_decoder_outputs"] is False
    five = InstructBlipForConditionalGeneration.from_pretrained(directory)
    assert five.language_model.lm_head is not None and not five.config.text_config.scale_decoder_outputs
    shutil.copytree(directory, tmp_path / "4x")
    config = json.loads((tmp_path / "4x" / "config.json").read_text())
    config["text_config"]["tie_word_embeddings"] = False
    del config["text_config"]["scale_decoder_outputs"]
    (tmp_path / "4x" / "config.json").write_text(json.dumps(config))
    four = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "4x")
    inputs = make_inputs("t5")
    torch.testing.assert_close(_logits(four, inputs), _logits(five, inputs), atol=0, rtol=0)


def test_tied_t5_head_rescales_and_matches_transformers(tmp_path):
    """An original-T5 style config (tied, rescaled): the head shares `shared` and the output is scaled."""
    import transformers

    theirs = hf_model("t5", seed=5)
    theirs.language_model.lm_head.weight = theirs.language_model.shared.weight  # tie again
    theirs.config.text_config.scale_decoder_outputs = True
    theirs.language_model.config.scale_decoder_outputs = True
    theirs.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        assert "language_model.lm_head.weight" not in f.keys()
    ours = InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
    head = ours.language_model.lm_head  # tied: none, or (the CPU routes) a layer over `shared` itself
    assert head is None or head.weight is ours.language_model.shared.weight
    assert ours.config.text_config.scale_decoder_outputs
    assert InstructBlipForConditionalGeneration.from_pretrained(tmp_path, optimize=False).language_model.lm_head is None
    inputs = make_inputs("t5")
    torch.testing.assert_close(_logits(ours, inputs), _logits(theirs, inputs), atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "again")
    again = transformers.InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "again").eval()
    torch.testing.assert_close(_logits(again, inputs), _logits(ours, inputs), atol=1e-5, rtol=0)


# ---- bad checkpoints: one clear error each ----


@pytest.fixture
def copy_of(hf_checkpoints, tmp_path):
    def make(family="llama"):
        target = tmp_path / "ckpt"
        shutil.copytree(hf_checkpoints[family][1], target)
        return target

    return make


def test_missing_weights_file(copy_of):
    d = copy_of()
    os.remove(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="has no weights: expected model.safetensors"):
        InstructBlipForConditionalGeneration.from_pretrained(d)


def test_truncated_safetensors(copy_of):
    d = copy_of()
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        InstructBlipForConditionalGeneration.from_pretrained(d)
    (d / "model.safetensors").write_bytes(data[:50])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        InstructBlipForConditionalGeneration.from_pretrained(d)


def _rewrite(d, change):
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    change(state)
    save_file(state, d / "model.safetensors")


def test_wrong_shape_names_key_and_both_shapes(copy_of):
    d = copy_of()
    _rewrite(d, lambda s: s.__setitem__("language_projection.weight", torch.zeros(32, 7)))
    with pytest.raises(CheckpointError, match=r"language_projection.weight .* has shape \[32, 7\].* \[32, 32\]"):
        InstructBlipForConditionalGeneration.from_pretrained(d)


def test_unknown_key(copy_of):
    d = copy_of()
    _rewrite(d, lambda s: s.__setitem__("vision_model.extra_head.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="vision_model.extra_head.weight"):
        InstructBlipForConditionalGeneration.from_pretrained(d)


def test_missing_key(copy_of):
    d = copy_of()
    _rewrite(d, lambda s: s.pop("qformer.encoder.layer.1.output_query.dense.weight"))
    with pytest.raises(CheckpointError, match="lacks 1 weight.*qformer.encoder.layer.1.output_query.dense.weight"):
        InstructBlipForConditionalGeneration.from_pretrained(d)


def test_config_missing_a_field(copy_of):
    d = copy_of()
    config = json.loads((d / "config.json").read_text())
    del config["text_config"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lacks the field 'text_config'"):
        InstructBlipForConditionalGeneration.from_pretrained(d)
    config["text_config"] = {"model_type": "gpt2"}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type is 'gpt2'"):
        InstructBlipForConditionalGeneration.from_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        InstructBlipForConditionalGeneration.from_pretrained(d)


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a model checkpoint: it has no config.json"):
        InstructBlipForConditionalGeneration.from_pretrained(tmp_path)


def test_unknown_hub_id_offline(tmp_path, monkeypatch):
    from instructblip import CheckpointNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointNotFoundError, match="hf download Salesforce/instructblip-flan-t5-xl"):
        InstructBlipForConditionalGeneration.from_pretrained("Salesforce/instructblip-flan-t5-xl")
    with pytest.raises(CheckpointNotFoundError, match="neither a local directory nor a hub id"):
        InstructBlipForConditionalGeneration.from_pretrained("no such dir")


def test_hub_id_resolves_through_the_local_cache(hf_checkpoints, tmp_path, monkeypatch):
    _, directory = hf_checkpoints["llama"]
    repo = tmp_path / "models--Salesforce--instructblip-tiny"
    shutil.copytree(directory, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = InstructBlipForConditionalGeneration.from_pretrained("Salesforce/instructblip-tiny")
    assert model.config.num_query_tokens == 4


def test_pytorch_bin_is_read_weights_only(hf_checkpoints, tmp_path):
    _, directory = hf_checkpoints["llama"]
    ref = InstructBlipForConditionalGeneration.from_pretrained(directory)
    shutil.copy(os.path.join(directory, "config.json"), tmp_path / "config.json")
    torch.save({k: v.clone() for k, v in hf_state_dict(ref).items()}, tmp_path / "pytorch_model.bin")
    model = InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
    inputs = make_inputs("llama")
    torch.testing.assert_close(_logits(model, inputs), _logits(ref, inputs), atol=0, rtol=0)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
