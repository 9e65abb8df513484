"""Generated tokens' log-probabilities in OpenAI's two shapes: chat completions (`choices[i].logprobs.content`, one
entry per token with its text, bytes and alternatives) and text completions (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`)."""

from __future__ import annotations

import re

from instructblip.generation.decode import TokenLogprobs

_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte-fallback tokens


def token_piece(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's text as it reads inside an answer (sentencepiece's word mark is a space) and its UTF-8 bytes. A
    byte-fallback token holds one byte of a character: its text is that byte escaped unless it is ASCII."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id)) or ""
    byte = _BYTE.fullmatch(piece)
    if byte is not None:
        value = int(byte[1], 16)
        return (chr(value) if value < 128 else f"\\x{value:02x}"), [value]
    text = piece.replace("\u2581", " ")
    return text, list(text.encode("utf-8", "surrogatepass"))


def chat_logprobs(tokenizer, entries: list[tuple[int, TokenLogprobs]]) -> dict:
    """`choices[i].logprobs` of a chat completion (or of one streamed chunk)."""
    content = []
    for token, lp in entries:
        text, data = token_piece(tokenizer, token)
        top = []
        for other, value in zip(lp.top_ids, lp.top_logprobs, strict=True):
            other_text, other_data = token_piece(tokenizer, other)
            top.append({"token": other_text, "logprob": value, "bytes": other_data})
        content.append({"token": text, "logprob": lp.logprob, "bytes": data, "top_logprobs": top})
    return {"content": content, "refusal": None}


def text_logprobs(tokenizer, entries: list[tuple[int, TokenLogprobs]], offset: int = 0) -> dict:
    """`choices[i].logprobs` of a text completion; `offset`: where the first token starts in the answer."""
    tokens, values, tops, offsets = [], [], [], []
    for token, lp in entries:
        text, _ = token_piece(tokenizer, token)
        tokens.append(text)
        values.append(lp.logprob)
        top: dict[str, float] = {}
        for other, value in zip(lp.top_ids, lp.top_logprobs, strict=True):
            top.setdefault(token_piece(tokenizer, other)[0], value)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
