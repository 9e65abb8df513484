"""The paper's instruction-aware Q-Former ablation on scenes, where the question decides what must be seen.

    python recipes/scenes/ablation.py --quick          # = make scenes-quick: (a) against (b), 2 queries, one seed
    python recipes/scenes/ablation.py                  # = make scenes-ablation: every run, query count and seed
    python recipes/scenes/ablation.py --queries 2 --runs full no_instruction --seeds 0 1 2   # some cells

Once: data, tokenizers, stage 0 (ViT) and stage 0b (LLM). Per query count (`ablation.yaml` queries): stage 1 (the
blind Q-Former, BLIP-2 stand-in). Per query count, run and seed: stage 2, then the evaluation on the test scenes
(the same for every cell):

- held-in: one question of each held-in type per test scene, prompt "Question: {} Short answer:" (held in);
- held-out type: one question of the held-out type (data.yaml) per test scene, same prompt (never in stage 2);
- held-out templates: the held-in questions, each in one of the three held-out templates (never in any stage).

Accuracy: the greedy first token is the answer (every answer is one token); ranking among the type's answers is kept
in the JSON too. A rerun skips what is done (every stage's model and every cell's scores stay in the work
directory); `ablation.md` / `ablation.json` there get the table of every cell done so far, `not run` elsewhere.
`--quick` prints both accuracies and, as its last line, `gap: X.X points` (full minus no_instruction, held-in).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import random
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    """A module of this folder under its own name: `recipe` is also the easy-vqa recipe's module name."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


R = _load("scenes_recipe", HERE / "recipe.py")  # the recipe's own module, next to this file
S = R.S  # the generator

REPO = R.HERE.parent.parent
COLUMNS = ("held_in", "held_out_type", "held_out_templates")
TITLES = {"held_in": "held-in", "held_out_type": "held-out type", "held_out_templates": "held-out templates"}
NAMES = {"full": "(a) full", "no_instruction": "(b) w/o instruction to the Q-Former",
         "no_balancing": "(c) w/o balanced sampling"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", help="all outputs (default: runs/scenes-ablation, with --quick runs/scenes-quick)")
    p.add_argument("--quick", action="store_true", help="ablation.yaml's quick settings: (a) vs (b), 2 queries, "
                                                        "one seed, fewer scenes and steps")
    p.add_argument("--seeds", type=int, nargs="+", help="stage-2 seeds (default: ablation.yaml)")
    p.add_argument("--queries", type=int, nargs="+", help="query counts (default: ablation.yaml)")
    p.add_argument("--runs", nargs="+", help="runs among ablation.yaml's (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="processes side by side: stages 0 and 0b, and the stage-2 "
                                                        "cells of a query count (default 2: one per core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (on a shared machine, two "
                                                          "threads per process ran many times slower than one)")
    # reduced sizes (the tests, quick tries)
    p.add_argument("--train-scenes", type=int)
    p.add_argument("--test-scenes", type=int)
    p.add_argument("--stage0-steps", type=int)
    p.add_argument("--stage0-llm-steps", type=int)
    p.add_argument("--stage1-steps", type=int)
    p.add_argument("--stage2-steps", type=int)
    p.add_argument("--batch-size", type=int)
    args = p.parse_args(argv)
    for name in ("train_scenes", "test_scenes", "stage0_steps", "stage0_llm_steps", "stage1_steps", "stage2_steps",
                 "batch_size", "threads", "jobs"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


def settings(args: argparse.Namespace) -> dict:
    """Every number of the run: the YAML files, then --quick's overrides, then the flags."""
    config = R.load_yaml(R.HERE / "ablation.yaml")
    data = R.load_yaml(R.HERE / "data.yaml")
    out = {"data": data, "spec": R.load_yaml(R.HERE / "model.yaml"), "seeds": config["seeds"],
           "queries": config["queries"], "runs": list(config["runs"]), "run_settings": config["runs"],
           "stage0": R.load_yaml(R.HERE / "stage0.yaml"), "stage0_llm": R.load_yaml(R.HERE / "stage0_llm.yaml"),
           "stage1": R.load_yaml(R.HERE / "stage1.yaml"), "stage2": R.load_yaml(R.HERE / "stage2.yaml")}
    steps = {"stage0": None, "stage0_llm": None, "stage1": None, "stage2": None}
    if args.quick:
        quick = config["quick"]
        out.update(seeds=quick["seeds"], queries=quick["queries"], runs=quick["runs"])
        data["train_scenes"] = quick["train_scenes"]
        steps = {name: quick[f"{name}_steps"] for name in steps}
    for name in steps:
        steps[name] = getattr(args, f"{name}_steps") or steps[name]
    out["seeds"] = args.seeds or out["seeds"]
    out["queries"] = args.queries or out["queries"]
    out["runs"] = args.runs or out["runs"]
    unknown = sorted(set(out["runs"]) - set(config["runs"]))
    if unknown:
        raise SystemExit(f"--runs: unknown run(s) {unknown}; ablation.yaml has {', '.join(config['runs'])}")
    if any(q < 1 or q > R.MAX_SLOTS for q in out["queries"]):
        raise SystemExit(f"--queries: each must be 1..{R.MAX_SLOTS} (stage 0b's text scenes use at most "
                         f"{R.MAX_SLOTS} positions), got {out['queries']}")
    data["train_scenes"] = args.train_scenes or data["train_scenes"]
    data["test_scenes"] = args.test_scenes or data["test_scenes"]
    for name, value in steps.items():
        if value:
            stage = out[name]
            stage["max_steps"] = value
            stage["warmup_steps"] = min(stage["warmup_steps"], value // 10)
    if args.batch_size:
        for name in ("stage0", "stage0_llm"):
            out[name]["batch_size"] = args.batch_size
        for name in ("stage1", "stage2"):
            out[name]["global_batch_size"] = out[name]["micro_batch_size"] = args.batch_size
    if set(data["held_out_templates"]) & (set(data["stage1_templates"]) | set(out["stage0_llm"]["templates"])
                                          | {data["eval_template"]}):
        raise SystemExit("a held-out template is among the templates of stage 0b, stage 1 or the held-in columns")
    return out


class Base:
    """What every cell shares: data, tokenizers, the pre-trained ViT and LLM, and the ViT's output per image."""

    def __init__(self, work: Path, cfg: dict, jobs: int, threads: int):
        from instructblip.processing.templates import VQA_TEMPLATES

        data, spec = cfg["data"], cfg["spec"]
        self.work, self.cfg, self.jobs, self.threads = work, cfg, jobs, threads
        seed = data["seed"]
        clock = Clock()
        self.train = R.make_split(seed, "train", data["train_scenes"], data["questions_per_scene"])
        self.test = R.make_split(data["test_seed"], "test", data["test_scenes"])
        self.seconds = {"data": clock.lap()}
        self.held_in_templates = [t for i, t in enumerate(VQA_TEMPLATES) if i not in data["held_out_templates"]]
        self.vocab_file = R.make_tokenizers(work / "tokenizers", R.text_corpus([q for _, q in self.train.questions]),
                                            spec)
        self.init = R.write_model(work / "init", spec, spec["num_query_tokens"], work / "tokenizers", self.vocab_file,
                                  seed)
        self.seconds["tokenizers, initial model"] = clock.lap()
        # stages 0 and 0b are independent (each trains its own part of the initial model): side by side with --jobs 2
        vision, llm = parallel(self, _pretrain, ["vision", "llm"])
        self.seconds["stage0 + stage0b" if jobs > 1 else "stage0, stage0b"] = clock.lap()
        self.pretrained = R.write_model(work / "pretrained", spec, spec["num_query_tokens"], work / "tokenizers",
                                        self.vocab_file, seed, vision_from=vision, llm_from=llm)
        self.features = {name: self._features(name, split) for name, split in (("train", self.train),
                                                                                ("test", self.test))}
        self.seconds["vit_features"] = clock.lap()

    def _features(self, name: str, split: R.Split) -> torch.Tensor:
        path = self.work / f"vit-{name}.pt"
        if path.is_file():
            cached = torch.load(path)
            if cached.shape[0] == len(split.images):
                return cached
        features = R.vision_features(self.pretrained, split.images)
        torch.save(features, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        return features

    def stage1(self, queries: int) -> Path:
        """The blind Q-Former stage of `queries` queries, from a fresh Q-Former on the pre-trained ViT and LLM."""
        from instructblip.processing.templates import VQA_TEMPLATES

        data = self.cfg["data"]
        root = self.work / f"q{queries}"
        init = R.write_model(root / "init", self.cfg["spec"], queries, self.work / "tokenizers", self.vocab_file,
                             data["seed"], vision_from=self.pretrained, llm_from=self.pretrained)
        templates = [VQA_TEMPLATES[i] for i in data["stage1_templates"]]
        # nothing runs beside stage 1: it gets the threads of every job
        torch.set_num_threads(self.jobs * self.threads)
        try:
            return R.train_qformer(init, root / "stage1", dict(self.cfg["stage1"]), self.features["train"],
                                   self.train.questions, templates, data["seed"])
        finally:
            torch.set_num_threads(self.threads)

    def eval_sets(self) -> dict[str, list[tuple[int, S.Question, str]]]:
        """The three columns' (scene, question, prompt) lists, the same for every cell."""
        from instructblip.processing.templates import VQA_TEMPLATES

        data = self.cfg["data"]
        prompt = VQA_TEMPLATES[data["eval_template"]]
        held_out = [VQA_TEMPLATES[i] for i in data["held_out_templates"]]
        rng = random.Random("held-out templates")
        out: dict[str, list] = {c: [] for c in COLUMNS}
        for scene, q in self.test.questions:
            if q.type == data["held_out_type"]:
                out["held_out_type"].append((scene, q, R.render(prompt, q.text)))
            else:
                out["held_in"].append((scene, q, R.render(prompt, q.text)))
                out["held_out_templates"].append((scene, q, R.render(rng.choice(held_out), q.text)))
        return out


def parallel(base: Base, function, items: list) -> list:
    """[function(base, item) for item in items], in `base.jobs` forked processes of `base.threads` torch threads
    each when jobs > 1 (the children inherit `base`, data and cached ViT outputs included, without a copy)."""
    global _BASE
    if base.jobs <= 1 or len(items) <= 1:
        return [function(base, item) for item in items]
    _BASE = base
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(min(base.jobs, len(items)), mp_context=context) as pool:
        return list(pool.map(_in_child, [function] * len(items), items))


_BASE: Base | None = None


def _in_child(function, item):
    torch.set_num_threads(_BASE.threads)
    return function(_BASE, item)


def _pretrain(base: Base, part: str) -> Path:
    """Stage 0 ("vision") or stage 0b ("llm"), each from the initial model."""
    from instructblip.processing.templates import VQA_TEMPLATES

    cfg, seed = base.cfg, base.cfg["data"]["seed"]
    if part == "vision":
        return R.pretrain_vision(base.init, base.train, base.work / "stage0", cfg["stage0"], seed)
    llm = cfg["stage0_llm"]
    return R.pretrain_language_model(base.init, base.work / "stage0-llm", llm,
                                     [VQA_TEMPLATES[i] for i in llm["templates"]], seed)


def cell_scores(work: Path, queries: int, seed: int, run: str, columns=COLUMNS) -> dict | None:
    cache = work / f"q{queries}" / f"seed{seed}" / run / "scores.json"
    if cache.is_file():
        scores = json.loads(cache.read_text())
        if all(c in scores for c in columns):
            return scores
    return None


def run_cell(base: Base, cell: tuple) -> dict:
    """Stage 2 of one cell (queries, seed, run, stage-1 model, evaluation sets, columns) and its scores ({column:
    evaluate's result}, "seconds"); cached in the cell's folder."""
    queries, seed, run, stage1, sets, columns = cell
    cfg, data = base.cfg, base.cfg["data"]
    root = base.work / f"q{queries}" / f"seed{seed}" / run
    done = cell_scores(base.work, queries, seed, run, columns)
    if done is not None:
        return done
    settings = cfg["run_settings"][run]
    start = R.with_instruction(stage1, root / "init", base.vocab_file, settings["reads_instruction"])
    stage = dict(cfg["stage2"], balance=settings["balance"])
    questions = [(s, q) for s, q in base.train.questions if q.type != data["held_out_type"]]
    clock = Clock()
    final = R.train_qformer(start, root / "stage2", stage, base.features["train"], questions, base.held_in_templates,
                            seed)
    seconds = {"stage2": clock.lap()}
    scores: dict = {c: R.evaluate(final, base.features["test"], sets[c]) for c in columns}
    seconds["eval"] = clock.lap()
    scores["seconds"] = seconds
    (root / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    print(f"[ablation] q{queries} seed {seed} {run}: " + ", ".join(
        f"{TITLES[c]} {scores[c]['greedy']:.1f}" for c in columns) + f" ({seconds})", flush=True)
    return scores


def table(results: dict, cfg: dict, all_runs: list[str], all_queries: list[int], all_seeds: list[int]) -> str:
    """Markdown: per query count, one row per run; mean ± standard deviation over the seeds done (greedy)."""
    lines = ["| queries | run | " + " | ".join(TITLES[c] for c in COLUMNS) + " | seeds |",
             "|---" * (len(COLUMNS) + 3) + "|"]
    for q in all_queries:
        for run in all_runs:
            done = [results[(q, s, run)] for s in all_seeds if (q, s, run) in results]
            if not done:
                lines.append(f"| {q} | {NAMES[run]} | " + " | ".join("not run" for _ in COLUMNS) + " | 0 |")
                continue
            cells = []
            for c in COLUMNS:
                values = [d[c]["greedy"] for d in done if c in d]
                if not values:
                    cells.append("not run")
                    continue
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.1f} ± {sd:.1f}" if len(values) > 1
                             else f"{values[0]:.1f}")
            lines.append(f"| {q} | {NAMES[run]} | " + " | ".join(cells) + f" | {len(done)} |")
    return "\n".join(lines)


def cpu_seconds() -> float:
    """CPU seconds of this process (every thread) and of its finished child processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class Clock:
    """Wall-clock and CPU seconds (this process and its finished children) since the last lap: on a shared machine
    the CPU seconds are the cost, the wall-clock ones depend on what else runs."""

    def __init__(self):
        self.wall, self.cpu = time.time(), cpu_seconds()

    def lap(self) -> dict[str, float]:
        wall, cpu = time.time(), cpu_seconds()
        out = {"wall": round(wall - self.wall, 1), "cpu": round(cpu - self.cpu, 1)}
        self.wall, self.cpu = wall, cpu
        return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = settings(args)
    default = "scenes-quick" if args.quick else "scenes-ablation"
    work = Path(args.work_dir or REPO / "runs" / default)
    work.mkdir(parents=True, exist_ok=True)
    clock, total = Clock(), Clock()
    base = Base(work, cfg, args.jobs, args.threads)
    sets = base.eval_sets()
    columns = ("held_in",) if args.quick else COLUMNS
    results, seconds = {}, dict(base.seconds)
    for q in cfg["queries"]:
        clock.lap()
        stage1 = base.stage1(q)
        seconds[f"q{q} stage1"] = clock.lap()
        cells = [(q, seed, run, stage1, sets, columns) for seed in cfg["seeds"] for run in cfg["runs"]]
        for cell, scores in zip(cells, parallel(base, run_cell, cells), strict=True):
            results[cell[:3]] = scores
        seconds[f"q{q} stage2 + eval"] = clock.lap()
    # every cell done in this work directory so far, for the table
    config = R.load_yaml(R.HERE / "ablation.yaml")
    all_queries = sorted(set(config["queries"]) | set(cfg["queries"]))
    all_seeds = sorted(set(config["seeds"]) | set(cfg["seeds"]))
    for q in all_queries:
        for seed in all_seeds:
            for run in config["runs"]:
                if (q, seed, run) not in results and (done := cell_scores(work, q, seed, run)) is not None:
                    results[(q, seed, run)] = done
    text = table(results, cfg, list(config["runs"]), all_queries, all_seeds)
    sizes = ", ".join(f"{TITLES[c]} {len(v)}" for c, v in sets.items())
    text += f"\n\nAccuracy (%), greedy first token; test questions per column: {sizes}\n"
    seconds["total"] = total.lap()
    out = {"results": {f"q{q} seed{s} {r}": v for (q, s, r), v in sorted(results.items())}, "seconds": seconds,
           "settings": {k: v for k, v in cfg.items() if k != "spec"}, "jobs": args.jobs, "threads": args.threads}
    (work / "ablation.json").write_text(json.dumps(out, indent=1) + "\n")
    (work / "ablation.md").write_text(text)
    print(text, flush=True)
    print(f"[ablation] seconds: {json.dumps(seconds)}", flush=True)
    if args.quick:
        q, seed = cfg["queries"][0], cfg["seeds"][0]
        full, blind = results[(q, seed, "full")]["held_in"], results[(q, seed, "no_instruction")]["held_in"]
        print(f"held-in accuracy, {q} queries, seed {seed}, {full['n']} questions: full {full['greedy']:.1f}%, "
              f"w/o instruction to the Q-Former {blind['greedy']:.1f}%")
        print(f"gap: {full['greedy'] - blind['greedy']:.1f} points", flush=True)
    return out


if __name__ == "__main__":
    main()
