"""Incremental detokenization: the text of a growing token sequence, safe to show piece by piece.

A tokenizer may only know the text of a sequence as a whole: byte-level and sentencepiece byte tokens split one
character over several tokens ('\\ufffd' until the last arrives), and some decoders rewrite the text before a new
token (a leading space dropped). So the whole sequence is decoded after each token, and a piece is released only
while it extends what was released; with stop strings, the tail that could be the start of one is held back too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence


class Detokenizer:
    """The text of the tokens `add`ed so far (`text`), and the part not yet released (`delta`).

    `tokenizer`: anything with `decode(ids, skip_special_tokens=True)`. `stop_strings`: `stop_at()` gives where the
    earliest one starts in the text; `delta()` holds back a tail that may be the start of one.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.ids: list[int] = []
        self.text = ""
        self.sent = ""  # the text released so far

    def add(self, token: int) -> None:
        self.ids.append(int(token))
        # an answer starts at its first visible character, as `ask` prints it (some decoders keep the space that
        # marks a word start on the first token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()

    def stop_at(self) -> int | None:
        """Where the earliest stop string starts in the text, or None."""
        return first_stop(self.text, self.stop_strings)

    def cut(self, end: int) -> None:
        """Keep the text up to `end` (a stop string's start)."""
        self.text = self.text[:end]

    def delta(self, final: bool = False) -> str:
        """The text to release now. Before the end (`final` False), held back: a text ending in an incomplete
        character, a text that no longer starts with what was released, and a tail that could begin a stop
        string. At the end, the rest (after the longest common prefix, if the text was rewritten)."""
        text = self.text
        if not final:
            if text.endswith("\ufffd") or not text.startswith(self.sent):
                return ""
            text = text[: len(text) - stop_prefix_overlap(text, self.stop_strings)]
        if len(text) <= len(self.sent) and text.startswith(self.sent):
            return ""
        piece = text[len(self.sent):] if text.startswith(self.sent) else text[common_prefix(text, self.sent):]
        self.sent = text
        return piece


def incremental_text(tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Text pieces for a stream of token ids, whose concatenation is `tokenizer.decode(all_ids,
    skip_special_tokens=True)` without its leading whitespace (see `Detokenizer`)."""
    text = Detokenizer(tokenizer)
    for token in tokens:
        text.add(token)
        if piece := text.delta():
            yield piece
    if piece := text.delta(final=True):
        yield piece


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def stop_prefix_overlap(text: str, stops: Sequence[str]) -> int:
    """The length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
