"""Tiny random transformers models (the test-only oracle) in both LLM families, every tensor re-randomised."""

from __future__ import annotations

import torch
from torch import nn

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
              patch_size=6)
QFORMER = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
               cross_attention_frequency=2, max_position_embeddings=40)
LLAMA = dict(model_type="llama", vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
             eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
T5 = dict(model_type="t5", vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
          num_heads=4, feed_forward_proj="gated-gelu", dense_act_fn="gelu", relative_attention_num_buckets=8,
          relative_attention_max_distance=20, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
          decoder_start_token_id=0)
NUM_QUERY_TOKENS = 4
IMAGE_TOKEN = 98


def hf_config(family: str, **overrides):
    import transformers

    text = dict(LLAMA if family == "llama" else T5)
    text_cls = transformers.LlamaConfig if family == "llama" else transformers.T5Config
    kind = text.pop("model_type")
    assert kind in ("llama", "t5")
    config = transformers.InstructBlipConfig(
        vision_config=transformers.InstructBlipVisionConfig(**VISION).to_dict(),
        qformer_config=transformers.InstructBlipQFormerConfig(**QFORMER).to_dict(),
        text_config=text_cls(**text).to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=IMAGE_TOKEN,
        **overrides,
    )
    return config


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every tensor random values (transformers initialises the vision weights near zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            is_norm = ("norm" in name.lower() or "layernorm" in name.lower()) and name.endswith("weight")
            p.copy_(1.0 + noise if is_norm else noise)
    return model


def hf_model(family: str, seed: int = 0, cls_name: str = "InstructBlipForConditionalGeneration", **overrides):
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(hf_config(family, **overrides))
    lm = model.language_model
    if family == "t5" and hasattr(lm, "lm_head"):  # Flan-T5: an lm_head of its own (5.x ties it at init)
        lm.lm_head.weight = nn.Parameter(torch.empty_like(lm.lm_head.weight))
    return randomize(model, seed).eval()


WIDE_IMAGE_TOKEN = 299
WIDE_QUERIES = 4


def wide_model(family: str, directory, tie: bool = False):
    """A transformers model whose every projection has at least `ops.MIN_WEIGHT` elements (so the fast linear routes
    and int8 quantization are exercised), saved to `directory`."""
    import transformers

    vision = transformers.InstructBlipVisionConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=64, patch_size=16)  # 17 rows
    qformer = transformers.InstructBlipQFormerConfig(vocab_size=300, hidden_size=256, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=512,
                                                     cross_attention_frequency=1, encoder_hidden_size=256,
                                                     max_position_embeddings=64)
    if family == "llama":
        text = transformers.LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie)
    else:
        text = transformers.T5Config(vocab_size=300, d_model=256, d_kv=64, d_ff=512, num_layers=2,
                                     num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                                     dense_act_fn="gelu", tie_word_embeddings=tie, pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0)
    config = transformers.InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                             text_config=text.to_dict(), num_query_tokens=WIDE_QUERIES,
                                             image_token_index=WIDE_IMAGE_TOKEN)
    torch.manual_seed(0)
    theirs = transformers.InstructBlipForConditionalGeneration(config)
    if family == "t5" and not tie:
        head = theirs.language_model.lm_head
        head.weight = torch.nn.Parameter(torch.empty_like(head.weight))
    theirs = randomize(theirs).eval()
    with torch.no_grad():  # randomize's 0.2 spread is for width 32; keep the wide model's activations in range
        for name, p in theirs.named_parameters():
            if p.dim() == 2 and p.shape[1] > 32 and not any(k in name for k in ("embed", "shared", "query_tokens")):
                p.mul_(32 / p.shape[1])
    theirs.save_pretrained(directory)
    return theirs


def wide_inputs() -> dict:
    g = torch.Generator().manual_seed(3)
    B, L = 3, 6
    ids = torch.randint(3, WIDE_IMAGE_TOKEN, (B, L), generator=g)
    ids = torch.cat([torch.full((B, WIDE_QUERIES), WIDE_IMAGE_TOKEN), ids], 1)
    return dict(pixel_values=torch.randn(B, 3, 64, 64, generator=g),
                qformer_input_ids=torch.randint(1, 300, (B, 6), generator=g),
                qformer_attention_mask=torch.ones(B, 6, dtype=torch.long),
                input_ids=ids, attention_mask=torch.ones_like(ids))


# ---------------------------------------------------------------------------------------------------------------------
# the family: BLIP-2 (OPT or Flan-T5, Q-Former without instruction) and InstructBLIP-Video, same tiny sizes

OPT = dict(model_type="opt", vocab_size=99, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
           max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)


def hf_family_config(kind: str, family: str, **overrides):
    """transformers' config of a tiny `kind` ("blip2" or "video") model with a `family` ("opt", "t5", "llama") LLM."""
    import transformers

    text = dict({"opt": OPT, "t5": T5, "llama": LLAMA}[family])
    text_cls = {"opt": transformers.OPTConfig, "t5": transformers.T5Config, "llama": transformers.LlamaConfig}[family]
    text.pop("model_type")
    text = text_cls(**text).to_dict()
    if kind == "blip2":
        return transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=text,
                                        num_query_tokens=NUM_QUERY_TOKENS,
                                        **{"image_token_index": IMAGE_TOKEN, **overrides})
    return transformers.InstructBlipVideoConfig(vision_config=VISION, qformer_config=QFORMER, text_config=text,
                                                num_query_tokens=NUM_QUERY_TOKENS,
                                                **{"video_token_index": IMAGE_TOKEN, **overrides})


def hf_family_model(kind: str, family: str, seed: int = 0, cls_name: str | None = None, **overrides):
    """A tiny random transformers BLIP-2 / InstructBLIP-Video model, every tensor re-randomised."""
    import transformers

    torch.manual_seed(seed)
    default = "Blip2ForConditionalGeneration" if kind == "blip2" else "InstructBlipVideoForConditionalGeneration"
    model = getattr(transformers, cls_name or default)(hf_family_config(kind, family, **overrides))
    lm = model.language_model
    if family == "t5" and hasattr(lm, "lm_head"):  # Flan-T5: an lm_head of its own
        lm.lm_head.weight = nn.Parameter(torch.empty_like(lm.lm_head.weight))
    return randomize(model, seed).eval()
