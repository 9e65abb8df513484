"""Throughput of `instructblip batch` with the built-in model on the easy-vqa test images.

    python benchmarks/batch_throughput.py [--records 240] [--reps 3] [--batch-size 8] [--max-new-tokens 8]

Two comparisons, each run as the command a user types, in a fresh process, the variants taking turns, `--reps`
times each, into a fresh output (nothing to resume):

1. image decoding: `--num-workers 0` (the main process decodes each batch's images before the model runs) against
   `--num-workers 2` (two DataLoader workers decode ahead of the model). Target: >= 1.3x.
2. processes: `torchrun --nproc_per_node 2` (gloo, CPU; torchrun gives each rank one thread) against
   `--nproc_per_node 1` (one process, torch's default threads); the merged outputs must hold the same answers.

The time is the whole command's wall-clock time (start-up, model load, the run, the merge); records/s divides the
records by it. A run during which this process was stopped or starved for over a second is done again. To tell
where the time goes, it also measures, in this process, decoding and preprocessing every image once, and
answering the records from already-decoded pixels (the model alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def records(n: int) -> list[dict]:
    import easy_vqa

    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    if n > len(questions):
        raise SystemExit(f"--records: easy-vqa has {len(questions)} test questions")
    # questions spread over the whole test set, so that most records have an image of their own (as in real data)
    step = max(1, len(questions) // n)
    return [{"id": f"q{i}", "image": paths[image_ids[i]], "instruction": questions[i]}
            for i in range(0, step * n, step)]


def timed(command: list[str], env: dict) -> float | None:
    """The command's wall-clock seconds, or None when this process was stopped or starved for over a second
    meanwhile (a shared machine: someone else's timing, a SIGSTOP), so that the run is done again."""
    ticks = {"last": time.monotonic(), "gap": 0.0, "run": True}

    def watch() -> None:
        while ticks["run"]:
            time.sleep(0.1)
            now = time.monotonic()
            ticks["gap"], ticks["last"] = max(ticks["gap"], now - ticks["last"]), now

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    ticks["run"] = False
    watcher.join()
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return None if ticks["gap"] > 1.0 else seconds


def answers(path: str) -> dict:
    with open(path) as f:
        return {row["id"]: row.get("answer", row.get("error")) for row in map(json.loads, f)}


def in_process(rows: list[dict], batch_size: int, generation: dict) -> dict:
    """Seconds to decode every image once, and to answer every record from decoded pixels (the model alone)."""
    import numpy as np
    import torch

    from instructblip import load

    vlm = load(None)
    start = time.perf_counter()
    pixels = [vlm.preprocess(r["image"]) for r in rows]
    decode = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        vlm.ask_preprocessed(torch.from_numpy(np.stack(pixels[i:i + batch_size])), [r["instruction"] for r in chunk],
                             **generation)
    return {"decode_s": decode, "model_s": time.perf_counter() - start, "threads": torch.get_num_threads()}


def summary(name: str, seconds: list[float], n: int) -> dict:
    rates = sorted(n / s for s in seconds)
    return {"variant": name, "seconds": [round(s, 2) for s in seconds], "rec_s_min": round(rates[0], 1),
            "rec_s_median": round(statistics.median(rates), 1), "rec_s_max": round(rates[-1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=240)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--skip", choices=["workers", "torchrun"], action="append", default=[])
    parser.add_argument("--pause-while", metavar="PATH", default=None,
                        help="before each run, wait while PATH exists (a shared machine's sign that someone is timing)")
    args = parser.parse_args()

    rows = records(args.records)
    generation = ["--num-beams", "1", "--max-new-tokens", str(args.max_new_tokens), "--batch-size",
                  str(args.batch_size), "--no-progress"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("OMP_NUM_THREADS", None)
    cli = [sys.executable, "-m", "instructblip", "batch"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    report = {"cpu": cpu_name(), "cores": os.cpu_count(), "records": len(rows), "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "in.jsonl")
        with open(source, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

        def run(name: str, command: list[str], rep: int) -> float:
            for attempt in range(5):
                while args.pause_while and os.path.exists(args.pause_while):
                    time.sleep(5)
                out = os.path.join(tmp, f"{name}-{rep}-{attempt}.jsonl")
                seconds = timed([*command, source, "-o", out, *generation], env)
                outputs.setdefault(name, answers(out))
                if seconds is not None:
                    return seconds
                print(f"rep {rep} {name}: stalled, again", file=sys.stderr, flush=True)
            raise SystemExit("five runs in a row stalled: the machine is too busy to measure")

        outputs: dict[str, dict] = {}
        variants = {}
        if "workers" not in args.skip:
            variants["workers-0"] = [*cli, "--num-workers", "0"]
            variants["workers-2"] = [*cli, "--num-workers", "2"]
        if "torchrun" not in args.skip:
            variants["torchrun-1"] = [*torchrun, "--nproc_per_node", "1", "-m", "instructblip", "batch"]
            variants["torchrun-2"] = [*torchrun, "--nproc_per_node", "2", "-m", "instructblip", "batch"]
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(args.reps):  # the variants take turns, so a slow patch of the machine hits them all
            for name, command in variants.items():
                times[name].append(run(name, command, rep))
                print(f"rep {rep} {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
        report["runs"] = [summary(name, seconds, len(rows)) for name, seconds in times.items()]
        reference = next(iter(outputs.values()))
        report["same_answers"] = {name: out == reference for name, out in outputs.items()}
        for base, other in (("workers-0", "workers-2"), ("torchrun-1", "torchrun-2")):
            if base in times:
                ratios = sorted(a / b for a in times[base] for b in times[other])
                report[f"speedup {other} / {base}"] = {
                    "median": round(statistics.median(times[base]) / statistics.median(times[other]), 2),
                    "range": [round(ratios[0], 2), round(ratios[-1], 2)]}
    while args.pause_while and os.path.exists(args.pause_while):
        time.sleep(5)
    report["in_process"] = in_process(rows, args.batch_size, {"num_beams": 1, "max_new_tokens": args.max_new_tokens})
    print(json.dumps(report, indent=2))


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


if __name__ == "__main__":
    main()
