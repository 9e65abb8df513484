"""config.json read and written as the HF layout has it, quirks included (docs/checkpoints.md#config-quirks)."""

import json

import pytest

from instructblip import (
    ConfigError,
    InstructBlipConfig,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    T5Config,
)
from instructblip.models.config import PRESETS


def test_transformers_written_config_round_trips(hf_checkpoints, tmp_path):
    for _, directory in hf_checkpoints.values():
        original = json.loads(open(f"{directory}/config.json").read())  # noqa: SIM115
        config = InstructBlipConfig.from_pretrained(directory)
        config.save_pretrained(tmp_path)
        again = json.loads((tmp_path / "config.json").read_text())
        assert again == original | {"dtype": original["dtype"]}  # nothing lost, nothing changed


def test_transformers_reads_what_we_write(tmp_path):
    import transformers

    for name in PRESETS:
        ours = InstructBlipConfig.from_name(name)
        ours.save_pretrained(tmp_path)
        theirs = transformers.InstructBlipConfig.from_pretrained(tmp_path)
        assert theirs.image_token_index == ours.image_token_index
        assert theirs.qformer_config.vocab_size == 30523
        t = theirs.text_config
        if isinstance(ours.text_config, T5Config):
            assert (t.d_model, t.num_heads, t.dense_act_fn, t.scale_decoder_outputs) == (
                ours.text_config.d_model, ours.text_config.num_heads, "gelu", False)
        else:
            assert (t.hidden_size, t.num_hidden_layers, t.rope_parameters["rope_theta"]) == (
                ours.text_config.hidden_size, ours.text_config.num_hidden_layers, 10000.0)


def test_rope_theta_4x_and_rope_parameters_5x():
    assert LlamaConfig.from_dict({"rope_theta": 500000.0}).rope_theta == 500000.0
    five = LlamaConfig.from_dict({"rope_parameters": {"rope_theta": 250000.0, "rope_type": "default"}})
    assert five.rope_theta == 250000.0
    assert five.to_dict()["rope_parameters"] == {"rope_theta": 250000.0, "rope_type": "default"}
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        LlamaConfig.from_dict({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_t5_quirks():
    assert T5Config.from_dict({"feed_forward_proj": "gated-gelu"}).dense_act_fn == "gelu_new"  # tanh GELU
    assert T5Config.from_dict({"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu"}).dense_act_fn == "gelu"
    four = T5Config.from_dict({"tie_word_embeddings": False})  # 4.x Flan-T5
    assert not four.tie_word_embeddings and not four.scale_decoder_outputs
    five = T5Config.from_dict({"tie_word_embeddings": True, "scale_decoder_outputs": False})  # 5.x Flan-T5
    assert not five.scale_decoder_outputs
    original = T5Config.from_dict({})  # original T5: tied and rescaled
    assert original.tie_word_embeddings and original.scale_decoder_outputs
    assert T5Config.from_dict({"pad_token_id": 0}).decoder_start_token_id == 0


def test_encoder_hidden_size_follows_the_vision_width():
    config = InstructBlipConfig(vision_config={"hidden_size": 48, "num_attention_heads": 4},
                                qformer_config={"encoder_hidden_size": 1408})
    assert config.qformer_config.encoder_hidden_size == 48


def test_vicuna_ids_kept_as_in_the_file():
    config = InstructBlipConfig.from_name("Salesforce/instructblip-vicuna-7b")
    t = config.text_config
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id, t.vocab_size) == (0, 1, 32000, 32064)
    assert config.image_token_index == 32001 and config.use_decoder_only_language_model


def test_image_token_schemes():
    assert InstructBlipConfig.from_dict({**PRESETS["flan-t5-xl"], "image_token_index": None}).image_token_id is None
    assert InstructBlipConfig.from_name("flan-t5-xl").image_token_id == 32100
    with pytest.raises(ConfigError, match="outside the text vocabulary"):
        InstructBlipConfig.from_name("flan-t5-xl", image_token_index=40000)


def test_from_vision_qformer_text_configs():
    config = InstructBlipConfig.from_vision_qformer_text_configs(
        InstructBlipVisionConfig(hidden_size=64, num_attention_heads=4), InstructBlipQFormerConfig(),
        T5Config(), num_query_tokens=8, image_token_index=32100,
    )
    assert config.is_encoder_decoder and config.num_query_tokens == 8
    assert config.qformer_config.encoder_hidden_size == 64
    assert InstructBlipConfig.from_dict(json.loads(config.to_json_string())) == config


@pytest.mark.parametrize("bad,message", [
    ({"text_config": {"model_type": "llama", "hidden_size": 30, "num_attention_heads": 4, "vocab_size": 32064}},
     "not divisible"),
    ({"vision_config": {"num_hidden_layers": 0}}, "num_hidden_layers must be a positive integer"),
    ({"vision_config": "big"}, "lacks the field 'vision_config'"),
    ({"model_type": "blip-2"}, "model_type 'blip-2'"),
    ({"qformer_config": {"hidden_act": "relu"}}, "not supported"),
])
def test_bad_configs_raise_one_clear_error(bad, message):
    data = {**PRESETS["vicuna-7b"], **bad}
    with pytest.raises(ConfigError, match=message):
        InstructBlipConfig.from_dict(data)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'opt-2.7b'; known: Salesforce/instructblip-vicuna-7b"):
        InstructBlipConfig.from_name("opt-2.7b")
