"""Our model against transformers 5.x on tiny random models of both families: every intermediate and the loss to
1e-5 in fp32, with batch > 1 and padded instructions, in both image-token schemes."""

import json
import shutil

import pytest
import torch
from hf_oracle import IMAGE_TOKEN, NUM_QUERY_TOKENS, hf_model

from instructblip import InstructBlipForConditionalGeneration, InstructBlipModel, build_labels

ATOL = 1e-5


def make_inputs(family: str, seed: int = 1, image_tokens: bool = True):
    g = torch.Generator().manual_seed(seed)
    B, T, L = 3, 6, 7
    qformer_ids = torch.randint(1, 64, (B, T), generator=g)
    qformer_mask = torch.ones(B, T, dtype=torch.long)
    qformer_mask[1, 4:] = 0  # padded instructions
    qformer_mask[2, 2:] = 0
    ids = torch.randint(3, 90, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if family == "llama":
        mask[1, :2] = 0  # left padding
    else:
        mask[1, -3:] = 0  # right padding
    ids = ids.masked_fill(mask == 0, 0)
    if image_tokens:
        ids = torch.cat([torch.full((B, NUM_QUERY_TOKENS), IMAGE_TOKEN), ids], 1)
        mask = torch.cat([torch.ones(B, NUM_QUERY_TOKENS, dtype=torch.long), mask], 1)
    pixel_values = torch.randn(B, 3, 30, 30, generator=g)
    inputs = dict(pixel_values=pixel_values, qformer_input_ids=qformer_ids, qformer_attention_mask=qformer_mask,
                  input_ids=ids, attention_mask=mask)
    if family == "t5":
        inputs["decoder_input_ids"] = torch.randint(0, 90, (B, 5), generator=g)
    return inputs


def hf_forward(model, inputs, labels=None):
    with torch.no_grad():
        return model(**inputs, labels=labels)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_intermediates_logits_and_loss_match(hf_checkpoints, family):
    theirs, directory = hf_checkpoints[family]
    ours = InstructBlipForConditionalGeneration.from_pretrained(directory)
    inputs = make_inputs(family)
    with torch.no_grad():
        # vision and Q-Former hidden states, image features
        t_feats = theirs.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                            inputs["qformer_attention_mask"], output_hidden_states=True)
        o_feats = ours.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                          inputs["qformer_attention_mask"], output_hidden_states=True)
    tv, ov = t_feats.vision_outputs, o_feats.vision_outputs
    torch.testing.assert_close(ov.last_hidden_state, tv.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(ov.pooler_output, tv.pooler_output, atol=ATOL, rtol=0)
    assert len(ov.hidden_states) == len(tv.hidden_states) == 3
    for a, b in zip(ov.hidden_states, tv.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    tq, oq = t_feats.qformer_outputs, o_feats.qformer_outputs
    valid = torch.cat([torch.ones(3, NUM_QUERY_TOKENS), inputs["qformer_attention_mask"]], 1).bool()
    for a, b in zip(oq.hidden_states, tq.hidden_states, strict=True):
        torch.testing.assert_close(a[valid], b[valid], atol=ATOL, rtol=0)
    torch.testing.assert_close(o_feats.pooler_output, t_feats.pooler_output, atol=ATOL, rtol=0)
    assert o_feats.pooler_output.abs().mean() > 0.05  # the comparison is not between near-zero tensors

    # logits and loss, with labels that mask image, prompt and pad positions
    if family == "llama":
        labels = build_labels(inputs["input_ids"], inputs["attention_mask"], prompt_lengths=torch.tensor([2, 1, 3]),
                              image_token_id=IMAGE_TOKEN)
    else:
        labels = inputs["decoder_input_ids"].clone()
        labels[0, -2:] = -100
    t_out = hf_forward(theirs, inputs, labels)
    o_out = hf_forward(ours, inputs, labels)
    valid = inputs["attention_mask"].bool() if family == "llama" else torch.ones(o_out.logits.shape[:2], dtype=bool)
    torch.testing.assert_close(o_out.logits[valid], t_out.logits[valid], atol=ATOL, rtol=0)
    torch.testing.assert_close(o_out.loss, t_out.loss, atol=ATOL, rtol=0)
    assert o_out.logits.std() > 0.1


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_legacy_prepend_scheme_matches_image_token_scheme(hf_checkpoints, family, tmp_path):
    """A 2023 config (image_token_index null): features prepended; equal to 5.x with the tokens in the prompt."""
    theirs, directory = hf_checkpoints[family]
    legacy = tmp_path / "legacy"
    shutil.copytree(directory, legacy)
    config = json.loads((legacy / "config.json").read_text())
    config["image_token_index"] = None
    (legacy / "config.json").write_text(json.dumps(config))
    ours = InstructBlipForConditionalGeneration.from_pretrained(legacy)
    assert ours.config.image_token_index is None
    with_tokens = make_inputs(family, image_tokens=True)
    without = make_inputs(family, image_tokens=False)
    t_out = hf_forward(theirs, with_tokens)
    o_out = hf_forward(ours, without)
    assert o_out.logits.shape == t_out.logits.shape
    valid = with_tokens["attention_mask"].bool()
    if family == "t5":
        valid = torch.ones(o_out.logits.shape[:2], dtype=bool)
    torch.testing.assert_close(o_out.logits[valid], t_out.logits[valid], atol=ATOL, rtol=0)
    if family == "llama":  # text-length labels (transformers 4.x style) are accepted in the legacy scheme
        # the first real token is predicted from a pad position (garbage in both): keep it out of the loss
        labels = build_labels(without["input_ids"], without["attention_mask"], prompt_lengths=torch.ones(3))
        full = torch.cat([torch.full((3, NUM_QUERY_TOKENS), -100), labels], 1)
        t_loss = hf_forward(theirs, with_tokens, full).loss
        torch.testing.assert_close(hf_forward(ours, without, labels).loss, t_loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_base_model_matches(family, tmp_path):
    theirs = hf_model(family, cls_name="InstructBlipModel", seed=3)
    theirs.save_pretrained(tmp_path)
    ours = InstructBlipModel.from_pretrained(tmp_path)
    inputs = make_inputs(family)
    t = hf_forward(theirs, inputs)
    o = hf_forward(ours, inputs)
    t_hidden = t.language_model_outputs.last_hidden_state
    valid = inputs["attention_mask"].bool() if family == "llama" else torch.ones(t_hidden.shape[:2], dtype=bool)
    torch.testing.assert_close(o.last_hidden_state[valid], t_hidden[valid], atol=ATOL, rtol=0)


def test_interpolate_pos_encoding_matches(hf_checkpoints):
    theirs, directory = hf_checkpoints["t5"]
    ours = InstructBlipForConditionalGeneration.from_pretrained(directory)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        t = theirs.vision_model(pixels, interpolate_pos_encoding=True).last_hidden_state
        o = ours.vision_model(pixels, interpolate_pos_encoding=True).last_hidden_state
    assert o.shape == (2, 1 + 8 * 8, 32)
    torch.testing.assert_close(o, t, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        ours.vision_model(pixels)


def test_vision_chunks_on_cpu_match_transformers(hf_checkpoints, monkeypatch):
    """On CPU a batch runs through the vision blocks a few images at a time (vision.CPU_CHUNK_ROWS): the same last
    state and hidden states as transformers' whole-batch pass, and the same gradients as our whole-batch pass."""
    from instructblip.models import vision

    theirs, directory = hf_checkpoints["t5"]
    ours = InstructBlipForConditionalGeneration.from_pretrained(directory)
    size = ours.config.vision_config.image_size
    pixels = torch.randn(5, 3, size, size)
    tokens = ours.vision_model.position_embedding.shape[1]
    calls = []
    ours.vision_model.layers[0].register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    monkeypatch.setattr(vision, "CPU_CHUNK_ROWS", 2 * tokens)  # two images per pass
    with torch.no_grad():
        t = theirs.vision_model(pixels, output_hidden_states=True)
        o = ours.vision_model(pixels, output_hidden_states=True)
    assert calls == [2, 2, 1]
    torch.testing.assert_close(o.last_hidden_state, t.last_hidden_state, atol=ATOL, rtol=0)
    assert len(o.hidden_states) == len(t.hidden_states)
    for a, b in zip(o.hidden_states, t.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    grads = []
    for chunk_rows in (2 * tokens, 1 << 30):  # chunked and whole-batch gradients
        monkeypatch.setattr(vision, "CPU_CHUNK_ROWS", chunk_rows)
        ours.vision_model.zero_grad()
        x = pixels.clone().requires_grad_(True)
        ours.vision_model(x).last_hidden_state.square().sum().backward()
        grads.append([x.grad] + [p.grad for p in ours.vision_model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_gradients(hf_checkpoints):
    _, directory = hf_checkpoints["llama"]
    inputs = make_inputs("llama")
    labels = build_labels(inputs["input_ids"], inputs["attention_mask"], image_token_id=IMAGE_TOKEN)
    grads = []
    for checkpointing in (False, True):
        model = InstructBlipForConditionalGeneration.from_pretrained(directory).train()
        for m in model.modules():  # dropout off, so both runs are deterministic
            if hasattr(m, "dropout"):
                m.dropout = 0.0
            if hasattr(m, "attn_dropout"):
                m.attn_dropout = 0.0
        model.qformer.config.hidden_dropout_prob = 0.0
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**inputs, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_vision_cache_runs_the_encoder_once_per_image(hf_checkpoints):
    """The cache lives outside the model (generation.features): the model takes the cached vision outputs."""
    from instructblip.generation.features import VisionCache, image_features

    _, directory = hf_checkpoints["t5"]
    model = InstructBlipForConditionalGeneration.from_pretrained(directory)
    inputs = make_inputs("t5")
    with torch.no_grad():
        plain = model(**inputs).logits
    cache = VisionCache(max_images=8)
    calls = []
    model.vision_model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    rest = {k: v for k, v in inputs.items() if k not in ("pixel_values", "qformer_input_ids", "qformer_attention_mask")}
    with torch.no_grad():
        for _ in range(5):  # five "instructions" about the same three images
            features = image_features(model, inputs["pixel_values"], inputs["qformer_input_ids"],
                                      inputs["qformer_attention_mask"], cache=cache)
            torch.testing.assert_close(model(image_features=features, **rest).logits, plain, atol=0, rtol=0)
    assert calls == [3]  # the vision encoder ran once, on the three images
    assert (cache.hits, cache.misses) == (12, 3)
    cache = VisionCache(max_images=2)  # bounded: only the last two images are kept
    with torch.no_grad():
        image_features(model, inputs["pixel_values"], inputs["qformer_input_ids"], inputs["qformer_attention_mask"],
                       cache=cache)
    assert len(cache.entries) == 2
