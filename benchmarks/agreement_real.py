"""Next-token agreement of each quantized mode with the unquantized model, at the official shapes.

    python benchmarks/agreement_real.py [--presets flan-t5-xl vicuna-7b] [--prompts 6] [--tokens 16]

Uses the random-weight checkpoints of `bench_real.py` (built there, reused here). The reference is float32 where it
fits in memory (Flan-T5-XL) and bfloat16 otherwise (Vicuna-7B needs 32 GB in float32): it generates `--tokens` greedy
tokens for `--prompts` fixed (seeded) images and instructions. Each mode then reads the same image, instruction and
reference tokens in one forward pass (teacher forcing) and the share of positions where its most likely next token
is the reference's is reported (the reference's own choice along its tokens, against the mode's), with the relative
error of the mode's logits against the reference's. Every model loads in its own process, one at a time. Random
networks at these depths magnify rounding layer after layer (Flan-T5-XL's so much that bfloat16 against float32 is
already uncorrelated), so these numbers do not bound what trained checkpoints show (README: the shipped model's
answers per mode).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

CHILD = r"""
import json, sys, torch
from instructblip import InstructBlipForConditionalGeneration

path, mode, prompts, tokens, reference = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
kw = {"fp32": {"dtype": torch.float32}, "bf16": {"dtype": torch.bfloat16}, "int8": {"quantize": "int8"},
      "int4": {"quantize": "int4"}, "int8+vision-int8": {"quantize": "int8", "quantize_vision": "int8"},
      "int4+vision-int8": {"quantize": "int4", "quantize_vision": "int8"}}[mode]
model = InstructBlipForConditionalGeneration.from_pretrained(path, **kw)
config = model.config
t5 = config.text_config.is_encoder_decoder
g = torch.Generator().manual_seed(0)
image = [config.image_token_index] * config.num_query_tokens if config.image_token_index is not None else []
cases = []
for _ in range(prompts):
    words = torch.randint(300, 20000, (12,), generator=g).tolist()
    ids = image + (words + [1] if t5 else [1] + words)
    cases.append(dict(pixel_values=torch.randn(1, 3, 224, 224, generator=g), input_ids=torch.tensor([ids]),
                      attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      qformer_input_ids=torch.tensor([[101] + torch.randint(2000, 20000, (8,), generator=g).tolist()
                                                      + [102]]),
                      qformer_attention_mask=torch.ones(1, 10, dtype=torch.long)))


def teacher_forced(x, new):  # the logits at the positions that predict each of `new`, given the tokens before it
    if t5:
        start = config.text_config.decoder_start_token_id
        return model(**x, decoder_input_ids=torch.tensor([[start] + new[:-1]])).logits[0].float()
    ids = torch.cat([x["input_ids"], torch.tensor([new[:-1]])], 1)
    return model(**dict(x, input_ids=ids, attention_mask=torch.ones_like(ids))).logits[0, -len(new):].float()


out = []
with torch.inference_mode():
    if reference.endswith("-"):  # this mode is the reference: generate, and keep the logits along its tokens
        saved = []
        for x in cases:
            new = model.generate(**x, max_new_tokens=tokens, min_new_tokens=tokens, num_beams=1,
                                 do_sample=False)[0].tolist()
            saved.append((new, teacher_forced(x, new)))
        torch.save(saved, reference[:-1])
    else:
        for x, (new, ref) in zip(cases, torch.load(reference)):
            logits = teacher_forced(x, new)
            same = sum(int(a == b) for a, b in zip(logits.argmax(-1).tolist(), ref.argmax(-1).tolist()))
            out.append([same, ((logits - ref).norm() / ref.norm()).item()])
print("RESULT " + json.dumps(out), flush=True)
"""


def run(path: str, mode: str, prompts: int, tokens: int, reference: str) -> list:
    proc = subprocess.run([sys.executable, "-c", CHILD, path, mode, str(prompts), str(tokens), reference],
                          capture_output=True, text=True, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["flan-t5-xl", "vicuna-7b"])
    parser.add_argument("--modes", nargs="+", default=["bf16", "int8", "int4", "int8+vision-int8",
                                                       "int4+vision-int8"])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--dir", default=os.path.expanduser("~/.cache/instructblip-bench"))
    args = parser.parse_args()
    print(f"torch {torch.__version__}; {args.prompts} prompts x {args.tokens} tokens, teacher-forced")
    for preset in args.presets:
        path = os.path.join(args.dir, preset)
        if not os.path.isfile(os.path.join(path, "config.json")):
            print(f"{preset}: no checkpoint in {path}; build it with benchmarks/bench_real.py first")
            continue
        reference = "fp32" if preset == "flan-t5-xl" else "bf16"
        ref_file = os.path.join(path, f"agreement-reference-{reference}.pt")
        run(path, reference, args.prompts, args.tokens, ref_file + "-")
        print(f"\n{preset}: reference {reference}")
        print("| mode | next token = reference's | logits' relative error (median, max) |\n|---|---|---|")
        for mode in args.modes:
            if mode == reference:
                continue
            rows = run(path, mode, args.prompts, args.tokens, ref_file)
            same, total = sum(r[0] for r in rows), args.prompts * args.tokens
            errors = sorted(r[1] for r in rows)
            print(f"| {mode} | {100 * same / total:.1f}% ({same} / {total}) | {errors[len(errors) // 2]:.3f}, "
                  f"{errors[-1]:.3f} |", flush=True)

if __name__ == "__main__":
    main()
