"""The family against transformers 5.23 on tiny random checkpoints saved by transformers: the OPT decoder, BLIP-2
(OPT and Flan-T5, Q-Former without instruction) and InstructBLIP-Video (LLaMA and Flan-T5). Logits and loss to 1e-5,
greedy and beam tokens identical, checkpoints both ways, the presets' sizes on the meta device."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hf_oracle import IMAGE_TOKEN, NUM_QUERY_TOKENS, hf_family_model, randomize
from safetensors.torch import load_file, save_file

from instructblip import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Model,
    InstructBlipForConditionalGeneration,
    InstructBlipVideoConfig,
    InstructBlipVideoForConditionalGeneration,
    build_labels,
)
from instructblip.generation import Decoding, GenerationConfig, prepare_prompt
from instructblip.generation.config import settle
from instructblip.generation.decode import penalty_prefix, prefill_chunks
from instructblip.models.config import OPTConfig
from instructblip.models.opt import OPT
from instructblip.weights.checkpoint import _opt_map, hf_state_dict

ATOL = 1e-5
EOS = {"opt": 2, "llama": 2, "t5": 1}
PAD = 0
CASES = [("blip2", "opt"), ("blip2", "t5"), ("video", "llama"), ("video", "t5")]
FRAMES = 4


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory):
    """{(kind, family): (transformers model, its directory)}, saved by transformers."""
    out = {}
    for kind, family in CASES:
        theirs = hf_family_model(kind, family)
        directory = tmp_path_factory.mktemp(f"{kind}-{family}")
        theirs.save_pretrained(directory)
        out[kind, family] = (theirs, directory)
    return out


def ours_for(kind: str, directory, **kwargs):
    cls = Blip2ForConditionalGeneration if kind == "blip2" else InstructBlipVideoForConditionalGeneration
    return cls.from_pretrained(directory, **kwargs)


def make_inputs(kind: str, family: str, seed: int = 1, lengths=(7, 4, 6), image_tokens: bool = True) -> dict:
    """Prompts of different lengths (left-padded for decoder-only models, right-padded for T5) after the image (or
    video: FRAMES x Q) tokens; instructions for the video model's Q-Former."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lengths):
        span = slice(0, n) if family == "t5" else slice(L - n, L)
        ids[b, span] = torch.randint(3, 90, (n,), generator=g)
        mask[b, span] = 1
    frames = FRAMES if kind == "video" else 1
    if image_tokens:
        Q = NUM_QUERY_TOKENS * frames
        ids = torch.cat([torch.full((B, Q), IMAGE_TOKEN), ids], 1)
        mask = torch.cat([torch.ones(B, Q, dtype=torch.long), mask], 1)
    shape = (B, frames, 3, 30, 30) if kind == "video" else (B, 3, 30, 30)
    inputs = dict(pixel_values=torch.randn(*shape, generator=g), input_ids=ids, attention_mask=mask)
    if kind == "video":
        qmask = torch.ones(B, 6, dtype=torch.long)
        qmask[1, 3:] = 0
        inputs |= dict(qformer_input_ids=torch.randint(1, 64, (B, 6), generator=g), qformer_attention_mask=qmask)
    return inputs


def hf_new_tokens(theirs, family: str, inputs: dict, **kwargs) -> torch.Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = theirs.generate(**inputs, use_cache=family != "t5", **kwargs)
    return out[:, 1:] if family == "t5" else out[:, inputs["input_ids"].shape[1]:]


def assert_same_tokens(ours: torch.Tensor, theirs: torch.Tensor, eos: int) -> None:
    """Equal up to each row's first eos; after it ours holds pad (transformers' beam search may write eos there)."""
    assert ours.shape == theirs.shape, (ours.tolist(), theirs.tolist())
    for o, t in zip(ours.tolist(), theirs.tolist(), strict=True):
        end = o.index(eos) + 1 if eos in o else len(o)
        assert o[:end] == t[:end], (ours.tolist(), theirs.tolist())
        assert all(tok == PAD for tok in o[end:]), o


# ---------------------------------------------------------------------------------------------------------------------
# the OPT decoder alone, against transformers' OPTForCausalLM


def _opt_pair(pre_norm: bool, seed: int = 0):
    """transformers' OPTForCausalLM (embeddings narrower than the blocks: project_in / project_out) and ours with
    the same weights, copied through the loader's key map."""
    import transformers

    kwargs = dict(vocab_size=99, hidden_size=32, word_embed_proj_dim=16, ffn_dim=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, do_layer_norm_before=pre_norm, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    theirs = randomize(transformers.OPTForCausalLM(transformers.OPTConfig(**kwargs)), seed).eval()
    ours = OPT(OPTConfig(**kwargs)).eval()
    state = theirs.state_dict()
    mine = {}
    for entry in _opt_map(ours.config, causal_lm=True, lm_head=False):  # keys under `language_model.` there
        parts = [state[p.removeprefix("language_model.")] for p in entry.parts]
        mine[entry.ours.removeprefix("language_model.")] = torch.cat(parts) if len(parts) > 1 else parts[0]
    ours.load_state_dict(mine, strict=True)
    return theirs, ours


@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre-LN", "post-LN (OPT-350M)"])
def test_opt_decoder_matches_transformers(pre_norm):
    """Logits of a left-padded batch, and the KV-cached path (a prefill in chunks, then one token per step) equal to
    transformers' forward over the whole sequence."""
    theirs, ours = _opt_pair(pre_norm)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 99, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        t = theirs(input_ids=ids, attention_mask=mask).logits
        o = ours.logits(ours(ours.embed_tokens(ids), mask))
        assert o.std() > 0.1
        torch.testing.assert_close(o[mask.bool()], t[mask.bool()], atol=ATOL, rtol=0)
        # the decoder interface: the prompt's first 6 positions, then 3 steps of one token
        steps = list(ours.prefill_chunks(ours.embed_tokens(ids[:, :6]), mask[:, :6], 3, chunk=4))
        assert steps[0] is None
        state, logits = steps[-1]
        got = [logits]
        for j in range(6, 8):
            got.append(ours.step(state, ids[:, j]))
    for k, logits in enumerate(got):
        torch.testing.assert_close(logits, t[:, 5 + k], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# BLIP-2 and InstructBLIP-Video against transformers


@pytest.mark.parametrize("kind,family", CASES)
def test_logits_and_loss_match(family_checkpoints, kind, family):
    theirs, directory = family_checkpoints[kind, family]
    ours = ours_for(kind, directory)
    assert ours.config.reads_instruction == (kind == "video")
    inputs = make_inputs(kind, family)
    if family == "t5":
        labels = torch.randint(3, 90, (3, 5), generator=torch.Generator().manual_seed(3))
        labels[0, -2:] = -100
    else:
        labels = build_labels(inputs["input_ids"], inputs["attention_mask"], prompt_lengths=torch.tensor([2, 1, 3]),
                              image_token_id=IMAGE_TOKEN)
    with torch.no_grad():
        t = theirs(**inputs, labels=labels)
        o = ours(**inputs, labels=labels)
    valid = inputs["attention_mask"].bool() if family != "t5" else torch.ones(o.logits.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(o.logits[valid], t.logits[valid], atol=ATOL, rtol=0)
    torch.testing.assert_close(o.loss, t.loss, atol=ATOL, rtol=0)
    assert o.logits.std() > 0.1
    if kind == "blip2" and family == "opt":
        # labels of the last positions only: transformers' BLIP-2 cuts the logits to them (its loss then fails on
        # the non-contiguous slice, so the same computation is written out here on its logits)
        short = labels[:, -4:].clone()  # (the shortest prompt's 4 positions: none is padding)
        short[:, 1] = 17
        cut = t.logits[:, -4:-1].reshape(-1, t.logits.shape[-1])
        expected = torch.nn.functional.cross_entropy(cut, short[:, 1:].reshape(-1), ignore_index=-100)
        with torch.no_grad():
            torch.testing.assert_close(ours(**inputs, labels=short).loss, expected, atol=ATOL, rtol=0)
    if kind == "video":  # (B, T * Q, D): each frame's query outputs, in frame order
        with torch.no_grad():
            feats = ours.get_video_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                            inputs["qformer_attention_mask"]).pooler_output
            frame = ours.get_image_features(inputs["pixel_values"][:, 2], inputs["qformer_input_ids"],
                                            inputs["qformer_attention_mask"]).pooler_output
            theirs_feats = theirs.get_video_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                                     inputs["qformer_attention_mask"]).pooler_output
        assert feats.shape == (3, FRAMES * NUM_QUERY_TOKENS, 32)
        torch.testing.assert_close(feats[:, 2 * NUM_QUERY_TOKENS:3 * NUM_QUERY_TOKENS], frame, atol=ATOL, rtol=0)
        torch.testing.assert_close(feats, theirs_feats, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind,family", CASES)
def test_greedy_and_beam_tokens_match(family_checkpoints, kind, family):
    theirs, directory = family_checkpoints[kind, family]
    ours = ours_for(kind, directory)
    inputs = make_inputs(kind, family)
    eos = EOS[family]
    for kwargs in (dict(max_new_tokens=10),
                   dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, length_penalty=0.5),
                   dict(max_new_tokens=8, num_beams=4, repetition_penalty=1.5, early_stopping=True)):
        # transformers 5.x penalises a decoder-only model's prompt ids too: our penalty_scope "all"
        scope = {"penalty_scope": "all"} if family != "t5" and "repetition_penalty" in kwargs else {}
        new = ours.generate(**inputs, **kwargs, **scope)
        assert_same_tokens(new, hf_new_tokens(theirs, family, inputs, **kwargs), eos)
    # captioning without a prompt: the image (video) tokens and bos
    if kind == "blip2" and family == "opt":
        pixels = {"pixel_values": inputs["pixel_values"]}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            t = theirs.generate(**pixels, max_new_tokens=6)[:, NUM_QUERY_TOKENS + 1:]
        assert_same_tokens(ours.generate(**pixels, max_new_tokens=6), t, eos)


def test_blip2_legacy_scheme_prepends_and_generates_the_same(family_checkpoints, tmp_path):
    """A config without image_token_index (2023's): the features are prepended; the same logits and tokens as
    transformers with the image tokens in the prompt."""
    import shutil

    theirs, directory = family_checkpoints["blip2", "opt"]
    legacy = tmp_path / "legacy"
    shutil.copytree(directory, legacy)
    config = json.loads((legacy / "config.json").read_text())
    config["image_token_index"] = None
    (legacy / "config.json").write_text(json.dumps(config))
    ours = Blip2ForConditionalGeneration.from_pretrained(legacy)
    with_tokens = make_inputs("blip2", "opt")
    without = make_inputs("blip2", "opt", image_tokens=False)
    with torch.no_grad():
        t, o = theirs(**with_tokens).logits, ours(**without).logits
    valid = with_tokens["attention_mask"].bool()
    torch.testing.assert_close(o[valid], t[valid], atol=ATOL, rtol=0)
    assert_same_tokens(ours.generate(**without, max_new_tokens=8),
                       hf_new_tokens(theirs, "opt", with_tokens, max_new_tokens=8), EOS["opt"])


def test_blip2_base_model_and_features(family_checkpoints, tmp_path):
    """Blip2Model keeps the LM head, as transformers': the same logits; its Q-Former and text features too."""
    import transformers

    _, directory = family_checkpoints["blip2", "opt"]
    theirs = transformers.Blip2Model.from_pretrained(directory).eval()
    ours = Blip2Model.from_pretrained(directory)
    inputs = make_inputs("blip2", "opt")
    with torch.no_grad():
        t, o = theirs(**inputs), ours(**inputs)
        valid = inputs["attention_mask"].bool()
        torch.testing.assert_close(o.logits[valid], t.logits[valid], atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.get_qformer_features(inputs["pixel_values"]),
                                   theirs.get_qformer_features(inputs["pixel_values"]), atol=ATOL, rtol=0)
        ids, mask = inputs["input_ids"][:, NUM_QUERY_TOKENS:], inputs["attention_mask"][:, NUM_QUERY_TOKENS:]
        t_text = theirs.get_text_features(ids, mask).last_hidden_state
        o_text = ours.get_text_features(ids, mask).last_hidden_state
        torch.testing.assert_close(o_text[mask.bool()], t_text[mask.bool()], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind,family", [("blip2", "opt"), ("blip2", "t5"), ("video", "llama")])
def test_we_save_transformers_loads(family_checkpoints, kind, family, tmp_path):
    """Our save_pretrained: transformers loads it with no missing or unexpected key and computes the same logits;
    the config round trip loses nothing."""
    import transformers

    theirs, directory = family_checkpoints[kind, family]
    ours = ours_for(kind, directory, optimize=False)
    ours.save_pretrained(tmp_path)
    cls = transformers.Blip2ForConditionalGeneration if kind == "blip2" else \
        transformers.InstructBlipVideoForConditionalGeneration
    reloaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = make_inputs(kind, family)
    if family == "t5":
        inputs["decoder_input_ids"] = torch.randint(0, 90, (3, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = reloaded.eval()(**inputs).logits, theirs(**inputs).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    saved = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((directory / "config.json").read_text())
    for key in ("transformers_version", "dtype"):
        saved.pop(key, None), original.pop(key, None)
    if family == "t5":  # Flan-T5's own head: written untied (transformers 5.x writes true and keeps the head anyway)
        assert saved["text_config"].pop("tie_word_embeddings") is False
        original["text_config"].pop("tie_word_embeddings")
    assert saved == original


def test_blip2_hub_files_with_unused_keys_load(family_checkpoints, tmp_path):
    """BLIP-2 hub files written before `use_qformer_text_input` hold the Q-Former's text feed-forward networks, and
    some hold OPT's head beside the embeddings it is tied to: both load (and are not used); other extra keys fail."""
    from instructblip import CheckpointError

    theirs, directory = family_checkpoints["blip2", "opt"]
    state = load_file(directory / "model.safetensors")
    state["language_model.lm_head.weight"] = state["language_model.model.decoder.embed_tokens.weight"].clone()
    for p, shape in (("intermediate.dense.weight", (37, 32)), ("output.dense.weight", (32, 37)),
                     ("output.LayerNorm.bias", (32,))):
        state[f"qformer.encoder.layer.1.{p}"] = torch.randn(shape)
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_text((directory / name).read_text())
    save_file(state, tmp_path / "model.safetensors")
    ours = Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    inputs = make_inputs("blip2", "opt")
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits[valid], theirs(**inputs).logits[valid], atol=ATOL, rtol=0)
    state["qformer.encoder.layer.1.something_else.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="something_else"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path)


def test_video_class_reads_instructblip_checkpoints(hf_checkpoints):
    """InstructBLIP-Video runs the InstructBLIP checkpoints (as transformers' docs load them): same weights, and a
    one-frame video is the image."""
    theirs, directory = hf_checkpoints["llama"]
    video = InstructBlipVideoForConditionalGeneration.from_pretrained(directory)
    image = InstructBlipForConditionalGeneration.from_pretrained(directory)
    assert isinstance(video.config, InstructBlipVideoConfig) and video.config.video_token_index == IMAGE_TOKEN
    inputs = make_inputs("video", "llama", lengths=(5, 3))
    one_frame = {**inputs, "pixel_values": inputs["pixel_values"][:, :1],
                 "input_ids": inputs["input_ids"][:, 3 * NUM_QUERY_TOKENS:],
                 "attention_mask": inputs["attention_mask"][:, 3 * NUM_QUERY_TOKENS:]}
    with torch.no_grad():
        a = video(**one_frame).logits
        b = image(**{**one_frame, "pixel_values": one_frame["pixel_values"][:, 0]}).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert video.generate(**inputs, max_new_tokens=5).shape == (2, 5)


# ---------------------------------------------------------------------------------------------------------------------
# continuous batching and quantization on OPT


def test_opt_rows_joining_a_running_batch_decode_as_alone(family_checkpoints):
    """`Decoding.admit` on OPT (its state extends and compacts as LLaMA's): a run that joins after 3 steps, its
    prompt prefilled in chunks, gets the tokens it gets alone; rows leave as they finish."""
    _, directory = family_checkpoints["blip2", "opt"]
    ours = Blip2ForConditionalGeneration.from_pretrained(directory, dtype=torch.float64)
    inputs = make_inputs("blip2", "opt", lengths=(7, 3))
    inputs["pixel_values"] = inputs["pixel_values"].double()
    configs = [GenerationConfig(max_new_tokens=9, repetition_penalty=1.3),
               GenerationConfig(max_new_tokens=12, min_new_tokens=10, no_repeat_ngram_size=2)]

    def start(b: int, chunk: int | None = None) -> Decoding:
        one = {k: v[b:b + 1] for k, v in inputs.items()}
        prompt = prepare_prompt(ours, **one)
        settings = [settle(configs[b], ours.config, prompt.attention_mask.shape[1], "cpu")]
        prefix, ignore = penalty_prefix(ours, prompt, "generated")
        prefilled = None
        if chunk is not None:
            chunks = list(prefill_chunks(ours.language_model, prompt, 12, [1], prefix, ignore, chunk))
            assert chunks[0] is None
            prefilled = chunks[-1]
        return Decoding(ours, prompt, settings, [1], prefix, ignore, prefilled=prefilled)

    with torch.inference_mode():
        alone = [[int(t) for t in start(b)] for b in range(2)]
        run, got = start(0), [[], []]
        for step in range(20):
            if step == 3:
                run.admit(start(1, chunk=3))
            if run.done():
                break
            tokens = next(run).tolist()
            owners = [0, 1][:run.rows] if step >= 3 else [0]
            for r, owner in enumerate(owners):
                got[owner].append(tokens[r])
    for b in range(2):
        assert got[b][:len(alone[b])] == alone[b]


def test_opt_int8_and_cpu_routes(family_checkpoints):
    """The language model quantized while loading (int8) and the float32 CPU routes (`accel.optimize`) on OPT:
    the routes give the plain model's tokens; int8 stays close to its logits."""
    from instructblip.accel.quantize import Int8Linear, available

    _, directory = family_checkpoints["blip2", "opt"]
    plain = Blip2ForConditionalGeneration.from_pretrained(directory, optimize=False)
    fast = Blip2ForConditionalGeneration.from_pretrained(directory)
    inputs = make_inputs("blip2", "opt")
    assert torch.equal(fast.generate(**inputs, max_new_tokens=6), plain.generate(**inputs, max_new_tokens=6))
    if not available("int8"):
        pytest.skip("this torch lacks the int8 CPU kernels")
    q = Blip2ForConditionalGeneration.from_pretrained(directory, quantize="int8", dtype=torch.float32)
    layers = [m for m in q.language_model.modules() if isinstance(m, Int8Linear)]
    assert q.quantized == "int8" and len(layers) == 2 * 4 + 1  # qkv, out_proj, fc1, fc2 per layer, and the head
    with torch.no_grad():
        a, b = q(**inputs).logits, plain(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert (a[valid] - b[valid]).abs().max() < 0.1 * b[valid].abs().max()


# ---------------------------------------------------------------------------------------------------------------------
# presets


@pytest.mark.parametrize("name", ["Salesforce/blip2-opt-2.7b", "Salesforce/blip2-opt-6.7b",
                                  "Salesforce/blip2-flan-t5-xl", "Salesforce/blip2-flan-t5-xxl",
                                  "Salesforce/blip2-opt-2.7b-coco", "Salesforce/blip2-flan-t5-xl-coco"])
def test_blip2_presets_match_transformers_on_meta(name):
    """Parameter counts and every key and shape, ours against transformers' model of the same config."""
    import transformers

    config = Blip2Config.from_name(name)
    with torch.device("meta"):
        ours = Blip2ForConditionalGeneration(config)
        theirs = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config.from_dict(config.to_dict()))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    lm = theirs.language_model
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    untied_here = tied and ours.language_model.lm_head is not None  # Flan-T5: transformers 5.x ties its T5 head
    assert count(ours) == count(theirs) + (lm.get_output_embeddings().weight.numel() if untied_here else 0)
    ours_keys = {k: tuple(v.shape) for k, v in hf_state_dict(ours).items()}
    aliases = {"language_model.encoder.embed_tokens.weight", "language_model.decoder.embed_tokens.weight",
               "language_model.lm_head.weight"}  # T5's embedding aliases, OPT's tied head
    theirs_keys = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    theirs_keys = {k: v for k, v in theirs_keys.items() if k not in aliases or k in ours_keys}
    assert ours_keys == theirs_keys
    expected = {"Salesforce/blip2-opt-2.7b": 3_744_761_856, "Salesforce/blip2-flan-t5-xl": 3_942_446_592}
    if name in expected:  # vision 986.0 M + Q-Former 105.1 M + queries + projection + the LLM
        assert count(ours) == expected[name]


# ---------------------------------------------------------------------------------------------------------------------
# LAVIS conversion of a BLIP-2 checkpoint


def _lavis_blip2_opt(theirs) -> tuple[dict, dict]:
    """A `blip2_opt`-style LAVIS state dict (Q-Former without word embeddings, `opt_proj`, EVA under
    `visual_encoder.` with one block more than kept) and an OPT directory's tensors (facebook/opt's `decoder.*`
    keys), renamed by hand from transformers' model, independently of the converter."""
    state = theirs.state_dict()
    lavis, llm = {}, {}
    D = theirs.config.vision_config.hidden_size
    renames = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.projection": "attn.proj",
               "self_attn.qkv": "attn.qkv", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for key, t in state.items():
        if key.startswith("vision_model.encoder.layers."):
            i, rest = key.removeprefix("vision_model.encoder.layers.").split(".", 1)
            name, p = rest.rsplit(".", 1)
            if rest == "self_attn.qkv.bias":
                lavis[f"visual_encoder.blocks.{i}.attn.q_bias"] = t[:D]
                lavis[f"visual_encoder.blocks.{i}.attn.v_bias"] = t[2 * D:]
            else:
                lavis[f"visual_encoder.blocks.{i}.{renames[name]}.{p}"] = t
        elif key.startswith("vision_model.embeddings."):
            name = key.removeprefix("vision_model.embeddings.")
            new = {"class_embedding": "cls_token", "position_embedding": "pos_embed"}.get(name)
            lavis["visual_encoder." + (new or name.replace("patch_embedding", "patch_embed.proj"))] = t
        elif key.startswith("vision_model.post_layernorm."):
            lavis["ln_vision." + key.rsplit(".", 1)[1]] = t
        elif key.startswith("qformer.layernorm."):
            lavis["Qformer.bert.embeddings.LayerNorm." + key.rsplit(".", 1)[1]] = t
        elif key.startswith("qformer."):
            lavis["Qformer.bert." + key.removeprefix("qformer.").replace("attention.attention", "attention.self")
                  .replace("crossattention.attention", "crossattention.self")] = t
        elif key.startswith("language_projection."):
            lavis["opt_proj." + key.rsplit(".", 1)[1]] = t
        elif key == "query_tokens":
            lavis[key] = t
        elif key.startswith("language_model.model."):
            llm[key.removeprefix("language_model.model.")] = t
    for p, shape in (("norm1.weight", (D,)), ("mlp.fc1.weight", (37, D))):  # EVA's last block, not kept
        lavis[f"visual_encoder.blocks.2.{p}"] = torch.randn(shape)
    lavis["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.randn(37, 32)  # a text FFN: dropped
    return lavis, llm


def test_lavis_blip2_opt_conversion(family_checkpoints, tmp_path):
    import transformers
    from tiny_checkpoint import make_opt_tokenizer_dir

    from instructblip.weights.lavis import convert_lavis

    theirs, _ = family_checkpoints["blip2", "opt"]
    lavis, llm = _lavis_blip2_opt(theirs)
    torch.save(lavis, tmp_path / "blip2_opt.pth")
    llm_dir = make_opt_tokenizer_dir(tmp_path / "opt")
    save_file({k: v.contiguous() for k, v in llm.items()}, llm_dir / "model.safetensors")
    (llm_dir / "config.json").write_text(json.dumps(theirs.config.text_config.to_dict()))
    report = convert_lavis(tmp_path / "blip2_opt.pth", None, llm_dir, tmp_path / "out", image_size=30,
                           vision_layers=2, vision_heads=4, qformer_heads=4)
    assert any("text feed-forward" in why for why in report.dropped.values())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "blip-2" and config["image_token_index"] is None
    from tokenizers import Tokenizer as Backend

    assert config["text_config"]["eos_token_id"] == Backend.from_file(str(llm_dir / "tokenizer.json")).encode(
        "\n", add_special_tokens=False).ids[-1]
    _, info = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out")  # the legacy scheme: features prepended
    with_tokens, without = make_inputs("blip2", "opt"), make_inputs("blip2", "opt", image_tokens=False)
    with torch.no_grad():
        t, o = theirs(**with_tokens).logits, ours(**without).logits
    valid = with_tokens["attention_mask"].bool()
    torch.testing.assert_close(o[valid], t[valid], atol=ATOL, rtol=0)


def test_opt_rank_matches_transformers_log_likelihoods(family_checkpoints):
    """Vocabulary ranking on BLIP-2 OPT: each candidate's score is the sum of its tokens' log-probabilities under
    transformers' model, fed the prompt and the candidate."""
    theirs, directory = family_checkpoints["blip2", "opt"]
    ours = Blip2ForConditionalGeneration.from_pretrained(directory)
    inputs = make_inputs("blip2", "opt", lengths=(5, 3))
    candidates = [[11, 12], [40], [7, 8, 9]]
    out = ours.rank(inputs, candidates)
    for b in range(2):
        for c, cand in enumerate(candidates):
            ids = torch.cat([inputs["input_ids"][b:b + 1], torch.tensor([cand])], 1)
            mask = torch.cat([inputs["attention_mask"][b:b + 1], torch.ones(1, len(cand), dtype=torch.long)], 1)
            with torch.no_grad():
                logp = theirs(pixel_values=inputs["pixel_values"][b:b + 1], input_ids=ids,
                              attention_mask=mask).logits.log_softmax(-1)[0]
            L = inputs["input_ids"].shape[1]
            expected = sum(float(logp[L - 1 + i, t]) for i, t in enumerate(cand))
            assert abs(float(out.scores[b, c]) - expected) < 1e-4, (b, c)
