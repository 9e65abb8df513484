"""Train the small InstructBLIP shipped as the package's default model, on easy-vqa, in the paper's two stages.

    python recipes/easyvqa/run.py                       # about 29 minutes on 2 CPU cores
    python recipes/easyvqa/run.py --install             # = make easyvqa: ... and install it as the default model
    python recipes/easyvqa/run.py --work-dir /tmp/x --max-images 16 --stage0-steps 2 --stage0-llm-steps 2 \
        --stage1-steps 2 --stage2-steps 2 --batch-size 4 --variants 2 --copies 1 --eval-limit 8   # reduced (tests)

1. Tokenizers: a byte-level BPE for the LLM (trained with `tokenizers`), a WordPiece vocabulary for the Q-Former.
2. A random (seeded) small InstructBLIP written as an HF-layout checkpoint (`model.yaml`).
3. Image variants (augmentation that keeps colour and shape) and one JSONL source per question type + captions.
4. Stage 0 (`stage0.yaml`, EVA-CLIP stand-in): the ViT alone learns the words of each image's caption.
5. Stage 0b (`stage0_llm.yaml`, Vicuna stand-in): the LLM alone learns on text, an imagined image written in words
   where the query tokens will stand.
6. Stage 1 (`stage1.yaml`, BLIP-2 stand-in): ViT and LLM frozen, the Q-Former learns to write what it sees where
   the LLM reads; the Q-Former does not see the instruction; questions asked plainly (`data.yaml` stage1_templates).
7. Stage 2 (`stage2.yaml`, instruction tuning): ViT and LLM frozen, the Q-Former reads the instruction.
8. Evaluation with the harness's easy-vqa adapter on the test split, generation and ranking, per question type.

Everything is seeded (`--seed`); the work directory keeps every step's output, and a rerun skips what is done
(an interrupted stage resumes from its last checkpoint). `summary.json` in the work directory has the timings, the
accuracies and the sha256 of the model's weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe as R  # noqa: E402 - the recipe's own module, next to this file

REPO = R.HERE.parent.parent
DEFAULT_MODEL_DIR = REPO / "src" / "instructblip" / "default_model"
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
                 "processor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default=str(REPO / "runs" / "easyvqa"), help="all outputs (default: runs/easyvqa)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the augmentation, the data order")
    p.add_argument("--install", action="store_true", help=f"copy the final model to {DEFAULT_MODEL_DIR}")
    p.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it at float rounding)")
    # reduced sizes, for the tests and quick tries
    p.add_argument("--max-images", type=int, help="use only the training images with the N smallest ids")
    p.add_argument("--variants", type=int, help="image variants (data.yaml)")
    p.add_argument("--copies", type=int, help="records per question (data.yaml)")
    p.add_argument("--stage0-steps", type=int, help="stage 0 max_steps (stage0.yaml)")
    p.add_argument("--stage0-llm-steps", type=int, help="stage 0b max_steps (stage0_llm.yaml)")
    p.add_argument("--stage1-steps", type=int, help="stage 1 max_steps (stage1.yaml)")
    p.add_argument("--stage2-steps", type=int, help="stage 2 max_steps (stage2.yaml)")
    p.add_argument("--batch-size", type=int, help="global and micro batch size of both stages")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N test questions only")
    p.add_argument("--skip-eval", action="store_true")
    return p.parse_args(argv)


def stage_settings(name: str, args: argparse.Namespace, steps: int | None) -> dict:
    stage = R.load_yaml(R.HERE / f"{name}.yaml")
    if steps is not None:
        stage["max_steps"] = steps
        stage["warmup_steps"] = min(stage["warmup_steps"], max(steps // 10, 0))
        stage["checkpoint_every"] = min(stage["checkpoint_every"], steps)
    if args.batch_size is not None:
        stage["global_batch_size"] = stage["micro_batch_size"] = args.batch_size
    return stage


def prepare(work: Path, args: argparse.Namespace, spec: dict, data: dict) -> tuple[list, list[dict], list[dict], Path]:
    """The training questions, tokenizers, the initial model, the image variants and the training sources of stages
    1 and 2 (each kept if already there)."""
    questions, paths = R.load_split("train")
    if args.max_images is not None:
        keep = set(sorted(paths)[: args.max_images])
        questions = [q for q in questions if q[2] in keep]
        paths = {i: p for i, p in paths.items() if i in keep}
    corpus = R.text_corpus(questions)
    tokenizers = work / "tokenizers"
    vocab_file = tokenizers / "qformer_vocab.txt"
    if not vocab_file.is_file():
        R.train_llm_tokenizer(corpus, spec["llm_vocab_size"], tokenizers / "llm")
        vocab = R.train_qformer_vocab(corpus, spec["qformer_vocab_size"])
        vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    vocab = vocab_file.read_text(encoding="utf-8").splitlines()
    init = work / "init"
    if not (init / "model.safetensors").is_file():
        R.write_initial_model(init, spec, tokenizers / "llm", vocab, seed=args.seed, reads_instruction=False)
    variants = R.write_image_variants(paths, work / "images", args.variants or data["variants"], seed=args.seed)
    copies = args.copies or data["copies"]
    stage1 = R.write_sources(work / "data-stage1", questions, variants, copies, seed=args.seed,
                             templates=R.stage1_templates(data), balance_answers=data["balance_answers"])
    stage2 = R.write_sources(work / "data", questions, variants, copies, seed=args.seed,
                             balance_answers=data["balance_answers"])
    return questions, stage1, stage2, vocab_file


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    spec = R.load_yaml(R.HERE / "model.yaml")
    data = R.load_yaml(R.HERE / "data.yaml")
    timer = R.Timer()

    questions, sources1, sources, vocab_file = prepare(work, args, spec, data)
    timer.mark("prepare")
    print(f"[recipe] data and initial model ready ({timer.marks['prepare']} s)", flush=True)

    stage0 = R.stage0_settings(args.stage0_steps, args.batch_size)
    captions = next(s["path"] for s in sources if s["name"] == R.CAPTION)
    vision = R.pretrain_vision(work / "init", captions, work / "stage0", stage0, seed=args.seed)
    timer.mark("stage0")
    llm = R.stage0_llm_settings(args.stage0_llm_steps, args.batch_size)
    start1 = R.pretrain_language_model(vision, questions, work / "stage0-llm", llm, seed=args.seed)
    timer.mark("stage0_llm")

    stage1 = stage_settings("stage1", args, args.stage1_steps)
    R.run_stage(stage1, start1, sources1, work / "stage1", seed=args.seed)
    timer.mark("stage1")

    start2 = work / "stage2-init"
    if not (start2 / "model.safetensors").is_file():
        shutil.rmtree(start2, ignore_errors=True)
        shutil.copytree(work / "stage1" / "model", start2)
        (start2 / "train_config.json").unlink()
        R.set_qformer_instruction(start2, vocab_file, reads_instruction=True)
    stage2 = stage_settings("stage2", args, args.stage2_steps)
    R.run_stage(stage2, start2, sources, work / "stage2", seed=args.seed + 1)
    timer.mark("stage2")

    final = work / "stage2" / "model"
    summary: dict = {
        "command": "python recipes/easyvqa/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "threads": args.threads,
        "model_dir": str(final),
        "sha256": R.sha256(final / "model.safetensors"),
        "size_bytes": sum(f.stat().st_size for f in final.rglob("*") if f.is_file()),
        "parameters": _parameters(final),
    }
    if not args.skip_eval:
        summary["eval"] = {}
        for mode in ("generate", "rank"):
            results = R.evaluate_model(final, mode, work / "eval", limit=args.eval_limit)
            summary["eval"][mode] = {"accuracy": results["score"], "per_type": results["per_type"],
                                     "num_samples": results["num_samples"]}
            print(f"[recipe] easy-vqa test, {mode}: {results['score']:.2f}% "
                  + ", ".join(f"{k} {v['accuracy']:.1f}" for k, v in results["per_type"].items()), flush=True)
        timer.mark("eval")
    if args.install:
        install(final, DEFAULT_MODEL_DIR, summary)
        timer.mark("install")
    summary["seconds"] = {**timer.marks, "total": timer.total}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"[recipe] done in {timer.total:.0f} s; weights sha256 {summary['sha256']}; summary in "
          f"{work / 'summary.json'}", flush=True)
    return summary


def _parameters(model_dir: Path) -> dict[str, int]:
    """Parameter counts per part, read from the safetensors header."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
            numel = 1
            for size in f.get_slice(key).get_shape():
                numel *= size
            part = key.split(".")[0]
            counts[part] = counts.get(part, 0) + numel
    counts["total"] = sum(counts.values())
    return counts


def install(model_dir: Path, target: Path, summary: dict) -> None:
    """Replace `target` (the package's default model) with the recipe's model: the HF-layout files only."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in SHIPPED_FILES:
        shutil.copy2(model_dir / name, tmp / name)
    shutil.copytree(model_dir / "qformer_tokenizer", tmp / "qformer_tokenizer")
    (tmp / "README.md").write_text(
        "# The default model: a small InstructBLIP trained on easy-vqa\n\n"
        "Written by `make easyvqa` (`python recipes/easyvqa/run.py --install`, seed "
        f"{summary['seed']}); the recipe, its results and what this model can and cannot do are in "
        "docs/easyvqa.md, which records the sha256 of model.safetensors:\n\n"
        f"    {summary['sha256']}\n", encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    print(f"[recipe] installed as the default model: {target}", flush=True)


if __name__ == "__main__":
    main()
