"""Tokenizers for InstructBLIP, on the `tokenizers` library, loading the Hugging Face tokenizer files the way
transformers 5.x does (so that ids are identical), and saving files transformers 5.x loads back to the same ids.

What transformers 5.x does on load, and therefore what we do (read from its `tokenization_utils_*.py` and the
per-model tokenizer classes):
- The class named by `tokenizer_config.json` (`tokenizer_class`) rebuilds its pipeline around the vocabulary of
  `tokenizer.json` instead of taking the file as it is:
  - `LlamaTokenizer`: BPE with byte fallback, no normalizer, a `Metaspace` pre-tokenizer that prepends "▁" only at
    the start of the text (`legacy: false`, the 5.x default) or to every segment (`legacy: true`). Unlike
    sentencepiece, a text that starts with spaces loses one of them (" Hello" -> "▁Hello").
  - `T5Tokenizer`: Unigram with the precompiled sentencepiece normalizer, split on whitespace runs, `</s>` appended.
  - `BertTokenizer`: WordPiece with BERT's normalizer (lower case, accents stripped) and `[CLS] ... [SEP]`.
  Any other class uses `tokenizer.json` unchanged.
- With a `tokenizer.json`, the bos/eos template is the file's post-processor: `add_bos_token` / `add_eos_token` in
  `tokenizer_config.json` are ignored (Vicuna's file adds `</s>` = 2 as bos). Without one (a sentencepiece
  `tokenizer.model` or a BERT `vocab.txt`), they are honoured.
- Added tokens come from `added_tokens_decoder` in `tokenizer_config.json`; older directories without it use
  `special_tokens_map.json`, `added_tokens.json` and the `added_tokens` of `tokenizer.json`.
- Padding side: `tokenizer_config.json`, else the class default (left for LLaMA, right otherwise); truncation side:
  the config, else right. `model_max_length` from the config (else unlimited).
- Truncation counts the special tokens; `max_length` without `padding` turns truncation on; `padding=True` pads to
  the longest sequence of the batch, `"max_length"` to `max_length`.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE, Unigram, WordPiece

from instructblip.files import read_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model")
VOCAB_FILE = "vocab.txt"

VERY_LARGE_INTEGER = int(1e30)  # transformers' "no limit" model_max_length
LARGE_INTEGER = int(1e20)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json keys that describe loading, not the tokenizer; dropped when saving
_TRANSIENT_KEYS = ("name_or_path", "is_local", "local_files_only", "files_loaded", "tokenizer_file", "vocab_file")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what transformers keeps around it (special tokens, sides, limits).

    Build it with `Tokenizer.from_pretrained(directory)`; see the module docstring for how files are read.
    `kind` is "llama", "t5", "bert" or "generic" and decides the class-specific pipeline and defaults.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        kind: str = "generic",
        tokenizer_class: str | None = None,
        special_tokens: dict[str, str] | None = None,
        extra_special_tokens: Sequence[str] = (),
        padding_side: str | None = None,
        truncation_side: str = "right",
        model_max_length: int | None = None,
        clean_up_tokenization_spaces: bool = False,
        config: dict[str, Any] | None = None,
    ):
        self.backend = backend
        self.kind = kind
        self.tokenizer_class = tokenizer_class or _DEFAULT_CLASS[kind]
        # named special tokens: bos_token, eos_token, ... and model-specific ones such as image_token
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.extra_special_tokens = list(dict.fromkeys(extra_special_tokens))
        self.padding_side = padding_side or ("left" if kind == "llama" else "right")
        self.truncation_side = truncation_side
        for name, side in (("padding_side", self.padding_side), ("truncation_side", self.truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
        self.model_max_length = VERY_LARGE_INTEGER if model_max_length is None else int(model_max_length)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.model_input_names = ["input_ids", "token_type_ids", "attention_mask"] if kind == "bert" else [
            "input_ids", "attention_mask"]
        # the tokenizer_config.json we were loaded from: written back (updated) by save_pretrained
        self.config = dict(config or {})
        self._lock = threading.Lock()  # the backend's truncation/padding settings are set per call

    def __getstate__(self) -> dict:  # picklable (DataLoader workers with "spawn"): the lock is rebuilt
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Tokenizer(class={self.tokenizer_class}, vocab_size={self.vocab_size}, len={len(self)}, "
            f"special_tokens={self.special_tokens}, padding_side={self.padding_side!r}, "
            f"truncation_side={self.truncation_side!r}, model_max_length={self.model_max_length})"
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> Tokenizer:
        """Load from a directory (or hub id) holding `tokenizer.json`, a sentencepiece `tokenizer.model` or a BERT
        `vocab.txt`, with `tokenizer_config.json` / `special_tokens_map.json`. `overrides` replace config keys
        (e.g. `padding_side="left"`)."""
        from instructblip.hub import resolve_checkpoint_dir

        directory = resolve_checkpoint_dir(path)
        file = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        config = read_json(file) if os.path.isfile(file) else {}
        config.update(overrides)
        json_file = os.path.join(directory, TOKENIZER_FILE)
        spm_file = next((os.path.join(directory, f) for f in SENTENCEPIECE_FILES
                         if os.path.isfile(os.path.join(directory, f))), None)
        vocab_file = os.path.join(directory, VOCAB_FILE)
        tokenizer_json = read_json(json_file) if os.path.isfile(json_file) else None
        if tokenizer_json is None and spm_file is None and not os.path.isfile(vocab_file):
            raise FileNotFoundError(
                f"{directory} has no {TOKENIZER_FILE}, {' or '.join(SENTENCEPIECE_FILES)} or {VOCAB_FILE}"
            )
        kind = _kind(config.get("tokenizer_class"), tokenizer_json, spm_file, vocab_file)
        added = _added_tokens(directory, config, tokenizer_json, overrides)
        if tokenizer_json is not None:  # the file's post-processor decides about bos/eos (transformers 5.x)
            config.pop("add_bos_token", None)
            config.pop("add_eos_token", None)
            _adopt_json_padding_truncation(config, tokenizer_json)
        special_tokens = {k: _content(v) for k, v in config.items()
                          if k.endswith("_token") and isinstance(v, (str, dict)) and _content(v) is not None}
        if isinstance(config.get("extra_special_tokens"), dict):  # named model-specific tokens, e.g. image_token
            special_tokens.update({k: _content(v) for k, v in config["extra_special_tokens"].items()})
        extra = [_content(t) for t in _extra_tokens(config)]
        if kind == "t5" and not any("<extra_id_" in t for t in extra):
            extra += [f"<extra_id_{i}>" for i in range(int(config.get("extra_ids", 100)))]
        backend = _build_backend(kind, directory, config, special_tokens, tokenizer_json, spm_file, vocab_file)

        # Add the added tokens (sorted by id), then any special token the vocabulary lacks
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        to_add = [t for _, t in sorted(added.items())]
        known = present | {t.content for t in to_add}
        named = [special_tokens[k] for k in SPECIAL_TOKEN_NAMES if k in special_tokens]
        named += [v for k, v in special_tokens.items() if k not in SPECIAL_TOKEN_NAMES]
        for content in named + extra:
            if content not in known:
                to_add.append(AddedToken(content, special=True))
                known.add(content)
        if to_add:
            backend.add_tokens(to_add)

        tokenizer = cls(
            backend,
            kind=kind,
            tokenizer_class=config.get("tokenizer_class"),
            special_tokens=special_tokens,
            extra_special_tokens=extra,
            padding_side=config.get("padding_side"),
            truncation_side=config.get("truncation_side") or "right",
            model_max_length=config.get("model_max_length", config.get("max_len")),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            config={k: v for k, v in config.items() if k not in _TRANSIENT_KEYS},
        )
        # The bos/eos template: BERT and T5 always have theirs; others keep the tokenizer.json one, or build one
        # from add_bos_token / add_eos_token when there is none.
        if kind == "bert":
            tokenizer._set_bert_template()
        elif kind == "t5":
            eos_id = tokenizer.eos_token_id
            backend.post_processor = processors.TemplateProcessing(
                single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", eos_id)]
            )
        elif backend.post_processor is None or "add_bos_token" in config or "add_eos_token" in config:
            tokenizer.set_bos_eos_template(bool(config.get("add_bos_token", False)),
                                           bool(config.get("add_eos_token", False)))
        return tokenizer

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` (transformers 5.x and 4.x
        load them back to the same ids)."""
        os.makedirs(directory, exist_ok=True)
        files = [os.path.join(directory, name) for name in
                 (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)]
        self.backend.save(files[0])
        config = {k: v for k, v in self.config.items()
                  if k not in ("additional_special_tokens", "extra_special_tokens", "add_bos_token", "add_eos_token")}
        config["added_tokens_decoder"] = {
            str(i): t.__getstate__() for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        for name in SPECIAL_TOKEN_NAMES:
            config.pop(name, None)
        named = {k: v for k, v in self.special_tokens.items() if k in SPECIAL_TOKEN_NAMES}
        config.update(named)
        model_specific = {k: v for k, v in self.special_tokens.items() if k not in SPECIAL_TOKEN_NAMES}
        if self.extra_special_tokens:
            config["extra_special_tokens"] = list(self.extra_special_tokens)
        for k in model_specific:
            config.pop(k, None)
        if model_specific:
            # transformers 5.x reads `<name>_token` keys as named model-specific tokens
            config.update(model_specific)
        config["tokenizer_class"] = self.tokenizer_class
        config["model_max_length"] = self.model_max_length
        config["truncation_side"] = self.truncation_side
        if "padding_side" in self.config or self.padding_side != ("left" if self.kind == "llama" else "right"):
            config["padding_side"] = self.padding_side  # only when set: 5.x passes it on to the Q-Former tokenizer
        config["clean_up_tokenization_spaces"] = self.clean_up_tokenization_spaces
        with open(files[1], "w", encoding="utf-8") as f:
            f.write(json.dumps(dict(sorted(config.items())), indent=2, ensure_ascii=False) + "\n")
        smap = dict(named)
        if self.extra_special_tokens:
            smap["additional_special_tokens"] = list(self.extra_special_tokens)
        with open(files[2], "w", encoding="utf-8") as f:
            f.write(json.dumps(smap, indent=2, ensure_ascii=False) + "\n")
        return files

    # ------------------------------------------------------------------------------------------------------------------
    # Vocabulary and special tokens

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (without added tokens), as transformers' `vocab_size`."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def _token_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    unk_token = property(lambda self: self.special_tokens.get("unk_token"))
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    sep_token = property(lambda self: self.special_tokens.get("sep_token"))
    cls_token = property(lambda self: self.special_tokens.get("cls_token"))
    bos_token_id = property(lambda self: self._token_id("bos_token"))
    eos_token_id = property(lambda self: self._token_id("eos_token"))
    unk_token_id = property(lambda self: self._token_id("unk_token"))
    pad_token_id = property(lambda self: self._token_id("pad_token"))
    sep_token_id = property(lambda self: self._token_id("sep_token"))
    cls_token_id = property(lambda self: self._token_id("cls_token"))

    @property
    def all_special_tokens(self) -> list[str]:
        named = [self.special_tokens[k] for k in SPECIAL_TOKEN_NAMES if k in self.special_tokens]
        return list(dict.fromkeys(named + self.extra_special_tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        """Token string(s) -> id(s); unknown tokens map to the unk id (None without an unk token)."""
        if isinstance(tokens, str):
            index = self.backend.token_to_id(tokens)
            return self.unk_token_id if index is None else index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend.id_to_token(int(i)) for i in _as_id_list(ids) if int(i) not in skip]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).tokens

    def add_tokens(self, tokens: str | AddedToken | Sequence[str | AddedToken], special_tokens: bool = False) -> int:
        """Add tokens to the vocabulary (kept whole, never split); returns how many are new. Special tokens are not
        normalized and are dropped by `decode(skip_special_tokens=True)`."""
        tokens = [tokens] if isinstance(tokens, (str, AddedToken)) else list(tokens)
        before = len(self)
        if special_tokens:
            self.backend.add_special_tokens(tokens)
        else:
            self.backend.add_tokens(tokens)
        return len(self) - before

    def add_special_tokens(self, special_tokens_dict: dict[str, str | AddedToken | Sequence[str | AddedToken]]) -> int:
        """Set named special tokens (`{"pad_token": "[PAD]"}`, `{"image_token": "<image>"}`) or extra ones
        (`{"additional_special_tokens": [...]}`), adding them to the vocabulary where missing."""
        before = len(self)
        for key, value in special_tokens_dict.items():
            if key in ("additional_special_tokens", "extra_special_tokens"):
                values = [value] if isinstance(value, (str, AddedToken)) else list(value)
                self.backend.add_special_tokens(values)
                self.extra_special_tokens = list(dict.fromkeys(self.extra_special_tokens + [str(_content(v))
                                                                                            for v in values]))
            elif key.endswith("_token"):
                self.backend.add_special_tokens([value])
                self.special_tokens[key] = _content(value)
            else:
                raise ValueError(f"{key!r} is not a special token name (use '<name>_token' or "
                                 f"'additional_special_tokens')")
        if self.kind == "bert":
            self._set_bert_template()
        return len(self) - before

    def set_bos_eos_template(self, add_bos_token: bool, add_eos_token: bool) -> None:
        """Make encoding add the bos and/or eos token (transformers' `update_post_processor`)."""
        bos, eos = self.bos_token, self.eos_token
        add_bos_token = add_bos_token and bos is not None
        add_eos_token = add_eos_token and eos is not None
        single = f"{(bos + ':0 ') if add_bos_token else ''}$A:0{(' ' + eos + ':0') if add_eos_token else ''}"
        pair = (f"{single}{(' ' + bos + ':1') if add_bos_token else ''} $B:1"
                f"{(' ' + eos + ':1') if add_eos_token else ''}")
        special = ([(bos, self.bos_token_id)] if add_bos_token else []) + (
            [(eos, self.eos_token_id)] if add_eos_token else [])
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
        self.config["add_bos_token"], self.config["add_eos_token"] = add_bos_token, add_eos_token

    def _set_bert_template(self) -> None:
        cls_token, sep_token = self.cls_token or "[CLS]", self.sep_token or "[SEP]"
        cls_id = self.cls_token_id if self.cls_token_id is not None else 2
        sep_id = self.sep_token_id if self.sep_token_id is not None else 3
        self.backend.post_processor = processors.TemplateProcessing(
            single=f"{cls_token}:0 $A:0 {sep_token}:0",
            pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
            special_tokens=[(cls_token, cls_id), (sep_token, sep_id)],
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Encoding

    def __call__(
        self,
        text: str | Sequence[str],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        return_token_type_ids: bool | None = None,
    ) -> dict[str, Any]:
        """Encode a string or a list of strings -> `{"input_ids", "attention_mask"}` (+ `token_type_ids` for BERT
        unless `return_token_type_ids=False`).

        `padding`: False, True / "longest" (to the longest in the batch) or "max_length". `truncation`: True /
        "longest_first" to cut to `max_length` (special tokens included) on `truncation_side`; None means "only if
        max_length is given and padding is off" (as transformers). Without `max_length`, padding to "max_length" and
        truncation use `model_max_length` when it is a real limit. `return_tensors="pt"` gives `[B, T]` int64
        tensors (B = 1 for a single string); otherwise lists (flat for a single string).
        """
        batched = not isinstance(text, str)
        texts = list(text) if isinstance(text, (list, tuple)) else [text]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        pad, truncate, max_length = self._strategies(padding, truncation, max_length, pad_to_multiple_of)
        with self._lock:
            if truncate:
                special = self.backend.num_special_tokens_to_add(False) if add_special_tokens else 0
                if max_length < special:
                    raise ValueError(f"max_length={max_length} is shorter than the {special} special tokens added")
                self.backend.enable_truncation(max_length, stride=0, strategy="longest_first",
                                               direction=self.truncation_side)
            else:
                self.backend.no_truncation()
            if pad:
                self.backend.enable_padding(
                    direction=padding_side or self.padding_side,
                    pad_id=self.pad_token_id,
                    pad_type_id=0,
                    pad_token=self.pad_token,
                    length=max_length if pad == "max_length" else None,
                    pad_to_multiple_of=pad_to_multiple_of,
                )
            else:
                self.backend.no_padding()
            try:
                encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            finally:
                self.backend.no_truncation()
                self.backend.no_padding()
        if return_token_type_ids is None:
            return_token_type_ids = "token_type_ids" in self.model_input_names
        out = {"input_ids": [e.ids for e in encodings]}
        if return_token_type_ids:
            out["token_type_ids"] = [e.type_ids for e in encodings]
        if return_attention_mask:
            out["attention_mask"] = [e.attention_mask for e in encodings]
        if return_tensors == "pt":
            import torch

            lengths = {len(ids) for ids in out["input_ids"]}
            if len(lengths) > 1:
                raise ValueError(
                    f"the texts have different lengths {sorted(lengths)}; pass padding=True to return tensors"
                )
            return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        if not batched:
            return {k: v[0] for k, v in out.items()}
        return out

    def _strategies(self, padding, truncation, max_length, pad_to_multiple_of):
        """(padding: False / "longest" / "max_length", truncate: bool, max_length) as transformers resolves them."""
        if max_length is not None and (not isinstance(max_length, int) or max_length <= 0):
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        if max_length is not None and padding is False and truncation is None:
            truncation = True
        if padding is True or padding == "longest":
            pad = "longest"
        elif padding is False or padding is None or padding == "do_not_pad":
            pad = False
        elif padding == "max_length":
            pad = "max_length"
        else:
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        if truncation in (True, "longest_first", "only_first"):
            truncate = True
        elif truncation in (False, None, "do_not_truncate"):
            truncate = False
        else:
            raise ValueError(f"truncation must be True, False or 'longest_first', got {truncation!r}")
        if max_length is None:
            limited = self.model_max_length <= LARGE_INTEGER
            if pad == "max_length":
                pad = "max_length" if limited else False
            if truncate:
                truncate = limited
            if limited and (pad == "max_length" or truncate):
                max_length = self.model_max_length
        if pad and self.pad_token_id is None:
            raise ValueError("padding needs a pad token, and this tokenizer has none: add one with "
                             "add_special_tokens({'pad_token': ...})")
        if truncate and pad and pad_to_multiple_of and max_length % pad_to_multiple_of:
            raise ValueError(f"max_length={max_length} is not a multiple of pad_to_multiple_of={pad_to_multiple_of}")
        return pad, truncate, max_length

    def encode(self, text: str, add_special_tokens: bool = True, truncation: bool | None = None,
               max_length: int | None = None) -> list[int]:
        """One string -> list of ids."""
        return self(text, add_special_tokens=add_special_tokens, truncation=truncation, max_length=max_length,
                    return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    # ------------------------------------------------------------------------------------------------------------------
    # Decoding

    def decode(self, ids: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
               ) -> str:
        """Ids (list, tuple, 1-D tensor/array, or one int) -> text."""
        text = self.backend.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)
        clean = clean_up_tokenization_spaces
        if clean is None:
            clean = self.clean_up_tokenization_spaces
        if clean and type(self.backend.model).__name__ != "BPE":  # transformers skips the clean-up for BPE
            text = clean_up_tokenization(text)
        return text

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """A batch of id sequences (list of lists or a 2-D tensor) -> list of texts."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]


class StreamDecoder:
    """Incremental detokenization for streaming: `step(all_ids_so_far)` returns only the text added since the last
    call. It decodes a small window of previous tokens with the new ones (so word-initial spaces come out right for
    sentencepiece) and holds text back while it ends in an incomplete UTF-8 character (byte-fallback tokens)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # ids before this have been emitted

    def step(self, ids: Any) -> str:
        ids = _as_id_list(ids)
        decode = self.tokenizer.decode
        before = decode(ids[self.prefix_offset : self.read_offset], self.skip_special_tokens, False)
        after = decode(ids[self.prefix_offset :], self.skip_special_tokens, False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            return after[len(before) :]
        return ""


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: drop spaces before punctuation and English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


# ----------------------------------------------------------------------------------------------------------------------
# Class-specific pipelines (as the transformers 5.x tokenizer classes build them)

_DEFAULT_CLASS = {"llama": "LlamaTokenizer", "t5": "T5Tokenizer", "bert": "BertTokenizer",
                  "generic": "PreTrainedTokenizerFast"}


def _kind(tokenizer_class: str | None, tokenizer_json: dict | None, spm_file: str | None, vocab_file: str) -> str:
    name = (tokenizer_class or "").removesuffix("Fast")
    if name in ("LlamaTokenizer", "CodeLlamaTokenizer"):
        return "llama"
    if name == "T5Tokenizer":
        return "t5"
    if name == "BertTokenizer":
        return "bert"
    if name:
        return "generic"
    # no class named: guess from the files
    model_type = ((tokenizer_json or {}).get("model") or {}).get("type")
    if model_type == "WordPiece" or (tokenizer_json is None and spm_file is None and os.path.isfile(vocab_file)):
        return "bert"
    if tokenizer_json is None and spm_file is not None:
        return "t5" if _read_sentencepiece(spm_file)["model_type"] == 1 else "llama"
    return "generic"


def _llama_backend(vocab, merges, charsmap, config, special_tokens, unk_id) -> BackendTokenizer:
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else add_prefix_space
    legacy = config.get("legacy", False)
    scheme = ("always" if legacy else "first") if add_prefix_space else "never"
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges or [], fuse_unk=True, byte_fallback=True, dropout=None))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    sequence = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        sequence.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(sequence)
    return backend


def _t5_backend(vocab, merges, charsmap, config, special_tokens, unk_id) -> BackendTokenizer:
    backend = BackendTokenizer(Unigram(vocab, unk_id=unk_id, byte_fallback=False))
    if charsmap is not None:
        backend.normalizer = normalizers.Precompiled(charsmap)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always",
                                                                    split=True)]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return backend


def _bert_backend(vocab, merges, charsmap, config, special_tokens, unk_id) -> BackendTokenizer:
    backend = BackendTokenizer(WordPiece(vocab, unk_token=str(special_tokens.get("unk_token", "[UNK]"))))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"),
        lowercase=config.get("do_lower_case", True),
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


_BUILDERS = {"llama": _llama_backend, "t5": _t5_backend, "bert": _bert_backend}


def _added_tokens(directory: str, config: dict, tokenizer_json: dict | None, overrides: dict) -> dict[int, AddedToken]:
    """{id: AddedToken} as transformers 5.x collects them: `added_tokens_decoder` of tokenizer_config.json, or for
    older directories `added_tokens.json` plus the `added_tokens` of tokenizer.json (and then the special tokens of
    `special_tokens_map.json` go into `config`)."""
    if "added_tokens_decoder" in config:
        return {int(i): _added_token(t) for i, t in config["added_tokens_decoder"].items()}
    added = {}
    smap_file = os.path.join(directory, SPECIAL_TOKENS_MAP_FILE)
    if os.path.isfile(smap_file):
        for key, value in read_json(smap_file).items():
            if key not in overrides:
                config[key] = value
    named = {_content(config[k]) for k in SPECIAL_TOKEN_NAMES if config.get(k)}
    named |= {_content(t) for t in _extra_tokens(config)}
    added_file = os.path.join(directory, ADDED_TOKENS_FILE)
    if os.path.isfile(added_file):
        for content, index in read_json(added_file).items():
            special = content in named
            added[int(index)] = AddedToken(content, normalized=not special, special=special)
    for entry in (tokenizer_json or {}).get("added_tokens", []):
        entry = dict(entry)
        index = int(entry.pop("id"))
        added[index] = AddedToken(**entry)
    return added


def _build_backend(kind, directory, config, special_tokens, tokenizer_json, spm_file, vocab_file) -> BackendTokenizer:
    """The `tokenizers` pipeline: tokenizer.json as it is for unknown classes, else the class's own pipeline around
    the vocabulary of tokenizer.json, tokenizer.model or vocab.txt (special tokens found in a sentencepiece model
    are added to `special_tokens`)."""
    if kind == "generic":
        if tokenizer_json is None:
            raise ValueError(f"{directory}: cannot build a {config.get('tokenizer_class')} tokenizer without "
                             f"{TOKENIZER_FILE}")
        backend = BackendTokenizer.from_str(json.dumps(tokenizer_json))
    else:
        unk_id = 2  # the Unigram unk id: T5's layout, hard-coded by transformers 5.x for tokenizer.json
        post_processor = None
        if tokenizer_json is not None:
            vocab, merges, charsmap = _vocab_from_tokenizer_json(tokenizer_json)
            post_processor = tokenizer_json.get("post_processor")
        elif spm_file is not None:
            vocab, merges, charsmap, spm_special, unk_id = _vocab_from_sentencepiece(spm_file, kind)
            for name, content in spm_special.items():
                special_tokens.setdefault(name, content)
        else:
            vocab, merges, charsmap = _vocab_from_vocab_txt(vocab_file), None, None
        backend = _BUILDERS[kind](vocab, merges, charsmap, config, special_tokens, unk_id)
        if post_processor is not None:
            backend.post_processor = _post_processor(post_processor)
    backend.no_truncation()
    backend.no_padding()
    return backend


def _post_processor(data: dict):
    """A post-processor object from its tokenizer.json dict."""
    stub = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": None, "post_processor": data, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {"x": 0}, "unk_token": "x"}}
    return BackendTokenizer.from_str(json.dumps(stub)).post_processor


def _vocab_from_tokenizer_json(data: dict):
    """(vocab, merges, precompiled charsmap) of a tokenizer.json, in the form the model constructors take."""
    model = data.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") == "Unigram":
        vocab = [tuple(item) for item in vocab]
    elif isinstance(vocab, list):
        vocab = {token[0] if isinstance(token, list) else token: i for i, token in enumerate(vocab)}
    merges = model.get("merges")
    if merges is not None:
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    charsmap = None
    normalizer = data.get("normalizer")
    if normalizer:
        parts = normalizer["normalizers"] if normalizer.get("type") == "Sequence" else [normalizer]
        for part in parts:
            if part.get("type") == "Precompiled" and part.get("precompiled_charsmap"):
                charsmap = base64.b64decode(part["precompiled_charsmap"])
                break
    return vocab, merges, charsmap


def _vocab_from_vocab_txt(path: str) -> dict[str, int]:
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def _vocab_from_sentencepiece(path: str, kind: str):
    """(vocab, merges, charsmap, special tokens, unk id) of a sentencepiece model file.

    BPE models (LLaMA) become a vocab dict with merges ordered by the score of the merged piece (sentencepiece merges
    the best-scoring pair first); Unigram models (T5) a list of (piece, score)."""
    spm = _read_sentencepiece(path)
    pieces = spm["pieces"]
    special = {}
    for name, key in (("unk_token", "unk_id"), ("bos_token", "bos_id"), ("eos_token", "eos_id"),
                      ("pad_token", "pad_id")):
        index = spm[key]
        if 0 <= index < len(pieces):
            special[name] = pieces[index][0]
    if kind == "t5":
        return [(piece, score) for piece, score, _ in pieces], None, spm["charsmap"], special, spm["unk_id"]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    ranked = []
    for piece, score, kind_of_piece in pieces:
        if kind_of_piece != 1:  # normal pieces only: no control, byte or user-defined merges
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[piece], vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    return vocab, merges, spm["charsmap"], special, spm["unk_id"]


def _read_sentencepiece(path: str) -> dict:
    """The parts of a sentencepiece `ModelProto` we need, read without protobuf: pieces (piece, score, type),
    trainer_spec model_type / unk_id / bos_id / eos_id / pad_id, normalizer_spec precompiled_charsmap."""
    with open(path, "rb") as f:
        buf = f.read()
    out = {"pieces": [], "model_type": 1, "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1, "charsmap": None}
    for field, value in _proto_fields(buf, path):
        if field == 1:
            piece, score, piece_type = "", 0.0, 1
            for sub, sub_value in _proto_fields(value, path):
                if sub == 1:
                    piece = sub_value.decode("utf-8")
                elif sub == 2:
                    score = struct.unpack("<f", sub_value)[0]
                elif sub == 3:
                    piece_type = sub_value
            out["pieces"].append((piece, score, piece_type))
        elif field == 2:
            names = {3: "model_type", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
            for sub, sub_value in _proto_fields(value, path):
                if sub in names:
                    out[names[sub]] = sub_value - (1 << 64) if sub_value >= 1 << 63 else sub_value
        elif field == 3:
            for sub, sub_value in _proto_fields(value, path):
                if sub == 2 and sub_value:
                    out["charsmap"] = bytes(sub_value)
    if not out["pieces"]:
        raise ValueError(f"{path} is not a sentencepiece model (no pieces)")
    return out


def _proto_fields(buf: bytes, where: str):
    """Yield (field number, value) of a protobuf message: ints for varints, bytes for length-delimited and fixed."""
    pos, end = 0, len(buf)

    def varint():
        nonlocal pos
        result = shift = 0
        while True:
            if pos >= end:
                raise ValueError(f"{where}: truncated protobuf")
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return result

    while pos < end:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, varint()
        elif wire == 2:
            n = varint()
            yield field, buf[pos : pos + n]
            pos += n
        elif wire == 5:
            yield field, buf[pos : pos + 4]
            pos += 4
        elif wire == 1:
            yield field, buf[pos : pos + 8]
            pos += 8
        else:
            raise ValueError(f"{where}: not a sentencepiece model (protobuf wire type {wire})")


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers


def _content(token: Any) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    if isinstance(token, AddedToken):
        return token.content
    return token


def _added_token(entry: Any) -> AddedToken:
    if isinstance(entry, str):
        return AddedToken(entry, special=True)
    fields = {k: v for k, v in entry.items() if k != "__type"}
    return AddedToken(**fields)


def _extra_tokens(config: dict) -> list:
    extra = config.get("extra_special_tokens")
    if not extra or isinstance(extra, dict):
        extra = config.get("additional_special_tokens") or []
    return list(extra)


def _adopt_json_padding_truncation(config: dict, data: dict) -> None:
    """Settings baked into tokenizer.json become defaults, as in transformers 5.x (config keys win)."""
    truncation, padding = data.get("truncation"), data.get("padding")
    if truncation:
        config.setdefault("max_length", truncation.get("max_length"))
        config.setdefault("truncation_side", truncation.get("direction", "right").lower())
    if padding:
        config.setdefault("pad_token", padding.get("pad_token"))
        config.setdefault("padding_side", padding.get("direction", "right").lower())


def _as_id_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]
