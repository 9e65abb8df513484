"""The paper's ablation (InstructBLIP Table 2) in miniature on easy-vqa, with held-out generalisation.

    python recipes/easyvqa/ablation.py [--work-dir runs/easyvqa-ablation] [--seeds 0 1 2]

Once: data and stage-0 / 0b / 1 models as in the recipe (run.py), except that stage 2's instructions are rendered
with the held-in VQA templates only (`--base runs/easyvqa` takes those stages from a finished recipe run of the
same seed instead of training them again: they are the same). Then, per seed, three stage-2 runs from that model,
of the recipe's stage-2 budget, all without the held-out question type (`ablation.yaml`). Each is evaluated with
the harness's easy-vqa adapter on the test split:

- held-in: the held-in question types with the adapter's prompt ("Question: {} Short answer:", a held-in template);
- held-out type: the held-out question type, same prompt (never seen in stage 2);
- held-out templates: the held-in types, each question with one of the held-out templates (drawn with a fixed seed;
  never seen in any stage);
- both: the held-out type with the held-out templates.

Generation (the adapter's settings: beam 5, at most 10 tokens) and ranking over the 13 answers. The table (mean and
standard deviation over the seeds) goes to `ablation.md` / `ablation.json` in the work directory; a rerun skips
finished runs and evaluations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe as R  # noqa: E402 - the recipe's own module, next to this file

COLUMNS = ("held_in", "held_out_type", "held_out_templates", "both")
TITLES = {"held_in": "held-in types", "held_out_type": "held-out type", "held_out_templates": "held-out templates",
          "both": "held-out type + templates"}
NAMES = {"full": "full recipe", "no_instruction": "w/o instruction to the Q-Former",
         "no_balancing": "w/o balanced sampling (size-proportional)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default=str(R.HERE.parent.parent / "runs" / "easyvqa-ablation"))
    p.add_argument("--seeds", type=int, nargs="+", help="default: ablation.yaml")
    p.add_argument("--base", help="a finished recipe run's work directory (run.py --work-dir, same seed): its "
                                  "tokenizers, initial model, image variants and stages 0, 0b and 1 are reused")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-images", type=int, help="reduced size (tests): the training images with the N smallest ids")
    p.add_argument("--stage0-steps", type=int)
    p.add_argument("--stage0-llm-steps", type=int)
    p.add_argument("--stage1-steps", type=int)
    p.add_argument("--stage2-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-limit", type=int, help="at most N test questions per evaluation set")
    return p.parse_args(argv)


def eval_sets(config: dict, limit: int | None) -> dict[str, list]:
    """The four evaluation sets (lists of the adapter's `Sample`s, ranking candidates attached later)."""
    from instructblip.evaluation.tasks import get_benchmark
    from instructblip.processing.templates import VQA_TEMPLATES

    samples = get_benchmark("easy-vqa", mode="rank").load(None, "test")  # candidates: the 13 answers
    held_out = [VQA_TEMPLATES[i] for i in config["held_out_templates"]]
    rng = random.Random("held-out templates")
    out: dict[str, list] = {c: [] for c in COLUMNS}
    for s in samples:
        question = s.info["question"]
        out_type = R.question_type(question) == config["held_out_type"]
        other = dataclasses.replace(s, prompt=R.render(rng.choice(held_out), question))
        out["held_out_type" if out_type else "held_in"].append(s)
        out["both" if out_type else "held_out_templates"].append(other)
    return {k: v[:limit] if limit else v for k, v in out.items()}


def evaluate(model_dir: Path, sets: dict[str, list], out_dir: Path) -> dict:
    """{column: {"generate": %, "rank": %}} for one model (cached in out_dir/scores.json)."""
    cache = out_dir / "scores.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    scores: dict[str, dict[str, float]] = {}
    for column, samples in sets.items():
        scores[column] = {}
        for mode in ("generate", "rank"):
            batch = [dataclasses.replace(s, candidates=s.candidates if mode == "rank" else None) for s in samples]
            result = R.evaluate_model(model_dir, mode, out_dir / column, samples=batch)
            scores[column][mode] = result["score"]
    cache.write_text(json.dumps(scores, indent=2) + "\n")
    return scores


def prepare_base(work: Path, args: argparse.Namespace, config: dict) -> tuple[Path, list[dict], Path]:
    """Data, tokenizers, initial model, stages 0, 0b and 1 (as run.py; stage 2's records rendered with the held-in
    templates only), shared by every stage-2 run: the ablation is about stage 2.
    Returns (stage-1 model, stage-2 sources, Q-Former vocabulary file)."""
    from instructblip.processing.templates import VQA_TEMPLATES

    spec = R.load_yaml(R.HERE / "model.yaml")
    data = R.load_yaml(R.HERE / "data.yaml")
    seed = config["base_seed"]
    root = work / "base"
    if args.base:
        reuse_recipe_run(Path(args.base), root, seed)
    questions, paths = R.load_split("train")
    if args.max_images is not None:
        keep = set(sorted(paths)[: args.max_images])
        questions = [q for q in questions if q[2] in keep]
        paths = {i: p for i, p in paths.items() if i in keep}
    held_in_templates = [t for i, t in enumerate(VQA_TEMPLATES) if i not in config["held_out_templates"]]
    corpus = R.text_corpus(questions)
    vocab_file = root / "tokenizers" / "qformer_vocab.txt"
    if not vocab_file.is_file():
        R.train_llm_tokenizer(corpus, spec["llm_vocab_size"], root / "tokenizers" / "llm")
        vocab_file.write_text("\n".join(R.train_qformer_vocab(corpus, spec["qformer_vocab_size"])) + "\n")
    vocab = vocab_file.read_text().splitlines()
    if not (root / "init" / "model.safetensors").is_file():
        R.write_initial_model(root / "init", spec, root / "tokenizers" / "llm", vocab, seed, reads_instruction=False)
    variants = R.write_image_variants(paths, root / "images", data["variants"], seed=seed)
    sources1 = R.write_sources(root / "data-stage1", questions, variants, data["copies"], seed=seed,
                               templates=R.stage1_templates(data), balance_answers=data["balance_answers"])
    sources = R.write_sources(root / "data", questions, variants, data["copies"], seed=seed,
                              templates=held_in_templates, balance_answers=data["balance_answers"])
    if set(config["held_out_templates"]) & set(data["stage1_templates"]):
        raise ValueError("a held-out template is among data.yaml's stage1_templates")

    stage0 = R.stage0_settings(args.stage0_steps, args.batch_size)
    captions = next(s["path"] for s in sources if s["name"] == R.CAPTION)
    vision = R.pretrain_vision(root / "init", captions, root / "stage0", stage0, seed=seed)
    llm = R.stage0_llm_settings(args.stage0_llm_steps, args.batch_size)
    if set(config["held_out_templates"]) & set(llm["templates"]):
        raise ValueError("a held-out template is among stage0_llm.yaml's templates")
    start1 = R.pretrain_language_model(vision, questions, root / "stage0-llm", llm, seed=seed)
    stage1 = R.load_yaml(R.HERE / "stage1.yaml")
    if args.stage1_steps:
        stage1["max_steps"] = args.stage1_steps
    _shrink(stage1, args)
    R.run_stage(stage1, start1, sources1, root / "stage1", seed=seed)
    return root / "stage1" / "model", sources, vocab_file


REUSED = ("tokenizers", "init", "images", "stage0", "stage0-llm", "stage1")


def reuse_recipe_run(recipe_dir: Path, root: Path, seed: int) -> None:
    """Copy what the ablation's base shares with a finished recipe run (same code, data and seed: the same files)
    into `root`; parts already there are kept."""
    summary = recipe_dir / "summary.json"
    if not summary.is_file() or not (recipe_dir / "stage1" / "model" / "model.safetensors").is_file():
        raise SystemExit(f"--base {recipe_dir}: not a finished recipe run (no summary.json or stage1/model); "
                         "run recipes/easyvqa/run.py --work-dir there first, or leave --base out")
    recipe_seed = json.loads(summary.read_text())["seed"]
    if recipe_seed != seed:
        raise SystemExit(f"--base {recipe_dir}: that run used seed {recipe_seed}, ablation.yaml's base_seed is {seed}")
    root.mkdir(parents=True, exist_ok=True)
    for name in REUSED:
        if not (root / name).exists():
            shutil.copytree(recipe_dir / name, root / name)
    print(f"[ablation] stages 0, 0b and 1 taken from {recipe_dir}", flush=True)


def run_seed(seed: int, work: Path, args: argparse.Namespace, config: dict, sets: dict[str, list],
             base: tuple[Path, list[dict], Path]) -> dict:
    """The three stage-2 runs of one seed (the seed drives their data order and dropout), each evaluated."""
    stage1_model, sources, vocab_file = base
    root = work / f"seed{seed}"
    results = {}
    held_in_sources = [s for s in sources if s["name"] != config["held_out_type"]]
    for name, run in config["runs"].items():
        start = root / f"{name}-init"
        if not (start / "model.safetensors").is_file():
            shutil.rmtree(start, ignore_errors=True)
            shutil.copytree(stage1_model, start)
            (start / "train_config.json").unlink()
            R.set_qformer_instruction(start, vocab_file, reads_instruction=run["reads_instruction"])
        stage2 = R.load_yaml(R.HERE / "stage2.yaml")
        stage2["max_steps"] = args.stage2_steps or config["stage2_steps"]
        stage2["balance"] = run["balance"]
        _shrink(stage2, args)
        R.run_stage(stage2, start, held_in_sources, root / name, seed=seed)
        results[name] = evaluate(root / name / "model", sets, root / name / "eval")
        print(f"[ablation] seed {seed} {name}: {json.dumps(results[name])}", flush=True)
    return results


def _shrink(stage: dict, args: argparse.Namespace) -> None:
    stage["warmup_steps"] = min(stage["warmup_steps"], stage["max_steps"] // 10)
    stage["checkpoint_every"] = min(stage["checkpoint_every"], stage["max_steps"])
    if args.batch_size is not None:
        stage["global_batch_size"] = stage["micro_batch_size"] = args.batch_size


def table(all_results: dict[int, dict], runs: list[str], mode: str) -> str:
    """Markdown: one row per run, mean ± standard deviation over seeds per column."""
    header = "| run | " + " | ".join(TITLES[c] for c in COLUMNS) + " |"
    lines = [header, "|---" * (len(COLUMNS) + 1) + "|"]
    for name in runs:
        cells = []
        for column in COLUMNS:
            values = [all_results[s][name][column][mode] for s in sorted(all_results)]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {sd:.1f}")
        lines.append(f"| {NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = R.load_yaml(R.HERE / "ablation.yaml")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sets = eval_sets(config, args.eval_limit)
    timer = R.Timer()
    base = prepare_base(work, args, config)
    timer.mark("stages 0, 0b and 1")
    all_results = {}
    for seed in args.seeds or config["seeds"]:
        all_results[seed] = run_seed(seed, work, args, config, sets, base)
        timer.mark(f"seed {seed}")
    runs = list(config["runs"])
    text = "\n\n".join(f"{mode}:\n\n{table(all_results, runs, mode)}" for mode in ("generate", "rank"))
    sizes = ", ".join(f"{TITLES[c]} {len(v)}" for c, v in sets.items())
    text += f"\n\nseeds {sorted(all_results)}; test questions per set: {sizes}\n"
    (work / "ablation.md").write_text(text)
    out = {"config": config, "results": {str(k): v for k, v in all_results.items()}, "seconds": timer.marks,
           "sizes": {c: len(v) for c, v in sets.items()}}
    (work / "ablation.json").write_text(json.dumps(out, indent=2) + "\n")
    print(text, flush=True)
    return out


if __name__ == "__main__":
    main()
