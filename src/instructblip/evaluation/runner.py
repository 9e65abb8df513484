"""The paper's zero-shot protocol on its 13 held-out benchmarks (`instructblip eval`), one call each.

    instructblip eval --model M --benchmark gqa --data data/gqa [--split testdev] [--limit N] [--output DIR]
    instructblip eval --model M --all --data data/            # data/<benchmark>/ each; prints Table 1
    instructblip eval --list                                   # benchmarks, expected files, where to get them
    torchrun --nproc_per_node 8 -m instructblip eval ...       # data-parallel; same predictions as one process

Python: `evaluate(model, "gqa", "data/gqa", output_dir="eval_results")` returns the results dict;
`evaluate_benchmarks` runs several with one model and prints Table 1, as the command does.

Outputs, in `--output` (default `eval_results/`), named `<benchmark>_<split>[_<mode>]`:
- `.predictions.jsonl`: one JSON line per sample (`id`, the sample's fields, `prompt`, `target`, `prediction`,
  ...), each written with a single write(2) on an O_APPEND descriptor as soon as its batch is done, so a killed run
  leaves only whole lines; a rerun skips the samples already there. At the end the file is rewritten in the
  dataset's order (atomically), so one process and N processes leave the same file.
- `.results.json`: the metrics, the settings used (prompt, mode, generation settings, image preprocessing), the
  model, and the paper's numbers for the benchmark.
- `.run.json`: the settings, written first; a rerun with different settings refuses to mix its predictions in.

Data parallelism (`torchrun`; gloo on CPU, nccl on GPUs): the samples left to do are cut into batches exactly as
one process would cut them, and rank r takes batches r, r + W, ...; so every batch, and hence every prediction, is
the one a single process computes. All ranks append to the same predictions file (whole-line appends; use a local
or POSIX-append-safe filesystem); rank 0 gathers the records, scores them and writes the results.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from instructblip.evaluation.tasks import (
    BENCHMARKS,
    HELD_OUT,
    TABLE1,
    Benchmark,
    MissingDataError,
    Sample,
    get_benchmark,
    paper_numbers,
    paper_row,
    read_frames,
)
from instructblip.progress import progress_bar

DEFAULT_OUTPUT = "eval_results"
DEFAULT_BATCH_SIZE = 8
DEFAULT_RANK_BATCH_SIZE = 128  # (sample, candidate) rows per language-model forward when ranking


# ---------------------------------------------------------------------------------------------------------------------
# distributed plumbing (a no-op in a single process)


def _dist(cuda: bool) -> tuple[int, int]:
    """(rank, world size); initialises the process group (nccl for a model on GPUs, else gloo) when launched by
    torchrun and not yet initialised."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _gather(obj: Any, world: int) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# model inputs


def _media(bench: Benchmark, sample: Sample) -> list:
    """The images of one sample: [path] for an image benchmark, `num_frames` frames for a video benchmark."""
    if not os.path.exists(sample.media):
        raise MissingDataError(f"{bench.name}: {sample.media} (sample {sample.id}) not found. Expected layout: "
                               f"{bench.layout}. Get it from {bench.source}")
    return read_frames(sample.media, bench.num_frames) if bench.video else [sample.media]


def build_inputs(vlm, media: list[list], prompts: list[str]) -> dict:
    """Model inputs for a batch: `media` holds one list of images per sample (1 image, or n video frames).

    Images: the processor's output. Videos: the processor's video inputs (n x Q `<image>` tokens in front of each
    prompt for image-token checkpoints; legacy ones prepend the features inside the model), and the model's video
    path (`get_image_features` on (B, n, 3, H, W): every frame through the vision encoder and the Q-Former with the
    sample's instruction, the n x Q query outputs of a sample concatenated) run here once, into `image_features`
    (B, n * Q, D), so that generation and ranking start from the features. BLIP-2's Q-Former reads no instruction:
    its processor writes no `qformer_*` inputs.
    """
    proc, model = vlm.processor, vlm.model
    n = len(media[0])
    if any(len(m) != n for m in media):
        raise ValueError("every sample of a batch needs the same number of frames")
    if n == 1:
        inputs = proc(images=[m[0] for m in media], text=prompts, padding=True)
        return inputs.to(model.device, dtype=model.dtype)
    inputs = dict(proc(videos=media, text=prompts, padding=True).to(model.device, dtype=model.dtype))
    with torch.no_grad():
        features = model.get_image_features(inputs.pop("pixel_values"), inputs.pop("qformer_input_ids", None),
                                            inputs.pop("qformer_attention_mask", None)).pooler_output  # (B, n*Q, D)
    return {"image_features": features, **inputs}


def predict(vlm, bench: Benchmark, batch: list[Sample], rank_batch_size: int | None = DEFAULT_RANK_BATCH_SIZE
            ) -> list[dict]:
    """The prediction records of one batch: generation with the benchmark's settings, or candidate ranking."""
    inputs = build_inputs(vlm, [_media(bench, s) for s in batch], [s.prompt for s in batch])
    model = vlm.model
    if bench.mode == "generate":
        settings = bench.generation_settings(model.config.text_config.is_encoder_decoder)
        tokens = model.generate(**inputs, **settings)
        answers = [a.strip() for a in vlm.processor.batch_decode(tokens, skip_special_tokens=True)]
        return [bench.record(s, answer=a) for s, a in zip(batch, answers, strict=True)]
    first = batch[0].candidates
    shared = all(s.candidates is first for s in batch)
    candidates = first if shared else [s.candidates for s in batch]
    out = model.rank(inputs, candidates, tokenizer=vlm.processor.tokenizer, batch_size=rank_batch_size)
    return [bench.record(s, scores=out.scores[i, : len(s.candidates)].tolist()) for i, s in enumerate(batch)]


# ---------------------------------------------------------------------------------------------------------------------
# files


def _read_predictions(path: Path) -> dict[str, dict]:
    """The records already written (first one per id); a line that does not parse is skipped."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "id" in record:
                done.setdefault(str(record["id"]), record)
    return done


def _write_line(fd: int, record: dict) -> None:
    """One whole line per write(2) on an O_APPEND descriptor: a kill never leaves half a record."""
    os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _check_run(path: Path, run: dict) -> None:
    """Write the run's settings, or refuse to resume a run made with other settings."""
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != run:
            changed = sorted(k for k in run.keys() | before.keys() if run.get(k) != before.get(k))
            raise ValueError(f"{path.parent} holds predictions made with other settings ({', '.join(changed)}); "
                             f"use another --output or delete {path.name} and its predictions")
    else:
        _write_atomic(path, json.dumps(run, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# the Python entry point


def evaluate(model: Any, benchmark: str | Benchmark, data_dir: str | os.PathLike | None = None,
             split: str | None = None, limit: int | None = None, output_dir: str | os.PathLike | None = None,
             batch_size: int = DEFAULT_BATCH_SIZE, mode: str | None = None, prompt: str | None = None,
             device: str = "auto", dtype: str = "auto", rank_batch_size: int | None = DEFAULT_RANK_BATCH_SIZE,
             model_name: str | None = None, progress: bool = True, samples: list[Sample] | None = None,
             quantize: str | None = None, quantize_vision: str | None = None) -> dict:
    """Run one benchmark zero-shot and score it; returns the results dict (on every rank under torchrun).

    `model`: an `InstructBlip` (from `instructblip.load`), or a directory / hub id to load (None: the default
    model). `benchmark`: a name from `BENCHMARKS` or an adapter. `limit`: the first N samples only. `output_dir`:
    where predictions and results go (None: nothing written, no resuming). `mode`: "generate" or "rank" where the
    benchmark supports both; `prompt`: the easy-vqa instruction template. `rank_batch_size`: (sample, candidate)
    rows per forward when ranking. `samples`: the split's samples if already loaded (`benchmark.load`).
    `quantize`: "int8" or "int4" to quantize the LLM when loading, `quantize_vision`: "int8" for the vision encoder
    (CPU; `accel.quantize`).
    """
    from instructblip.api import InstructBlip, load

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if isinstance(model, InstructBlip):
        rank, world = _dist(model.device.type == "cuda")
    else:
        rank, world = _dist(torch.cuda.is_available() and device in ("auto", "cuda"))
    if isinstance(benchmark, str):
        options = {"mode": mode} | ({"prompt": prompt} if prompt is not None else {})
        if prompt is not None and benchmark != "easy-vqa":
            raise ValueError("--prompt is for easy-vqa only; the paper's benchmarks use the paper's prompts")
        bench = get_benchmark(benchmark, **options)
    else:
        bench = benchmark
    split = split or bench.splits[0]
    if samples is None:
        samples = bench.load(data_dir, split)
    if limit is not None:
        samples = samples[:limit]
    if isinstance(model, InstructBlip):
        vlm = model
        model_name = model_name or "(in-memory model)"
    else:
        if world > 1 and torch.cuda.is_available() and device in ("auto", "cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        vlm = load(model, device=device, dtype=dtype, quantize=quantize, quantize_vision=quantize_vision)
        model_name = model_name or (str(model) if model is not None else "default model")
    is_t5 = vlm.model.config.text_config.is_encoder_decoder
    settings = {
        **bench.settings(is_t5),
        "image_processor": {k: v for k, v in vlm.processor.image_processor.to_dict().items()
                            if k in ("size", "resample", "image_mean", "image_std", "do_resize", "do_normalize")},
        "num_query_tokens": vlm.model.config.num_query_tokens,
        "dtype": str(vlm.model.dtype).removeprefix("torch."),
    }
    if vlm.model.quantized:  # part of the settings a resumed run must share
        settings["quantized"] = vlm.model.quantized
    if vlm.model.quantized_vision:
        settings["quantized_vision"] = vlm.model.quantized_vision
    run = {"benchmark": bench.name, "split": split, "model": model_name, "settings": settings}

    stem = f"{bench.name}_{split}" + ("" if bench.mode == type(bench).mode else f"_{bench.mode}")
    out = Path(output_dir) if output_dir is not None else None
    predictions_path = out / f"{stem}.predictions.jsonl" if out else None
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _check_run(out / f"{stem}.run.json", run)
    _barrier(world)
    done = _read_predictions(predictions_path) if predictions_path else {}
    _barrier(world)  # everyone has read the file before anyone appends to it

    todo = [s for s in samples if s.id not in done]
    batches = [todo[i: i + batch_size] for i in range(0, len(todo), batch_size)]
    mine = batches[rank::world]
    start = time.time()
    bar = progress_bar(len(todo), bench.name, unit="sample", enabled=progress and rank == 0)
    fd = os.open(predictions_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if predictions_path else None
    new: dict[str, dict] = {}
    try:
        for batch in mine:
            for sample, record in zip(batch, predict(vlm, bench, batch, rank_batch_size), strict=True):
                line = {"id": sample.id, **sample.info, "prompt": sample.prompt, "target": sample.target, **record}
                new[sample.id] = line
                if fd is not None:
                    _write_line(fd, line)
            bar.update(len(batch) * world)  # the others' batches are as large, but for the last
    finally:
        bar.close()
        if fd is not None:
            os.close(fd)

    gathered = _gather(new, world)
    results = None
    if rank == 0:
        records = dict(done)
        for part in gathered:
            records.update(part)
        results = _score(bench, samples, records, run, limit, world, time.time() - start)
        results["batch_size"] = batch_size
        if out is not None:
            ids = {s.id for s in samples}
            ordered = [records[s.id] for s in samples] + [r for k, r in records.items() if k not in ids]
            _write_atomic(predictions_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
            results["predictions"] = str(predictions_path)
            _write_atomic(out / f"{stem}.results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    if world > 1:
        box = [results]
        torch.distributed.broadcast_object_list(box, src=0)
        results = box[0]
    return results


def _score(bench: Benchmark, samples: list[Sample], records: dict[str, dict], run: dict, limit: int | None,
           world: int, elapsed: float) -> dict:
    missing = [s.id for s in samples if s.id not in records]
    if missing:
        raise RuntimeError(f"{bench.name}: no prediction for {len(missing)} samples (e.g. {missing[:3]})")
    metrics = bench.score([(s, records[s.id]) for s in samples])
    headline = next(iter(metrics))
    row = paper_row(run["model"])
    return {
        "benchmark": bench.name, "title": bench.title, "split": run["split"], "model": run["model"],
        "metric": headline, "score": metrics[headline], "metrics": metrics, "num_samples": len(samples),
        "limit": limit, "settings": run["settings"], "paper_row": row, "paper": paper_numbers(bench.name),
        "world_size": world, "elapsed_s": round(elapsed, 1),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Table 1


def format_table(ours: dict[str, float | None], model_name: str) -> str:
    """A markdown table laid out like the paper's Table 1: its rows, then ours (`ours`: benchmark -> score)."""
    header = ["Model", *(BENCHMARKS[name].title for name in HELD_OUT)]
    rows = [[row, *("–" if v is None else f"{v:.1f}" for v in values)] for row, values in TABLE1.items()]
    rows.append([f"**ours: {model_name}**", *("–" if ours.get(n) is None else f"{ours[n]:.1f}" for n in HELD_OUT)])
    reference = paper_row(model_name)
    if reference is not None:
        values = TABLE1[reference]
        rows.append([f"ours - {reference}", *(
            "–" if ours.get(n) is None or v is None else f"{ours[n] - v:+.1f}" for n, v in zip(HELD_OUT, values,
                                                                                              strict=True))])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# several benchmarks with one model (`instructblip eval`)


def describe_benchmarks() -> str:
    """One entry per benchmark: title, metric, modes, splits, the files expected and where to get them."""
    lines = []
    for name, cls in BENCHMARKS.items():
        modes = "/".join(cls.modes)
        lines.append(f"{name:13} {cls.title:10} {cls.metric:9} {modes:16} splits: {', '.join(cls.splits)}")
        lines.append(f"{'':13} files: {cls.layout}")
        lines.append(f"{'':13} from:  {cls.source}")
    return "\n".join(lines)


def evaluate_benchmarks(model: str | None, names: list[str], data: str | None, split: str | None = None,
                        limit: int | None = None, output_dir: str = DEFAULT_OUTPUT,
                        batch_size: int = DEFAULT_BATCH_SIZE, rank_batch_size: int = DEFAULT_RANK_BATCH_SIZE,
                        mode: str | None = None, prompt: str | None = None, device: str = "auto", dtype: str = "auto",
                        quantize: str | None = None, quantize_vision: str | None = None,
                        progress: bool = True) -> dict[str, float | None]:
    """Evaluate the model `model` (a directory or hub id; None: the shipped model) on `names`, printing one line per
    benchmark and, for several, the paper's Table 1 with ours added (also written to `output_dir`/table1.md).

    With several benchmarks, `data` holds one folder per benchmark (a benchmark without one is skipped, with a
    message), `mode` applies to those that support it, and each runs its paper split. Every benchmark's annotations
    are read before the model is loaded, so that missing data is reported first. Returns benchmark -> score.
    """
    from instructblip.api import load

    several = len(names) > 1
    jobs = []
    for name in names:
        # with several benchmarks, --mode applies to those that support it; one benchmark must support it
        options: dict[str, Any] = {"mode": mode if not several or mode in BENCHMARKS[name].modes else None}
        if prompt is not None:
            if name != "easy-vqa":
                raise ValueError("--prompt is for easy-vqa only; the paper's benchmarks use the paper's prompts")
            options["prompt"] = prompt
        bench = get_benchmark(name, **options)
        folder = data
        if several:
            folder = os.path.join(data, name)
            if name == "easy-vqa" and not os.path.isdir(folder):
                folder = None  # the data come with the package
        try:
            jobs.append((bench, bench.load(folder, split)))
        except MissingDataError as e:
            if not several:
                raise
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"{name}: skipped, {e}", file=sys.stderr)
    if not jobs:
        raise MissingDataError(f"no benchmark data found under {data}; run `instructblip eval --list` to see "
                               f"the folders and files expected")

    initialised_here = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (
        torch.distributed.is_available() and torch.distributed.is_initialized())
    rank, world = _dist(torch.cuda.is_available() and device in ("auto", "cuda"))
    if world > 1 and torch.cuda.is_available() and device in ("auto", "cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    model_name = model or "default model"
    vlm = load(model, device=device, dtype=dtype, quantize=quantize, quantize_vision=quantize_vision)
    scores: dict[str, float | None] = {}
    try:
        for bench, samples in jobs:
            name = bench.name
            results = evaluate(vlm, bench, split=split, limit=limit, output_dir=output_dir, batch_size=batch_size,
                               rank_batch_size=rank_batch_size, model_name=model_name, progress=progress,
                               samples=samples)
            scores[name] = results["score"]
            if rank == 0:
                others = ", ".join(f"{k} {v:.2f}" for k, v in results["metrics"].items() if k != results["metric"])
                row = results["paper_row"]
                paper = f"; paper ({row}): {results['paper'][row]}" if row and row in results["paper"] else ""
                print(f"{name} ({results['split']}, {results['num_samples']} samples): {results['metric']} "
                      f"{results['score']:.2f}" + (f" ({others})" if others else "") + paper)
        if several and rank == 0:
            table = format_table(scores, model_name)
            print(table)
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            _write_atomic(Path(output_dir) / "table1.md", table + "\n")
    finally:
        if initialised_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return scores
