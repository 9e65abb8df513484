"""Resolve what the user names as a model: a local directory, or a hub id found in the local Hugging Face cache
(or downloaded with huggingface_hub when the network allows). No torch here."""

from __future__ import annotations

import os
import re

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a model directory needs; tokenizer files are fetched too so the processor finds them
_ALLOW = ["*.json", "*.safetensors", "*.model", "*.txt", "qformer_tokenizer/*"]


class CheckpointNotFoundError(FileNotFoundError):
    """The named model is neither a local directory nor a hub id that can be found."""


def _cached_snapshot(repo_id: str) -> str | None:
    """The newest snapshot of `repo_id` in the local HF cache, without importing huggingface_hub."""
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub"
    )
    repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    ref = os.path.join(repo_dir, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            snapshot = os.path.join(repo_dir, "snapshots", f.read().strip())
        if os.path.isfile(os.path.join(snapshot, "config.json")):
            return snapshot
    snapshots = os.path.join(repo_dir, "snapshots")
    if os.path.isdir(snapshots):
        for name in sorted(os.listdir(snapshots), key=lambda n: os.path.getmtime(os.path.join(snapshots, n)))[::-1]:
            if os.path.isfile(os.path.join(snapshots, name, "config.json")):
                return os.path.join(snapshots, name)
    return None


def resolve_checkpoint_dir(name: str | os.PathLike) -> str:
    """Return a local directory holding the checkpoint `name`.

    `name` is a directory, or a hub id such as `Salesforce/instructblip-flan-t5-xl`, looked up in the local HF cache
    first and then downloaded with huggingface_hub unless `HF_HUB_OFFLINE=1`.
    """
    path = os.fspath(name)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointNotFoundError(f"{path} is a file; a model is a directory holding config.json and weights")
    if not _HUB_ID.match(path):
        raise CheckpointNotFoundError(
            f"{path} is neither a local directory nor a hub id like 'Salesforce/instructblip-flan-t5-xl'"
        )
    snapshot = _cached_snapshot(path)
    if snapshot:
        return snapshot
    return _download(path, _ALLOW)


def resolve_config_dir(name: str | os.PathLike) -> str:
    """A local directory holding at least the config of `name`: the checkpoint itself when it is local or cached; for
    a hub id not in the cache, its JSON files only (config, shard index, generation and tokenizer configs), without
    the weights: enough to describe the model and what it needs (`instructblip info`)."""
    path = os.fspath(name)
    if os.path.exists(path) or not _HUB_ID.match(path) or _cached_snapshot(path):
        return resolve_checkpoint_dir(path)
    return _download(path, ["*.json"])


def _download(path: str, patterns: list[str]) -> str:
    """Fetch the files of hub id `path` matching `patterns` with huggingface_hub, or say how to get them."""
    how = (
        f"download it where the network allows with `hf download {path}` (it lands in the Hugging Face cache, "
        f"where we look), or pass a local directory holding its config.json and *.safetensors"
    )
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise CheckpointNotFoundError(f"{path} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: {how}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointNotFoundError(
            f"{path} is not in the local Hugging Face cache and huggingface_hub is not installed "
            f"(pip install 'instructblip[hub]'): {how}"
        ) from None
    try:
        return snapshot_download(path, allow_patterns=patterns)
    except Exception as e:  # network errors, unknown repos, gated repos: one message with the fix
        raise CheckpointNotFoundError(f"could not fetch {path} from the hub ({type(e).__name__}: {e}); {how}") from None
