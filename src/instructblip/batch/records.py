"""Records in, answer lines out: the input readers (JSONL, a folder of images, parquet), the key of a record's id,
and the index of what an output already holds.

Everything streams. A reader yields one record at a time; the output index keeps 9 bytes per id of the output
(a 64-bit key and a flag), never the answers, so a million records need about 9 MB whatever the answers hold.

An output is a JSONL file appended to one whole line at a time. An id may appear on several lines (a failed record
retried with --retry-failed gets a second line): the last line of an id is the one that counts, for resuming and
for merging alike. A line that is not JSON (the torn end of a killed write) is ignored by every reader.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PARQUET_SUFFIXES = (".parquet", ".pq")


# ----------------------------------------------------------------------------------------------------------------------
# ids


def id_key(rid) -> int:
    """A record id's 64-bit key: the same in every process and on every machine (unlike `hash`), so it can shard
    records between ranks and index an output. 1 and "1" are different ids. Two ids share a key with a chance of
    about n**2 / 2**65 (3e-8 for a million records)."""
    text = json.dumps(rid, ensure_ascii=False, sort_keys=True)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


# ----------------------------------------------------------------------------------------------------------------------
# input


def input_kind(path: str, instruction: str | None) -> str:
    """"jsonl", "folder" or "parquet" for an input path; a ValueError names what is wrong with it."""
    if os.path.isdir(path):
        if not instruction:
            raise ValueError(f"{path} is a folder of images: give the question for all of them with --instruction")
        if not any(image_names(path)):
            raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return "folder"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.lower().endswith(PARQUET_SUFFIXES):
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow: pip install 'instructblip[datasets]'") from None
        return "parquet"
    return "jsonl"


def read_records(path: str, instruction: str | None = None, select: Callable[[int], bool] | None = None
                 ) -> Iterator[dict]:
    """The records of a JSONL file, a folder of images or a parquet file, one at a time.

    A record is {"id", "image", "instruction"}: image paths relative to the input file are made absolute; a parquet
    image column may also hold the encoded bytes (or `datasets`' {"bytes", "path"}). `instruction` fills records that
    have none. A bad record (not JSON, a missing field) comes back as {"id", "error"} so that it is reported, not
    fatal. `select(i)`, when given, says which positions (line, file or row numbers from 0) to read at all: the data
    loader's workers split the input with it before anything is parsed."""
    kind = input_kind(path, instruction)
    if kind == "folder":
        yield from _folder_records(path, instruction, select)
    elif kind == "parquet":
        yield from _parquet_records(path, instruction, select)
    else:
        yield from _jsonl_records(path, instruction, select)


def image_names(folder: str) -> Iterator[str]:
    # os.scandir streams a folder's entries in the file system's order, where os.listdir would hold a million names
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file():
                yield entry.name


def _folder_records(folder: str, instruction: str, select: Callable[[int], bool] | None) -> Iterator[dict]:
    for i, name in enumerate(image_names(folder)):
        if select is None or select(i):
            yield {"id": name, "image": os.path.join(folder, name), "instruction": instruction}


def _jsonl_records(path: str, instruction: str | None, select: Callable[[int], bool] | None) -> Iterator[dict]:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            if select is not None and not select(i):
                continue
            number = i + 1
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield {"id": f"line-{number}", "error": f"line {number} is not JSON ({getattr(e, 'msg', e)})"}
                continue
            if not isinstance(record, dict):
                yield {"id": f"line-{number}", "error": f"line {number} is not a JSON object"}
                continue
            yield checked_record(record, record.get("id", f"line-{number}"), f"line {number}", instruction, base)


def _parquet_records(path: str, instruction: str | None, select: Callable[[int], bool] | None) -> Iterator[dict]:
    import pyarrow.parquet as pq

    base = os.path.dirname(os.path.abspath(path))
    file = pq.ParquetFile(path)
    columns = [c for c in ("id", "image", "instruction") if c in file.schema_arrow.names]
    i = -1
    for chunk in file.iter_batches(batch_size=1024, columns=columns):  # a thousand rows in memory at a time
        for record in chunk.to_pylist():
            i += 1
            if select is None or select(i):
                yield checked_record(record, record.get("id", f"row-{i}"), f"row {i}", instruction, base)


def checked_record(record: dict, rid, where: str, instruction: str | None, base: str) -> dict:
    """{"id", "image", "instruction"} with the image path made absolute, or {"id", "error"}."""
    image = record.get("image")
    if isinstance(image, dict):  # `datasets`' Image feature: {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    text = record.get("instruction")
    if not (isinstance(text, str) and text.strip()) and instruction:
        text = instruction
    missing = []
    if not (isinstance(image, (str, bytes)) and image):
        missing.append("image")
    if not (isinstance(text, str) and text.strip()):
        missing.append("instruction")
    if missing:
        return {"id": rid, "error": f"{where} lacks {' and '.join(missing)}"}
    if isinstance(image, str) and not os.path.isabs(image):
        image = os.path.join(base, image)
    return {"id": rid, "image": image, "instruction": text}


# ----------------------------------------------------------------------------------------------------------------------
# output


def check_output(input_path: str | None, output: str) -> None:
    """Refuse, before any model is loaded, an output that cannot be written or that is the input itself."""
    if input_path is not None and os.path.exists(input_path) and os.path.exists(output) \
            and os.path.samefile(input_path, output):
        raise ValueError(f"--output {output} is the input file; write the answers to another file")
    if os.path.isdir(output):
        raise ValueError(f"--output {output} is a folder; name a file such as {os.path.join(output, 'answers.jsonl')}")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise ValueError(f"--output {output}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(output) and not os.access(output, os.W_OK)):
        raise ValueError(f"--output {output}: not writable here; choose a file in a folder you can write to")


def output_lines(path: str, size: int | None = None) -> Iterator[tuple[bytes, int, bool]]:
    """(line, key of its id, whether it carries an error) for every valid line of an output file, in order, within
    its first `size` bytes when given; lines that are not JSON objects with an id (a torn end) are skipped."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        read = 0
        for raw in f:
            read += len(raw)
            if size is not None and read > size:
                return
            if not raw.endswith(b"\n"):
                continue  # a torn last line: its writer cut it off, or will
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(row, dict) and "id" in row:
                yield raw, id_key(row["id"]), "error" in row


def cut_torn_tail(path: str) -> None:
    """Cut an unfinished last line (a kill in the middle of a write) off a file this process is about to append
    to, so that the next line starts on a line of its own. Reads only the end of the file."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            block = f.read(step)
            if pos == end and block.endswith(b"\n"):
                return
            newline = block.rfind(b"\n")
            if newline >= 0:
                f.truncate(pos - step + newline + 1)
                return
            pos -= step
        f.truncate(0)


@dataclass
class OutputIndex:
    """What some output files hold: the sorted keys of their ids and, per key, whether the id's last line carries an
    error (9 bytes per id)."""

    keys: np.ndarray  # uint64, sorted, unique
    failed: np.ndarray  # bool, one per key

    @classmethod
    def scan(cls, paths: list[str]) -> OutputIndex:
        """Read the ids of `paths` in order (a later line of an id replaces an earlier one)."""
        keys, errors = array("Q"), bytearray()
        for path in paths:
            for _, key, error in output_lines(path):
                keys.append(key)
                errors.append(error)
        # the last line of each key: the first occurrence in the reversed order
        reversed_keys = np.frombuffer(keys, dtype=np.uint64)[::-1]
        unique, first = np.unique(reversed_keys, return_index=True)
        failed = np.frombuffer(bytes(errors), dtype=np.bool_)[::-1][first] if len(errors) else np.zeros(0, bool)
        return cls(unique, failed.copy())

    def status(self, key: int) -> str | None:
        """"done", "failed" (the last line is an error) or None (not in the output)."""
        i = int(np.searchsorted(self.keys, np.uint64(key)))
        if i == len(self.keys) or int(self.keys[i]) != key:
            return None
        return "failed" if self.failed[i] else "done"

    def __len__(self) -> int:
        return len(self.keys)
