"""`instructblip serve`: an OpenAI-compatible HTTP server with dynamic batching, streaming and a web page.

    instructblip serve [--model M] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--allow-remote-images] ...

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything")
    client.chat.completions.create(model=client.models.list().data[0].id, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is unusual about this image?"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}]}])

Endpoints: `POST /v1/chat/completions` (JSON, or server-sent events with `stream: true`), `GET /v1/models`,
`GET /health`, `GET /metrics` (Prometheus text), `GET /openapi.json` (the OpenAPI document: `openapi.py`), `GET /`
(a web page: pick or paste an image, ask, watch the answer stream in).

The parts: `protocol.py` (the request schema, and how a chat becomes an instruction, a prompt and decoding
settings), `media.py` (where images may come from), `scheduler.py` (the batching worker that owns the model),
`metrics.py` (/metrics), `access.py` (request ids and the log line), `connections.py` (limits on connections and
requests in progress, timeouts), `openapi.py`, `logprobs.py`. This file holds the routes, which tie them together.

- /metrics, with vLLM's names where vLLM has the metric (`metrics.py` lists them all):
  `vllm:time_to_first_token_seconds`, `vllm:request_time_per_output_token_seconds`,
  `vllm:e2e_request_latency_seconds` (completed requests), `vllm:num_requests_running` / `_waiting`,
  `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`, `vllm:request_success_total{finished_reason}`,
  `vllm:num_preemptions_total`, `vllm:mm_cache_hits_total` / `_queries_total` (the vision-feature cache), and
  `instructblip_requests_rejected_total{reason}` (503s), `instructblip_requests_failed_total{code}`,
  `instructblip_http_requests_total{path,status}`, `instructblip_batch_size`.
- every response carries `X-Request-Id`: the client's if it sent a safe one (1-128 printable ASCII characters, no
  spaces), else a new one; every request writes one line on the logger `instructblip.serving.access` when its
  response has ended: `request_id method path status [prompt_tokens generation_tokens ttft_s finish_reason | error]
  e2e_s`, as `key=value` text or one JSON object (`--log-format json`).
- `usage.prompt_tokens` counts the language model's input, the query-token placeholders included (as vLLM);
  `completion_tokens` every token generated over all choices, eos included.
- errors, all in OpenAI's shape: 400 bad input (`protocol.py` lists what is checked), 401 missing or wrong API key,
  404 unknown model or path, 408 the body did not arrive within `--body-timeout`, 413 body too large, 503 busy (queue
  full, `--max-running-requests` API requests in progress, or `--max-connections` open; with `Retry-After`), 504 the
  request ran past `--request-timeout`, 500 a failure inside the model. A 408 closes the connection.

Safety:
- binds 127.0.0.1 by default; `--api-key` (or the INSTRUCTBLIP_API_KEY environment variable) requires
  `Authorization: Bearer KEY` on /v1/* and /metrics; binding elsewhere without a key prints a warning.
- limits: open connections (`--max-connections`), API requests in progress (`--max-running-requests`), seconds to
  send a request's headers (`--header-timeout`) and its body (`--body-timeout`): idle or half-sent connections
  cannot lock other clients out (`connections.py`); body size (`--max-body-mb`, checked while reading), one image
  per request, image bytes
  (`--max-image-mb`), image pixels (`--max-image-pixels`, read from the header before decoding: decompression bombs),
  prompt tokens (`--max-prompt-tokens`), `max_tokens` (`--max-tokens-limit`), `n` (8), stop strings (4).
- images: `data:` URLs always; `http(s)` only with `--allow-remote-images` and to public addresses, `file://` only
  under `--allowed-local-media-path` (the rules: `media.py`).
- the model runs in one worker thread (see `scheduler.py`); image decoding runs in a thread pool; the event loop
  only moves bytes. A client that disconnects cancels its request (greedy/sampled rows stop at the next token).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib import resources
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from instructblip.generation.config import GenerationConfig
from instructblip.processing.image import load_image
from instructblip.processing.video import NUM_FRAMES, read_video_bytes
from instructblip.serving.access import AccessEntry, AccessMiddleware, line_format
from instructblip.serving.connections import RequestLimit
from instructblip.serving.logprobs import chat_logprobs, text_logprobs
from instructblip.serving.media import ImageError, read_image_bytes
from instructblip.serving.metrics import CONTENT_TYPE, Metrics
from instructblip.serving.openapi import STREAMED, document, error_responses, json_body
from instructblip.serving.protocol import (
    APIError,
    ChatPlan,
    ChatRequest,
    CompletionRequest,
    ServerConfig,
    bad_request,
    generation_config,
    parse_request,
    plan_chat,
    plan_completion,
)
from instructblip.serving.scheduler import (
    ChoiceEnd,
    Completed,
    Failed,
    Job,
    QueueFull,
    Scheduler,
    ShuttingDown,
    TextDelta,
    default_batch_size,
)

log = logging.getLogger("instructblip.serving.app")

_STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
           "style.css": "text/css; charset=utf-8"}
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def create_app(vlm, config: ServerConfig | None = None, **options: Any) -> FastAPI:
    """The FastAPI app serving `vlm` (an `instructblip.InstructBlip`, as `instructblip.load` returns).

    `config`: a `ServerConfig`; `options`: any of its fields, overriding it (e.g. `api_key="..."`). The batching
    worker starts and stops with the app's lifespan (uvicorn runs it). The app's state holds `scheduler`, `metrics`
    and `config`.
    """
    server = _Server(vlm, replace(config or ServerConfig(), **options))
    app = FastAPI(title="instructblip", lifespan=server.lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.openapi = lambda: document(app)
    app.state.scheduler, app.state.metrics, app.state.config = server.scheduler, server.metrics, server.config
    app.add_middleware(RequestLimit, limit=server.config.max_running_requests)
    # outside the limit: its 503s are counted and logged
    app.add_middleware(AccessMiddleware, metrics=server.metrics, format_line=line_format(server.config.log_format))
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.get("/", response_class=HTMLResponse)(server.index)
    app.get("/static/{name}", response_class=Response, responses=error_responses(404))(server.static_file)
    app.get("/health")(server.health)
    app.get("/v1/models", responses=error_responses(401, 503))(server.models)
    app.get("/v1/models/{name:path}", responses=error_responses(401, 404, 503))(server.model_info)
    app.get("/metrics", response_class=PlainTextResponse, responses=error_responses(401))(server.metrics_page)
    api_errors = error_responses(400, 401, 404, 408, 413, 500, 503, 504)
    app.post("/v1/chat/completions", **json_body(ChatRequest), responses={**api_errors, **STREAMED}
             )(server.chat_completions)
    app.post("/v1/completions", **json_body(CompletionRequest), responses={**api_errors, **STREAMED}
             )(server.completions)
    return app


# ---------------------------------------------------------------------------------------------------------------------
# errors


async def _api_error(request: Request, exc: APIError):
    request.state.access.error = exc.code
    return exc.response()


async def _http_error(request: Request, exc: StarletteHTTPException):
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)),
                    code="not_found" if exc.status_code == 404 else None).response()


async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s", request.url.path)
    # answered outside AccessMiddleware (Starlette's outermost layer), which cannot add the id here: add it
    entry = getattr(request.state, "access", None)
    headers = {"X-Request-Id": entry.request_id} if entry is not None else None
    return APIError(500, "internal server error", code="internal_error", headers=headers).response()


class _ClientGone(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# the routes


class _Server:
    """What one app serves from (the model's limits, the batching worker, the metrics, the page's files and the thread
    pools); its methods are the routes. A class rather than closures or module globals: every route sees the same
    state under one name, and several apps (tests start many) live side by side in one process."""

    def __init__(self, vlm, config: ServerConfig):
        model, processor = vlm.model, vlm.processor
        self.config = config
        self.processor = processor
        self.metrics = Metrics(config.model_name)
        batch = config.max_batch_size or default_batch_size(model, config.default_max_tokens)
        self.scheduler = Scheduler(model, processor, max_batch_size=batch, max_queue=config.max_queue,
                                   batch_wait=config.batch_wait, on_batch=self.metrics.observe_batch,
                                   vision_cache=getattr(vlm, "vision_cache", None),
                                   max_step_tokens=config.max_step_tokens, prefill_chunk=config.prefill_chunk)
        self.metrics.watch(self.scheduler)
        text_config = model.config.text_config
        self.context = None if text_config.is_encoder_decoder else text_config.max_position_embeddings
        self.qformer_limit = model.config.qformer_config.max_position_embeddings
        self.num_frames = getattr(vlm, "num_frames", NUM_FRAMES)  # frames sampled from a video
        self.image_tokens = processor.num_query_tokens if processor.insert_image_tokens else 0  # per image or frame
        self.prepended = 0 if processor.insert_image_tokens else model.config.num_query_tokens  # legacy checkpoints
        self.created = int(time.time())
        self.static = {name: resources.files("instructblip.serving").joinpath("static", name).read_bytes()
                       for name in _STATIC}
        # threads off the event loop: downloads (slow, bounded by --image-fetch-timeout) apart from decoding (CPU)
        self.fetch_pool = ThreadPoolExecutor(8, thread_name_prefix="instructblip-fetch")
        self.mailbox: _Mailbox | None = None  # made on the first request, on the event loop's thread
        self.decode_pool = ThreadPoolExecutor(config.image_workers, thread_name_prefix="instructblip-decode")

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(self.scheduler.stop)
            self.fetch_pool.shutdown(wait=False, cancel_futures=True)
            self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def authorize(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.config.api_key.encode()):
            message = "missing API key: send Authorization: Bearer <key>" if not header else "incorrect API key"
            raise APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # ---- pages and small endpoints ----

    async def index(self):
        return Response(self.static["index.html"], media_type=_STATIC["index.html"], headers=_PAGE_HEADERS)

    async def static_file(self, name: str):
        if name not in _STATIC or name == "index.html":
            raise APIError(404, f"no file {name}", code="not_found")
        return Response(self.static[name], media_type=_STATIC[name], headers=_PAGE_HEADERS)

    async def health(self):
        if not self.scheduler.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "model": self.config.model_name, "queue_depth": self.scheduler.queue_depth}

    def model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "instructblip"}

    async def models(self, request: Request):
        self.authorize(request)
        return {"object": "list", "data": [self.model_card()]}

    async def model_info(self, name: str, request: Request):
        self.authorize(request)
        if name != self.config.model_name:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return self.model_card()

    async def metrics_page(self, request: Request):
        self.authorize(request)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # ---- chat completions ----

    async def chat_completions(self, request: Request):
        return await self.answer(request, "chat")

    async def completions(self, request: Request):
        return await self.answer(request, "text")

    async def answer(self, request: Request, kind: str):
        """A chat completion (`kind` "chat") or a text completion ("text"): read, check, queue, answer."""
        arrived = time.monotonic()
        self.authorize(request)
        req, plan = await self.read_request(request, kind)
        pixels, qformer_ids, input_ids = await self.model_inputs(plan)
        frames = pixels.shape[0] if plan.video else 1
        prompt_tokens = len(input_ids) + self.prepended * frames
        params, n = generation_config(req, self.config, prompt_tokens, self.context)
        deadline = arrived + self.config.request_timeout
        job, events = self.submit(plan, params, n, pixels, qformer_ids, input_ids, deadline)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        reply = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.config.model_name}
        if plan.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(self.stream(job, events, reply, plan, prompt_tokens, request.state.access),
                                     media_type="text/event-stream", headers=headers)
        return await self.complete(request, job, events, reply, plan, prompt_tokens)

    async def read_request(self, request: Request, kind: str) -> tuple[ChatRequest | CompletionRequest, ChatPlan]:
        """The request read and checked as far as it can be without its image."""
        raw = await self.read_body(request)
        schema = ChatRequest if kind == "chat" else CompletionRequest
        # a large body (a big data URL) is parsed off the event loop
        if len(raw) < 65536:
            req = parse_request(raw, schema)
        else:
            req = await asyncio.get_running_loop().run_in_executor(self.decode_pool, parse_request, raw, schema)
        if req.model != self.config.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{self.config.model_name!r}", param="model", code="model_not_found")
        plan = plan_chat(req, self.config) if kind == "chat" else plan_completion(req)
        generation_config(req, self.config, 0, None)  # settings errors before any image work; the context comes later
        if max(len(plan.prompt), len(plan.instruction)) > 32 * self.config.max_prompt_tokens:
            raise bad_request(f"the prompt is longer than this server's limit of {self.config.max_prompt_tokens} "
                              "tokens", param=_prompt_param(plan), code="prompt_too_long")
        return req, plan

    async def read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        # not closed: uvicorn reads and drops the rest (closing with unread data would reset the connection before
        # the client reads the 413); the header timeout bounds how long that may go on
        too_large = APIError(413, f"the body is larger than {limit} bytes", code="body_too_large")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        chunks, total = [], 0

        async def receive_all():
            nonlocal total
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise too_large
                chunks.append(chunk)

        try:
            await asyncio.wait_for(receive_all(), self.config.body_timeout)
        except TimeoutError:
            raise APIError(408, f"the body did not arrive within {self.config.body_timeout:g} seconds",
                           code="body_timeout", headers={"Connection": "close"}) from None
        return b"".join(chunks)

    async def model_inputs(self, plan: ChatPlan) -> tuple[torch.Tensor, list[int], list[int]]:
        """(pixels, Q-Former ids, LLM ids): the image fetched and decoded in the thread pools, the texts tokenized,
        and the prompt's length checked in tokens."""
        loop = asyncio.get_running_loop()
        remote = not plan.image_url.startswith("data:")
        data = await loop.run_in_executor(self.fetch_pool if remote else self.decode_pool, self.image_bytes, plan)
        pixels, qformer_ids, input_ids = await loop.run_in_executor(self.decode_pool, self.prepare, plan, data)
        text_tokens = len(input_ids) - self.image_tokens * (pixels.shape[0] if plan.video else 1)
        if text_tokens > self.config.max_prompt_tokens:
            raise bad_request(f"the prompt is {text_tokens} tokens long; this server's limit is "
                              f"{self.config.max_prompt_tokens}", param=_prompt_param(plan), code="prompt_too_long")
        if len(qformer_ids) > self.qformer_limit:
            raise bad_request(f"the instruction is {len(qformer_ids)} Q-Former tokens long; at most "
                              f"{self.qformer_limit} fit", param=_prompt_param(plan), code="prompt_too_long")
        return pixels, qformer_ids, input_ids

    def image_bytes(self, plan: ChatPlan) -> bytes:
        config = self.config
        try:
            return read_image_bytes(plan.image_url, max_bytes=config.max_image_bytes,
                                    allow_remote=config.allow_remote_images,
                                    local_root=config.allowed_local_media_path,
                                    fetch_timeout=config.image_fetch_timeout, kind="video" if plan.video else "image")
        except ImageError as e:
            raise bad_request(f"{plan.image_param}: {e}", param=plan.image_param, code="invalid_image") from None

    def prepare(self, plan: ChatPlan, data: bytes) -> tuple[torch.Tensor, list[int], list[int]]:
        """Check and decode the image (header first: pixel limit) or the video (`num_frames` frames), preprocess it,
        tokenize. Pixels: (3, H, W) for an image, (T, 3, H, W) for a video."""
        processor = self.processor
        try:
            if plan.video:
                frames = read_video_bytes(data, self.num_frames, max_pixels=self.config.max_image_pixels)
                encoded = processor(videos=[frames], text=[plan.prompt], return_tensors=None)
                pixels = torch.from_numpy(np.stack(encoded["pixel_values"][0]))  # (T, 3, H, W)
            else:
                image = load_image(data, max_image_pixels=self.config.max_image_pixels)
                encoded = processor(images=[image], text=[plan.prompt], return_tensors=None)
                pixels = torch.from_numpy(encoded["pixel_values"][0])
        except (ValueError, ImportError) as e:
            code = "invalid_video" if plan.video else "invalid_image"
            raise bad_request(f"{plan.image_param}: {e}", param=plan.image_param, code=code) from None
        qformer_ids = encoded.get("qformer_input_ids", [[]])[0]  # (none for BLIP-2, whose Q-Former reads no text)
        if plan.prompt != plan.instruction and processor.qformer_tokenizer is not None:
            qformer_ids = processor(text=[plan.instruction], return_tensors=None)["qformer_input_ids"][0]
        return pixels, qformer_ids, encoded["input_ids"][0]

    def submit(self, plan: ChatPlan, params: GenerationConfig, n: int, pixels: torch.Tensor, qformer_ids: list[int],
               input_ids: list[int], deadline: float) -> tuple[Job, asyncio.Queue]:
        """Queue the request for the worker; its events arrive, in batches, on the returned queue."""
        loop = asyncio.get_running_loop()
        if self.mailbox is None or self.mailbox.loop is not loop:
            self.mailbox = _Mailbox(loop)
        events: asyncio.Queue = asyncio.Queue()
        mailbox = self.mailbox

        started = False

        def emit(batch: list) -> None:  # called from the worker thread
            nonlocal started
            text = any(isinstance(e, TextDelta) for e in batch)
            # the first token and the end go out at once: time to first token and end-to-end latency
            urgent = (text and not started) or any(isinstance(e, (Completed, Failed)) for e in batch)
            started = started or text
            mailbox.post(events, batch, urgent)

        image_tokens = self.image_tokens * (pixels.shape[0] if plan.video else 1)
        job = Job(pixel_values=pixels, qformer_input_ids=qformer_ids, input_ids=input_ids,
                  image_tokens=image_tokens, params=params, n=n, emit=emit, stream=plan.stream, deadline=deadline,
                  logprobs=plan.logprobs)
        try:
            self.scheduler.submit(job)
        except QueueFull:
            self.metrics.observe_rejected("queue_full")
            raise APIError(503, "the server is busy (the request queue is full); retry shortly", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            self.metrics.observe_rejected("shutting_down")
            raise APIError(503, "the server is shutting down", code="shutting_down") from None
        return job, events

    async def complete(self, request: Request, job: Job, events: asyncio.Queue, reply: dict, plan: ChatPlan,
                       prompt_tokens: int) -> Response:
        """The whole answer as one JSON response; a client that goes away cancels the job."""
        watcher = asyncio.ensure_future(_disconnected(request))
        last = None
        try:
            while True:
                for event in await _next_events(job, events, watcher):
                    if isinstance(event, (Completed, Failed)):
                        last = event
                    if isinstance(event, Failed):
                        raise APIError(event.status, event.message, code=event.code)
                    if isinstance(event, Completed):
                        return self.completion(event, reply, plan, prompt_tokens)
        except _ClientGone:
            job.cancelled.set()
            return Response(status_code=499)
        except BaseException:
            job.cancelled.set()
            raise
        finally:
            watcher.cancel()
            self.ended(request.state.access, job, last, prompt_tokens)

    def completion(self, done: Completed, reply: dict, plan: ChatPlan, prompt_tokens: int) -> JSONResponse:
        completion = sum(c.tokens for c in done.choices)
        usage = _usage(prompt_tokens, completion)
        if plan.kind == "text":
            choices = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                        "logprobs": self.logprobs(plan, c.logprobs)} for c in done.choices]
            return JSONResponse({**reply, "object": "text_completion", "choices": choices, "usage": usage,
                                 "system_fingerprint": None})
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "finish_reason": c.finish_reason, "logprobs": self.logprobs(plan, c.logprobs)}
                   for c in done.choices]
        return JSONResponse({**reply, "object": "chat.completion", "choices": choices, "usage": usage,
                             "system_fingerprint": None})

    def logprobs(self, plan: ChatPlan, entries: list | None, offset: int = 0) -> dict | None:
        if plan.logprobs is None or entries is None:
            return None
        if plan.kind == "text":
            return text_logprobs(self.processor.tokenizer, entries, offset)
        return chat_logprobs(self.processor.tokenizer, entries)

    async def stream(self, job: Job, events: asyncio.Queue, reply: dict, plan: ChatPlan, prompt_tokens: int,
                     entry: AccessEntry):
        """The answer as server-sent events: (chat) a role chunk per choice, then text deltas, finish reasons,
        [DONE]."""
        text = plan.kind == "text"
        base = {**reply, "object": "text_completion" if text else "chat.completion.chunk", "system_fingerprint": None}
        usage = {"usage": None} if plan.include_usage else {}
        offsets = [0] * plan.n  # text completions: where each choice's next piece starts

        templates: dict[int, tuple[str, str]] = {}

        def text_chunk(index: int, piece: str) -> str:
            """`chunk(index, {"content": piece})` without log-probabilities: the same bytes from a template."""
            if text:
                offsets[index] += len(piece)
            if index not in templates:
                marker = "\ue000piece\ue000"  # a private-use character: no model text, and JSON leaves it as is
                if text:
                    choice = {"index": index, "text": marker, "finish_reason": None, "logprobs": None}
                else:
                    choice = {"index": index, "delta": {"content": marker}, "finish_reason": None, "logprobs": None}
                head, tail = _event({**base, "choices": [choice], **usage}).split(f'"{marker}"')
                templates[index] = head, tail
            head, tail = templates[index]
            return head + json.dumps(piece, ensure_ascii=False) + tail

        def chunk(index: int, delta: dict, finish: str | None = None, logprobs: list | None = None) -> str:
            if text:
                piece = delta.get("content", "")
                choice = {"index": index, "text": piece, "finish_reason": finish,
                          "logprobs": self.logprobs(plan, logprobs, offsets[index])}
                offsets[index] += len(piece)
            else:
                choice = {"index": index, "delta": delta, "finish_reason": finish,
                          "logprobs": self.logprobs(plan, logprobs)}
            return _event({**base, "choices": [choice], **usage})

        last = None
        try:
            if not text:
                for i in range(plan.n):
                    yield chunk(i, {"role": "assistant", "content": ""})
            while True:
                try:
                    batch = await _next_events(job, events, None)
                except APIError as e:
                    yield _event(e.body()) + "data: [DONE]\n\n"
                    break
                while not events.empty():  # a client that reads slower than tokens come gets them in one write
                    batch += events.get_nowait()
                finished, out = False, []
                pieces: list[str] = []  # text of consecutive deltas of one choice: sent as one chunk
                for event, following in zip(batch, [*batch[1:], None], strict=True):
                    if isinstance(event, TextDelta) and event.logprobs is None:
                        pieces.append(event.text)
                        if not (isinstance(following, TextDelta) and following.logprobs is None
                                and following.index == event.index):
                            out.append(text_chunk(event.index, "".join(pieces)))
                            pieces = []
                    elif isinstance(event, TextDelta):
                        out.append(chunk(event.index, {"content": event.text}, logprobs=event.logprobs))
                    elif isinstance(event, ChoiceEnd):
                        out.append(chunk(event.index, {}, event.finish_reason))
                    elif isinstance(event, Failed):
                        last = event
                        out.append(_event(APIError(event.status, event.message, code=event.code).body()))
                        finished = True
                    elif isinstance(event, Completed):
                        last = event
                        completion = sum(c.tokens for c in event.choices)
                        if plan.include_usage:
                            out.append(_event({**base, "choices": [], "usage": _usage(prompt_tokens, completion)}))
                        finished = True
                if finished:
                    yield "".join(out) + "data: [DONE]\n\n"
                    break
                if out:
                    yield "".join(out)
        finally:
            job.cancelled.set()  # the client went away (or the stream ended): stop the work
            self.ended(entry, job, last, prompt_tokens)

    def ended(self, entry: AccessEntry, job: Job, last: Completed | Failed | None, prompt_tokens: int) -> None:
        """Count a chat completion that ended, once, and fill in its log line. `last`: its final event; None when it
        ran past its deadline or its client went away (or the server stopped) before one came."""
        entry.first_token_at = job.first_token_at
        if isinstance(last, Completed):
            self.metrics.observe_completed(entry.start, job.first_token_at, job.finished_at, prompt_tokens,
                                           last.choices, (job.queued_at, job.admitted_at))
            entry.prompt_tokens = prompt_tokens
            entry.generation_tokens = sum(c.tokens for c in last.choices)
            entry.finish_reason = ",".join(c.finish_reason for c in last.choices)
            return
        entry.error = last.code if last is not None else "timeout" if job.expired() else "abort"
        self.metrics.observe_unanswered(entry.error)


# ---------------------------------------------------------------------------------------------------------------------
# waiting for the worker


# Under load the loop takes the worker's events at most every FLUSH_PER_REQUEST seconds per request that had events
# in the last flush, FLUSH_MAX at most (32 ms for 64 streams; a lone stream gets every token as it comes, and every
# request its first token and its end at once). Each flush writes to every stream, and with a write per stream and
# step (a system call and a pass through the ASGI stack each) the event loop took more of the cores than the
# decoding did (docs/performance.md, "Serving").
FLUSH_PER_REQUEST = 0.0005
FLUSH_MAX = 0.05


class _Mailbox:
    """Events from the worker thread to the event loop. The worker posts one list per request and step; one wake-up
    of the loop carries everything posted since the last, instead of one wake-up per request and step (a batch of
    64 streams would wake the loop 64 times a step), and wake-ups are spaced out under load (FLUSH_PER_REQUEST)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, list]] = []
        self._scheduled = False
        self._urgent: set[asyncio.Queue] = set()  # requests with an event to deliver at once
        self._urgent_scheduled = False
        self._last = 0.0  # loop.time() of the last flush
        self._interval = 0.0  # seconds from one flush to the next at the least

    def post(self, queue: asyncio.Queue, batch: list, urgent: bool = False) -> None:
        """`urgent`: deliver this request's events without waiting for the interval (its first token, its end)."""
        with self._lock:
            self._items.append((queue, batch))
            call = None
            if urgent:
                self._urgent.add(queue)
                if not self._urgent_scheduled:
                    self._urgent_scheduled, call = True, self._flush_urgent
            elif not self._scheduled:
                self._scheduled, call = True, self._wake
        if call is not None:
            self.loop.call_soon_threadsafe(call)

    def _wake(self) -> None:
        wait = self._last + self._interval - self.loop.time()
        if wait > 0:
            self.loop.call_later(wait, self._flush)
        else:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
            self._urgent.clear()
        if not items:  # urgent flushes took them
            return
        self._last = self.loop.time()
        for queue, batch in items:
            queue.put_nowait(batch)
        self._interval = min(FLUSH_MAX, FLUSH_PER_REQUEST * len({id(queue) for queue, _ in items}))

    def _flush_urgent(self) -> None:
        """The events of the requests that posted something urgent, in order; the others wait for `_flush`."""
        with self._lock:
            urgent, self._urgent, self._urgent_scheduled = self._urgent, set(), False
            items = [(queue, batch) for queue, batch in self._items if queue in urgent]
            self._items = [(queue, batch) for queue, batch in self._items if queue not in urgent]
        for queue, batch in items:
            queue.put_nowait(batch)


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


def _prompt_param(plan: ChatPlan) -> str:
    return "messages" if plan.kind == "chat" else "prompt"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


__all__ = ["ServerConfig", "create_app"]
