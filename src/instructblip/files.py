"""Reading and writing the small JSON and text files of a checkpoint directory, a report, a results file."""

from __future__ import annotations

import json
import os


def read_json(path: str | os.PathLike, missing_ok: bool = False) -> dict:
    """A JSON object from `path`; `{}` for a missing file when `missing_ok`. ValueError names a bad file."""
    if missing_ok and not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write `data` as indented JSON, whole or not at all (`write_text`)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` under a temporary name and rename it into place: never a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
