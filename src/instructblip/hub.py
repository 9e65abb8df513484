"""Resolve what the user names as a model: a local directory, or a hub id found in the local Hugging Face cache
(or downloaded with huggingface_hub when the network allows). No torch here.

The cache layout is huggingface_hub's: `<cache>/models--Org--name/snapshots/<commit>/<files>`, with
`refs/<branch or tag>` holding the commit a name points to. `<cache>` is `cache_dir` when given, else
`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.

`safetensors_headers` reads the headers of a hub repository's safetensors files with HTTP range requests: the
tensor names, dtypes and shapes, and not one byte of the weights (`instructblip info`).
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# what a model directory needs; tokenizer files are fetched too so the processor finds them
_ALLOW = ["*.json", "*.safetensors", "*.model", "*.txt", "qformer_tokenizer/*"]
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointNotFoundError(FileNotFoundError):
    """The named model is neither a local directory nor a hub id that can be found."""


def hub_cache(cache_dir: str | os.PathLike | None = None) -> str:
    if cache_dir is not None:
        return os.fspath(cache_dir)
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub"
    )


def _complete(snapshot: str, need_weights: bool) -> bool:
    """Whether `snapshot` holds a config and, if `need_weights`, its weights (every shard an index names)."""
    if not os.path.isfile(os.path.join(snapshot, "config.json")):
        return False
    if not need_weights or any(os.path.isfile(os.path.join(snapshot, name)) for name in _WEIGHTS):
        return True
    for name in _INDEXES:
        try:
            with open(os.path.join(snapshot, name), encoding="utf-8") as f:
                shards = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if shards and all(os.path.isfile(os.path.join(snapshot, shard)) for shard in shards):
            return True
    return False


def _cached_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                     need_weights: bool = True) -> str | None:
    """The snapshot of `repo_id` at `revision` (a branch, a tag or a commit; None: main, else the newest snapshot)
    in the local HF cache, without importing huggingface_hub. `need_weights`: a snapshot that holds the JSON files
    only (what `instructblip info` fetches) does not count."""
    repo_dir = os.path.join(hub_cache(cache_dir), "models--" + repo_id.replace("/", "--"))
    snapshots = os.path.join(repo_dir, "snapshots")
    ref = os.path.join(repo_dir, "refs", revision or "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            snapshot = os.path.join(snapshots, f.read().strip())
        if _complete(snapshot, need_weights):
            return snapshot
    if revision is not None:  # a commit (or its prefix, as the hub accepts) names its snapshot directly
        if os.path.isdir(snapshots) and len(revision) >= 7 and re.fullmatch(r"[0-9a-f]+", revision):
            for name in os.listdir(snapshots):
                if name.startswith(revision) and _complete(os.path.join(snapshots, name), need_weights):
                    return os.path.join(snapshots, name)
        return None
    if os.path.isdir(snapshots):
        for name in sorted(os.listdir(snapshots), key=lambda n: os.path.getmtime(os.path.join(snapshots, n)))[::-1]:
            if _complete(os.path.join(snapshots, name), need_weights):
                return os.path.join(snapshots, name)
    return None


def resolve_checkpoint_dir(name: str | os.PathLike, revision: str | None = None, token: str | bool | None = None,
                           cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> str:
    """Return a local directory holding the checkpoint `name`.

    `name` is a directory, or a hub id such as `Salesforce/instructblip-flan-t5-xl`, looked up in the local HF cache
    first (at `revision`: a branch, tag or commit) and then downloaded with huggingface_hub, unless
    `local_files_only` or `HF_HUB_OFFLINE=1`. `token`: for gated or private repositories (None: huggingface_hub's
    stored token or `$HF_TOKEN`). For a local directory the hub arguments do not apply.
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
    snapshot = _cached_snapshot(path, revision, cache_dir)
    if snapshot:
        return snapshot
    return _download(path, _ALLOW, revision, token, cache_dir, local_files_only)


def resolve_config_dir(name: str | os.PathLike, revision: str | None = None, token: str | bool | None = None,
                       cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> str:
    """A local directory holding at least the config of `name`: the checkpoint itself when it is local or cached; for
    a hub id not in the cache, its JSON files only (config, shard index, generation and tokenizer configs), without
    the weights: enough to describe the model and what it needs (`instructblip info`)."""
    path = os.fspath(name)
    if os.path.exists(path) or not _HUB_ID.match(path):
        return resolve_checkpoint_dir(path)
    snapshot = _cached_snapshot(path, revision, cache_dir, need_weights=False)
    if snapshot:
        return snapshot
    return _download(path, ["*.json"], revision, token, cache_dir, local_files_only)


def offline_hint(repo_id: str, revision: str | None = None) -> str:
    """How to get a hub repository onto a machine (the current hub CLI, `hf`, from huggingface_hub >= 0.34)."""
    at = f" --revision {revision}" if revision else ""
    return (f"download it where the network allows with `hf download {repo_id}{at}` (it lands in the Hugging Face "
            f"cache, where we look), or pass a local directory holding its config.json and *.safetensors")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _download(path: str, patterns: list[str], revision: str | None, token: str | bool | None,
              cache_dir: str | os.PathLike | None, local_files_only: bool) -> str:
    """Fetch the files of hub id `path` matching `patterns` with huggingface_hub, or say how to get them."""
    how = offline_hint(path, revision)
    at = f" at revision {revision!r}" if revision else ""
    if local_files_only:
        raise CheckpointNotFoundError(f"{path}{at} is not in the local Hugging Face cache ({hub_cache(cache_dir)}) "
                                      f"and local_files_only is set: {how}")
    if _offline():
        raise CheckpointNotFoundError(f"{path}{at} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                                      f"{how}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointNotFoundError(
            f"{path} is not in the local Hugging Face cache and huggingface_hub is not installed "
            f"(pip install 'instructblip[hub]'): {how}"
        ) from None
    options = {k: v for k, v in (("revision", revision), ("token", token), ("cache_dir", cache_dir)) if v is not None}
    try:
        return snapshot_download(path, allow_patterns=patterns, **options)
    except Exception as e:  # network errors, unknown repos, gated repos: one message with the fix
        raise CheckpointNotFoundError(f"could not fetch {path} from the hub ({type(e).__name__}: {e}); {how}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Headers only, over HTTP


def safetensors_headers(repo_id: str, files: list[str], revision: str | None = None,
                        token: str | bool | None = None) -> tuple[dict[str, dict], int]:
    """The safetensors headers of `files` in hub repository `repo_id` ({tensor name: {dtype, shape, ...}}, all files
    together) and the bytes read, which are the headers' only: per file one range request for the 8-byte header
    length and one for the header itself. CheckpointNotFoundError when a file cannot be read."""
    try:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers
    except ImportError:
        raise CheckpointNotFoundError(f"reading {repo_id}'s headers needs huggingface_hub (pip install "
                                      "'instructblip[hub]')") from None
    if _offline():
        raise CheckpointNotFoundError(f"{repo_id}'s weights are not here and HF_HUB_OFFLINE is set: "
                                      f"{offline_hint(repo_id, revision)}")
    headers = build_hf_headers(token=token)
    endpoint = os.environ.get("HF_ENDPOINT")  # read now: huggingface_hub reads it once, when imported
    tensors: dict[str, dict] = {}
    read = 0
    for file in files:
        url = hf_hub_url(repo_id, file, revision=revision, endpoint=endpoint.rstrip("/") if endpoint else None)
        first = _ranged(url, headers, 0, 8)
        n = int.from_bytes(first, "little")
        if not 2 <= n <= 100_000_000:
            raise CheckpointNotFoundError(f"{repo_id}/{file} does not start like a safetensors file")
        body = _ranged(url, headers, 8, n)
        read += len(first) + len(body)
        try:
            header = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointNotFoundError(f"{repo_id}/{file}: unreadable safetensors header ({e})") from None
        header.pop("__metadata__", None)
        tensors.update(header)
    return tensors, read


def _ranged(url: str, headers: dict, start: int, length: int) -> bytes:
    request = urllib.request.Request(url, headers={**headers, "Range": f"bytes={start}-{start + length - 1}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            if response.status != 206:  # a server that ignores Range would send the whole file: stop here
                raise CheckpointNotFoundError(f"{url} does not serve byte ranges (HTTP {response.status})")
            data = response.read(length + 1)
    except urllib.error.URLError as e:
        raise CheckpointNotFoundError(f"could not read {url} ({e})") from None
    if len(data) != length:
        raise CheckpointNotFoundError(f"{url}: asked for {length} bytes at {start}, got {len(data)}")
    return data
