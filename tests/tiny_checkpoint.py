"""A complete tiny InstructBLIP checkpoint directory (weights + processor files), written by transformers: real
Flan-T5 / LLaMA-style tokenizers and the real bert-base-uncased Q-Former vocabulary, random tiny weights."""

from __future__ import annotations

from pathlib import Path

import torch
from assets import make_checkpoint_dir
from hf_oracle import QFORMER, VISION, randomize

NUM_QUERY_TOKENS = 4


def make_full_checkpoint(directory: Path, family: str = "t5", seed: int = 0) -> Path:
    import transformers

    make_checkpoint_dir(directory, family, num_query_tokens=NUM_QUERY_TOKENS)
    if family == "t5":
        text = transformers.T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                     num_heads=4, feed_forward_proj="gated-gelu", dense_act_fn="gelu",
                                     tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0, bos_token_id=1)
        image_token = 32100
    else:  # Vicuna-style ids: the config says bos 0 / eos 1, the tokenizer uses </s> = 2
        text = transformers.LlamaConfig(vocab_size=32064, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=32000, tie_word_embeddings=False)
        image_token = 32001
    config = transformers.InstructBlipConfig(
        vision_config=transformers.InstructBlipVisionConfig(**{**VISION, "image_size": 224,
                                                                "patch_size": 32}).to_dict(),
        qformer_config=transformers.InstructBlipQFormerConfig(**{**QFORMER, "vocab_size": 30523,
                                                                  "max_position_embeddings": 512}).to_dict(),
        text_config=text.to_dict(), num_query_tokens=NUM_QUERY_TOKENS, image_token_index=image_token,
    )
    torch.manual_seed(seed)
    model = transformers.InstructBlipForConditionalGeneration(config)
    if family == "t5":
        lm = model.language_model
        lm.lm_head.weight = torch.nn.Parameter(torch.empty_like(lm.lm_head.weight))
    randomize(model, seed).save_pretrained(directory)
    return directory
