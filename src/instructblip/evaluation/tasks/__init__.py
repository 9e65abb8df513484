"""The InstructBLIP paper's 13 held-out zero-shot benchmarks (Table 1), plus easy-vqa, one adapter each.

An adapter reads the dataset's own published files from a local directory (its docstring says which, and where to
get them), builds the paper's prompt per sample (appendix E; docs/recipe.md#prompts), picks the inference mode
(open-ended generation, or vocabulary ranking over candidates) and LAVIS' generation settings, and scores the
predictions with the paper's metric (`instructblip.evaluation.metrics`). Images are preprocessed by the checkpoint's own
image processor (a 224 x 224 bicubic resize that squashes the aspect ratio, as LAVIS' `blip_image_eval`).

    from instructblip.evaluation.tasks import get_benchmark
    bench = get_benchmark("gqa")
    samples = bench.load("data/gqa")          # Sample(id, media, prompt, target, candidates, info)

Modules: `captioning` (NoCaps, Flickr30K), `vqa` (GQA, VSR, TextVQA, VizWiz, easy-vqa), `choice` (IconQA,
ScienceQA, HatefulMemes, Visual Dialog), `video` (MSVD-QA, MSRVTT-QA, iVQA, frame sampling).
"""

from __future__ import annotations

from instructblip.evaluation.tasks.base import Benchmark, MissingDataError, Sample, generate_kwargs
from instructblip.evaluation.tasks.captioning import Flickr30K, NoCaps
from instructblip.evaluation.tasks.choice import HatefulMemes, IconQA, ScienceQA, VisualDialog
from instructblip.evaluation.tasks.video import IVQA, MSRVTTQA, MSVDQA, frame_indices, read_frames
from instructblip.evaluation.tasks.vqa import GQA, VSR, EasyVQA, TextVQA, VizWiz

# Table 1's column order
HELD_OUT = ("nocaps", "flickr30k", "gqa", "vsr", "iconqa", "textvqa", "visdial", "hatefulmemes", "vizwiz",
            "scienceqa", "msvd-qa", "msrvtt-qa", "ivqa")
BENCHMARKS: dict[str, type[Benchmark]] = {b.name: b for b in (
    NoCaps, Flickr30K, GQA, VSR, IconQA, TextVQA, VisualDialog, HatefulMemes, VizWiz, ScienceQA, MSVDQA, MSRVTTQA,
    IVQA, EasyVQA)}

# The paper's Table 1 (docs/recipe.md#table-1), in HELD_OUT's column order; None = not reported.
TABLE1: dict[str, tuple[float | None, ...]] = {
    "Flamingo-3B": (None, 60.6, None, None, None, 30.1, None, 53.7, 28.9, None, 27.5, 11.0, 32.7),
    "Flamingo-9B": (None, 61.5, None, None, None, 31.8, None, 57.0, 28.8, None, 30.2, 13.7, 35.2),
    "Flamingo-80B": (None, 67.2, None, None, None, 35.0, None, 46.4, 31.6, None, 35.6, 17.4, 40.7),
    "BLIP-2 (FlanT5XL)": (104.5, 76.1, 44.0, 60.5, 45.5, 43.1, 45.7, 53.0, 29.8, 54.9, 33.7, 16.2, 40.4),
    "BLIP-2 (FlanT5XXL)": (98.4, 73.7, 44.6, 68.2, 45.4, 44.1, 46.9, 52.0, 29.4, 64.5, 34.4, 17.4, 45.8),
    "BLIP-2 (Vicuna-7B)": (107.5, 74.9, 38.6, 50.0, 39.7, 40.1, 44.9, 50.6, 25.3, 53.8, 18.3, 9.2, 27.5),
    "BLIP-2 (Vicuna-13B)": (103.9, 71.6, 41.0, 50.9, 40.6, 42.5, 45.1, 53.7, 19.6, 61.0, 20.3, 10.3, 23.5),
    "InstructBLIP (FlanT5XL)": (119.9, 84.5, 48.4, 64.8, 50.0, 46.6, 46.6, 56.6, 32.7, 70.4, 43.4, 25.0, 53.1),
    "InstructBLIP (FlanT5XXL)": (120.0, 83.5, 47.9, 65.6, 51.2, 46.6, 48.5, 54.1, 30.9, 70.6, 44.3, 25.6, 53.8),
    "InstructBLIP (Vicuna-7B)": (123.1, 82.4, 49.2, 54.3, 43.1, 50.1, 45.2, 59.6, 34.5, 60.5, 41.8, 22.1, 52.2),
    "InstructBLIP (Vicuna-13B)": (121.9, 82.8, 49.5, 52.1, 44.8, 50.7, 45.4, 57.5, 33.4, 63.1, 41.2, 24.8, 51.0),
}
# checkpoint names -> their Table 1 row
PAPER_ROWS = {"flan-t5-xl": "InstructBLIP (FlanT5XL)", "flan-t5-xxl": "InstructBLIP (FlanT5XXL)",
              "vicuna-7b": "InstructBLIP (Vicuna-7B)", "vicuna-13b": "InstructBLIP (Vicuna-13B)"}


def get_benchmark(name: str, **options) -> Benchmark:
    """An adapter by name (`BENCHMARKS`); `options`: `mode`, and `prompt` for easy-vqa."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name](**options)


def paper_numbers(name: str) -> dict[str, float]:
    """The paper's Table 1 entries for one benchmark, by row."""
    if name not in HELD_OUT:
        return {}
    column = HELD_OUT.index(name)
    return {row: values[column] for row, values in TABLE1.items() if values[column] is not None}


def paper_row(model_name: str) -> str | None:
    """The Table 1 row of a checkpoint, recognised by its name (e.g. Salesforce/instructblip-vicuna-7b)."""
    lowered = model_name.lower()
    for key in sorted(PAPER_ROWS, key=len, reverse=True):  # "flan-t5-xxl" before "flan-t5-xl"
        if key in lowered:
            return PAPER_ROWS[key]
    return None


__all__ = ["BENCHMARKS", "HELD_OUT", "TABLE1", "Benchmark", "EasyVQA", "Flickr30K", "GQA", "HatefulMemes", "IVQA",
           "IconQA", "MSRVTTQA", "MSVDQA", "MissingDataError", "NoCaps", "Sample", "ScienceQA", "TextVQA", "VSR",
           "VisualDialog", "VizWiz", "frame_indices", "generate_kwargs", "get_benchmark", "paper_numbers", "paper_row",
           "read_frames"]
