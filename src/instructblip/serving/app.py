"""`instructblip serve`: an OpenAI-compatible HTTP server with dynamic batching, streaming and a web page.

    instructblip serve [--model M] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--allow-remote-images] ...

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.chat.completions.create(model=client.models.list().data[0].id, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is unusual about this image?"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}]}])

Endpoints: `POST /v1/chat/completions` (JSON, or server-sent events with `stream: true`), `GET /v1/models`,
`GET /health`, `GET /metrics` (Prometheus text), `GET /` (a web page: pick or paste an image, ask, watch the answer
stream in).

How a chat becomes an InstructBLIP input:
- exactly one image per request (the model looks at one image): an `image_url` part in any message; none or more
  than one is a 400, refused before any image is decoded.
- the instruction is the text of the last message, which must come from the user (its text parts joined by
  newlines). An empty instruction captions the image ("A short image description:", the paper's prompt).
- earlier turns and system messages: `--history last` (default) leaves them out, which is what InstructBLIP was
  trained on; `--history fold` writes them into the language model's prompt ("Question: ... Answer: ...") before the
  instruction. The Q-Former always gets the last instruction alone: it picks what to look at in the image.

Decoding, per request:
- no `temperature` (and no `num_beams`): InstructBLIP's recommended settings, as `instructblip ask`: beam search
  (`--num-beams`, 5) for plain requests, greedy for `stream: true`; with `n` > 1, the n best beams.
- `temperature: 0`: greedy (`n` > 1 returns n copies); `temperature` > 0 (or `top_p` alone): sampling.
- extra fields (the OpenAI client's `extra_body`): `num_beams`, `repetition_penalty` (default `--repetition-penalty`,
  1.5), `length_penalty`, `min_tokens`, `top_k`.
- `max_tokens` / `max_completion_tokens` (default `--max-tokens`), `stop` (up to 4 strings; the text is cut before
  the first), `seed` (sampling), `n`, `stream`, `stream_options.include_usage`.
- `usage.prompt_tokens` counts the language model's input, the query-token placeholders included (as vLLM);
  `completion_tokens` every token generated over all choices, eos included.
- not supported (400 when asked for): logprobs, tools, non-text `response_format`, presence/frequency penalties,
  logit_bias. Unknown fields are ignored.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 bad input, 401 missing or wrong
API key, 404 unknown model or path, 413 body too large, 503 queue full (with `Retry-After`), 504 the request ran past
`--request-timeout`, 500 a failure inside the model. 500 and 504 carry `x-should-retry: false`, so that the
OpenAI client does not run an expensive request again.

Safety:
- binds 127.0.0.1 by default; `--api-key` (or the INSTRUCTBLIP_API_KEY environment variable) requires
  `Authorization: Bearer KEY` on /v1/* and /metrics; binding elsewhere without a key prints a warning.
- limits: body size (`--max-body-mb`, checked while reading), one image per request, image bytes
  (`--max-image-mb`), image pixels (`--max-image-pixels`, read from the header before decoding: decompression bombs),
  prompt tokens (`--max-prompt-tokens`), `max_tokens` (`--max-tokens-limit`), `n` (8), stop strings (4).
- images: `data:` URLs with base64 always. `http(s)` URLs only with `--allow-remote-images`: the URL is parsed once,
  the host resolved, every address it resolves to must be public (no loopback, private, link-local, metadata,
  shared, multicast or reserved ranges, IPv4-mapped and NAT64 forms included) and the connection goes to the
  address that was checked (no second lookup: DNS rebinding); redirects (at most 3) are checked the same way;
  downloads are capped in bytes and in time (`--image-fetch-timeout`, for the whole fetch). `file://` URLs only
  under `--allowed-local-media-path`, symlinks resolved.
- the model runs in one worker thread (see `scheduler.py`); image decoding runs in a thread pool; the event loop
  only moves bytes. A client that disconnects cancels its request (greedy/sampled rows stop at the next token).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import http.client
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urljoin, urlsplit

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from instructblip.processing.image import load_image
from instructblip.serving.scheduler import (
    ChoiceEnd,
    Completed,
    Failed,
    Job,
    QueueFull,
    SamplingParams,
    Scheduler,
    ShuttingDown,
    TextDelta,
)

log = logging.getLogger("instructblip.serving.app")

CAPTION_PROMPT = "A short image description:"
MAX_N = 8
MAX_STOP = 4
MAX_STOP_LENGTH = 256
MAX_BEAMS = 16
MAX_REDIRECTS = 3


@dataclass
class ServerConfig:
    """What `create_app` needs besides the model; `main` fills it from the command line."""

    model_name: str = "instructblip"  # the id clients send as `model` (and /v1/models lists)
    api_key: str | None = None
    max_batch_size: int = 16
    batch_wait: float = 0.005  # seconds the worker waits for more requests once one has arrived
    max_queue: int = 64
    request_timeout: float = 300.0  # seconds from arrival to the last token
    max_body_bytes: int = 20 * 1024 * 1024
    body_timeout: float = 60.0  # seconds to receive the whole body
    max_image_bytes: int = 15 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_prompt_tokens: int = 512
    default_max_tokens: int = 256
    max_tokens_limit: int = 1024
    num_beams: int = 5  # the default search when a request names no temperature
    repetition_penalty: float = 1.5
    history: Literal["last", "fold"] = "last"
    allow_remote_images: bool = False
    allowed_local_media_path: str | None = None
    image_fetch_timeout: float = 5.0
    image_workers: int = 4  # images decoded at once


# ---------------------------------------------------------------------------------------------------------------------
# errors


class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})
        if status in (500, 504):
            self.headers.setdefault("x-should-retry", "false")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# ---------------------------------------------------------------------------------------------------------------------
# the request (fields the OpenAI client sends; unknown ones are ignored; numbers are not coerced from strings)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL | str


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = False


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    user: str | None = None
    # InstructBLIP's own settings (`extra_body`)
    num_beams: int | None = Field(None, ge=1, le=MAX_BEAMS)
    repetition_penalty: float | None = Field(None, gt=0)
    length_penalty: float | None = None
    min_tokens: int | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)


def parse_request(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise _bad("the body must be a JSON object")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        param, message = _validation_message(e)
        raise _bad(f"{param}: {message}" if param else message, param=param) from None


_TYPE_TAGS = {"str", "int", "float", "bool", "ImageURL", "TextPart", "ImagePart", "Message", "StreamOptions"}


def _validation_message(error: ValidationError) -> tuple[str | None, str]:
    """The most specific problem: pydantic reports each branch of a union; keep the deepest location, drop the
    branch names from it ("messages.0.content.0.image_url.url"), and join what the branches said there."""
    by_param: dict[str, list[str]] = {}
    for e in error.errors():
        parts: list[str] = []
        for p in e["loc"]:
            p = str(p)
            if "[" in p or p in _TYPE_TAGS or (parts and parts[-1] == p):
                continue
            parts.append(p)
        messages = by_param.setdefault(".".join(parts), [])
        if e["msg"] not in messages:
            messages.append(e["msg"])
    param = max(by_param, key=lambda p: len(p.split(".")) if p else 0)
    return param or None, " or ".join(by_param[param])


@dataclass
class ChatPlan:
    """A validated request, before its image is read."""

    instruction: str  # what the Q-Former gets
    prompt: str  # what the language model gets
    image_url: str
    image_param: str  # where the image is in the request, for error messages
    stream: bool
    include_usage: bool
    n: int


def plan_chat(req: ChatRequest, config: ServerConfig) -> ChatPlan:
    """Map the messages to (instruction, prompt, image) and check the settings that need no tokenizer."""
    unsupported = {
        "logprobs": bool(req.logprobs), "top_logprobs": bool(req.top_logprobs), "tools": bool(req.tools),
        "functions": bool(req.functions), "logit_bias": bool(req.logit_bias),
        "presence_penalty": bool(req.presence_penalty), "frequency_penalty": bool(req.frequency_penalty),
        "response_format": req.response_format is not None and req.response_format.get("type", "text") != "text",
    }
    for name, asked in unsupported.items():
        if asked:
            raise _bad(f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    images = []
    for i, message in enumerate(req.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    images.append((f"messages.{i}.content.{j}.image_url", part.image_url))
    if not images:
        raise _bad("this model needs exactly one image: add an image_url content part", param="messages",
                   code="image_required")
    if len(images) > 1:
        raise _bad(f"too many images: {len(images)}; this model takes exactly one image per request",
                   param=images[1][0], code="too_many_images")
    image_param, image = images[0]
    last = req.messages[-1]
    if last.role != "user":
        raise _bad(f"the last message must come from the user, not {last.role!r}", param="messages")
    instruction = _text(last).strip() or CAPTION_PROMPT
    prompt = instruction
    if config.history == "fold":
        turns = []
        for message in req.messages[:-1]:
            text = _text(message).strip()
            if not text:
                continue
            label = {"user": "Question: ", "assistant": "Answer: "}.get(message.role, "")
            turns.append(label + text)
        prompt = "\n".join([*turns, instruction])
    stream = bool(req.stream)
    if req.stream_options is not None and not stream:
        raise _bad("stream_options is only allowed with stream: true", param="stream_options")
    return ChatPlan(
        instruction=instruction, prompt=prompt, image_url=image if isinstance(image, str) else image.url,
        image_param=image_param, stream=stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage), n=req.n or 1,
    )


def _text(message: Message) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "\n".join(p.text for p in message.content if isinstance(p, TextPart))


def sampling_params(req: ChatRequest, config: ServerConfig, prompt_positions: int, context: int | None
                    ) -> SamplingParams:
    """The decoding settings of a request (see the module docstring). `prompt_positions`: the language model's
    input length; `context`: its position limit (None for T5)."""
    explicit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_new = config.default_max_tokens if explicit is None else explicit
    if max_new > config.max_tokens_limit:
        raise _bad(f"{name}={max_new} is above this server's limit of {config.max_tokens_limit}", param=name)
    if context is not None and prompt_positions + max_new > context:
        room = context - prompt_positions
        if explicit is not None or room < 1:
            raise _bad(f"this model's context is {context} tokens; the prompt takes {prompt_positions}, which leaves "
                       f"{max(room, 0)} for the answer, and {max_new} were asked for", param=name,
                       code="context_length_exceeded")
        max_new = room
    min_new = req.min_tokens or 0
    if min_new > max_new:
        raise _bad(f"min_tokens={min_new} is above the {name} of {max_new}", param="min_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise _bad(f"at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in stop):
        raise _bad(f"stop strings must be 1 to {MAX_STOP_LENGTH} characters long", param="stop")
    n = req.n or 1
    if req.temperature is not None:
        do_sample = req.temperature > 0
    else:
        do_sample = req.top_p is not None
    if req.num_beams is not None:
        num_beams = req.num_beams
    elif do_sample or req.temperature is not None or req.stream:
        num_beams = 1
    else:
        num_beams = max(config.num_beams, n)
    if num_beams > 1 and req.stream:
        raise _bad("streaming works with greedy decoding or sampling, not with num_beams > 1", param="num_beams")
    if num_beams > 1 and n > num_beams:
        raise _bad(f"n={n} needs num_beams >= n with beam search, got num_beams={num_beams}", param="n")
    return SamplingParams(
        max_new_tokens=max_new, min_new_tokens=min_new, do_sample=do_sample,
        temperature=req.temperature if do_sample and req.temperature is not None else 1.0,
        top_p=req.top_p if req.top_p is not None else 1.0, top_k=req.top_k or 0, num_beams=num_beams,
        length_penalty=req.length_penalty if req.length_penalty is not None else 1.0,
        repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else config.repetition_penalty,
        n=n, stop=tuple(stop), seed=req.seed,
    )


# ---------------------------------------------------------------------------------------------------------------------
# images: data URLs, remote URLs (guarded against server-side request forgery), local files


class ImageError(ValueError):
    """The image of a request cannot be used; the message says why."""


_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def read_data_url(url: str, max_bytes: int) -> bytes:
    head = _DATA_URL.match(url[:1024])
    if head is None:
        raise ImageError("malformed data URL: expected data:image/<type>;base64,<data>")
    mime = head["mime"].strip().lower()
    params = [p.strip().lower() for p in head["params"].split(";")[1:]]
    if "base64" not in params:
        raise ImageError("only base64 data URLs are supported (data:image/<type>;base64,...)")
    if mime and not mime.startswith("image/"):
        raise ImageError(f"the data URL holds {mime!r}, not an image")
    payload = url[head.end():]
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise ImageError(f"the image is larger than {max_bytes} bytes")
    if any(c in payload for c in " \t\r\n"):
        payload = re.sub(r"\s+", "", payload)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the data URL is not valid base64: {e}") from None
    if not data:
        raise ImageError("the data URL holds no data")
    if len(data) > max_bytes:
        raise ImageError(f"the image is larger than {max_bytes} bytes")
    return data


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for an address on the public internet: not loopback, private, link-local (cloud metadata at
    169.254.169.254), shared (100.64/10), multicast, reserved or unspecified; IPv6 forms that embed an IPv4 address
    (mapped, NAT64, 6to4) are judged by it, Teredo is refused."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip in _NAT64:
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            return is_public_address(ip.sixtofour)
        if ip.teredo is not None:
            return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


def resolve_checked(host: str, port: int, allowed=is_public_address) -> list[str]:
    """Resolve `host` and return its addresses, all of which `allowed` must accept (ImageError otherwise)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise ImageError(f"cannot resolve the image host {host!r}: {e}") from None
    addresses = []
    for info in infos:
        address = str(info[4][0]).split("%")[0]
        ip = ipaddress.ip_address(address)
        if not allowed(ip):
            raise ImageError(f"the image host {host!r} resolves to {ip}, a private, loopback, link-local or "
                             f"otherwise non-public address, which this server does not fetch from")
        addresses.append(address)
    if not addresses:
        raise ImageError(f"the image host {host!r} has no address")
    return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to an address checked beforehand (the Host header keeps the name)."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address checked beforehand; the certificate is verified against the host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_remote_image(url: str, max_bytes: int, timeout: float, allowed=is_public_address,
                       max_redirects: int = MAX_REDIRECTS) -> bytes:
    """GET an http(s) image URL under the rules of the module docstring: every hop's host resolved and checked with
    `allowed` before connecting to the checked address, at most `max_redirects` redirects, `max_bytes`, and
    `timeout` seconds for everything."""
    deadline = time.monotonic() + timeout
    for _ in range(max_redirects + 1):
        if any(c in url for c in "\\\r\n\t ") or any(ord(c) < 32 or ord(c) == 127 for c in url):
            raise ImageError("the image URL contains spaces, control characters or backslashes")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ImageError(f"image URLs must be http or https, got {parts.scheme or 'none'!r}")
        if parts.username is not None or parts.password is not None:
            raise ImageError("image URLs with credentials are not fetched")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ImageError("the image URL has an invalid port") from None
        host = parts.hostname
        if not host:
            raise ImageError("the image URL has no host")
        try:
            host = host.encode("idna").decode("ascii") if not host.isascii() else host
        except UnicodeError:
            raise ImageError(f"the image host {parts.hostname!r} is not a valid name") from None
        address = resolve_checked(host, port, allowed)[0]
        left = deadline - time.monotonic()
        if left <= 0:
            raise ImageError(f"fetching the image took longer than {timeout:g} s")
        cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        conn = cls(host, port, address, timeout=left)
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", path, headers={"User-Agent": "instructblip-server", "Accept": "image/*"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise ImageError(f"the image URL redirects ({response.status}) without a Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise ImageError(f"fetching the image failed: HTTP {response.status}")
            length = response.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ImageError(f"the image is larger than {max_bytes} bytes")
            chunks, total = [], 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ImageError(f"fetching the image took longer than {timeout:g} s")
                if conn.sock is not None:
                    conn.sock.settimeout(left)
                chunk = response.read1(65536) if hasattr(response, "read1") else response.read(65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise ImageError(f"the image is larger than {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
        except TimeoutError:
            raise ImageError(f"fetching the image took longer than {timeout:g} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise ImageError(f"could not fetch the image: {e}") from None
        finally:
            conn.close()
    raise ImageError(f"the image URL redirects more than {max_redirects} times")


def read_local_file(url: str, root: str, max_bytes: int) -> bytes:
    """A `file://` URL whose real path (symlinks resolved) lies under `root`."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageError("file URLs must name a local path (file:///path)")
    try:
        path = os.path.realpath(unquote(parts.path))
        base = os.path.realpath(root)
        inside = os.path.commonpath([path, base]) == base
    except ValueError:
        raise ImageError("the file URL is not a valid path") from None
    if not inside:
        raise ImageError("the file is outside the directory this server may read (--allowed-local-media-path)")
    if not os.path.isfile(path):
        raise ImageError("the file does not exist")
    if os.path.getsize(path) > max_bytes:
        raise ImageError(f"the image is larger than {max_bytes} bytes")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def read_image_bytes(url: str, config: ServerConfig) -> bytes:
    scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
    if scheme == "data":
        return read_data_url(url, config.max_image_bytes)
    if scheme in ("http", "https"):
        if not config.allow_remote_images:
            raise ImageError("remote image URLs are disabled on this server (start it with --allow-remote-images); "
                             "send the image as a data: URL")
        return fetch_remote_image(url, config.max_image_bytes, config.image_fetch_timeout)
    if scheme == "file":
        if not config.allowed_local_media_path:
            raise ImageError("file URLs are disabled on this server (see --allowed-local-media-path)")
        return read_local_file(url, config.allowed_local_media_path, config.max_image_bytes)
    raise ImageError("the image URL must be a data: URL (data:image/png;base64,...) or an http(s) URL")


# ---------------------------------------------------------------------------------------------------------------------
# metrics (Prometheus text format, no dependency)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts,
                                                                                   strict=True)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{braces} {_num(self.sum)}", f"{name}_count{braces} {self.count}"]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Metrics:
    LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
    PATHS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.batch_size = _Histogram(self.BATCH_BUCKETS)
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        path = path if path in self.PATHS else "other"
        with self._lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            if path == "/v1/chat/completions":
                self.latency.setdefault(str(status), _Histogram(self.LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self.batch_size.observe(size)

    def add_tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def render(self, queue_depth: int, cache) -> str:
        with self._lock:
            out = ["# HELP instructblip_requests_total HTTP requests answered, by path and status.",
                   "# TYPE instructblip_requests_total counter"]
            for (path, status), count in sorted(self.requests.items()):
                out.append(f'instructblip_requests_total{{path="{path}",status="{status}"}} {count}')
            out += ["# HELP instructblip_request_duration_seconds Chat completion latency (arrival to last byte).",
                    "# TYPE instructblip_request_duration_seconds histogram"]
            for status, hist in sorted(self.latency.items()):
                out += hist.lines("instructblip_request_duration_seconds", f'status="{status}"')
            out += ["# HELP instructblip_batch_size Requests per batch run by the worker.",
                    "# TYPE instructblip_batch_size histogram", *self.batch_size.lines("instructblip_batch_size")]
            out += ["# HELP instructblip_queue_depth Requests waiting for the worker.",
                    "# TYPE instructblip_queue_depth gauge", f"instructblip_queue_depth {queue_depth}"]
            out += ["# HELP instructblip_prompt_tokens_total Prompt tokens of completed requests.",
                    "# TYPE instructblip_prompt_tokens_total counter",
                    f"instructblip_prompt_tokens_total {self.prompt_tokens}",
                    "# HELP instructblip_completion_tokens_total Tokens generated for completed requests.",
                    "# TYPE instructblip_completion_tokens_total counter",
                    f"instructblip_completion_tokens_total {self.completion_tokens}"]
        hits, misses = (cache.hits, cache.misses) if cache is not None else (0, 0)
        out += ["# HELP instructblip_vision_cache_hits_total Images whose vision features came from the cache.",
                "# TYPE instructblip_vision_cache_hits_total counter", f"instructblip_vision_cache_hits_total {hits}",
                "# HELP instructblip_vision_cache_misses_total Images run through the vision encoder.",
                "# TYPE instructblip_vision_cache_misses_total counter",
                f"instructblip_vision_cache_misses_total {misses}"]
        return "\n".join(out) + "\n"


class _MetricsMiddleware:
    """Counts every HTTP request by path and status, and times chat completions to their last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.monotonic(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(scope.get("path", ""), status, time.monotonic() - start)


# ---------------------------------------------------------------------------------------------------------------------
# the app

_STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
           "style.css": "text/css; charset=utf-8"}
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class _ClientGone(Exception):
    pass


def create_app(vlm, config: ServerConfig | None = None, **options: Any) -> FastAPI:
    """The FastAPI app serving `vlm` (an `instructblip.InstructBlip`, as `instructblip.load` returns).

    `config`: a `ServerConfig`; `options`: any of its fields, overriding it (e.g. `api_key="..."`). The batching
    worker starts and stops with the app's lifespan (uvicorn runs it). The app's state holds `scheduler`, `metrics`
    and `config`.
    """
    config = replace(config or ServerConfig(), **options)
    model, processor = vlm.model, vlm.processor
    metrics = Metrics()
    scheduler = Scheduler(model, processor, max_batch_size=config.max_batch_size, max_queue=config.max_queue,
                          batch_wait=config.batch_wait, on_batch=metrics.observe_batch,
                          vision_cache=getattr(vlm, "vision_cache", None))
    text_config = model.config.text_config
    context = None if text_config.is_encoder_decoder else text_config.max_position_embeddings
    qformer_limit = model.config.qformer_config.max_position_embeddings
    image_tokens = processor.num_query_tokens if processor.insert_image_tokens else 0
    prepended = 0 if processor.insert_image_tokens else model.config.num_query_tokens  # legacy checkpoints
    created = int(time.time())
    static = {name: resources.files("instructblip.serving").joinpath("static", name).read_bytes() for name in _STATIC}
    # threads off the event loop: downloads (slow, bounded by --image-fetch-timeout) apart from decoding (CPU)
    fetch_pool = ThreadPoolExecutor(8, thread_name_prefix="instructblip-fetch")
    decode_pool = ThreadPoolExecutor(config.image_workers, thread_name_prefix="instructblip-decode")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)
            fetch_pool.shutdown(wait=False, cancel_futures=True)
            decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="instructblip", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.config = scheduler, metrics, config
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)),
                        code="not_found" if exc.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, "internal server error", code="internal_error").response()

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            message = "missing API key: send Authorization: Bearer <key>" if not header else "incorrect API key"
            raise APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # ---- pages and small endpoints ----

    @app.get("/")
    async def index():
        return Response(static["index.html"], media_type=_STATIC["index.html"], headers=_PAGE_HEADERS)

    @app.get("/static/{name}")
    async def static_file(name: str):
        if name not in _STATIC or name == "index.html":
            raise APIError(404, f"no file {name}", code="not_found")
        return Response(static[name], media_type=_STATIC[name], headers=_PAGE_HEADERS)

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "model": config.model_name, "queue_depth": scheduler.queue_depth}

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": created, "owned_by": "instructblip"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request):
        authorize(request)
        if name != config.model_name:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return model_card()

    @app.get("/metrics")
    async def metrics_page(request: Request):
        authorize(request)
        text = metrics.render(scheduler.queue_depth, scheduler.vision_cache)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---- chat completions ----

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            raise APIError(413, f"the body is larger than {config.max_body_bytes} bytes", code="body_too_large")
        chunks, total = [], 0

        async def receive_all():
            nonlocal total
            async for chunk in request.stream():
                total += len(chunk)
                if total > config.max_body_bytes:
                    raise APIError(413, f"the body is larger than {config.max_body_bytes} bytes",
                                   code="body_too_large")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(receive_all(), config.body_timeout)
        except TimeoutError:
            raise APIError(408, "the body took too long to arrive", code="body_timeout") from None
        return b"".join(chunks)

    def image_bytes(plan: ChatPlan) -> bytes:
        try:
            return read_image_bytes(plan.image_url, config)
        except ImageError as e:
            raise _bad(f"{plan.image_param}: {e}", param=plan.image_param, code="invalid_image") from None

    def prepare(plan: ChatPlan, data: bytes) -> tuple[torch.Tensor, list[int], list[int]]:
        """Check and decode the image (header first: pixel limit), preprocess it, tokenize."""
        try:
            image = load_image(data, max_image_pixels=config.max_image_pixels)
            encoded = processor(images=[image], text=[plan.prompt], return_tensors=None)
        except ValueError as e:
            raise _bad(f"{plan.image_param}: {e}", param=plan.image_param, code="invalid_image") from None
        qformer_ids = encoded["qformer_input_ids"][0]
        if plan.prompt != plan.instruction:
            qformer_ids = processor(text=[plan.instruction], return_tensors=None)["qformer_input_ids"][0]
        pixels = torch.from_numpy(encoded["pixel_values"][0])
        return pixels, qformer_ids, encoded["input_ids"][0]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        authorize(request)
        raw = await read_body(request)
        loop = asyncio.get_running_loop()
        # a large body (a big data URL) is parsed off the event loop
        req = parse_request(raw) if len(raw) < 65536 else await loop.run_in_executor(decode_pool, parse_request, raw)
        if req.model != config.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")
        plan = plan_chat(req, config)
        sampling_params(req, config, 0, None)  # settings errors before any image work; the context is checked below
        if max(len(plan.prompt), len(plan.instruction)) > 32 * config.max_prompt_tokens:
            raise _bad(f"the prompt is longer than this server's limit of {config.max_prompt_tokens} tokens",
                       param="messages", code="prompt_too_long")
        remote = not plan.image_url.startswith("data:")
        data = await loop.run_in_executor(fetch_pool if remote else decode_pool, image_bytes, plan)
        pixels, qformer_ids, input_ids = await loop.run_in_executor(decode_pool, prepare, plan, data)
        text_tokens = len(input_ids) - image_tokens
        if text_tokens > config.max_prompt_tokens:
            raise _bad(f"the prompt is {text_tokens} tokens long; this server's limit is {config.max_prompt_tokens}",
                       param="messages", code="prompt_too_long")
        if len(qformer_ids) > qformer_limit:
            raise _bad(f"the instruction is {len(qformer_ids)} Q-Former tokens long; at most {qformer_limit} fit",
                       param="messages", code="prompt_too_long")
        prompt_tokens = len(input_ids) + prepended
        params = sampling_params(req, config, prompt_tokens, context)

        events: asyncio.Queue = asyncio.Queue()

        def emit(batch: list) -> None:  # called from the worker thread
            loop.call_soon_threadsafe(events.put_nowait, batch)

        job = Job(pixel_values=pixels, qformer_input_ids=qformer_ids, input_ids=input_ids, image_tokens=image_tokens,
                  params=params, emit=emit, stream=plan.stream, deadline=arrived + config.request_timeout)
        try:
            scheduler.submit(job)
        except QueueFull:
            raise APIError(503, "the server is busy (the request queue is full); retry shortly", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", code="shutting_down") from None
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_name}
        if plan.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(_sse(job, events, reply, plan, prompt_tokens), media_type="text/event-stream",
                                     headers=headers)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                for event in await _next_events(job, events, watcher):
                    if isinstance(event, Failed):
                        raise APIError(event.status, event.message, code=event.code)
                    if isinstance(event, Completed):
                        return _completion(event, reply, prompt_tokens)
        except _ClientGone:
            job.cancelled.set()
            return Response(status_code=499)
        except BaseException:
            job.cancelled.set()
            raise
        finally:
            watcher.cancel()

    def _completion(done: Completed, reply: dict, prompt_tokens: int) -> JSONResponse:
        completion = sum(c.tokens for c in done.choices)
        metrics.add_tokens(prompt_tokens, completion)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "finish_reason": c.finish_reason, "logprobs": None} for c in done.choices]
        return JSONResponse({**reply, "object": "chat.completion", "choices": choices,
                             "usage": _usage(prompt_tokens, completion), "system_fingerprint": None})

    async def _sse(job: Job, events: asyncio.Queue, reply: dict, plan: ChatPlan, prompt_tokens: int):
        base = {**reply, "object": "chat.completion.chunk", "system_fingerprint": None}
        usage = {"usage": None} if plan.include_usage else {}

        def chunk(index: int, delta: dict, finish: str | None = None) -> str:
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            return _event({**base, "choices": [choice], **usage})

        try:
            for i in range(plan.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            while True:
                try:
                    batch = await _next_events(job, events, None)
                except APIError as e:
                    yield _event(e.body())
                    break
                finished = False
                for event in batch:
                    if isinstance(event, TextDelta):
                        yield chunk(event.index, {"content": event.text})
                    elif isinstance(event, ChoiceEnd):
                        yield chunk(event.index, {}, event.finish_reason)
                    elif isinstance(event, Failed):
                        yield _event(APIError(event.status, event.message, code=event.code).body())
                        finished = True
                    elif isinstance(event, Completed):
                        completion = sum(c.tokens for c in event.choices)
                        metrics.add_tokens(prompt_tokens, completion)
                        if plan.include_usage:
                            yield _event({**base, "choices": [], "usage": _usage(prompt_tokens, completion)})
                        finished = True
                if finished:
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # the client went away (or the stream ended): stop the work

    return app


async def _next_events(job: Job, events: asyncio.Queue, watcher: asyncio.Future | None) -> list:
    """The next batch of events from the worker; APIError 504 at the deadline, _ClientGone if `watcher` fires."""
    left = job.deadline - time.monotonic()
    if left <= 0:
        job.cancelled.set()
        raise APIError(504, "the request timed out", code="timeout")
    getter = asyncio.ensure_future(events.get())
    waiting = {getter} if watcher is None else {getter, watcher}
    try:
        done, _ = await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
    if getter in done:
        return getter.result()
    if watcher is not None and watcher in done:
        raise _ClientGone()
    job.cancelled.set()
    raise APIError(504, "the request timed out", code="timeout")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------------------------------------------------
# the command


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def security_warnings(host: str, api_key: str | None, allow_remote_images: bool) -> list[str]:
    out = []
    if not is_loopback_host(host) and not api_key:
        out.append(f"serving on {host} without --api-key: anyone who can reach this address can use the model")
    if allow_remote_images:
        out.append("--allow-remote-images: the server fetches image URLs it is sent (public addresses only)")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instructblip serve", description="An OpenAI-compatible InstructBLIP server.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ServerConfig()
    p.add_argument("--model", default=None, help="a local HF-layout directory or a hub id (default: the small "
                   "model shipped inside)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="int8 dynamic quantization of the LLM, for CPU inference")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the directory name or hub id)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (or set $INSTRUCTBLIP_API_KEY, "
                   "which keeps the key out of the process list)")
    g = p.add_argument_group("images")
    g.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (public hosts only)")
    g.add_argument("--allowed-local-media-path", default=None, help="allow file:// image URLs under this directory")
    g.add_argument("--image-fetch-timeout", type=float, default=d.image_fetch_timeout, help="seconds per fetch")
    g.add_argument("--max-image-mb", type=float, default=d.max_image_bytes / 2**20)
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    g = p.add_argument_group("limits")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20)
    g.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    g.add_argument("--max-tokens", type=int, default=d.default_max_tokens, help="max_tokens when a request has none")
    g.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit, help="largest max_tokens accepted")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds, arrival to last token")
    g.add_argument("--max-connections", type=int, default=256, help="open connections before uvicorn answers 503")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    g.add_argument("--batch-wait-ms", type=float, default=d.batch_wait * 1000)
    g.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests before 503")
    g.add_argument("--vision-cache-size", type=int, default=64, help="images whose vision features are kept")
    g = p.add_argument_group("defaults")
    g.add_argument("--num-beams", type=int, default=d.num_beams, help="search when a request has no temperature")
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    g.add_argument("--history", choices=["last", "fold"], default=d.history,
                   help="last: only the last user message; fold: earlier turns go into the prompt")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if args.allowed_local_media_path and not os.path.isdir(args.allowed_local_media_path):
        raise ValueError(f"--allowed-local-media-path {args.allowed_local_media_path}: not a directory")
    for name in ("max_batch_size", "max_queue", "max_prompt_tokens", "max_tokens", "max_tokens_limit", "num_beams",
                 "max_image_pixels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_tokens > args.max_tokens_limit:
        raise ValueError("--max-tokens must not exceed --max-tokens-limit")
    if args.served_model_name:
        name = args.served_model_name
    elif args.model is None:
        name = "instructblip"
    else:
        name = os.path.basename(os.path.normpath(args.model)) if os.path.isdir(args.model) else args.model
    return ServerConfig(
        model_name=name, api_key=args.api_key or os.environ.get("INSTRUCTBLIP_API_KEY") or None,
        max_batch_size=args.max_batch_size,
        batch_wait=args.batch_wait_ms / 1000, max_queue=args.max_queue, request_timeout=args.request_timeout,
        max_body_bytes=int(args.max_body_mb * 2**20), max_image_bytes=int(args.max_image_mb * 2**20),
        max_image_pixels=args.max_image_pixels, max_prompt_tokens=args.max_prompt_tokens,
        default_max_tokens=args.max_tokens, max_tokens_limit=args.max_tokens_limit, num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty, history=args.history,
        allow_remote_images=args.allow_remote_images, allowed_local_media_path=args.allowed_local_media_path,
        image_fetch_timeout=args.image_fetch_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    """`instructblip serve ARGS`: load the model and serve it until interrupted."""
    import uvicorn

    from instructblip.api import load

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    config = config_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    for warning in security_warnings(args.host, config.api_key, config.allow_remote_images):
        log.warning(warning)
    vlm = load(args.model, device=args.device, dtype=args.dtype, vision_cache_size=args.vision_cache_size,
               quantize=args.quantize)
    app = create_app(vlm, config)
    log.info("serving %r on http://%s:%d (web page at /, API at /v1)", config.model_name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, limit_concurrency=args.max_connections,
                timeout_keep_alive=5, timeout_graceful_shutdown=10, server_header=False)
    return 0


__all__ = ["APIError", "ChatRequest", "ServerConfig", "create_app", "fetch_remote_image", "is_public_address",
           "main", "sampling_params"]


if __name__ == "__main__":
    raise SystemExit(main())

