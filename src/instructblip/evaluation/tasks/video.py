"""Video QA: MSVD-QA, MSRVTT-QA and iVQA, plus reading frames.

Each video gives 4 frames sampled uniformly (LAVIS' `alpro_video_eval`, `n_frms: 4`); each frame goes through the
vision encoder and the Q-Former with the instruction, and the 4 x Q query outputs are concatenated for the LLM
(docs/recipe.md#video). A video is a file PyAV can decode or a folder of frame images (sorted by name, numbers in
natural order); the reading is `processing/video.py`'s. MSVD-QA and MSRVTT-QA rank the answer vocabulary (the
paper's vocabulary ranking); iVQA generates.
"""

from __future__ import annotations

import collections
import contextlib
import csv
from pathlib import Path

from instructblip.evaluation.metrics import exact_match, ivqa_accuracy
from instructblip.evaluation.tasks.base import VQA_PROMPT, Benchmark, Sample, read_json
from instructblip.processing.video import VIDEO_EXTENSIONS, frame_indices, read_frames

__all__ = ["IVQA", "MSRVTTQA", "MSVDQA", "find_video", "frame_indices", "read_frames"]

def find_video(root: Path, stems: list[str], folders: tuple[str, ...]) -> str | None:
    """The first video file (any of VIDEO_EXTENSIONS) or frame folder named by one of `stems` in `folders`."""
    for folder in folders:
        base = root / folder
        for stem in stems:
            if (base / stem).is_dir():
                return str(base / stem)
            for ext in VIDEO_EXTENSIONS:
                if (base / f"{stem}{ext}").exists():
                    return str(base / f"{stem}{ext}")
    return None


# ---------------------------------------------------------------------------------------------------------------------


class _VideoQA(Benchmark):
    """MSVD-QA / MSRVTT-QA (Xu et al. 2017): `<split>_qa.json`, a list of {`question`, `answer`, `video_id`, `id`}."""

    video = True
    mode = "rank"
    modes = ("rank", "generate")
    splits = ("test", "val", "train")
    prompt = VQA_PROMPT
    vocabulary_size = 1000
    folders: tuple[str, ...] = ()

    def _video_stems(self, root: Path, row: dict) -> list[str]:
        raise NotImplementedError

    def _load(self, root: Path, split: str) -> list[Sample]:
        rows = read_json(self.need(root, f"{split}_qa.json"))
        candidates = self.vocabulary(root) if self.mode == "rank" else None
        samples = []
        for row in rows:
            stems = self._video_stems(root, row)
            media = find_video(root, stems, self.folders) or str(root / self.folders[0] / stems[0])
            samples.append(Sample(id=str(row["id"]), media=media, prompt=VQA_PROMPT.format(question=row["question"]),
                                  target=row["answer"], candidates=candidates, info={"question": row["question"]}))
        return samples

    def vocabulary(self, root: Path) -> list[str]:
        """The answers ranked: `train_ans2label.json` (the vocabulary file of ALPRO/LAVIS) when present, else the
        `vocabulary_size` most frequent answers of `train_qa.json` (ties in order of first appearance)."""
        if (root / "train_ans2label.json").exists():
            ans2label = read_json(root / "train_ans2label.json")
            return sorted(ans2label, key=ans2label.__getitem__)
        counts = collections.Counter(row["answer"] for row in read_json(self.need(root, "train_qa.json")))
        return [answer for answer, _ in counts.most_common(self.vocabulary_size)]

    def settings(self, is_encoder_decoder: bool) -> dict:
        out = super().settings(is_encoder_decoder)
        if self.mode == "rank":
            out["candidates"] = (f"the answer vocabulary (train_ans2label.json, else the {self.vocabulary_size} most "
                                 "frequent train answers)")
        return out

    def score(self, results: list[tuple[Sample, dict]]) -> dict[str, float]:
        return {"accuracy": 100 * sum(exact_match(r["prediction"], s.target) for s, r in results) / len(results)}


class MSVDQA(_VideoQA):
    """MSVD-QA test (13,157 questions on 520 clips). Files from https://github.com/xudejing/video-question-answering:
    `test_qa.json`, `train_qa.json` (the answer vocabulary) and `youtube_mapping.txt` (`<clip name> vid<N>`);
    the clips `YouTubeClips/<clip name>.avi` from the MSVD corpus (YouTubeClips.tar), or frame folders of that name.
    `--mode generate` uses LAVIS' MSVD settings (at most 30 tokens)."""

    name = "msvd-qa"
    title = "MSVD-QA"
    folders = ("YouTubeClips", "videos", "video", "frames", "")
    generation = dict(num_beams=5, max_len=30, min_len=1, length_penalty=-1.0, repetition_penalty=1.5)
    layout = "test_qa.json, train_qa.json, youtube_mapping.txt and YouTubeClips/<clip name>.avi"
    source = ("https://github.com/xudejing/video-question-answering (QA files) and "
              "https://www.cs.utexas.edu/users/ml/clamp/videoDescription/ (YouTubeClips.tar)")

    def _load(self, root: Path, split: str) -> list[Sample]:
        self._names = {}
        for line in self.need(root, "youtube_mapping.txt").read_text(encoding="utf-8").splitlines():
            if line.strip():
                name, vid = line.split()
                self._names[int(vid.removeprefix("vid"))] = name
        return super()._load(root, split)

    def _video_stems(self, root: Path, row: dict) -> list[str]:
        if row["video_id"] not in self._names:
            raise ValueError(f"{self.name}: video_id {row['video_id']} is not in youtube_mapping.txt")
        return [self._names[row["video_id"]]]


class MSRVTTQA(_VideoQA):
    """MSRVTT-QA test (72,821 questions on 2,990 clips). Files from https://github.com/xudejing/video-question-answering:
    `test_qa.json` and `train_qa.json`; the clips `video<video_id>.mp4` of MSR-VTT in `TestVideo/` (or
    `TrainValVideo/`, `videos/all/`, `videos/`), or frame folders of that name. `--mode generate` uses LAVIS'
    MSRVTT settings (at most 10 tokens)."""

    name = "msrvtt-qa"
    title = "MSRVTT-QA"
    vocabulary_size = 1500
    folders = ("TestVideo", "TrainValVideo", "videos/all", "videos", "video", "frames", "")
    layout = "test_qa.json, train_qa.json and TestVideo/video<video_id>.mp4"
    source = ("https://github.com/xudejing/video-question-answering (QA files) and "
              "https://www.microsoft.com/en-us/research/publication/msr-vtt/ (videos)")

    def _video_stems(self, root: Path, row: dict) -> list[str]:
        return [f"video{row['video_id']}"]


class IVQA(Benchmark):
    """iVQA test (2,000 questions on instructional clips, 5 answers each): iVQA accuracy, min(#annotators / 2, 1).

    Generation with the VQA prompt and settings. Files from "Just Ask" (https://antoyang.github.io/just-ask.html):
    `test.csv` (columns `video_id`, `start`, `end`, `question`, `answer1` .. `answer5`) and the clips
    `video/<video_id>_<start>_<end>.<ext>` (or `<video_id>.<ext>`; also `videos/`, `frames/`).
    """

    name = "ivqa"
    title = "iVQA"
    video = True
    splits = ("test", "val", "train")
    prompt = VQA_PROMPT
    folders = ("video", "videos", "frames", "")
    layout = "test.csv and video/<video_id>_<start>_<end>.mp4"
    source = "https://antoyang.github.io/just-ask.html (iVQA)"

    def _load(self, root: Path, split: str) -> list[Sample]:
        with open(self.need(root, f"{split}.csv"), newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        samples = []
        for i, row in enumerate(rows):
            vid = row["video_id"]
            stems = [f"{vid}_{row.get('start')}_{row.get('end')}", vid]
            for key in ("start", "end"):  # "12.0" in the csv, 12 in the file name
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    row[key] = str(int(float(row[key])))
            stems.insert(1, f"{vid}_{row.get('start')}_{row.get('end')}")
            media = find_video(root, stems, self.folders) or str(root / self.folders[0] / f"{stems[0]}.mp4")
            answers = [row[f"answer{k}"] for k in range(1, 6) if row.get(f"answer{k}")]
            samples.append(Sample(id=str(i), media=media, prompt=VQA_PROMPT.format(question=row["question"]),
                                  target=answers, info={"question": row["question"], "video_id": vid}))
        return samples

    def score(self, results: list[tuple[Sample, dict]]) -> dict[str, float]:
        return {"accuracy": 100 * sum(ivqa_accuracy(r["prediction"], s.target) for s, r in results) / len(results)}
