"""The `instructblip` command.

    instructblip ask IMAGE "instruction" [--model M] [generation flags]
    instructblip caption IMAGE [IMAGE...]
    instructblip batch INPUT.jsonl|FOLDER --output OUT.jsonl [--instruction TEXT]
    instructblip info [M]
    instructblip convert-lavis --lavis-checkpoint X.pth --vision eva_vit_g.pth --llm DIR --out DIR
    instructblip bench
    instructblip train | eval | serve ...   (flags of their own: `instructblip train --help`)

User errors (a missing file, something that is not an image, an unknown model, bad flags) print one line and exit
with status 2; failures while running exit with status 1. Set INSTRUCTBLIP_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class UsageError(Exception):
    """Something the user passed is wrong: exit status 2."""


# ----------------------------------------------------------------------------------------------------------------------
# Arguments


def _generation_flags(parser: argparse.ArgumentParser, beams: int, max_new: int) -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"longest answer in tokens (default {max_new}, at most half the LLM's context)")
    g.add_argument("--min-new-tokens", type=int, default=None, help="shortest answer in tokens")
    g.add_argument("--num-beams", type=int, default=beams, help=f"beam search width; 1 = greedy (default {beams})")
    g.add_argument("--do-sample", action="store_true", help="sample instead of searching")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    g.add_argument("--repetition-penalty", type=float, default=1.5, help="LAVIS default 1.5; 1.0 = off")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam score / length**penalty (default 1.0)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a local HF-layout directory or a hub id (default: the small model shipped inside)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--quantize", default=None, choices=["int8"],
                        help="int8 dynamic quantization of the LLM, for CPU inference (faster decoding)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructblip",
        description="Ask questions about images and caption them with InstructBLIP.",
        epilog="Run `instructblip COMMAND --help` for the flags of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("ask", help="answer an instruction about an image",
                       description="Answer an instruction about an image.")
    p.add_argument("image", help="image file")
    p.add_argument("instruction", help='e.g. "What is unusual about this image?"')
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated (greedy/sampling)")
    _model_flags(p)
    _generation_flags(p, beams=5, max_new=256)

    p = sub.add_parser("caption", help="describe one or more images", description="Describe images.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--prompt", default="A short image description:", help="the captioning instruction")
    _model_flags(p)
    _generation_flags(p, beams=5, max_new=80)

    p = sub.add_parser(
        "batch", help="answer many records, resumably",
        description="Answer every record of a JSONL file ({'id', 'image', 'instruction'} per line; image paths are "
                    "relative to the file) or every image of a folder with one --instruction. Records already in "
                    "OUTPUT are skipped, so an interrupted run continues where it stopped.",
    )
    p.add_argument("input", help="records.jsonl or a folder of images")
    p.add_argument("--output", "-o", required=True, help="answers.jsonl (appended to; one line per record)")
    p.add_argument("--instruction", default=None, help="the instruction for every image of a folder")
    p.add_argument("--batch-size", type=int, default=8, help="records per forward pass (default 8)")
    _model_flags(p)
    _generation_flags(p, beams=5, max_new=256)

    p = sub.add_parser("info", help="sizes and memory needs of a model", description="Describe a model.")
    p.add_argument("model", nargs="?", default=None, help="directory or hub id (default: the shipped model)")

    p = sub.add_parser("convert-lavis", help="convert an original LAVIS checkpoint to the HF layout",
                       description="Convert a LAVIS InstructBLIP checkpoint (Q-Former, projection, query tokens) "
                                   "plus EVA ViT-g and the LLM into an HF-layout directory.")
    p.add_argument("--lavis-checkpoint", required=True, help="LAVIS .pth (e.g. instruct_blip_flanxl_trimmed.pth)")
    p.add_argument("--vision", default=None, help="EVA ViT-g .pth (eva_vit_g.pth); not needed if the LAVIS file has it")
    p.add_argument("--llm", required=True, help="the LLM's HF directory (vicuna-7b-v1.1, google/flan-t5-xl, ...)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--image-size", type=int, default=224, help="224, or 364 for the COCO-finetuned variants")
    p.add_argument("--qformer-tokenizer", default=None, help="a bert-base-uncased tokenizer directory to include")
    p.add_argument("--max-shard-size", default="5GB")

    p = sub.add_parser("bench", help="ours against transformers, side by side",
                       description="Run benchmarks/bench.py (source checkouts); extra arguments go to it.")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="e.g. --only b c --reps 3")
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


# ----------------------------------------------------------------------------------------------------------------------
# Commands


def _generation(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.num_beams < 1:
        raise UsageError(f"--num-beams must be at least 1, got {args.num_beams}")
    out: dict[str, Any] = dict(num_beams=args.num_beams, repetition_penalty=args.repetition_penalty,
                               length_penalty=args.length_penalty)
    if args.max_new_tokens is not None:
        out["max_new_tokens"] = args.max_new_tokens
    if args.min_new_tokens is not None:
        out["min_new_tokens"] = args.min_new_tokens
    if args.do_sample:
        out.update(do_sample=True, temperature=args.temperature, num_beams=1)
        if args.top_p is not None:
            out["top_p"] = args.top_p
        if args.top_k is not None:
            out["top_k"] = args.top_k
        if args.seed is not None:
            out["generator"] = torch.Generator().manual_seed(args.seed)
    return out


def _load(args: argparse.Namespace):
    from instructblip.api import load

    return load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory; give an image file")


def cmd_ask(args: argparse.Namespace) -> int:
    _check_file(args.image)
    gen = _generation(args)
    vlm = _load(args)
    if args.stream:
        for piece in vlm.stream(args.image, args.instruction, **gen):
            print(piece, end="", flush=True)
        print()
    else:
        print(vlm.ask(args.image, args.instruction, **gen))
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    for path in args.images:
        _check_file(path)
    gen = _generation(args)
    vlm = _load(args)
    captions = vlm.caption(list(args.images), prompt=args.prompt, **gen)
    for path, caption in zip(args.images, captions, strict=True):
        print(f"{path}\t{caption}" if len(args.images) > 1 else caption)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from instructblip.api import default_model_dir
    from instructblip.hub import resolve_checkpoint_dir
    from instructblip.modeling import InstructBlipForConditionalGeneration
    from instructblip.models.config import InstructBlipConfig
    from instructblip.weights.checkpoint import _Reader

    directory = resolve_checkpoint_dir(args.model or default_model_dir())
    config = InstructBlipConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = InstructBlipForConditionalGeneration(config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    parts = {"vision encoder": count(model.vision_model), "Q-Former + queries": count(model.qformer)
             + model.query_tokens.numel(), "projection": count(model.language_projection),
             "language model": count(model.language_model)}
    total = sum(parts.values())
    reader = _Reader(directory)
    stored = reader.first_float_dtype()
    text = config.text_config
    print(f"model:      {directory}")
    print(f"LLM:        {text.model_type} ({'encoder-decoder' if text.is_encoder_decoder else 'decoder-only'}), "
          f"vocabulary {text.vocab_size}")
    print(f"images:     {config.vision_config.image_size}x{config.vision_config.image_size}, "
          f"{config.num_query_tokens} query tokens, image tokens: "
          f"{'id ' + str(config.image_token_index) if config.image_token_index is not None else 'prepended (legacy)'}")
    for name, n in parts.items():
        print(f"  {name:<20} {n / 1e6:>12,.1f} M parameters")
    print(f"  {'total':<20} {total / 1e6:>12,.1f} M parameters")
    print(f"stored as:  {str(stored).removeprefix('torch.')}")
    print(f"memory for the weights: float32 {_bytes(total * 4)}, bfloat16/float16 {_bytes(total * 2)} "
          "(plus activations and, for generation, the KV cache)")
    return 0


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_convert_lavis(args: argparse.Namespace) -> int:
    from instructblip.weights.lavis import convert_lavis

    report = convert_lavis(args.lavis_checkpoint, args.vision, args.llm, args.out, image_size=args.image_size,
                           qformer_tokenizer=args.qformer_tokenizer, max_shard_size=args.max_shard_size)
    print(report.summary())
    print(f"written: {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the side-by-side benchmarks when this is a source checkout; otherwise say where they are."""
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench.py")
    if not os.path.isfile(script):
        print("The benchmarks live in benchmarks/ of the source tree (git clone, then `make bench`):\n"
              "  benchmarks/bench.py        ours against transformers, same weights (results: benchmarks/RESULTS.md)\n"
              "  benchmarks/load_memory.py  peak memory and time while loading a ~1 GB checkpoint\n"
              "  benchmarks/serve_load.py   server throughput and latency under concurrency")
        return 0
    return subprocess.call([sys.executable, os.path.abspath(script), *args.bench_args])


# ----------------------------------------------------------------------------------------------------------------------
# batch


def _records(path: str, instruction: str | None) -> Iterator[dict]:
    """Records from a JSONL file (image paths relative to it) or a folder of images; bad lines become records with
    an `error` field so that they are reported, not fatal."""
    if os.path.isdir(path):
        if not instruction:
            raise UsageError("a folder of images needs --instruction")
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise UsageError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for name in names:
            yield {"id": name, "image": os.path.join(path, name), "instruction": instruction}
        return
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file or folder")
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield {"id": f"line-{number}", "error": f"line {number} is not JSON ({e.msg})"}
                continue
            if not isinstance(record, dict):
                yield {"id": f"line-{number}", "error": f"line {number} is not a JSON object"}
                continue
            rid = record.get("id", f"line-{number}")
            missing = [k for k in ("image", "instruction") if not isinstance(record.get(k), str) or not record[k]]
            if instruction and "instruction" in missing:
                record["instruction"] = instruction
                missing.remove("instruction")
            if missing:
                yield {"id": rid, "error": f"line {number} lacks {' and '.join(missing)}"}
                continue
            image = record["image"] if os.path.isabs(record["image"]) else os.path.join(base, record["image"])
            yield {"id": rid, "image": image, "instruction": record["instruction"]}


def _done_ids(output: str) -> set:
    """Ids already answered in `output`; a torn last line (a crash mid-write) is cut off first."""
    if not os.path.exists(output):
        return set()
    with open(output, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            f.truncate(cut)
            data = data[:cut]
    done = set()
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            done.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


class _Progress:
    """A one-line progress bar on stderr (only when it is a terminal, or INSTRUCTBLIP_PROGRESS=1)."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.enabled = sys.stderr.isatty() or os.environ.get("INSTRUCTBLIP_PROGRESS") == "1"

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled:
            rate = self.done / max(time.monotonic() - self.start, 1e-9)
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {rate:.2f} rec/s",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def cmd_batch(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    records = list(_records(args.input, args.instruction))
    done = _done_ids(args.output)
    todo = [r for r in records if r["id"] not in done]
    print(f"{len(records)} records, {len(records) - len(todo)} already in {args.output}, {len(todo)} to do",
          file=sys.stderr)
    if not todo:
        return 0
    gen = _generation(args)
    vlm = _load(args)
    progress = _Progress(len(todo))
    fd = os.open(args.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    failed = 0
    try:
        good = [r for r in todo if "error" not in r]
        for r in todo:
            if "error" in r:
                _write_line(fd, r)
                failed += 1
                progress.update(1)
        for i in range(0, len(good), args.batch_size):
            chunk = good[i:i + args.batch_size]
            for record, answer, error in _answer(vlm, chunk, gen):
                out = {"id": record["id"], "image": record["image"], "instruction": record["instruction"]}
                out |= {"error": error} if error else {"answer": answer}
                failed += bool(error)
                _write_line(fd, out)
            progress.update(len(chunk))
    finally:
        os.close(fd)
        progress.close()
    print(f"wrote {len(todo)} records to {args.output} ({failed} with errors)", file=sys.stderr)
    return 0


def _answer(vlm, chunk: list[dict], gen: dict) -> list[tuple[dict, str | None, str | None]]:
    """Answer a chunk as one batch; if an input is bad, answer the records one by one to isolate it."""
    try:
        answers = vlm.ask([r["image"] for r in chunk], [r["instruction"] for r in chunk], **gen)
        return [(r, a, None) for r, a in zip(chunk, answers, strict=True)]
    except (ValueError, FileNotFoundError) as e:
        if len(chunk) == 1:
            return [(chunk[0], None, str(e))]
    return [item for r in chunk for item in _answer(vlm, [r], gen)]


def _write_line(fd: int, record: dict) -> None:
    """One whole line per write(2) on an O_APPEND descriptor, so a kill never leaves half a record."""
    os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------------------


COMMANDS = {"ask": cmd_ask, "caption": cmd_caption, "batch": cmd_batch, "info": cmd_info,
            "convert-lavis": cmd_convert_lavis, "bench": cmd_bench}
# commands with flags of their own: module.main(argv) parses the rest of the command line
DELEGATED = {
    "train": ("instructblip.training.train", "instruction-tune a model (torchrun-ready)"),
    "eval": ("instructblip.evaluation.runner", "zero-shot evaluation on the paper's benchmarks"),
    "serve": ("instructblip.serving.app", "an OpenAI-compatible HTTP server with a web page"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        command, rest = argv[0], argv[1:]
        run = lambda: importlib.import_module(DELEGATED[command][0]).main(rest)  # noqa: E731
    else:
        args = build_parser().parse_args(argv)
        command = args.command
        run = lambda: COMMANDS[command](args)  # noqa: E731
    from instructblip.hub import CheckpointNotFoundError
    from instructblip.models.config import ConfigError
    from instructblip.weights.checkpoint import CheckpointError

    try:
        return run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UsageError, CheckpointNotFoundError, CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        if os.environ.get("INSTRUCTBLIP_DEBUG"):
            raise
        print(f"instructblip {command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a failure while running: one line, status 1
        if os.environ.get("INSTRUCTBLIP_DEBUG"):
            raise
        print(f"instructblip {command}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
