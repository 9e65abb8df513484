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


# ---------------------------------------------------------------------------------------------------------------------
# the family: BLIP-2 (OPT or Flan-T5) and InstructBLIP-Video checkpoints, complete with processor files

OPT_VOCAB = 400  # at most this many learned tokens in the tiny GPT-2-style vocabulary below; `<image>` follows them
OPT_CORPUS = ["What is unusual about this image?", "Describe the image in detail, please.", "a photo of a cat",
              "Question: what is happening in the video? Answer:", "A short image description:", "two cats on a couch",
              "the quick brown fox jumps over the lazy dog", "Which colour is the car? Short answer: red"] * 20


def make_opt_tokenizer_dir(directory: Path) -> Path:
    """An OPT-style tokenizer (GPT-2 byte-level BPE, `</s>` as bos and eos, `<pad>` = 1) learned on a small corpus:
    the layout of `Salesforce/blip2-opt-2.7b`'s tokenizer files, with `<image>` added."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=OPT_VOCAB, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(OPT_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", 2)])
    tok.add_tokens([AddedToken("<image>", normalized=False, special=True)])
    image = tok.token_to_id("<image>")
    tok.save(str(directory / "tokenizer.json"))
    added = {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, c in ((0, "<s>"), (1, "<pad>"), (2, "</s>"), (3, "<unk>"),
                                                    (image, "<image>"))}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_prefix_space": False, "added_tokens_decoder": added, "bos_token": "</s>",
        "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>", "tokenizer_class": "GPT2Tokenizer",
        "processor_class": "Blip2Processor", "model_max_length": 1000000000000000019884624838656,
        "clean_up_tokenization_spaces": False,
    }))
    return directory


def make_family_checkpoint(directory: Path, kind: str, family: str, seed: int = 0, image_size: int = 224,
                           patch_size: int = 32) -> Path:
    """A complete tiny checkpoint of `kind` "blip2" (family "opt" or "t5") or "video" ("t5" or "llama"): weights and
    config written by transformers, the processor files beside them."""
    import json
    import shutil

    import transformers
    from hf_oracle import OPT, T5

    num_query_tokens = NUM_QUERY_TOKENS
    if family == "opt":
        from tokenizers import Tokenizer

        make_opt_tokenizer_dir(directory)
        token = Tokenizer.from_file(str(directory / "tokenizer.json")).token_to_id("<image>")
        text = transformers.OPTConfig(**{**{k: v for k, v in OPT.items() if k != "model_type"}, "vocab_size": 448,
                                         "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1})
        (directory / "preprocessor_config.json").write_text(json.dumps({
            "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "BlipImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
            "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224}}))
        (directory / "processor_config.json").write_text(json.dumps({"num_query_tokens": num_query_tokens,
                                                                     "processor_class": "Blip2Processor"}))
    else:
        make_checkpoint_dir(directory, family, num_query_tokens=num_query_tokens)
        if family == "t5":
            text = transformers.T5Config(**{**{k: v for k, v in T5.items() if k != "model_type"},
                                            "vocab_size": 32128, "bos_token_id": 1})
        else:
            text = transformers.LlamaConfig(vocab_size=32064, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                            bos_token_id=0, eos_token_id=1, pad_token_id=32000,
                                            tie_word_embeddings=False)
        # the placeholder: `<image>` for BLIP-2, `<video>` for the video model (32101 in Flan-T5's, 32002 in Vicuna's)
        token = (32100 if family == "t5" else 32001) + (kind == "video")
    vision = transformers.Blip2VisionConfig(**{**VISION, "image_size": image_size, "patch_size": patch_size})
    qformer = {**QFORMER, "vocab_size": 30523, "max_position_embeddings": 512}
    if kind == "blip2":
        shutil.rmtree(directory / "qformer_tokenizer", ignore_errors=True)  # BLIP-2's Q-Former reads no text
        config = transformers.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer,
                                          text_config=text.to_dict(), num_query_tokens=num_query_tokens,
                                          image_token_index=token)
        cls = transformers.Blip2ForConditionalGeneration
    else:
        config = transformers.InstructBlipVideoConfig(vision_config=vision.to_dict(), qformer_config=qformer,
                                                      text_config=text.to_dict(), num_query_tokens=num_query_tokens,
                                                      video_token_index=token)
        cls = transformers.InstructBlipVideoForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config)
    if family == "t5":
        lm = model.language_model
        lm.lm_head.weight = torch.nn.Parameter(torch.empty_like(lm.lm_head.weight))
    randomize(model, seed).save_pretrained(directory)
    return directory
