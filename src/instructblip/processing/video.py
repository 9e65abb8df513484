"""Videos as frames: uniform sampling (4 frames by default, as the paper and LAVIS do), decoding with PyAV, and the
forms a video may be given in (a file, a folder of frame images, a list of frames, a (T, H, W, C) array).

Each sampled frame is then an image like any other (`processing/image.py`); the model puts every frame through the
vision encoder and the Q-Former and concatenates their query outputs (`models/instructblip.py`).
"""

from __future__ import annotations

import collections
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

NUM_FRAMES = 4  # LAVIS' `alpro_video_eval` (`n_frms: 4`), the paper's video setting
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def frame_indices(total: int, n: int) -> list[int]:
    """LAVIS' uniform sampling, `np.arange(0, total, total / n).astype(int)`; a video shorter than n frames
    repeats frames (LAVIS would return fewer, which the n x Q image tokens cannot take)."""
    if total < 1:
        raise ValueError("the video has no frames")
    if total >= n:
        return np.arange(0, total, total / n).astype(int)[:n].tolist()
    return [i * total // n for i in range(n)]


def is_video_file(source: Any) -> bool:
    """Whether `source` names a video: a path with a video extension, or a folder (of frame images)."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source)
    return path.suffix.lower() in VIDEO_EXTENSIONS or path.is_dir()


def read_frames(path: str | os.PathLike, n: int = NUM_FRAMES) -> list:
    """`n` frames of a video file (RGB uint8 arrays, by PyAV) or of a folder of frame images (paths)."""
    path = Path(path)
    if path.is_dir():
        frames = sorted((p for p in path.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS), key=_natural)
        if not frames:
            raise ValueError(f"{path} holds no frame images ({', '.join(FRAME_EXTENSIONS)})")
        return [str(frames[i]) for i in frame_indices(len(frames), n)]
    if not path.exists():
        raise FileNotFoundError(f"video {path} not found")
    return _read_container(str(path), n, str(path))


def read_video_bytes(data: bytes, n: int = NUM_FRAMES, max_pixels: int | None = None) -> list[np.ndarray]:
    """`n` frames of an encoded video held in memory (an upload, a data: URL); `max_pixels`: the largest frame
    (width x height) accepted, checked before anything is decoded."""
    if not data:
        raise ValueError("the video is empty")
    with tempfile.NamedTemporaryFile(suffix=".video") as f:  # some containers (mp4) need a seekable file
        f.write(data)
        f.flush()
        return _read_container(f.name, n, "the video", max_pixels)


def _read_container(source: str, n: int, name: str, max_pixels: int | None = None) -> list[np.ndarray]:
    try:
        import av
    except ImportError:
        raise ImportError("reading videos needs PyAV: pip install 'instructblip[eval]' (or pip install av)") from None
    if n < 1:
        raise ValueError(f"the number of frames must be >= 1, got {n}")
    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise ValueError(f"{name} has no video stream")
            stream = container.streams.video[0]
            if max_pixels is not None and stream.width * stream.height > max_pixels:
                raise ValueError(f"{name}'s frames are {stream.width}x{stream.height}, more than the {max_pixels} "
                                 "pixels allowed")
            total = stream.frames
        if total <= 0:  # no frame count in the header: count by decoding
            total = _count(source)
        frames = _decode(source, frame_indices(total, n))
        if len(frames) < n:  # the header over-counted: sample again from the frames that exist
            frames = _decode(source, frame_indices(_count(source), n))
    except av.FFmpegError as e:
        raise ValueError(f"cannot decode {name}: {e}") from None
    return frames


def _count(source: str) -> int:
    import av

    with av.open(source) as container:
        return sum(1 for _ in container.decode(video=0))


def _decode(source: str, indices: list[int]) -> list[np.ndarray]:
    import av

    wanted = collections.Counter(indices)
    out = []
    with av.open(source) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                out += [frame.to_ndarray(format="rgb24")] * wanted[i]  # (H, W, 3) uint8
            if i >= indices[-1]:
                break
    return out


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _is_frame_stack(x: Any) -> bool:
    """A (T, H, W, C) or (T, C, H, W) array or tensor: one video."""
    return hasattr(x, "ndim") and hasattr(x, "shape") and x.ndim == 4


def video_frames(video: Any, n: int = NUM_FRAMES) -> list:
    """The frames of one video given as a file or folder (`n` sampled uniformly), a list or tuple of frames (taken
    as they are), or a (T, H, W, C) / (T, C, H, W) array or tensor (its T frames)."""
    if is_video_file(video):
        return read_frames(video, n)
    if _is_frame_stack(video):
        return list(video)
    if isinstance(video, (list, tuple)) and video and not any(isinstance(f, (list, tuple)) for f in video):
        return list(video)
    raise ValueError("a video is a video file, a folder of frame images, a list of frames or a (frames, height, "
                     f"width, channels) array; got {type(video).__name__}")


def batch_of_videos(videos: Any, n: int = NUM_FRAMES) -> list[list]:
    """One video or a list of videos -> a list of frame lists (transformers' rule: a list of images is one video,
    a list of lists or of arrays of frames is a batch)."""
    if is_video_file(videos) or _is_frame_stack(videos):
        return [video_frames(videos, n)]
    if isinstance(videos, (list, tuple)) and videos and all(
            isinstance(v, (list, tuple)) or _is_frame_stack(v) or is_video_file(v) for v in videos):
        return [video_frames(v, n) for v in videos]
    return [video_frames(videos, n)]
