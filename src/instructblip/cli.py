"""The `instructblip` command.

    instructblip ask IMAGE "instruction" [--model M] [generation flags]
    instructblip caption IMAGE [IMAGE...]
    instructblip batch INPUT.jsonl|FOLDER|INPUT.parquet --output OUT.jsonl [--instruction TEXT] [--num-workers N]
    torchrun --nproc_per_node N -m instructblip batch ...       (or --ray [ADDRESS]; --merge OUT)
    instructblip info [M] [--revision R]
    instructblip convert-lavis --lavis-checkpoint X.pth --vision eva_vit_g.pth --llm DIR --out DIR
    instructblip train [CONFIG.yaml] [--key value ...]        (torchrun-ready)
    instructblip eval --model M --benchmark gqa --data DIR | --all --data DIR | --list
    instructblip serve [--model M] [--host 127.0.0.1] [--port 8000] ...

    instructblip --version

Every command has a parser of its own (`instructblip serve --help`), built here: this file holds every command's
flags; the library modules take plain arguments and configs. A mistyped flag gets the command's usage and the
closest flag; `--help` shows each default once.

User errors (a missing file, something that is not an image, an unknown model, bad flags) print one line and exit
with status 2; failures while running exit with status 1. Set INSTRUCTBLIP_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import ipaddress
import os
import re
import sys
import typing
from typing import TYPE_CHECKING, Any

from instructblip.generation.config import ANSWER, CAPTION, GenerationConfig
from instructblip.processing.templates import CAPTION_PROMPT

if TYPE_CHECKING:
    from instructblip.serving.protocol import ServerConfig
    from instructblip.training.config import TrainConfig

BATCH_WORKERS = 0  # `batch --num-workers`' default


class UsageError(Exception):
    """Something the user passed is wrong: exit status 2."""


# ----------------------------------------------------------------------------------------------------------------------
# Arguments: one parser per command (its usage in its errors), every default shown once in --help


class _Help(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help unless the help already speaks of its default, or it has none to
    speak of (None, a flag that is off, a suppressed default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text.lower() or default in (None, False, argparse.SUPPRESS)
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An argument parser whose error for an unknown option suggests the closest known one (difflib), shows this
    command's usage and exits with status 2."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", _Help)
        kwargs.setdefault("allow_abbrev", False)  # a shortened or mistyped flag gets a suggestion, not a guess
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001 (argparse's signature)
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}{suggestion(extra, self._option_string_actions)}")
        return parsed


def suggestion(words: list[str], known: typing.Iterable[str]) -> str:
    """"; did you mean --num-beams?" for the first unknown option close to a known one, else ""."""
    for word in words:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.split("=", 1)[0], list(known), n=1, cutoff=0.6)
            if close:
                return f"; did you mean {close[0]}?"
    return ""


class _Devices(list):
    """--device's choices: auto, cpu, cuda, and cuda:N."""

    def __contains__(self, value: object) -> bool:
        return super().__contains__(value) or bool(isinstance(value, str) and re.fullmatch(r"cuda:\d+", value))


DEVICES = _Devices(["auto", "cpu", "cuda"])
DTYPES = ["auto", "float32", "bfloat16", "float16"]


def _generation_flags(parser: argparse.ArgumentParser, preset: GenerationConfig) -> None:
    """The decoding flags; their defaults are `preset`'s (the paper's settings: generation.config.ANSWER, CAPTION).
    Sampling follows the server's rule (`api.samples`): --temperature above 0 samples, 0 is greedy; --top-p or
    --do-sample alone sample at temperature 1. Flags given without effect get a warning (`_generation`)."""
    g = parser.add_argument_group("generation")
    max_new, beams = preset.max_new_tokens, preset.num_beams
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"longest answer in tokens (default {max_new}, at most half the LLM's context)")
    g.add_argument("--min-new-tokens", type=int, default=None, help="shortest answer in tokens")
    g.add_argument("--num-beams", type=int, default=None,
                   help=f"beam search width; 1 = greedy (default {beams}; 1 when sampling)")
    g.add_argument("--do-sample", action="store_true", help="sample (at --temperature, default 1.0)")
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature: above 0 samples (as the server does), 0 decodes greedily (default: "
                        "no sampling; 1.0 with --do-sample or --top-p)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]; samples")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    g.add_argument("--repetition-penalty", type=float, default=preset.repetition_penalty,
                   help=f"1.0 = off (default {preset.repetition_penalty}, LAVIS's)")
    g.add_argument("--length-penalty", type=float, default=None,
                   help=f"beam score / length**penalty (default {preset.length_penalty}; beam search only)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.set_defaults(preset=preset)


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a local HF-layout directory or a hub id (default: the built-in easy-vqa model, for "
                             "easy-vqa pictures only)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where to run (cuda:N: that GPU)")
    _precision_flags(parser)


def _progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they are drawn only when stderr is a terminal)")


def _precision_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="auto (the default): on the CPU float32 where it fits and bfloat16 is not native or the "
                        "model is small, else bfloat16; bfloat16 on GPUs")
    parser.add_argument("--quantize", default=None, choices=["int8", "int4"],
                        help="the LLM's linear layers in int8 or int4, quantized while loading (CPU inference: less "
                        "memory, faster decoding; docs/performance.md)")
    parser.add_argument("--quantize-vision", default=None, choices=["int8"],
                        help="the vision encoder's linear layers in int8 (CPU: faster image encoding)")


def ask_parser() -> Parser:
    p = Parser(prog="instructblip ask",
               description="Answer an instruction about an image, or a video (4 frames sampled uniformly).")
    p.add_argument("image", help="image or video file")
    p.add_argument("instruction", help='e.g. "What is unusual about this image?"')
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated (greedy/sampling)")
    _model_flags(p)
    _progress_flag(p)
    _generation_flags(p, ANSWER)
    return p


def caption_parser() -> Parser:
    p = Parser(prog="instructblip caption", description="Describe images (or videos).")
    p.add_argument("images", nargs="+", help="image (or video) files")
    p.add_argument("--prompt", default=CAPTION_PROMPT, help="the captioning instruction")
    _model_flags(p)
    _progress_flag(p)
    _generation_flags(p, CAPTION)
    return p


def batch_parser() -> Parser:
    p = Parser(
        prog="instructblip batch",
        description="Answer every record of a JSONL file ({'id', 'image', 'instruction'} per line; image paths are "
                    "relative to the file), a parquet file with those columns, or every image of a folder with one "
                    "--instruction. Records already answered in OUTPUT are skipped, so an interrupted run continues "
                    "where it stopped; an id's last line in OUTPUT is the one that counts. Exit status 0 when every "
                    "record is answered, 1 when some failed, 2 for bad arguments.",
        epilog="Many processes: torchrun --nproc_per_node N -m instructblip batch ... (each rank writes "
               "OUTPUT.rank-0000R-of-0000N.jsonl; rank 0 merges them into OUTPUT at the end). "
               "A Ray cluster: --ray [ADDRESS].",
    )
    p.add_argument("input", nargs="?", help="records.jsonl, records.parquet or a folder of images")
    p.add_argument("--output", "-o", default=None, help="answers.jsonl (appended to; one line per record)")
    p.add_argument("--instruction", default=None, help="the instruction for every image of a folder (and for "
                   "records without one)")
    p.add_argument("--batch-size", type=int, default=8, help="records per forward pass (default 8)")
    p.add_argument("--num-workers", type=int, default=BATCH_WORKERS,
                   help=f"processes decoding images ahead of the model; 0: the main process (default "
                   f"{BATCH_WORKERS})")
    p.add_argument("--retry-failed", action="store_true", help="answer again the records whose line is an error")
    p.add_argument("--merge", metavar="OUT", default=None,
                   help="only merge OUT's part files (left by a torchrun run) into OUT, each id once, and exit")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray Data: a local cluster, or the cluster at ADDRESS (e.g. auto, ray://host:10001)")
    p.add_argument("--ray-actors", type=int, default=1, help="model actors on the Ray cluster (default 1)")
    _model_flags(p)
    _progress_flag(p)
    _generation_flags(p, ANSWER)
    return p


def info_parser() -> Parser:
    p = Parser(prog="instructblip info", description="Describe a model: its parts and parameter counts, its stored "
               "dtype and the memory each way of loading it needs. For a hub id not in the local cache only its "
               "JSON files and the headers of its safetensors files are read, never the weights.")
    p.add_argument("model", nargs="?", default=None, help="directory or hub id (default: the built-in model)")
    p.add_argument("--revision", default=None, help="for a hub id: a branch, tag or commit (default: main)")
    return p


def convert_lavis_parser() -> Parser:
    p = Parser(prog="instructblip convert-lavis",
               description="Convert a LAVIS InstructBLIP checkpoint (Q-Former, projection, query tokens) plus EVA "
                           "ViT-g and the LLM into an HF-layout directory.")
    p.add_argument("--lavis-checkpoint", required=True, help="LAVIS .pth (e.g. instruct_blip_flanxl_trimmed.pth)")
    p.add_argument("--vision", default=None, help="EVA ViT-g .pth (eva_vit_g.pth); not needed if the LAVIS file has it")
    p.add_argument("--llm", required=True, help="the LLM's HF directory (vicuna-7b-v1.1, google/flan-t5-xl, ...)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--image-size", type=int, default=224, help="224, or 364 for the COCO-finetuned variants")
    p.add_argument("--qformer-tokenizer", default=None, help="a bert-base-uncased tokenizer directory to include")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file before splitting")
    return p


def build_parser() -> Parser:
    """The top-level parser: --help, --version and the list of commands (each command parses its own flags)."""
    parser = Parser(
        prog="instructblip",
        description="Ask questions about images and caption them with InstructBLIP.",
        epilog="Run `instructblip COMMAND --help` for the flags of each command.",
    )
    parser.add_argument("--version", action="store_true", help="print the versions and the device that would be used")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def version() -> str:
    """The package's and torch's versions and the device `--device auto` would pick."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    import torch

    try:
        ours = installed("instructblip")
    except PackageNotFoundError:
        from instructblip import __version__ as ours
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s))"
    else:
        device = "cpu (no CUDA device)"
    return f"instructblip {ours}, torch {torch.__version__}, device: {device}"


# ----------------------------------------------------------------------------------------------------------------------
# Commands


def _generation(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The decoding flags as keyword arguments for `InstructBlip.ask` / `caption` (the preset fills the rest); a
    warning on stderr for each flag given that has no effect."""
    config = generation_config(args)
    for warning in generation_warnings(args, config):
        print(f"instructblip {command}: warning: {warning}", file=sys.stderr)
    given = ["num_beams", "repetition_penalty", "length_penalty"]  # flags with defaults: always given
    given += [name for name in ("max_new_tokens", "min_new_tokens") if getattr(config, name) is not None]
    if config.do_sample:
        given += ["do_sample", "temperature", "top_p", "top_k", "seed"]
    return {name: getattr(config, name) for name in given}


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The decoding flags as a `GenerationConfig` (checked: a UsageError names the flag). Whether to sample follows
    the server's rule (`api.samples`): a temperature above 0 samples, 0 is greedy; without one, --top-p or
    --do-sample samples."""
    from instructblip.api import samples

    preset: GenerationConfig = args.preset
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.num_beams is not None and args.num_beams < 1:
        raise UsageError(f"--num-beams must be at least 1, got {args.num_beams}")
    if args.temperature is not None and args.temperature < 0:
        raise UsageError(f"--temperature must be at least 0, got {args.temperature}")
    config = GenerationConfig(
        num_beams=preset.num_beams if args.num_beams is None else args.num_beams,
        repetition_penalty=args.repetition_penalty,
        length_penalty=preset.length_penalty if args.length_penalty is None else args.length_penalty,
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens)
    if samples(args.temperature, args.top_p, args.do_sample):
        config = dataclasses.replace(config, do_sample=True, num_beams=1,
                                     temperature=1.0 if args.temperature is None else args.temperature,
                                     top_p=1.0 if args.top_p is None else args.top_p, top_k=args.top_k,
                                     seed=args.seed)
    try:
        config.validate()
    except ValueError as e:
        flag = "--" + str(e).split(" ", 1)[0].replace("_", "-")
        raise UsageError(f"{flag}: {e}") from None
    return config


def generation_warnings(args: argparse.Namespace, config: GenerationConfig) -> list[str]:
    """The decoding flags given that `config` does not use, each with why."""
    out = []
    if config.do_sample:
        if args.num_beams is not None and args.num_beams > 1:
            out.append(f"--num-beams {args.num_beams} has no effect when sampling (one sample per answer)")
    else:
        why = ("--temperature 0 decodes greedily" if args.temperature is not None
               else "there is no sampling without --temperature above 0, --top-p or --do-sample")
        for flag, value in (("--do-sample", args.do_sample or None), ("--top-p", args.top_p),
                            ("--top-k", args.top_k), ("--seed", args.seed)):
            if value is not None:
                out.append(f"{flag} has no effect: {why}")
    if config.num_beams == 1 and args.length_penalty is not None:
        out.append("--length-penalty has no effect without beam search (--num-beams above 1)")
    if getattr(args, "stream", False) and args.num_beams is not None and args.num_beams > 1:
        out.append(f"--num-beams {args.num_beams} has no effect with --stream, which decodes greedily (or samples)")
    return out


_notice_shown = False


def builtin_notice(model: str | None, command: str) -> None:
    """Once per process, when no --model is given: one stderr line saying which model answers and how to use
    another (the built-in one knows only easy-vqa's pictures)."""
    global _notice_shown
    if model is None and not _notice_shown:
        from instructblip.api import BUILTIN_NOTICE

        print(f"instructblip {command}: {BUILTIN_NOTICE}", file=sys.stderr)
        _notice_shown = True


def warn_unlike_easyvqa(paths: list[str], command: str) -> None:
    """For the built-in model: a warning for each image unlike easy-vqa's, whose answer is unreliable."""
    from instructblip.api import EXAMPLE_CHECKPOINT, unlike_easyvqa

    for path in paths:
        try:
            reason = unlike_easyvqa(path)
        except Exception:  # an unreadable image fails later with its own message
            continue
        if reason:
            print(f"instructblip {command}: warning: {path} is not an easy-vqa picture ({reason}): the built-in "
                  f"model's answer about it is unreliable; use --model {EXAMPLE_CHECKPOINT} or another checkpoint",
                  file=sys.stderr)


def _load(args: argparse.Namespace, command: str = "ask"):
    from instructblip.api import load

    builtin_notice(args.model, command)
    return load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                quantize_vision=args.quantize_vision)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory; give an image file")


def cmd_ask(argv: list[str]) -> int:
    args = ask_parser().parse_args(argv)
    _check_file(args.image)
    gen = _generation(args, "ask")
    if args.model is None:
        builtin_notice(None, "ask")
        warn_unlike_easyvqa([args.image], "ask")
    vlm = _load(args, "ask")
    if args.stream:
        for piece in vlm.stream(args.image, args.instruction, **gen):
            print(piece, end="", flush=True)
        print()
    else:
        print(vlm.ask(args.image, args.instruction, **gen))
    return 0


def cmd_caption(argv: list[str]) -> int:
    args = caption_parser().parse_args(argv)
    for path in args.images:
        _check_file(path)
    gen = _generation(args, "caption")
    if args.model is None:
        builtin_notice(None, "caption")
        warn_unlike_easyvqa(args.images, "caption")
    vlm = _load(args, "caption")
    captions = vlm.caption(list(args.images), prompt=args.prompt, **gen)
    for path, caption in zip(args.images, captions, strict=True):
        print(f"{path}\t{caption}" if len(args.images) > 1 else caption)
    return 0


_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _stored_on_hub(model: str, directory: str, revision: str | None) -> str:
    """The dtype a hub checkpoint is stored in, from its safetensors headers (range requests: no weights read);
    CheckpointNotFoundError when they cannot be read."""
    from instructblip.files import read_json
    from instructblip.hub import safetensors_headers

    index = read_json(os.path.join(directory, "model.safetensors.index.json"), missing_ok=True)
    files = sorted(set(index.get("weight_map", {}).values())) or ["model.safetensors"]
    tensors, read = safetensors_headers(model, files, revision=revision)
    dtypes = [info["dtype"] for key, info in tensors.items() if key != "query_tokens"]
    floating = [d for d in dtypes if d in _DTYPE_NAMES]
    stored = _DTYPE_NAMES[floating[0]] if floating else "unknown"
    return f"{stored} (the headers of {len(files)} safetensors file(s), {_bytes(read)} read; no weights)"


def cmd_info(argv: list[str]) -> int:
    import torch

    from instructblip.api import default_model_dir
    from instructblip.hub import CheckpointNotFoundError, resolve_config_dir
    from instructblip.modeling import generation_class
    from instructblip.models.config import load_config
    from instructblip.weights.checkpoint import CheckpointError, _Reader
    from instructblip.weights.memory import FLAGS, available_bytes, needed, rest_dtype, weight_bytes

    args = info_parser().parse_args(argv)
    # a hub id not in the cache: its JSON files, then the weights' headers (below), never the weights
    directory = resolve_config_dir(args.model or default_model_dir(), revision=args.revision)
    config = load_config(directory)  # InstructBLIP, BLIP-2 or InstructBLIP-Video: its model_type says
    with torch.device("meta"):
        model = generation_class(config)(config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    parts = {"vision encoder": count(model.vision_model), "Q-Former + queries": count(model.qformer)
             + model.query_tokens.numel(), "projection": count(model.language_projection),
             "language model": count(model.language_model)}
    total = sum(parts.values())
    try:
        stored = str(_Reader(directory).first_float_dtype()).removeprefix("torch.")  # from the files' headers
    except CheckpointError:  # the weights are not here: a hub id's headers, or what the config says
        said = config.extra.get("torch_dtype", config.extra.get("dtype", "unknown"))
        stored = f"{said} (from config.json; the weights are not here)"
        if args.model is not None and not os.path.exists(args.model):
            try:
                stored = _stored_on_hub(args.model, directory, args.revision)
            except CheckpointNotFoundError as e:
                stored = f"{said} (from config.json; the safetensors headers could not be read: {e})"
    text = config.text_config
    print(f"model:      {directory} ({config.model_type})")
    print(f"LLM:        {text.model_type} ({'encoder-decoder' if text.is_encoder_decoder else 'decoder-only'}), "
          f"vocabulary {text.vocab_size}")
    print(f"images:     {config.vision_config.image_size}x{config.vision_config.image_size}, "
          f"{config.num_query_tokens} query tokens, image tokens: "
          f"{'id ' + str(config.image_token_index) if config.image_token_index is not None else 'prepended (legacy)'}")
    for name, n in parts.items():
        print(f"  {name:<20} {n / 1e6:>12,.1f} M parameters")
    print(f"  {'total':<20} {total / 1e6:>12,.1f} M parameters")
    print(f"stored as:  {stored}")
    available = available_bytes()
    free = f"{_bytes(available)} free here" if available is not None else "free memory unknown"
    rest = str(rest_dtype()).removeprefix("torch.")
    print(f"memory to load on the CPU (weights + room for activations; int8 / int4 keep the rest in {rest}; {free}):")
    for mode, size in weight_bytes(config).items():
        verdict = "" if available is None else "  fits" if needed(size) <= available else "  does not fit"
        print(f"  {mode:<10} {FLAGS[mode]:<18} weights {_bytes(size):>10}, needs {_bytes(needed(size)):>10}{verdict}")
    return 0


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_convert_lavis(argv: list[str]) -> int:
    from instructblip.weights.lavis import convert_lavis

    args = convert_lavis_parser().parse_args(argv)

    report = convert_lavis(args.lavis_checkpoint, args.vision, args.llm, args.out, image_size=args.image_size,
                           qformer_tokenizer=args.qformer_tokenizer, max_shard_size=args.max_shard_size)
    print(report.summary())
    print(f"written: {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# batch: the machinery is instructblip/batch/


def cmd_batch(argv: list[str]) -> int:
    """Exit status 0 when every record of the output is answered, 1 when some failed (their lines carry an error)."""
    from instructblip.batch import BatchConfig, merge, run
    from instructblip.batch.runner import check
    from instructblip.batch.shards import part_files

    args = batch_parser().parse_args(argv)

    if args.merge is not None:
        if args.input is not None or args.output is not None:
            raise UsageError("--merge OUT takes no INPUT and no --output; run it alone")
        if not os.path.exists(args.merge) and not part_files(args.merge):
            raise UsageError(f"--merge {args.merge}: neither the file nor part files of it exist")
        report = merge(args.merge)
        print(f"merged {report.parts} part files into {args.merge}: {report.records} records, {report.failed} with "
              f"errors", file=sys.stderr)
        return 1 if report.failed else 0
    if args.input is None or args.output is None:
        raise UsageError("batch needs INPUT and --output OUT (or --merge OUT alone)")
    config = BatchConfig(
        input=args.input, output=args.output, instruction=args.instruction, batch_size=args.batch_size,
        num_workers=args.num_workers, retry_failed=args.retry_failed, progress=not args.no_progress,
        model=args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
        quantize_vision=args.quantize_vision, generation=_generation(args, "batch"),
    )
    check(config)  # the paths and numbers, before the notice and before any model loads
    if int(os.environ.get("RANK", "0")) == 0:
        builtin_notice(args.model, "batch")
    if args.ray is not None:
        from instructblip.batch.ray_predictor import run_ray

        summary = run_ray(config, args.ray, args.ray_actors)
    else:
        summary = run(config)
    if int(os.environ.get("RANK", "0")) == 0:
        merged = f"; merged {summary.merged} part files" if summary.merged else ""
        print(f"answered {summary.answered} records now, {summary.done_before} before{merged}", file=sys.stderr)
        if summary.failed:
            print(f"{summary.failed} of {summary.records} records failed (their lines in {args.output} carry an "
                  f"error); fix the cause and rerun with --retry-failed", file=sys.stderr)
    return 1 if summary.failed else 0


# ----------------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------------
# train: one flag per TrainConfig field


def train_parser() -> argparse.ArgumentParser:
    from instructblip.training.config import CHOICES, TrainConfig, field_types

    parser = Parser(
        prog="instructblip train",
        description="Instruction-tune InstructBLIP (the paper's recipe). Values: defaults < CONFIG.yaml < flags.",
        epilog="Multi-GPU / multi-process: torchrun --nproc_per_node N -m instructblip train CONFIG.yaml ...",
    )
    parser.add_argument("config", nargs="?", help="YAML file presetting any of the flags below (keys = flag names "
                                                  "with underscores)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING and "default" not in help_text:  # shown once
            help_text += f" (default: {f.default})"
        hint = field_types()[f.name]
        if typing.get_origin(hint) is list:
            parser.add_argument(flag, dest=f.name, nargs="+", metavar="PATH", default=argparse.SUPPRESS,
                                help=help_text)
        elif f.name == "resume":
            parser.add_argument(flag, dest=f.name, nargs="?", const="latest", default=argparse.SUPPRESS,
                                help=help_text)
        elif bool in typing.get_args(hint) or hint is bool:
            parser.add_argument(flag, dest=f.name, nargs="?", const="true", metavar="BOOL",
                                default=argparse.SUPPRESS, help=help_text)
        else:
            choices = DEVICES if f.name == "device" else CHOICES.get(f.name)
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, choices=choices, help=help_text)
    parser.add_argument("--no-progress", dest="progress", action="store_const", const="false",
                        default=argparse.SUPPRESS, help="no progress bar (the same as --progress false)")
    return parser


def train_config(argv: list[str]) -> TrainConfig:
    """`[CONFIG.yaml] [--key value ...]` -> TrainConfig; bad values raise ValueError / FileNotFoundError."""
    from instructblip.training.config import config_from_dict, load_yaml

    args = vars(train_parser().parse_args(argv))
    path = args.pop("config")
    data = load_yaml(path) if path else {}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    data.update(args)
    return config_from_dict(data, where=path or "command line")


def cmd_train(argv: list[str]) -> int:
    from instructblip.training import train

    train(train_config(argv))
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# eval


def eval_parser() -> argparse.ArgumentParser:
    from instructblip.evaluation.runner import DEFAULT_BATCH_SIZE, DEFAULT_OUTPUT, DEFAULT_RANK_BATCH_SIZE
    from instructblip.evaluation.tasks import BENCHMARKS

    p = Parser(
        prog="instructblip eval",
        description="Zero-shot evaluation on the InstructBLIP paper's held-out benchmarks (Table 1), with the "
                    "paper's prompts, inference modes, generation settings and metrics. Data-parallel under "
                    "torchrun (python -m torch.distributed.run --nproc_per_node N -m instructblip eval ...).",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--benchmark", "-b", help=f"one or more (comma-separated) of: {', '.join(BENCHMARKS)}")
    what.add_argument("--all", action="store_true", help="all 13 held-out benchmarks; --data holds one folder each "
                                                         "(named as the benchmarks), and a Table 1 is printed")
    what.add_argument("--list", action="store_true", help="list the benchmarks, their files and where to get them")
    p.add_argument("--model", default=None, help="a local HF-layout directory or hub id (default: the shipped model)")
    p.add_argument("--data", default=None, help="the dataset's directory (with several benchmarks: their parent)")
    p.add_argument("--split", default=None, help="default: the split the paper reports")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N samples only")
    p.add_argument("--output", "-o", default=DEFAULT_OUTPUT, help="results directory")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="samples per forward")
    p.add_argument("--rank-batch-size", type=int, default=DEFAULT_RANK_BATCH_SIZE,
                   help="(sample, candidate) rows per forward when ranking")
    p.add_argument("--mode", choices=["generate", "rank"], default=None,
                   help="inference mode where a benchmark supports both (default: the paper's)")
    p.add_argument("--prompt", default=None, help="easy-vqa only: the instruction template, with {question}")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to run (cuda:N: that GPU)")
    _precision_flags(p)
    p.add_argument("--no-progress", "--quiet", action="store_true", dest="no_progress",
                   help="no progress bars (they are drawn only when stderr is a terminal)")
    return p


def cmd_eval(argv: list[str]) -> int:
    from instructblip.evaluation.runner import describe_benchmarks, evaluate_benchmarks
    from instructblip.evaluation.tasks import BENCHMARKS, HELD_OUT, MissingDataError

    args = eval_parser().parse_args(argv)
    if args.list:
        print(describe_benchmarks())
        return 0
    names = list(HELD_OUT) if args.all else [n.strip() for n in args.benchmark.split(",") if n.strip()]
    for name in names:
        if name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    several = len(names) > 1
    if several and args.split:
        raise ValueError("--split applies to one benchmark; each of several runs its paper split")
    if (several or args.all) and args.data is None:
        raise ValueError("--data must name the folder holding one subfolder per benchmark")
    if args.data is not None and not os.path.isdir(args.data):
        raise MissingDataError(f"--data {args.data} is not a directory")
    evaluate_benchmarks(args.model, names, args.data, split=args.split, limit=args.limit, output_dir=args.output,
                        batch_size=args.batch_size, rank_batch_size=args.rank_batch_size, mode=args.mode,
                        prompt=args.prompt, device=args.device, dtype=args.dtype, quantize=args.quantize,
                        quantize_vision=args.quantize_vision, progress=not args.no_progress)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# serve: flags for ServerConfig, plus where to bind and what to load


def serve_parser() -> argparse.ArgumentParser:
    from instructblip.serving.protocol import ServerConfig

    p = Parser(prog="instructblip serve", description="An OpenAI-compatible InstructBLIP server.")
    d = ServerConfig()
    _model_flags(p)
    _progress_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the directory name or hub id)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (or set $INSTRUCTBLIP_API_KEY, "
                   "which keeps the key out of the process list)")
    g = p.add_argument_group("images")
    g.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (public hosts only)")
    g.add_argument("--allowed-local-media-path", default=None, help="allow file:// image URLs under this directory")
    g.add_argument("--image-fetch-timeout", type=float, default=d.image_fetch_timeout, help="seconds per fetch")
    g.add_argument("--max-image-mb", type=float, default=d.max_image_bytes / 2**20, help="largest image, encoded")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="largest image, decoded (checked from its header: no decompression bombs)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20, help="largest request body")
    g.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, help="longest prompt in tokens")
    g.add_argument("--max-tokens", type=int, default=d.default_max_tokens, help="max_tokens when a request has none")
    g.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit, help="largest max_tokens accepted")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds, arrival to last token")
    g.add_argument("--max-connections", type=int, default=512,
                   help="open connections; a request on one opened past it gets 503 and the connection is closed")
    g.add_argument("--max-running-requests", type=int, default=d.max_running_requests,
                   help="API requests in progress (reading, waiting, decoding) before 503; /health is not counted")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a request's headers (after opening, or after its last "
                        "response) before it is closed")
    g.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help="seconds a request has to send its whole body (408 after)")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="requests decoding at once; waiting ones join between steps (default: as many as a "
                        "quarter of the free memory holds the KV caches of, 64 at most)")
    g.add_argument("--batch-wait-ms", type=float, default=d.batch_wait * 1000,
                   help="an idle server waits this long for more requests once one has arrived")
    g.add_argument("--max-step-tokens", type=int, default=d.max_step_tokens,
                   help="positions one step runs: running rows plus a prefill chunk")
    g.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk,
                   help="prompt positions prefilled per step while others decode")
    g.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests before 503")
    g.add_argument("--vision-cache-size", type=int, default=64, help="images whose vision features are kept")
    g = p.add_argument_group("defaults")
    g.add_argument("--num-beams", type=int, default=d.num_beams, help="search when a request has no temperature")
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help="when a request has no repetition_penalty")
    g.add_argument("--history", choices=["last", "fold"], default=d.history,
                   help="last: only the last user message; fold: earlier turns go into the prompt")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the server's log lines at this level and above")
    p.add_argument("--log-format", default=d.log_format, choices=["text", "json"],
                   help="each request's log line (instructblip.serving.access): key=value text, or one JSON object "
                   "per line with nothing around it")
    return p


def serve_config(args: argparse.Namespace) -> ServerConfig:
    from instructblip.serving.protocol import ServerConfig

    if args.allowed_local_media_path and not os.path.isdir(args.allowed_local_media_path):
        raise ValueError(f"--allowed-local-media-path {args.allowed_local_media_path}: not a directory")
    if args.max_batch_size is not None and args.max_batch_size < 1:
        raise ValueError("--max-batch-size must be >= 1")
    for name in ("max_queue", "max_prompt_tokens", "max_tokens", "max_tokens_limit", "num_beams",
                 "max_image_pixels", "max_step_tokens", "prefill_chunk", "max_connections", "max_running_requests"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("header_timeout", "body_timeout", "request_timeout"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0 seconds")
    if args.max_tokens > args.max_tokens_limit:
        raise ValueError("--max-tokens must not exceed --max-tokens-limit")
    if args.served_model_name:
        name = args.served_model_name
    elif args.model is None:
        name = "instructblip"
    else:
        name = os.path.basename(os.path.normpath(args.model)) if os.path.isdir(args.model) else args.model
    return ServerConfig(
        model_name=name, api_key=args.api_key or os.environ.get("INSTRUCTBLIP_API_KEY") or None,
        max_batch_size=args.max_batch_size, max_step_tokens=args.max_step_tokens, prefill_chunk=args.prefill_chunk,
        batch_wait=args.batch_wait_ms / 1000, max_queue=args.max_queue, request_timeout=args.request_timeout,
        max_body_bytes=int(args.max_body_mb * 2**20), max_image_bytes=int(args.max_image_mb * 2**20),
        max_image_pixels=args.max_image_pixels, max_prompt_tokens=args.max_prompt_tokens,
        default_max_tokens=args.max_tokens, max_tokens_limit=args.max_tokens_limit, num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty, history=args.history,
        allow_remote_images=args.allow_remote_images, allowed_local_media_path=args.allowed_local_media_path,
        image_fetch_timeout=args.image_fetch_timeout, log_format=args.log_format,
        max_running_requests=args.max_running_requests, body_timeout=args.body_timeout,
    )


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def security_warnings(host: str, api_key: str | None, allow_remote_images: bool) -> list[str]:
    out = []
    if not is_loopback_host(host) and not api_key:
        out.append(f"serving on {host} without --api-key: anyone who can reach this address can use the model")
    if allow_remote_images:
        out.append("--allow-remote-images: the server fetches image URLs it is sent (public addresses only)")
    return out


def check_model(model: str | None) -> None:
    """What can be wrong with --model, found before loading it (a path that is not there, a directory that is not a
    model, a config or weights file that cannot be read): a UsageError naming the problem and the fix."""
    from instructblip.api import default_model_dir
    from instructblip.hub import CheckpointNotFoundError, resolve_checkpoint_dir
    from instructblip.models.config import ConfigError, load_config
    from instructblip.weights.checkpoint import CheckpointError, check_weights

    fix = "pass --model a directory holding config.json and model.safetensors, or a hub id"
    try:
        directory = resolve_checkpoint_dir(default_model_dir() if model is None else model)
    except CheckpointNotFoundError as e:  # its message says what to pass instead
        raise UsageError(f"--model {model}: {e}") from None
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise UsageError(f"--model {model}: {directory} is not a model directory (it has no config.json); {fix}")
    try:
        load_config(directory)
        check_weights(directory)
    except (ConfigError, CheckpointError) as e:
        raise UsageError(f"--model {model}: {e}; {fix}") from None
    except OSError as e:
        raise UsageError(f"--model {model}: cannot read {e.filename or directory} ({e.strerror or e}); make it "
                         f"readable, or {fix}") from None


def cmd_serve(argv: list[str]) -> int:
    """Check the flags, bind the port and check the model (each error before the slow load), then load the model and
    serve it until interrupted."""
    import logging

    import uvicorn

    from instructblip.api import load
    from instructblip.serving.app import create_app
    from instructblip.serving.connections import HTTPProtocol, bind

    args = serve_parser().parse_args(argv)
    config = serve_config(args)
    sockets = bind(args.host, args.port)
    try:
        check_model(args.model)
        builtin_notice(args.model, "serve")
        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
        log = logging.getLogger("instructblip.serving.app")  # the server's own lines; each request's: ...serving.access
        if config.log_format == "json":  # the request lines bare, one JSON object per line, for a log shipper to parse
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            access = logging.getLogger("instructblip.serving.access")
            access.addHandler(handler)
            access.propagate = False
        for warning in security_warnings(args.host, config.api_key, config.allow_remote_images):
            log.warning(warning)
        vlm = load(args.model, device=args.device, dtype=args.dtype, vision_cache_size=args.vision_cache_size,
                   quantize=args.quantize, quantize_vision=args.quantize_vision)
        app = create_app(vlm, config)
        port = sockets[0].getsockname()[1]
        log.info("serving %r on http://%s:%d (web page at /, API at /v1)", config.model_name, args.host, port)
        # the connection cap and the header timeout are the protocol's (serving/connections.py), not uvicorn's
        # limit_concurrency, which counts idle connections against running requests
        server = uvicorn.Server(uvicorn.Config(
            app, host=args.host, port=port, log_level=args.log_level, timeout_keep_alive=5,
            timeout_graceful_shutdown=10, server_header=False, ws="none",  # no websocket routes
            access_log=False,  # the server writes its own line per request (serving/access.py), with more in it
            http=HTTPProtocol.factory(args.max_connections, args.header_timeout)))
        # uvicorn shuts down on Ctrl-C, then raises the signal again; uvicorn.run swallows it, and so do we
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
    return 0 if server.started else 1


# ----------------------------------------------------------------------------------------------------------------------


# every command: (its parser, what runs it on the rest of the command line, its line in `instructblip --help`)
COMMANDS = {
    "ask": (ask_parser, cmd_ask, "answer an instruction about an image (or a video)"),
    "caption": (caption_parser, cmd_caption, "describe one or more images (or videos)"),
    "batch": (batch_parser, cmd_batch, "answer many records, resumably"),
    "info": (info_parser, cmd_info, "sizes and memory needs of a model (a hub id: headers only)"),
    "convert-lavis": (convert_lavis_parser, cmd_convert_lavis, "convert an original LAVIS checkpoint to the HF layout"),
    "train": (train_parser, cmd_train, "instruction-tune a model (torchrun-ready)"),
    "eval": (eval_parser, cmd_eval, "zero-shot evaluation on the paper's benchmarks"),
    "serve": (serve_parser, cmd_serve, "an OpenAI-compatible HTTP server with a web page"),
}


def main(argv: list[str] | None = None) -> int:
    """Each command parses the rest of the line with its own parser, so that its usage and errors name it
    ("instructblip ask: error: unrecognized arguments: --beams 3; did you mean --num-beams?")."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-"):
        args = build_parser().parse_args(argv[:1] if argv and argv[0] in ("-h", "--help") else argv)
        if args.version:
            print(version())
            return 0
        build_parser().error("give a COMMAND (instructblip --help lists them)")
    command = argv[0]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; choose from {', '.join(COMMANDS)}"
        build_parser().error(f"unknown command {command!r}{hint}")
    rest = argv[1:]
    if "--no-progress" in rest:
        from instructblip import progress

        progress.disable()
    run = lambda: COMMANDS[command][1](rest)  # noqa: E731
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
