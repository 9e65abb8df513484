"""What the server accepts and how a request becomes model inputs: OpenAI's chat-completions schema, its errors, and
the mapping of a chat to (instruction, prompt, image) and to decoding settings.

How a chat becomes an InstructBLIP input:
- exactly one image per request (the model looks at one image): an `image_url` part in any message; none or more
  than one is a 400, refused before any image is decoded. A video instead (vLLM's `video_url` part, a data: URL of
  a video file or a URL the server may read): its frames are sampled uniformly (4, `load(num_frames=...)`) and each goes
  through the vision encoder and the Q-Former.
- the instruction is the text of the last message, which must come from the user (its text parts joined by
  newlines). An empty instruction captions the image (CAPTION_PROMPT, the paper's prompt).
- earlier turns and system messages: `--history last` (default) leaves them out, which is what InstructBLIP was
  trained on; `--history fold` writes them into the language model's prompt ("Question: ... Answer: ...") before the
  instruction. The Q-Former always gets the last instruction alone: it picks what to look at in the image.

Decoding, per request:
- no `temperature` (and no `num_beams`): InstructBLIP's recommended settings, as `instructblip ask`: beam search
  (`--num-beams`, 5) for plain requests, greedy for `stream: true`; with `n` > 1, the n best beams.
- `temperature` below 1e-5 (`api.SAMPLING_EPSILON`, vLLM's), 0 included: greedy (`n` > 1 returns n copies); dividing
  the scores by a smaller one overflows them. Above it (or `top_p` alone): sampling.
- extra fields (the OpenAI client's `extra_body`): `num_beams`, `repetition_penalty` (in (0, 10]; default
  `--repetition-penalty`, 1.5), `length_penalty` (in [-10, 10]: beam scores divide by length ** length_penalty, which
  stays finite in float32 for any length up to 7,000 tokens), `min_tokens`, `top_k`, `no_repeat_ngram_size`.
- the settings become a `generation.GenerationConfig`, checked by its `validate()` (a 400 naming the field), and run
  on the same token iterator as `generate`.

Reading the body (`parse_request`) is strict where Python's `json` is lenient: the body must be UTF-8; NaN and
Infinity (which `json` accepts) are refused, and so are numbers that overflow to infinity (1e999) and integers of
more than 4,300 digits; nesting deeper than Python's recursion limit is a 400, not a crash; a string that holds a lone
UTF-16 surrogate ("\\ud800", which no tokenizer can encode) is a 400 naming its field. Every float field must be
finite and within its range; `seed` is an integer in [0, 2**63).
- `max_tokens` / `max_completion_tokens` (default `--max-tokens`), `stop` (up to 4 strings; the text is cut before
  the first), `seed` (sampling), `n`, `stream`, `stream_options.include_usage`.
- `logprobs` / `top_logprobs` (up to 20): each generated token's log-probability under the model (the log-softmax
  of its logits, before penalties, temperature and filtering) and the most likely alternatives; they make the
  default search greedy (beam search has no per-token probabilities: `num_beams` > 1 with logprobs is a 400).
- `POST /v1/completions` (`CompletionRequest`): OpenAI's text completions for a plain prompt, the language model's
  input as given, with the image in an extra field `image`; `logprobs` there is the number of alternatives.
- not supported (400 when asked for): tools, non-text `response_format`, presence/frequency penalties, logit_bias;
  for completions also echo, suffix, best_of other than n. Unknown fields are ignored.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` (`APIError`); 500 and 504 carry
`x-should-retry: false`, so that the OpenAI client does not run an expensive request again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from instructblip.api import samples
from instructblip.generation.config import ANSWER, GenerationConfig
from instructblip.processing.templates import CAPTION_PROMPT

MAX_N = 8
MAX_STOP = 4
MAX_STOP_LENGTH = 256
MAX_BEAMS = 16
MAX_TOP_LOGPROBS = 20
MAX_REPETITION_PENALTY = 10.0
MAX_LENGTH_PENALTY = 10.0


@dataclass
class ServerConfig:
    """What `create_app` needs besides the model (`instructblip serve` fills it from its flags): limits and defaults for
    requests, batching, and where images may come from."""

    model_name: str = "instructblip"  # the id clients send as `model` (and /v1/models lists)
    api_key: str | None = None
    max_batch_size: int | None = None  # requests running at once (decoding, prefilling, searching beams); None: as
    # many as a quarter of the free memory holds the KV caches of, 64 at most (`scheduler.default_batch_size`)
    batch_wait: float = 0.005  # seconds an idle worker waits for more requests once one has arrived
    max_queue: int = 64
    max_step_tokens: int = 1024  # positions one step runs: the running rows plus a prefill chunk
    prefill_chunk: int = 256  # prompt positions prefilled per step while a batch runs
    request_timeout: float = 300.0  # seconds from arrival to the last token
    max_body_bytes: int = 20 * 1024 * 1024
    body_timeout: float = 60.0  # seconds to receive the whole body
    max_image_bytes: int = 15 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_prompt_tokens: int = 512
    default_max_tokens: int = 256
    max_tokens_limit: int = 1024
    num_beams: int = ANSWER.num_beams  # the default search when a request names no temperature
    repetition_penalty: float = ANSWER.repetition_penalty
    history: Literal["last", "fold"] = "last"
    allow_remote_images: bool = False
    allowed_local_media_path: str | None = None
    image_fetch_timeout: float = 5.0
    image_workers: int = 4  # images decoded at once
    log_format: Literal["text", "json"] = "text"  # each request's log line: key=value text or a JSON object
    max_running_requests: int = 128  # API requests in progress (reading, waiting, decoding) before a 503


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


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error (`APIError.body`), for the OpenAPI document."""

    error: ErrorDetail


# ---------------------------------------------------------------------------------------------------------------------
# the request (fields the OpenAI client sends; unknown ones are ignored; numbers are not coerced from strings)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL | str


class VideoURL(_Strict):
    url: str


class VideoPart(_Strict):
    """vLLM's video content part: a video file as a data: URL (`data:video/mp4;base64,...`) or a URL."""

    type: Literal["video_url"]
    video_url: VideoURL | str


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _Settings(_Strict):
    """The decoding fields chat and text completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # InstructBLIP's own settings (`extra_body`)
    num_beams: int | None = Field(None, ge=1, le=MAX_BEAMS)
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_REPETITION_PENALTY)
    length_penalty: float | None = Field(None, ge=-MAX_LENGTH_PENALTY, le=MAX_LENGTH_PENALTY)
    min_tokens: int | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    no_repeat_ngram_size: int | None = Field(None, ge=0)


class ChatRequest(_Settings):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None


class CompletionRequest(_Settings):
    """`POST /v1/completions`: a plain prompt (the language model's input, as given) about one image. The image is
    an extra field, `image` (a URL as in chat: data:, http(s) or file://); `instruction` (extra, optional) is what
    the Q-Former reads, by default the prompt."""

    prompt: str | list[str]
    image: str | ImageURL | None = None
    instruction: str | None = None
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @property
    def max_completion_tokens(self) -> None:  # (chat's other name for max_tokens)
        return None


def parse_request(body: bytes, schema: type[_Settings] = ChatRequest) -> _Settings:
    """The body as a `schema` (ChatRequest or CompletionRequest), or a 400 naming the field."""
    data = parse_json(body)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        param, message = _validation_message(e)
        raise bad_request(f"{param}: {message}" if param else message, param=param) from None


def parse_json(body: bytes) -> dict:
    """The body as a JSON object, read strictly (see the module docstring); a 400 otherwise."""
    try:
        text = body.decode("utf-8")
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise bad_request("the body is not valid JSON: it is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN, integers past Python's 4,300 digits
        reason = "an integer has more than 4,300 digits" if "integer string conversion" in str(e) else e
        raise bad_request(f"the body is not valid JSON: {reason}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    if _ESCAPED_SURROGATE.search(text):  # only an escape can make one: the body decoded as strict UTF-8
        where = _lone_surrogate(data)
        if where is not None:
            raise bad_request(f"{where}: the text holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                              "which is not Unicode; send the character itself or a complete surrogate pair",
                              param=where, code="invalid_unicode")
    return data


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number; send a finite number")


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(data: Any) -> str | None:
    """Where ("messages.0.content") the first string (or key) holding a lone surrogate is, or None. A loop rather
    than recursion: the nesting is as deep as the body makes it."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and not _encodable(value):
            return path
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                if not _encodable(key):
                    return where.encode("utf-8", "backslashreplace").decode()
                stack.append((where, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", item) for i, item in enumerate(value))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    """A validated request (chat or text completion), before its image is read."""

    instruction: str  # what the Q-Former gets
    prompt: str  # what the language model gets
    image_url: str
    image_param: str  # where the image is in the request, for error messages
    stream: bool
    include_usage: bool
    n: int
    logprobs: int | None = None  # None, or how many most likely tokens to report with each token
    kind: Literal["chat", "text"] = "chat"  # the response's shape: chat.completion or text_completion
    video: bool = False  # `image_url` holds a video


def plan_chat(req: ChatRequest, config: ServerConfig) -> ChatPlan:
    """Map the messages to (instruction, prompt, image) and check the settings that need no tokenizer."""
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    unsupported = {
        "tools": bool(req.tools),
        "functions": bool(req.functions), "logit_bias": bool(req.logit_bias),
        "presence_penalty": bool(req.presence_penalty), "frequency_penalty": bool(req.frequency_penalty),
        "response_format": req.response_format is not None and req.response_format.get("type", "text") != "text",
    }
    for name, asked in unsupported.items():
        if asked:
            raise bad_request(f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    images = []
    for i, message in enumerate(req.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    images.append((f"messages.{i}.content.{j}.image_url", part.image_url, False))
                elif isinstance(part, VideoPart):
                    images.append((f"messages.{i}.content.{j}.video_url", part.video_url, True))
    if not images:
        raise bad_request("this model needs exactly one image: add an image_url content part (or a video_url)",
                          param="messages", code="image_required")
    if len(images) > 1:
        raise bad_request(f"too many images: {len(images)}; this model takes exactly one image (or video) per "
                          "request", param=images[1][0], code="too_many_images")
    image_param, image, video = images[0]
    last = req.messages[-1]
    if last.role != "user":
        raise bad_request(f"the last message must come from the user, not {last.role!r}", param="messages")
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
        raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
    return ChatPlan(
        instruction=instruction, prompt=prompt, image_url=image if isinstance(image, str) else image.url,
        image_param=image_param, stream=stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage), n=req.n or 1,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None, video=video,
    )


def plan_completion(req: CompletionRequest) -> ChatPlan:
    """A text completion's (instruction, prompt, image), and the settings that need no tokenizer."""
    unsupported = {
        "echo": bool(req.echo), "suffix": bool(req.suffix), "logit_bias": bool(req.logit_bias),
        "best_of": req.best_of is not None and req.best_of != (req.n or 1),
        "presence_penalty": bool(req.presence_penalty), "frequency_penalty": bool(req.frequency_penalty),
    }
    for name, asked in unsupported.items():
        if asked:
            raise bad_request(f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise bad_request(f"this server completes one prompt per request, got {len(prompts)}", param="prompt")
    if req.image is None:
        raise bad_request("this model needs exactly one image: add \"image\": \"data:image/...;base64,...\" (or an "
                          "http(s) or file:// URL the server allows)", param="image", code="image_required")
    prompt = prompts[0]
    instruction = (req.instruction if req.instruction is not None else prompt).strip() or CAPTION_PROMPT
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
    return ChatPlan(
        instruction=instruction, prompt=prompt.strip() or instruction,
        image_url=req.image if isinstance(req.image, str) else req.image.url, image_param="image",
        stream=bool(req.stream), include_usage=bool(req.stream_options and req.stream_options.include_usage),
        n=req.n or 1, logprobs=req.logprobs, kind="text",
    )


def _text(message: Message) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "\n".join(p.text for p in message.content if isinstance(p, TextPart))


def generation_config(req: ChatRequest | CompletionRequest, config: ServerConfig, prompt_positions: int,
                      context: int | None) -> tuple[GenerationConfig, int]:
    """The decoding settings of a request (see the module docstring), validated, and its number of choices `n`.
    `prompt_positions`: the language model's input length; `context`: its position limit (None for T5)."""
    logprobs = req.logprobs is not None if isinstance(req, CompletionRequest) else bool(req.logprobs)
    explicit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_new = config.default_max_tokens if explicit is None else explicit
    if max_new > config.max_tokens_limit:
        raise bad_request(f"{name}={max_new} is above this server's limit of {config.max_tokens_limit}", param=name)
    if context is not None and prompt_positions + max_new > context:
        room = context - prompt_positions
        if explicit is not None or room < 1:
            raise bad_request(f"this model's context is {context} tokens; the prompt takes {prompt_positions}, which "
                              f"leaves {max(room, 0)} for the answer, and {max_new} were asked for", param=name,
                              code="context_length_exceeded")
        max_new = room
    min_new = req.min_tokens or 0
    if min_new > max_new:
        raise bad_request(f"min_tokens={min_new} is above the {name} of {max_new}", param="min_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise bad_request(f"at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in stop):
        raise bad_request(f"stop strings must be 1 to {MAX_STOP_LENGTH} characters long", param="stop")
    n = req.n or 1
    do_sample = samples(req.temperature, req.top_p)  # the rule `instructblip ask` follows too
    if req.num_beams is not None:
        num_beams = req.num_beams
    elif do_sample or req.temperature is not None or req.stream or logprobs:
        num_beams = 1
    else:
        num_beams = max(config.num_beams, n)
    if num_beams > 1 and req.stream:
        raise bad_request("streaming works with greedy decoding or sampling, not with num_beams > 1", param="num_beams")
    if num_beams > 1 and logprobs:
        raise bad_request("logprobs work with greedy decoding or sampling, not with num_beams > 1", param="num_beams")
    if num_beams > 1 and n > num_beams:
        raise bad_request(f"n={n} needs num_beams >= n with beam search, got num_beams={num_beams}", param="n")
    generation = GenerationConfig(
        max_new_tokens=max_new, min_new_tokens=min_new, do_sample=do_sample,
        temperature=req.temperature if do_sample and req.temperature is not None else 1.0,
        top_p=req.top_p if req.top_p is not None else 1.0, top_k=req.top_k or 0, num_beams=num_beams,
        num_return_sequences=n if num_beams > 1 else 1,
        length_penalty=req.length_penalty if req.length_penalty is not None else 1.0,
        repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else config.repetition_penalty,
        no_repeat_ngram_size=req.no_repeat_ngram_size or 0, stop_strings=tuple(stop), seed=req.seed,
    )
    try:
        generation.validate()
    except ValueError as e:
        param = next((f for f in _CHECKED if str(e).startswith(f)), None)
        raise bad_request(str(e), param=_REQUEST_NAMES.get(param, param)) from None
    return generation, n


# GenerationConfig's fields whose check a request can fail, and their names in the request
_CHECKED = ("temperature", "top_p", "top_k", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "seed",
            "stop_strings", "num_return_sequences", "num_beams", "min_new_tokens", "max_new_tokens")
_REQUEST_NAMES = {"stop_strings": "stop", "num_return_sequences": "n", "min_new_tokens": "min_tokens",
                  "max_new_tokens": "max_tokens"}
