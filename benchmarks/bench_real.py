"""Real sizes: InstructBLIP Vicuna-7B and Flan-T5-XL at the official shapes (random bf16 weights), ours against
transformers, each load and measurement in a fresh process. Not part of `make test`; `make bench-real` runs it.

    python benchmarks/bench_real.py [--presets vicuna-7b flan-t5-xl] [--reps 2] [--dir DIR]
        [--modes fp32 bf16 int8 int4 int8+vision-int8 int4+vision-int8] [--write benchmarks/RESULTS.md]
    python benchmarks/bench_real.py --presets tiny --reps 1   # the whole script on small configs, in seconds

Checkpoints: random weights (normal, std 0.02; norm weights 1, biases 0) at the official configs, written once in
the Hugging Face layout (~2 GB safetensors shards and an index) under ~/.cache/instructblip-bench/<preset> and
reused: 15.8 GB for Vicuna-7B, 8.0 GB for Flan-T5-XL. Both libraries load the same files.

Per run (a fresh child process; a repetition runs every mode once, ours and transformers alternating, one child at a
time): the time to the first token is the first `generate(max_new_tokens=1)` after loading, with nothing run before
it (the image encoding, the prefill, the first use of every kernel and the first read of memory-mapped weights all
count); then `generate` with 1 and with 17 new tokens (min_new_tokens = max_new_tokens, greedy), twice each: the time
per token is (median of the 17-token runs - median of the 1-token runs) / 16. Peak RSS is the child's VmHWM at the
end (GB = 10^9 bytes). A mode whose weights do not fit in the memory available now is skipped, and a mode that fails
(an unknown keyword, an error, a kill) is reported as failed; neither stops the script.

The floor: the bytes a decoding step must read (the language model's linear weights, the LM head included, in the
mode's format: fp32 4 bytes a weight, bf16 2, int8 1 plus an fp32 scale per row, int4 0.5 plus a bf16 scale and zero
per group of 128; for T5 the decoder's only, less the cross-attention keys and values, computed once per answer;
the KV cache is left out, under 1% of the weights at these lengths) over the read bandwidth measured in this process
(`sum` over 2 GiB of float32 with torch's threads, best of 5).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch
from bench import read_bandwidth_gbs  # this folder is on the path when a script in it runs

from instructblip.files import write_text

REAL_PRESETS = ("vicuna-7b", "flan-t5-xl")
TINY_PRESETS = ("tiny-vicuna", "tiny-t5")
# (implementation, mode) in the order a repetition runs them: ours and transformers alternate where both have a mode
RUNS = [("ours", "fp32"), ("transformers", "fp32"), ("ours", "bf16"), ("transformers", "bf16"), ("ours", "int8"),
        ("ours", "int4"), ("ours", "int8+vision-int8"), ("ours", "int4+vision-int8")]
MODES = list(dict.fromkeys(mode for _, mode in RUNS))
SHARD_BYTES = 2 * 10**9
DONE = "BENCH_CHECKPOINT_COMPLETE"  # written last into a finished checkpoint directory
SECTION = "## Real sizes (make bench-real)"
GB = 1e9

CHILD = r"""
import json, sys, time, traceback
import torch

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

impl, mode, path = sys.argv[1], sys.argv[2], sys.argv[3]
out = {"impl": impl, "mode": mode}
try:
    with open(path + "/config.json") as f:
        config = json.load(f)
    t5 = config["text_config"]["model_type"] == "t5"
    image = config.get("image_token_index")
    # the image placeholders first, as transformers' processor writes them; then a fixed instruction
    ids = [image] * config["num_query_tokens"] if image is not None else []
    if t5:
        ids += [363, 19, 8, 2271, 13, 8, 1023, 58, 11860, 10, 30, 412, 2233, 1820, 5, 3, 9, 2491, 1]
    else:
        ids += [1, 319, 13563, 1546, 263, 12758, 1404, 322, 385, 23116, 21082, 20255, 29889, 3148, 1001, 29901,
                1724, 338, 297]
    qformer_ids = [101, 2054, 2003, 1999, 1996, 3746, 1029, 2079, 2017, 2156, 102]
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    out["rss_before"] = status("VmRSS")
    start = time.perf_counter()
    if impl == "ours":
        from instructblip import InstructBlipForConditionalGeneration
        kw = {"fp32": {"dtype": torch.float32}, "bf16": {"dtype": torch.bfloat16}, "int8": {"quantize": "int8"},
              "int4": {"quantize": "int4"}, "int8+vision-int8": {"quantize": "int8", "quantize_vision": "int8"},
              "int4+vision-int8": {"quantize": "int4", "quantize_vision": "int8"}}[mode]
        model = InstructBlipForConditionalGeneration.from_pretrained(path, **kw)
        # float32 pixels: ours casts them to its vision encoder's dtype, whatever the mode made that
    else:
        import transformers
        from transformers import InstructBlipForConditionalGeneration
        transformers.logging.set_verbosity_error()
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[mode]
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # `dtype` replaced `torch_dtype` in 4.56
        model, info = InstructBlipForConditionalGeneration.from_pretrained(path, output_loading_info=True,
                                                                             **{key: dtype})
        # transformers initialises a missing weight at random and says so only in a warning, silenced above
        bad = {k: list(v)[:5] for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                                    "mismatched_keys")}
        if bad:
            raise RuntimeError(f"transformers did not load every weight: {bad}")
        pixels = pixels.to(dtype)
    model.eval()
    out["load_s"] = time.perf_counter() - start
    out["rss_loaded"] = status("VmRSS")
    inputs = dict(pixel_values=pixels, input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                  dtype=torch.long), qformer_input_ids=torch.tensor([qformer_ids]),
                  qformer_attention_mask=torch.ones(1, len(qformer_ids), dtype=torch.long))

    def timed(n):
        start = time.perf_counter()
        with torch.inference_mode():
            tokens = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        # ours returns the new tokens; transformers the prompt (or T5's decoder start) before them
        return time.perf_counter() - start, tokens[0, -n:].tolist()

    out["ttft"], _ = timed(1)
    out["t1"] = [timed(1)[0] for _ in range(2)]
    runs = [timed(17) for _ in range(2)]
    out["t17"] = [t for t, _ in runs]
    out["tokens"] = runs[-1][1]
    out["peak_rss"] = status("VmHWM")
except BaseException as e:  # one line for the parent's table; the traceback goes to stderr
    traceback.print_exc()
    out["error"] = f"{type(e).__name__}: {e}"[:300]
print("RESULT " + json.dumps(out), flush=True)
"""


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


def make_config(preset: str):
    from instructblip import InstructBlipConfig
    from instructblip.models.config import PRESETS

    if preset in REAL_PRESETS:
        return InstructBlipConfig.from_name(preset)
    # the official token ids and vocabularies (so the child's fixed ids mean the same), everything else tiny
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    qformer = dict(vocab_size=30523, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    if preset == "tiny-vicuna":
        text = {**PRESETS["vicuna-7b"]["text_config"], "hidden_size": 128, "intermediate_size": 256,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4}
        return InstructBlipConfig.from_name("vicuna-7b", vision_config=vision, qformer_config=qformer, text_config=text)
    if preset == "tiny-t5":
        text = {**PRESETS["flan-t5-xl"]["text_config"], "d_model": 128, "d_ff": 256, "d_kv": 32, "num_heads": 4,
                "num_layers": 2, "num_decoder_layers": 2}
        return InstructBlipConfig.from_name("flan-t5-xl", vision_config=vision, qformer_config=qformer,
                                            text_config=text)
    raise SystemExit(f"unknown preset {preset!r}; known: {', '.join(REAL_PRESETS + TINY_PRESETS)} (and 'tiny')")


def hf_shapes(config) -> dict[str, tuple[int, ...]]:
    """transformers' key -> shape of every tensor of the checkpoint, in our weight map's order, checked against
    transformers' own model (on the meta device: nothing allocated) so that neither library finds a key missing."""
    import transformers

    from instructblip import InstructBlipForConditionalGeneration
    from instructblip.weights.checkpoint import weight_map

    with torch.device("meta"):
        ours = InstructBlipForConditionalGeneration(config)
    targets = dict(ours.state_dict())
    shapes = {}
    for entry in weight_map(config):
        shape = tuple(targets[entry.ours].shape)
        for i, key in enumerate(entry.parts):  # a fused tensor of ours is its parts stacked along dim 0
            shapes[key] = shape if entry.rows is None else (entry.rows[i], *shape[1:])
    theirs_config = transformers.InstructBlipConfig.from_dict(config.to_dict())
    with torch.device("meta"):
        theirs = transformers.InstructBlipForConditionalGeneration(theirs_config)
    expected = {k: tuple(t.shape) for k, t in theirs.state_dict().items()}
    tied = set()  # aliases transformers fills by tying (T5's embed_tokens; its lm_head in 5.x, unless in the files)
    for name, module in theirs.named_modules():
        for alias in getattr(module, "_tied_weights_keys", None) or ():
            tied.add(f"{name}.{alias}" if name else alias)
    wrong = sorted(k for k in shapes if expected.get(k) != shapes[k])
    missing = sorted(k for k in expected if k not in shapes and k not in tied)
    if wrong or missing:
        raise SystemExit(f"our weight map and transformers' model disagree: shapes or keys {wrong[:4]}, keys "
                         f"transformers needs {missing[:4]}")
    return shapes


def init_value(key: str) -> str:
    """How a random checkpoint fills this tensor: norms' weights 1 (LayerNorm and RMSNorm), every bias 0, the rest
    normal. `relative_attention_bias.weight` is an embedding table, not a bias."""
    if key.endswith(".bias"):
        return "zeros"
    if key.endswith(".weight") and "norm" in key.lower():  # layernorm, layer_norm, LayerNorm, input_layernorm, norm
        return "ones"
    return "normal"


def build_checkpoint(preset: str, directory: str) -> bool:
    """Write the random checkpoint unless a complete one is there; False (with a message) when the disk is short.
    Written into `<directory>.partial` and renamed when complete, with a marker file last, so an interrupted build
    is started again rather than used."""
    from safetensors.torch import save_file

    if os.path.exists(os.path.join(directory, DONE)):
        return True
    if os.path.exists(directory):
        raise SystemExit(f"{directory} exists but is not a finished benchmark checkpoint (no {DONE}); remove it or "
                         "pass another --dir")
    config = make_config(preset)
    shapes = hf_shapes(config)
    total = sum(2 * math.prod(s) for s in shapes.values())
    partial = directory + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # an interrupted build of ours: its space counts as free
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < total + 2 * 10**9:
        print(f"{preset}: skipped: the checkpoint needs {total / GB:.1f} GB (+2 GB to spare) and {parent} has "
              f"{free / GB:.1f} GB free")
        return False
    print(f"{preset}: writing {sum(math.prod(s) for s in shapes.values()) / 1e9:.2f}B parameters, "
          f"{total / GB:.1f} GB bf16, to {directory}", flush=True)
    started = time.perf_counter()
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    os.makedirs(partial)
    generator = torch.Generator().manual_seed(0)
    for name, keys in zip(names, shards, strict=True):
        tensors = {}
        for key in keys:
            kind = init_value(key)
            if kind == "normal":
                tensors[key] = torch.empty(shapes[key], dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
            else:
                tensors[key] = getattr(torch, kind)(shapes[key], dtype=torch.bfloat16)
        save_file(tensors, os.path.join(partial, name), metadata={"format": "pt"})
        del tensors
    where = {key: name for name, keys in zip(names, shards, strict=True) for key in keys}
    index = {"metadata": {"total_size": total}, "weight_map": where}
    with open(os.path.join(partial, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    config.extra["dtype"] = "bfloat16"
    config.save_pretrained(partial)
    text = config.text_config
    generation = {"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
                  "pad_token_id": text.pad_token_id}
    if text.is_encoder_decoder:
        generation["decoder_start_token_id"] = text.decoder_start_token_id
    with open(os.path.join(partial, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in generation.items() if v is not None}, f, indent=2)
    with open(os.path.join(partial, DONE), "w") as f:
        f.write(f"{preset}\n")
    os.replace(partial, directory)
    print(f"{preset}: written in {time.perf_counter() - started:.0f} s ({len(names)} shards)", flush=True)
    return True


# ----------------------------------------------------------------------------------------------------------------------
# What a mode needs: memory to load, bytes to read per token


def is_lm_linear(key: str, shape: tuple[int, ...]) -> bool:
    return (key.startswith("language_model.") and len(shape) == 2
            and not any(s in key for s in ("embed_tokens", "shared", "relative_attention_bias")))


def weights_in_memory(shapes: dict[str, tuple[int, ...]], impl: str, mode: str) -> float:
    """Bytes of the loaded weights: fp32 4 a parameter, bf16 2; int8 about 1 per language-model linear weight, int4
    about 0.6, the rest in bf16 (with the vision encoder's linear weights at 1 too for int8+vision-int8); times
    1.1 for transformers, whose loading holds more than the weights."""
    total = sum(math.prod(s) for s in shapes.values())
    lm = sum(math.prod(s) for k, s in shapes.items() if is_lm_linear(k, s))
    vision = sum(math.prod(s) for k, s in shapes.items() if k.startswith("vision_model.encoder.") and len(s) == 2)
    nbytes = {"fp32": 4 * total, "bf16": 2 * total, "int8": lm + 2 * (total - lm),
              "int4": 0.6 * lm + 2 * (total - lm), "int8+vision-int8": lm + vision + 2 * (total - lm - vision),
              "int4+vision-int8": 0.6 * lm + vision + 2 * (total - lm - vision)}[mode]
    return nbytes * (1.1 if impl == "transformers" else 1.0)


def step_bytes(shapes: dict[str, tuple[int, ...]], mode: str) -> float:
    """Bytes one decoding step reads at the least: the language model's linear weights in the mode's format (see
    the module docstring); the KV cache is left out."""
    total = 0.0
    for key, shape in shapes.items():
        if not is_lm_linear(key, shape) or ".encoder." in key or "EncDecAttention.k." in key or \
                "EncDecAttention.v." in key:  # T5: the encoder runs once, the cross keys and values are cached
            continue
        rows, n = shape[0], math.prod(shape)
        total += {"fp32": 4 * n, "bf16": 2 * n, "int8": n + 4 * rows, "int8+vision-int8": n + 4 * rows,
                  "int4": n / 2 + 4 * n / 128, "int4+vision-int8": n / 2 + 4 * n / 128}[mode]
    return total


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Runs


def run_child(impl: str, mode: str, directory: str, timeout: float) -> dict:
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, impl, mode, directory], capture_output=True, text=True,
                             timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "mode": mode, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    why = f"killed by signal {-out.returncode}" if out.returncode < 0 else f"exit {out.returncode}"
    if out.returncode == -9:
        why += " (out of memory?)"
    tail = out.stderr.strip().splitlines()[-1:] or [""]
    return {"impl": impl, "mode": mode, "error": f"{why}: {tail[0][:200]}"}


def per_token(r: dict) -> float:
    return (statistics.median(r["t17"]) - statistics.median(r["t1"])) / 16


def measure_preset(preset: str, directory: str, modes: list[str], reps: int, timeout: float) -> dict:
    shapes = hf_shapes(make_config(preset))
    bandwidth = read_bandwidth_gbs(mib=2048, reps=5) * GB  # bytes per second
    print(f"{preset}: read bandwidth {bandwidth / GB:.1f} GB/s", flush=True)
    runs = [(impl, mode) for impl, mode in RUNS if mode in modes]
    results: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
    skipped: dict[tuple[str, str], str] = {}
    for rep in range(reps):
        for impl, mode in runs:
            if (impl, mode) in skipped:
                continue
            need, free = weights_in_memory(shapes, impl, mode) + 1.0 * GB, mem_available()  # + torch, activations
            if need > free:
                skipped[(impl, mode)] = f"needs ~{need / GB:.1f} GB, {free / GB:.1f} GB available"
                print(f"{preset} {impl} {mode}: skipped: {skipped[(impl, mode)]}", flush=True)
                continue
            r = run_child(impl, mode, directory, timeout)
            results[(impl, mode)].append(r)
            if "error" in r:
                skipped[(impl, mode)] = "failed: " + r["error"]  # an error repeats: not run again
                print(f"{preset} {impl} {mode} (rep {rep + 1}): FAILED: {r['error']}", flush=True)
            else:
                print(f"{preset} {impl} {mode} (rep {rep + 1}): load {r['load_s']:.1f} s, TTFT {r['ttft']:.2f} s, "
                      f"per token {per_token(r):.3f} s, peak RSS {r['peak_rss'] / GB:.2f} GB", flush=True)
    return {"shapes": shapes, "bandwidth": bandwidth, "results": results, "skipped": skipped}


# ----------------------------------------------------------------------------------------------------------------------
# Report


def span(values: list[float]) -> str:
    """min-max over the repetitions, 3 significant digits (tiny presets take milliseconds, real ones seconds)."""
    lo, hi = f"{min(values):.3g}", f"{max(values):.3g}"
    return lo if lo == hi else f"{lo} to {hi}"


def preset_report(preset: str, m: dict) -> tuple[str, list[tuple[str, bool | None, str]]]:
    shapes, bandwidth, results, skipped = m["shapes"], m["bandwidth"], m["results"], m["skipped"]
    params = sum(math.prod(s) for s in shapes.values())
    ok = {run: [r for r in rs if "error" not in r] for run, rs in results.items()}
    summary = {run: {"ttft": statistics.median(r["ttft"] for r in rs),
                     "token": statistics.median(per_token(r) for r in rs),
                     "peak": max(r["peak_rss"] for r in rs)} for run, rs in ok.items() if rs}
    theirs = {mode: s for (impl, mode), s in summary.items() if impl == "transformers"}
    best_token = min(theirs.items(), key=lambda kv: kv[1]["token"]) if theirs else None
    best_ttft = min(theirs.items(), key=lambda kv: kv[1]["ttft"]) if theirs else None
    lines = [f"### {preset} ({params / 1e9:.2f}B parameters, read bandwidth {bandwidth / GB:.1f} GB/s)", ""]
    if best_token:
        lines.append(f"transformers' best mode that fits: {best_token[0]} per token, {best_ttft[0]} to the first "
                     "token; \"vs transformers\" is its time over ours (above 1: ours is faster)")
        lines.append("")
    lines += ["| mode | impl | load s | TTFT s | per-token s | peak RSS GB | vs transformers: per-token, TTFT | "
              "per-token / floor | tokens = transformers' |", "|---|---|---|---|---|---|---|---|---|"]
    for impl, mode in results:
        if (impl, mode) not in summary:
            why = skipped.get((impl, mode), "not run")
            lines.append(f"| {mode} | {impl} | {why} | | | | | | |")
            continue
        s, good = summary[(impl, mode)], ok[(impl, mode)]
        vs = ""
        if impl == "ours" and best_token:
            vs = f"{best_token[1]['token'] / s['token']:.2f}x, {best_ttft[1]['ttft'] / s['ttft']:.2f}x"
        floor = step_bytes(shapes, mode) / bandwidth
        same = ""
        if impl == "ours" and ok.get(("transformers", mode)):
            same = "yes" if good[-1]["tokens"] == ok[("transformers", mode)][-1]["tokens"] else "no"
        lines.append(f"| {mode} | {impl} | {span([r['load_s'] for r in good])} | "
                     f"{span([r['ttft'] for r in good])} | {span([per_token(r) for r in good])} | "
                     f"{s['peak'] / GB:.2f} | {vs} | {s['token'] / floor:.2f}x (floor {floor:.3g} s) | {same} |")
    lines.append("")

    checks: list[tuple[str, bool | None, str]] = []
    if preset in REAL_PRESETS:
        int8, int4 = summary.get(("ours", "int8")), summary.get(("ours", "int4"))
        if preset == "vicuna-7b":
            checks.append(("int8 peak RSS <= 10 GB", None if int8 is None else int8["peak"] <= 10 * GB,
                           "" if int8 is None else f"{int8['peak'] / GB:.2f} GB"))
            checks.append(("int4 peak RSS <= 6 GB", None if int4 is None else int4["peak"] <= 6 * GB,
                           "" if int4 is None else f"{int4['peak'] / GB:.2f} GB"))
            int4v = summary.get(("ours", "int4+vision-int8"))
            if int4v is not None:
                checks.append(("int4+vision-int8 peak RSS <= 6 GB", int4v["peak"] <= 6 * GB,
                               f"{int4v['peak'] / GB:.2f} GB"))
        if int8 is not None and best_token:
            ratio = best_token[1]["token"] / int8["token"]
            checks.append((f"int8 per token >= 2x transformers' best ({best_token[0]})", ratio >= 2, f"{ratio:.2f}x"))
        else:
            checks.append(("int8 per token >= 2x transformers' best", None, ""))
        if int8 is not None:
            ratio = int8["token"] / (step_bytes(shapes, "int8") / bandwidth)
            checks.append(("int8 per token <= 1.3x the floor", ratio <= 1.3, f"{ratio:.2f}x"))
        else:
            checks.append(("int8 per token <= 1.3x the floor", None, ""))
        if int8 is not None and best_ttft:
            ratio = best_ttft[1]["ttft"] / int8["ttft"]
            checks.append((f"int8 TTFT >= 1.5x transformers' best ({best_ttft[0]})", ratio >= 1.5, f"{ratio:.2f}x"))
        else:
            checks.append(("int8 TTFT >= 1.5x transformers' best", None, ""))
        int8v = summary.get(("ours", "int8+vision-int8"))
        if int8v is not None and best_ttft:
            ratio = best_ttft[1]["ttft"] / int8v["ttft"]
            checks.append((f"int8+vision-int8 TTFT >= 1.5x transformers' best ({best_ttft[0]})", ratio >= 1.5,
                           f"{ratio:.2f}x"))
    for name, passed, value in checks:
        verdict = "not measured" if passed is None else ("PASS" if passed else "FAIL")
        lines.append(f"- {preset}: {name}: {verdict}" + (f" ({value})" if value else ""))
    if checks:
        lines.append("")
    return "\n".join(lines), checks


def machine() -> str:
    import transformers

    model, flags = platform.processor() or "?", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "Model name":
                model = value.strip()
            elif name.strip() == "Flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    present = [f for f in wanted if f in flags]
    absent = [f for f in wanted if f not in flags]
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    return (f"Machine: {model}, {os.cpu_count()} cores, {total / GB:.1f} GB, flags: {' '.join(present) or 'none'}"
            f" (without: {' '.join(absent) or 'none'}); torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), transformers {transformers.__version__}, Python {platform.python_version()}")


def write_report(path: str, report: str) -> None:
    """Replace the section headed SECTION in a Markdown file, or add it above the first section (the file keeps
    its newest runs first); the file is replaced whole through a temporary file."""
    old = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
    section = f"{SECTION}\n\n{report.rstrip()}\n\n"
    start = old.find(SECTION)
    if start >= 0:
        end = old.find("\n## ", start + len(SECTION))
        text = old[:start] + section + (old[end + 1:] if end >= 0 else "")
    else:
        at = old.find("\n## ")
        text = old[:at + 1] + section + old[at + 1:] if at >= 0 else old.rstrip() + "\n\n" + section
    write_text(path, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(REAL_PRESETS),
                        help=f"of {', '.join(REAL_PRESETS + TINY_PRESETS)}; 'tiny' = both tiny ones")
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--reps", type=int, default=2, help="repetitions of every mode (fresh processes)")
    parser.add_argument("--dir", default=None,
                        help="checkpoint directory (one preset) or parent of one per preset; default "
                             "~/.cache/instructblip-bench/<preset>")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one child may run")
    parser.add_argument("--write", default=None, help=f"also put the report in this Markdown file as '{SECTION}'")
    args = parser.parse_args()
    presets = [p for name in args.presets for p in (TINY_PRESETS if name == "tiny" else (name,))]
    for preset in presets:
        make_config(preset)  # an unknown name stops here, before anything is built
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = machine()
    print(header, flush=True)
    sections, checks = [], []
    for preset in presets:
        if args.dir and len(presets) == 1:
            directory = args.dir
        else:
            directory = os.path.join(args.dir or os.path.expanduser("~/.cache/instructblip-bench"), preset)
        if not build_checkpoint(preset, directory):
            sections.append(f"### {preset}\n\nskipped: not enough free disk for its checkpoint\n")
            continue
        measured = measure_preset(preset, directory, args.modes, max(1, args.reps), args.timeout)
        text, preset_checks = preset_report(preset, measured)
        sections.append(text)
        checks += preset_checks
    command = " ".join(["bench_real.py", *sys.argv[1:]])
    report = (f"Run of {stamp} (`{command}`), {max(1, args.reps)} repetition(s) of every mode, each in a fresh "
              f"process.\n{header}\n\n" + "\n".join(sections))
    print("\n" + report)
    if args.write:
        write_report(args.write, report)
        print(f"written to {args.write}")


if __name__ == "__main__":
    main()
