"""LAVIS -> HF conversion on synthetic LAVIS-style state dicts built to the real key layout (tiny sizes)."""

import pytest
import torch
from hf_oracle import LLAMA, T5, randomize

from instructblip import CheckpointError, InstructBlipForConditionalGeneration
from instructblip.weights.lavis import convert_lavis

D, HEADS, PATCH, IMAGE, BLOCKS = 32, 4, 6, 30, 3  # EVA file with 3 blocks; InstructBLIP keeps 2 (as 39 of 40)
QD, QLAYERS, QVOCAB, QUERIES = 32, 3, 64, 4


def eva_state(g):
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    s = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + (IMAGE // PATCH) ** 2, D),
         "patch_embed.proj.weight": r(D, 3, PATCH, PATCH), "patch_embed.proj.bias": r(D)}
    for i in range(BLOCKS):
        b = f"blocks.{i}."
        s |= {b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D), b + "attn.q_bias": r(D), b + "attn.v_bias": r(D),
              b + "attn.qkv.weight": r(3 * D, D), b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
              b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D), b + "mlp.fc1.weight": r(37, D),
              b + "mlp.fc1.bias": r(37), b + "mlp.fc2.weight": r(D, 37), b + "mlp.fc2.bias": r(D)}
    return s


def lavis_state(g, proj: str, llm_width: int):
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    s = {"query_tokens": r(1, QUERIES, QD), "ln_vision.weight": 1 + r(D), "ln_vision.bias": r(D),
         "Qformer.bert.embeddings.word_embeddings.weight": r(QVOCAB, QD),
         "Qformer.bert.embeddings.position_embeddings.weight": r(40, QD),
         "Qformer.bert.embeddings.LayerNorm.weight": 1 + r(QD), "Qformer.bert.embeddings.LayerNorm.bias": r(QD),
         "Qformer.bert.embeddings.position_ids": torch.arange(40)[None],
         f"{proj}.weight": r(llm_width, QD), f"{proj}.bias": r(llm_width)}
    for i in range(QLAYERS):
        b = f"Qformer.bert.encoder.layer.{i}."
        for n in ("query", "key", "value"):
            s |= {b + f"attention.self.{n}.weight": r(QD, QD), b + f"attention.self.{n}.bias": r(QD)}
        s |= {b + "attention.output.dense.weight": r(QD, QD), b + "attention.output.dense.bias": r(QD),
              b + "attention.output.LayerNorm.weight": 1 + r(QD), b + "attention.output.LayerNorm.bias": r(QD)}
        if i % 2 == 0:
            s |= {b + "crossattention.self.query.weight": r(QD, QD), b + "crossattention.self.query.bias": r(QD)}
            for n in ("key", "value"):
                s |= {b + f"crossattention.self.{n}.weight": r(QD, D), b + f"crossattention.self.{n}.bias": r(QD)}
            s |= {b + "crossattention.output.dense.weight": r(QD, QD), b + "crossattention.output.dense.bias": r(QD),
                  b + "crossattention.output.LayerNorm.weight": 1 + r(QD),
                  b + "crossattention.output.LayerNorm.bias": r(QD)}
        for ffn, out in (("intermediate", "output"), ("intermediate_query", "output_query")):
            s |= {b + f"{ffn}.dense.weight": r(37, QD), b + f"{ffn}.dense.bias": r(37),
                  b + f"{out}.dense.weight": r(QD, 37), b + f"{out}.dense.bias": r(QD),
                  b + f"{out}.LayerNorm.weight": 1 + r(QD), b + f"{out}.LayerNorm.bias": r(QD)}
    return s


def reference(family, eva, lavis, llm):
    """transformers' model with every tensor placed by hand, written out here independently of the converter."""
    import transformers

    text = dict(LLAMA if family == "llama" else T5)
    text_cls = transformers.LlamaConfig if family == "llama" else transformers.T5Config
    text.pop("model_type")
    config = transformers.InstructBlipConfig(
        vision_config=dict(hidden_size=D, intermediate_size=37, num_hidden_layers=BLOCKS - 1, num_attention_heads=HEADS,
                           image_size=IMAGE, patch_size=PATCH),
        qformer_config=dict(vocab_size=QVOCAB, hidden_size=QD, num_hidden_layers=QLAYERS, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=40),
        text_config=text_cls(**text).to_dict(), num_query_tokens=QUERIES, image_token_index=98)
    model = transformers.InstructBlipForConditionalGeneration(config).eval()
    if family == "t5":  # Flan-T5's own head (transformers 5.x ties it to `shared` at init)
        model.language_model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.language_model.lm_head.weight))
    sd = {"vision_model.embeddings.class_embedding": eva["cls_token"],
          "vision_model.embeddings.position_embedding": eva["pos_embed"],
          "vision_model.embeddings.patch_embedding.weight": eva["patch_embed.proj.weight"],
          "vision_model.embeddings.patch_embedding.bias": eva["patch_embed.proj.bias"],
          "vision_model.post_layernorm.weight": lavis["ln_vision.weight"],
          "vision_model.post_layernorm.bias": lavis["ln_vision.bias"], "query_tokens": lavis["query_tokens"],
          "qformer.embeddings.layernorm.weight": lavis["Qformer.bert.embeddings.LayerNorm.weight"],
          "qformer.embeddings.layernorm.bias": lavis["Qformer.bert.embeddings.LayerNorm.bias"]}
    for i in range(BLOCKS - 1):
        e, h = f"blocks.{i}.", f"vision_model.encoder.layers.{i}."
        sd[h + "self_attn.qkv.bias"] = torch.cat([eva[e + "attn.q_bias"], torch.zeros(D), eva[e + "attn.v_bias"]])
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.projection"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            sd[h + b + ".weight"], sd[h + b + ".bias"] = eva[e + a + ".weight"], eva[e + a + ".bias"]
        sd[h + "self_attn.qkv.weight"] = eva[e + "attn.qkv.weight"]
    for key, value in lavis.items():
        if key.startswith("Qformer.bert.embeddings.LayerNorm") or key.endswith("position_ids"):
            continue
        if key.startswith("Qformer.bert."):
            sd["qformer." + key[len("Qformer.bert."):].replace("attention.self", "attention.attention")] = value
        elif key.endswith("proj.weight") or key.endswith("proj.bias"):
            sd["language_projection." + key.rsplit(".", 1)[1]] = value
    for key, value in llm.state_dict().items():
        sd["language_model." + key] = value
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("embed_tokens" in k for k in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_converted_model_equals_the_hand_built_reference(family, tmp_path):
    import transformers

    g = torch.Generator().manual_seed(0)
    text = dict(LLAMA if family == "llama" else T5)
    text.pop("model_type")
    if family == "llama":
        llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**text))
    else:
        llm = transformers.T5ForConditionalGeneration(transformers.T5Config(**text))
        llm.lm_head.weight = torch.nn.Parameter(torch.empty_like(llm.lm_head.weight))
    randomize(llm, seed=3).save_pretrained(tmp_path / "llm")
    eva = eva_state(g)
    lavis = lavis_state(g, "llm_proj" if family == "llama" else "t5_proj", 32)
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    torch.save({"model": lavis}, tmp_path / "instruct_blip.pth")

    report = convert_lavis(tmp_path / "instruct_blip.pth", tmp_path / "eva_vit_g.pth", tmp_path / "llm",
                           tmp_path / "out", image_size=IMAGE, vision_layers=BLOCKS - 1, vision_heads=HEADS,
                           qformer_heads=4, max_shard_size="30KB")
    # every source key used or deliberately dropped (and listed)
    sources = set(eva) | set(lavis)
    accounted = {k.split(":")[-1] for k in report.used} | {k.split(":")[-1] for k in report.dropped}
    assert sources <= accounted
    assert all(k.startswith(f"blocks.{BLOCKS - 1}.") for k in report.dropped if k in eva)
    assert "Qformer.bert.embeddings.position_ids" in report.dropped
    assert "dropped" in report.summary()

    ref = reference(family, eva, lavis, llm)
    converted = transformers.InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "out")  # transformers
    ref_state = ref.state_dict()
    for key, value in converted.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    ours = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "out")  # and ours, legacy scheme
    assert ours.config.image_token_index is None
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=g)
    qids = torch.randint(1, QVOCAB, (2, 5), generator=g)
    ids = torch.randint(3, 90, (2, 6), generator=g)
    extra = {"decoder_input_ids": torch.randint(0, 90, (2, 4), generator=g)} if family == "t5" else {}
    with torch.no_grad():
        with_tokens = torch.cat([torch.full((2, QUERIES), 98), ids], 1)
        theirs = ref(pixel_values=pixels, qformer_input_ids=qids, input_ids=with_tokens, **extra).logits
        mine = ours(pixel_values=pixels, qformer_input_ids=qids, input_ids=ids, **extra).logits
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_unknown_keys_are_an_error(tmp_path):
    g = torch.Generator().manual_seed(0)
    lavis = lavis_state(g, "t5_proj", 32) | {"Qformer.cls.predictions.bias": torch.zeros(3)}
    torch.save(eva_state(g), tmp_path / "eva.pth")
    torch.save({"model": lavis}, tmp_path / "lavis.pth")
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(CheckpointError, match="does not know, e.g. Qformer.cls.predictions.bias"):
        convert_lavis(tmp_path / "lavis.pth", tmp_path / "eva.pth", tmp_path / "llm", tmp_path / "out",
                      image_size=IMAGE, vision_layers=BLOCKS - 1, vision_heads=HEADS, qformer_heads=4)
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_lavis(tmp_path / "nope.pth", None, tmp_path / "llm", tmp_path / "out")
