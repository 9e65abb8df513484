"""Every HTTP request's id and its one log line, and the middleware that gives both (and counts the request for
/metrics).

- The id: the client's `X-Request-Id` when it is 1 to 128 printable ASCII characters without spaces (safe in a header
  and in a log line), else a new one (32 hex digits); returned as `X-Request-Id` on every response, errors and
  streams included.
- The line, on the logger `instructblip.serving.access` at INFO, written when the response has ended (a stream's when
  its last event has gone): `request_id method path status`, then for a chat completion `prompt_tokens
  generation_tokens ttft_s finish_reason` (one per choice, comma-separated) or `error` (the error's code: `timeout`,
  `queue_full`, `abort` for a client that went away, ...), then `e2e_s` (arrival to the response's last byte). Fields a
  request does not have are left out. `key=value` text (values quoted as JSON strings where they hold spaces, quotes
  or `=`), or one JSON object per line (`--log-format json`).

The routes fill in what they learn through `request.state.access`, the request's `AccessEntry`.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("instructblip.serving.access")

_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_BARE = re.compile(r'[\x21-\x7e]+')  # text values written without quotes (and without '"' or '=', checked apart)


def request_id(given: str | None) -> str:
    """The client's id if it is safe to echo and log, else a new one."""
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


@dataclass
class AccessEntry:
    """One request's log line, filled in as the request goes."""

    request_id: str
    method: str
    path: str
    start: float  # time.monotonic() at arrival
    status: int = 500  # until a response starts: an exception that no handler answered
    prompt_tokens: int | None = None
    generation_tokens: int | None = None
    first_token_at: float | None = None  # time.monotonic()
    finish_reason: str | None = None
    error: str | None = None

    def fields(self, end: float) -> dict:
        ttft = None if self.first_token_at is None else round(self.first_token_at - self.start, 4)
        out = {"request_id": self.request_id, "method": self.method, "path": self.path, "status": self.status,
               "prompt_tokens": self.prompt_tokens, "generation_tokens": self.generation_tokens, "ttft_s": ttft,
               "finish_reason": self.finish_reason, "error": self.error, "e2e_s": round(end - self.start, 4)}
        return {k: v for k, v in out.items() if v is not None}


def text_line(fields: dict) -> str:
    def value(v) -> str:
        v = str(v)
        return v if _BARE.fullmatch(v) and '"' not in v and "=" not in v else json.dumps(v)

    return " ".join(f"{k}={value(v)}" for k, v in fields.items())


def json_line(fields: dict) -> str:
    return json.dumps(fields, separators=(",", ":"))


def line_format(name: str) -> Callable[[dict], str]:
    """The formatter `--log-format` names: `text` or `json`."""
    if name == "text":
        return text_line
    if name == "json":
        return json_line
    raise ValueError(f"log_format must be 'text' or 'json', not {name!r}")


class AccessMiddleware:
    """Gives each HTTP request its id and its `AccessEntry` (in `scope["state"]`, which `request.state` reads), puts
    `X-Request-Id` on the response, and when the response has ended counts it for /metrics and writes its line.

    A pure ASGI middleware rather than Starlette's BaseHTTPMiddleware: a streamed response passes through unbuffered,
    and the line waits for its end."""

    def __init__(self, app, metrics, format_line: Callable[[dict], str] = text_line):
        self.app = app
        self.metrics = metrics
        self.format_line = format_line

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        entry = AccessEntry(request_id(given), scope["method"], scope["path"], time.monotonic())
        scope.setdefault("state", {})["access"] = entry  # the same dict the exception handlers' requests read
        header = (b"x-request-id", entry.request_id.encode())

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                entry.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # the route's template, not the path: a bounded label set whatever paths clients try
            route = getattr(scope.get("route"), "path", None)
            self.metrics.observe_http(route or "other", entry.status)
            if log.isEnabledFor(logging.INFO):
                log.info(self.format_line(entry.fields(time.monotonic())))
