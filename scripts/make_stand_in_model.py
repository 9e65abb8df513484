"""Write the stand-in default model to src/instructblip/default_model/: a tiny InstructBLIP with random weights.

It exists so that `instructblip ask` and `make demo` work out of the box before the trained easy-vqa model (issue 9)
replaces it. Its answers are random words: it shows the plumbing, not understanding.

    python scripts/make_stand_in_model.py
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

from instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration
from instructblip.pipeline import default_model_dir

WORDS = ("a an the is are this that what which who where how many color colour shape image picture photo cat dog "
         "circle square rectangle triangle red green blue yellow black white gray grey brown orange purple teal "
         "yes no there in on of with and or not does do contain see can you describe short description answer "
         "question small large big left right top bottom").split()


def llm_tokenizer(directory: str) -> int:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<image>": 3}
    for w in WORDS + list(".,?!:"):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>", "<image>"])
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
              "unk_token": "<unk>", "image_token": "<image>", "padding_side": "right", "truncation_side": "left",
              "model_max_length": 128}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return tok.get_vocab_size()


def qformer_tokenizer(directory: str) -> int:
    os.makedirs(directory, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS + list(".,?!:")), "[DEC]"]
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "bos_token": "[DEC]", "pad_token": "[PAD]",
              "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]",
              "truncation_side": "left", "model_max_length": 512}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return len(vocab)


def main() -> None:
    out = default_model_dir()
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    text_vocab = llm_tokenizer(out)
    q_vocab = qformer_tokenizer(os.path.join(out, "qformer_tokenizer"))
    config = InstructBlipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32),
        qformer_config=dict(vocab_size=q_vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=128),
        text_config=dict(model_type="t5", vocab_size=text_vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                         num_heads=4, feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False,
                         pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
        num_query_tokens=8, image_token_index=3,
    )
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name and name.endswith("weight")
            p.copy_(1 + 0.1 * torch.randn_like(p) if is_norm else 0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    for name, data in {"preprocessor_config.json": {"image_processor_type": "BlipImageProcessor",
                                                    "size": {"height": 224, "width": 224}, "resample": 3,
                                                    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
                                                    "do_resize": True, "rescale_factor": 1 / 255,
                                                    "image_mean": [0.48145466, 0.4578275, 0.40821073],
                                                    "image_std": [0.26862954, 0.26130258, 0.27577711]},
                       "processor_config.json": {"num_query_tokens": 8, "processor_class": "InstructBlipProcessor"},
                       "STAND_IN.md": None}.items():
        if data is None:
            with open(os.path.join(out, name), "w") as f:
                f.write("Random weights written by scripts/make_stand_in_model.py; answers are random words.\n")
            continue
        with open(os.path.join(out, name), "w") as f:
            json.dump(data, f, indent=2)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    print(f"wrote {out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
