"""Tiny copies of the held-out benchmarks, written in each dataset's published file layout (a few samples each),
with real photos from skimage.data and videos encoded in the test with PyAV; plus a tiny checkpoint made once per
session."""

from __future__ import annotations

import atexit
import csv
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
_CHECKPOINTS: dict[str, Path] = {}


def tiny_checkpoint(family: str = "t5") -> Path:
    """`make_full_checkpoint(family)` once per session (4 query tokens, 224 px, real tokenizers)."""
    if family not in _CHECKPOINTS:
        from tiny_checkpoint import make_full_checkpoint

        root = Path(tempfile.mkdtemp(prefix=f"eval-tiny-{family}-"))
        atexit.register(shutil.rmtree, root, True)
        _CHECKPOINTS[family] = make_full_checkpoint(root / family, family)
    return _CHECKPOINTS[family]


def _photo(name: str) -> Image.Image:
    from assets import photo

    return Image.fromarray(photo(name)).convert("RGB")


def save_photo(path: Path, name: str, size: int = 96) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = _photo(name)
    image.thumbnail((size, size))
    image.save(path)
    return path


def _dump(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def video_frames(n: int = 12, width: int = 64, height: int = 48) -> list[np.ndarray]:
    """n frames of a real photo, panning, each with a distinct brightness offset: frame i's mean grows with i."""
    base = np.asarray(_photo("astronaut").resize((width * 2, height)), dtype=np.int16)
    return [np.clip(base[:, 2 * i: 2 * i + width] // 4 + 16 * i, 0, 255).astype(np.uint8) for i in range(n)]


def write_video(path: Path, frames: list[np.ndarray], codec: str = "mpeg4", rate: int = 10) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frame_folder(path: Path, frames: list[np.ndarray]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(path / f"frame_{i + 1}.png")  # frame_1 .. frame_12: natural order matters
    return path


# ---------------------------------------------------------------------------------------------------------------------
# one writer per dataset


def write_nocaps(root: Path) -> Path:
    images = [
        {"id": 0, "file_name": "0013ea2087020901.jpg", "domain": "in-domain", "open_images_id": "0013ea2087020901"},
        {"id": 1, "file_name": "00223f2a1c5f4fd8.jpg", "domain": "near-domain", "open_images_id": "00223f2a1c5f4fd8"},
        {"id": 2, "file_name": "0036ef2e84a0d1a5.jpg", "domain": "out-domain", "open_images_id": "0036ef2e84a0d1a5"},
    ]
    captions = {0: ["An astronaut poses in front of a flag.", "A woman in a space suit."],
                1: ["A cat lying down.", "An orange tabby cat looking at the camera."],
                2: ["A cup of coffee on a saucer.", "A coffee cup with latte art."]}
    for im, name in zip(images, PHOTOS, strict=False):
        save_photo(root / "images" / im["file_name"], name)
    annotations = [{"image_id": i, "id": 10 * i + k, "caption": c} for i, cs in captions.items()
                   for k, c in enumerate(cs)]
    _dump(root / "nocaps_val_4500_captions.json", {"licenses": [], "info": {}, "images": images,
                                                    "annotations": annotations})
    return root


def write_flickr30k(root: Path) -> Path:
    images = []
    for i, (name, split) in enumerate(zip(PHOTOS, ("test", "test", "train", "val"), strict=True)):
        filename = f"{1000092795 + i}.jpg"
        save_photo(root / "flickr30k-images" / filename, name)
        images.append({"filename": filename, "imgid": i, "split": split, "sentids": [2 * i, 2 * i + 1],
                       "sentences": [{"raw": f"A photo number {i}.", "tokens": ["a", "photo"], "imgid": i,
                                      "sentid": 2 * i},
                                     {"raw": f"Something called {name}.", "tokens": [name], "imgid": i,
                                      "sentid": 2 * i + 1}]})
    _dump(root / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    return root


def write_gqa(root: Path) -> Path:
    questions = {
        "20968379": {"imageId": "n288870", "question": "What is the woman wearing?", "answer": "suit"},
        "20968380": {"imageId": "n161313", "question": "Is the cat on the left or right?", "answer": "right"},
        "201307251": {"imageId": "n288870", "question": "Are there both flags and helmets?", "answer": "yes"},
    }
    for q in questions.values():
        q |= {"fullAnswer": "", "isBalanced": True, "types": {}, "semantic": [], "entailed": [], "equivalent": []}
    save_photo(root / "images" / "n288870.jpg", "astronaut")
    save_photo(root / "images" / "n161313.jpg", "chelsea")
    _dump(root / "testdev_balanced_questions.json", questions)
    return root


def write_vsr(root: Path) -> Path:
    rows = [
        {"image": "000000050403.jpg", "caption": "The cat is in front of the person.", "label": 1},
        {"image": "000000401552.jpg", "caption": "The cup is far away from the saucer.", "label": 0},
    ]
    for row, name in zip(rows, ("chelsea", "coffee"), strict=True):
        save_photo(root / "images" / row["image"], name)
        row |= {"image_link": f"http://images.cocodataset.org/train2017/{row['image']}", "relation": "in front of",
                "annotator_id": 31, "vote_true_validator_id": [2, 6], "vote_false_validator_id": []}
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def write_iconqa(root: Path) -> Path:
    problems = {
        "17": {"question": "What has been done to this letter?", "choices": ["turn", "slide", "flip"], "answer": 1,
               "ques_type": "choose_txt", "grade": "prek", "label": "", "skills": []},
        "102": {"question": "Which is the odd one?", "choices": ["cat", "cup"], "answer": 0,
                "ques_type": "choose_txt", "grade": "prek", "label": "", "skills": []},
    }
    for (pid, p), name in zip(problems.items(), ("rocket", "chelsea"), strict=True):
        folder = root / "iconqa" / "test" / "choose_txt" / pid
        _dump(folder / "data.json", p)
        save_photo(folder / "image.png", name)
    return root


def write_textvqa(root: Path) -> Path:
    questions = [
        {"question": "what brand is this?", "image_id": "003a8ae2ef43b901", "question_id": 34602,
         "answers": ["nous les gosses"] * 5 + ["dakota"] * 3 + ["clothing"] * 2},
        {"question": "what is written on the cup?", "image_id": "00685bc495504d61", "question_id": 34603,
         "answers": ["latte"] * 10},
    ]
    for q in questions:
        q |= {"image_classes": [], "image_width": 96, "image_height": 64, "question_tokens": [], "set_name": "val"}
    ocr = [{"image_id": "003a8ae2ef43b901", "ocr_tokens": [f"w{i}" for i in range(35)], "ocr_info": []},
           {"image_id": "00685bc495504d61", "ocr_tokens": ["LATTE", "ART"], "ocr_info": []}]
    save_photo(root / "train_images" / "003a8ae2ef43b901.jpg", "astronaut")
    save_photo(root / "train_images" / "00685bc495504d61.jpg", "coffee")
    _dump(root / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa",
                                            "dataset_version": "0.5.1", "data": questions})
    _dump(root / "TextVQA_Rosetta_OCR_v0.2_val.json", {"dataset_type": "val", "data": ocr})
    return root


def write_vizwiz(root: Path) -> Path:
    rows = [
        {"image": "VizWiz_val_00000000.jpg", "question": "Ok. There is another picture I hope it is a better one.",
         "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10, "answer_type": "unanswerable",
         "answerable": 0},
        {"image": "VizWiz_val_00000001.jpg", "question": "What kind of drink is this?",
         "answers": [{"answer": "coffee", "answer_confidence": "yes"}] * 6
         + [{"answer": "latte", "answer_confidence": "maybe"}] * 4, "answer_type": "other", "answerable": 1},
    ]
    save_photo(root / "val" / rows[0]["image"], "rocket")
    save_photo(root / "val" / rows[1]["image"], "coffee")
    _dump(root / "Annotations" / "val.json", rows)
    return root


def write_scienceqa(root: Path) -> Path:
    problems = {
        "1": {"question": "Which animal is shown?", "choices": ["cat", "dog", "bird"], "answer": 0,
              "hint": "Look at the picture.", "image": "image.png", "task": "closed choice", "split": "test"},
        "2": {"question": "Which word comes first?", "choices": ["apple", "zebra"], "answer": 0, "hint": "",
              "image": None, "task": "closed choice", "split": "test"},
        "3": {"question": "What is in the cup?", "choices": ["tea", "coffee", "water", "milk", "juice"],
              "answer": 1, "hint": "", "image": "image.png", "task": "closed choice", "split": "test"},
    }
    save_photo(root / "images" / "test" / "1" / "image.png", "chelsea")
    save_photo(root / "images" / "test" / "3" / "image.png", "coffee")
    _dump(root / "problems.json", problems)
    _dump(root / "pid_splits.json", {"train": [], "val": [], "test": ["1", "2", "3"], "minival": []})
    return root


def write_hatefulmemes(root: Path) -> Path:
    rows = [{"id": 8291, "img": "img/08291.png", "label": 1, "text": "white people is this a shooting range"},
            {"id": 46971, "img": "img/46971.png", "label": 0, "text": "bravery at its finest"},
            {"id": 3745, "img": "img/03745.png", "label": 1, "text": "your order comes to $37.50"}]
    for row, name in zip(rows, ("astronaut", "rocket", "coffee"), strict=True):
        save_photo(root / row["img"], name)
    (root / "dev_seen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def write_visdial(root: Path, n_options: int = 6) -> Path:
    questions = ["is the photo in color", "is it a cat", "what color is it"]
    answers = ["yes", "no", "orange", "2", "i can't tell", "black and white", "maybe"]
    dialog = [{"question": 0, "answer": 0, "answer_options": [1, 0, 2, 3, 4, 5][:n_options], "gt_index": 1},
              {"question": 1, "answer": 0, "answer_options": [0, 1, 6, 3, 4, 5][:n_options], "gt_index": 0},
              {"question": 2, "answer": 2, "answer_options": [5, 1, 6, 3, 2, 0][:n_options], "gt_index": 4}]
    _dump(root / "visdial_1.0_val.json", {"version": "1.0", "split": "val2018", "data": {
        "dialogs": [{"image_id": 185565, "caption": "a cat lying on a blanket", "dialog": dialog}],
        "questions": questions, "answers": answers}})
    save_photo(root / "VisualDialog_val2018" / "VisualDialog_val2018_000000185565.jpg", "chelsea")
    return root


def write_msvd(root: Path) -> Path:
    (root / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\n00jrXRMlZOY_0_10 vid2\n", encoding="utf-8")
    _dump(root / "train_qa.json", [{"answer": a, "id": i, "question": "q", "video_id": 2}
                                   for i, a in enumerate(["man", "man", "woman", "cat", "cat", "cat", "dog"])])
    _dump(root / "test_qa.json", [{"answer": "man", "id": 0, "question": "who is walking?", "video_id": 1},
                                  {"answer": "cat", "id": 1, "question": "what is lying?", "video_id": 2}])
    write_video(root / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi", video_frames())
    write_frame_folder(root / "YouTubeClips" / "00jrXRMlZOY_0_10", video_frames(7))
    return root


def write_msrvtt(root: Path) -> Path:
    _dump(root / "train_qa.json", [{"answer": a, "category_id": 0, "id": i, "question": "q", "video_id": 0}
                                   for i, a in enumerate(["man", "woman", "woman", "dog"])])
    _dump(root / "test_qa.json", [{"answer": "woman", "category_id": 3, "id": 158581,
                                   "question": "who is singing?", "video_id": 7010}])
    write_video(root / "TestVideo" / "video7010.mp4", video_frames(10))
    return root


def write_ivqa(root: Path) -> Path:
    rows = [{"video_id": "-AhXyvqnrIc", "start": "12", "end": "25", "question": "what is the man holding?",
             "answer1": "knife", "answer2": "knife", "answer3": "knife", "answer4": "spoon", "answer5": "knife"},
            {"video_id": "0bTS0GAtF8A", "start": "3", "end": "11", "question": "what is being cut?",
             "answer1": "onion", "answer2": "onion", "answer3": "garlic", "answer4": "leek", "answer5": "carrot"}]
    with open(root / "test.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_video(root / "video" / "-AhXyvqnrIc_12_25.mp4", video_frames(9))
    write_video(root / "video" / "0bTS0GAtF8A_3_11.avi", video_frames(5))
    return root


WRITERS = {"nocaps": write_nocaps, "flickr30k": write_flickr30k, "gqa": write_gqa, "vsr": write_vsr,
           "iconqa": write_iconqa, "textvqa": write_textvqa, "vizwiz": write_vizwiz, "scienceqa": write_scienceqa,
           "hatefulmemes": write_hatefulmemes, "visdial": write_visdial, "msvd-qa": write_msvd,
           "msrvtt-qa": write_msrvtt, "ivqa": write_ivqa}


def write_all(root: Path) -> Path:
    """Every benchmark's fixture in `root/<name>/`."""
    for name, writer in WRITERS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        writer(root / name)
    return root
