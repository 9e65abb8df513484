"""Captioning: NoCaps (val) and Flickr30K (Karpathy test). Open-ended generation with the paper's captioning prompt
and LAVIS' captioning settings (beam 5, 10 to 80 tokens); CIDEr-D (and BLEU-4) from pycocoevalcap."""

from __future__ import annotations

from pathlib import Path

from instructblip.evaluation.metrics import caption_metrics
from instructblip.evaluation.tasks.base import CAPTION_GENERATION, Benchmark, Sample, read_json
from instructblip.processing.templates import CAPTION_PROMPT


def _caption_scores(results: list[tuple[Sample, dict]]) -> dict[str, float]:
    scores = caption_metrics({s.id: r["prediction"] for s, r in results}, {s.id: s.target for s, _ in results})
    return {"CIDEr": 100 * scores["CIDEr"], "BLEU-4": 100 * scores["Bleu_4"]}


class NoCaps(Benchmark):
    """NoCaps validation: 4,500 Open Images photos with 10 captions each, in-, near- and out-of-domain.

    Files: `nocaps_val_4500_captions.json` (COCO format: `images` with `id`, `file_name`, `domain`; `annotations`
    with `image_id`, `caption`), from https://nocaps.org/download (https://nocaps.s3.amazonaws.com/...), and the
    images, named by `file_name`, in `images/` (or `validation/`, `val/`; they are Open Images validation images,
    downloadable by the `coco_url` of each entry). Reported: CIDEr overall (the paper's number) and per domain.
    """

    name = "nocaps"
    title = "NoCaps"
    metric = "CIDEr"
    splits = ("val",)
    prompt = CAPTION_PROMPT
    generation = CAPTION_GENERATION
    layout = "nocaps_val_4500_captions.json and the images in images/ (named by file_name)"
    source = "https://nocaps.org/download (annotations; images: Open Images validation, the coco_url of each entry)"

    def _load(self, root: Path, split: str) -> list[Sample]:
        data = read_json(self.need(root, "nocaps_val_4500_captions.json", "annotations/nocaps_val_4500_captions.json"))
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(ann["image_id"], []).append(ann["caption"])
        return [
            Sample(id=str(im["id"]), media=self.find(root, im["file_name"], ("images", "validation", "val", "")),
                   prompt=CAPTION_PROMPT, target=captions[im["id"]], info={"domain": im.get("domain")})
            for im in data["images"]
        ]

    def score(self, results: list[tuple[Sample, dict]]) -> dict[str, float]:
        out = _caption_scores(results)
        for domain in ("in-domain", "near-domain", "out-domain"):
            subset = [(s, r) for s, r in results if s.info.get("domain") == domain]
            if subset:  # CIDEr's document frequencies come from the subset's references, as the nocaps server does
                out[f"CIDEr {domain}"] = _caption_scores(subset)["CIDEr"]
        return out


class Flickr30K(Benchmark):
    """Flickr30K, Karpathy's test split: 1,000 images with 5 captions each.

    Files: `dataset_flickr30k.json` from Karpathy's splits (https://cs.stanford.edu/people/karpathy/deepimagesent/,
    `caption_datasets.zip`: `images` with `filename`, `split`, `sentences[].raw`), and the Flickr30K images in
    `flickr30k-images/` (or `images/`; https://shannon.cs.illinois.edu/DenotationGraph/ after agreeing to the terms).
    """

    name = "flickr30k"
    title = "Flickr30K"
    metric = "CIDEr"
    splits = ("test", "val")
    prompt = CAPTION_PROMPT
    generation = CAPTION_GENERATION
    layout = "dataset_flickr30k.json (Karpathy splits) and flickr30k-images/<filename>.jpg"
    source = ("https://cs.stanford.edu/people/karpathy/deepimagesent/ (caption_datasets.zip) and "
              "https://shannon.cs.illinois.edu/DenotationGraph/ (images)")

    def _load(self, root: Path, split: str) -> list[Sample]:
        data = read_json(self.need(root, "dataset_flickr30k.json", "annotations/dataset_flickr30k.json"))
        return [
            Sample(id=Path(im["filename"]).stem, prompt=CAPTION_PROMPT, target=[s["raw"] for s in im["sentences"]],
                   media=self.find(root, im["filename"], ("flickr30k-images", "images", "")))
            for im in data["images"] if im["split"] == split
        ]

    def score(self, results: list[tuple[Sample, dict]]) -> dict[str, float]:
        return _caption_scores(results)
