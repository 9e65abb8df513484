"""Peak memory and time while loading a ~1 GB bf16 checkpoint: ours against transformers, same files.

    python benchmarks/load_memory.py [--size-gb 1.0] [--dir /tmp/ib-load-bench] [--reps 3]

Each load runs in a fresh process, `--reps` times per loader and dtype, the loaders alternating; the time is the
median, the memory the highest of the repetitions: the rise of the process's peak resident memory (VmHWM) over its
resident memory just before the load, right after loading and after every weight has been touched once (as a first
forward pass does: memory-mapped weights are only read then), divided by the size of the weights in memory.
Target: at most 1.3x the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time, torch
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if which == "ours":
    from instructblip import InstructBlipForConditionalGeneration as M
    kw = {"dtype": dtype}
else:
    import transformers
    from transformers import InstructBlipForConditionalGeneration as M
    transformers.logging.set_verbosity_error()
    kw = {"dtype": dtype}
base = rss("VmRSS")
t = time.perf_counter()
model = M.from_pretrained(path, **kw)
seconds = time.perf_counter() - t
loaded = rss("VmHWM") - base
with torch.no_grad():  # touch every weight, as a first forward pass would (memory-mapped pages come in now)
    total = sum(float(p.float().sum()) for p in model.parameters())
print(json.dumps({"seconds": seconds, "peak_rise": loaded, "touched_rise": rss("VmHWM") - base,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def build(directory: str, size_gb: float) -> int:
    """Random bf16 weights: a ViT-g-width vision encoder with as many layers as fit the size, small rest."""
    import torch

    from instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration

    per_layer = 4 * 1408 * 1408 + 2 * 1408 * 6144  # vision block weights (biases are noise)
    layers = max(1, round(size_gb * 1e9 / 2 / per_layer))
    config = InstructBlipConfig(
        vision_config=dict(num_hidden_layers=layers),
        qformer_config=dict(vocab_size=30523, num_hidden_layers=2),
        text_config=dict(model_type="llama", vocab_size=32064, hidden_size=512, intermediate_size=1376,
                         num_hidden_layers=2, num_attention_heads=8),
        num_query_tokens=32, image_token_index=32001,
    )
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(directory, max_shard_size="400MB")
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))


def measure(which: str, directory: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, directory, dtype], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"{which} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--dir", default="/tmp/ib-load-bench")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--reps", type=int, default=3, help="loads per loader and dtype (median time, highest memory)")
    args = parser.parse_args()
    t = time.perf_counter()
    size = build(args.dir, args.size_gb)
    print(f"checkpoint: {size / 1e9:.2f} GB bf16 in {args.dir} (built in {time.perf_counter() - t:.0f} s)\n")
    rows = [("ours", "bfloat16"), ("ours", "float32")]
    if not args.skip_transformers:
        rows += [("transformers", "bfloat16"), ("transformers", "float32")]
    print(f"| {'loader':<12} | {'dtype':<8} | {'median s':>8} | {'peak rise, loaded':>17} | "
          f"{'peak rise, weights touched':>26} |")
    print(f"|{'-' * 14}|{'-' * 10}|{'-' * 10}|{'-' * 19}|{'-' * 28}|")
    runs = {row: [] for row in rows}
    for _ in range(max(1, args.reps)):
        for which, dtype in rows:
            runs[(which, dtype)].append(measure(which, args.dir, dtype))
    results = {}
    for (which, dtype), reps in runs.items():
        r = {"seconds": statistics.median(x["seconds"] for x in reps),
             "peak_rise": max(x["peak_rise"] for x in reps), "touched_rise": max(x["touched_rise"] for x in reps)}
        in_memory = size * (2 if dtype == "float32" else 1)  # the loaded weights' own size
        results[(which, dtype)] = r
        loaded = f"{r['peak_rise'] / 1e9:.2f} GB ({r['peak_rise'] / in_memory:.2f}x)"
        touched = f"{r['touched_rise'] / 1e9:.2f} GB ({r['touched_rise'] / in_memory:.2f}x)"
        print(f"| {which:<12} | {dtype:<8} | {r['seconds']:>8.2f} | {loaded:>17} | {touched:>26} |")
    ours = max(results[("ours", "bfloat16")]["peak_rise"], results[("ours", "bfloat16")]["touched_rise"]) / size
    verdict = "PASS" if ours <= 1.3 else "FAIL"
    print(f"\nours, bf16: peak rise {ours:.2f}x the checkpoint size (target <= 1.30): {verdict}")
    if not args.skip_transformers:
        for dtype in ("bfloat16", "float32"):
            o, t = results[("ours", dtype)], results[("transformers", dtype)]
            ok = o["peak_rise"] <= t["peak_rise"] * 1.05 + 2e7 and o["touched_rise"] <= t["touched_rise"] * 1.05 + 2e7
            print(f"{dtype}: peak memory not above transformers' (loaded and touched, 5% + 20 MB noise): "
                  f"{'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
