"""Property-based fuzzing of `instructblip serve`: every endpoint of the app's own OpenAPI document (schemathesis),
and chat bodies from strategies of our own (a valid image with every other field fuzzed: floats with NaN, infinities,
huge and tiny values, integers past int64, text with lone surrogates, deep nesting). The properties: no 5xx, every
error in OpenAI's shape, and a 200 is a chat completion. The server runs on the tiny model with low limits (8 tokens,
small beams) so that a request that passes costs a few milliseconds; examples are derandomized."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from test_server import MODEL, data_url, live
from tiny_checkpoint import make_full_checkpoint

import instructblip
from instructblip.serving.app import create_app

FUZZ = settings(max_examples=50, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    vlm = instructblip.load(make_full_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama"))
    app = create_app(vlm, model_name=MODEL, max_tokens_limit=8, default_max_tokens=4, num_beams=2,
                     max_prompt_tokens=64, batch_wait=0.001, request_timeout=30)
    with live(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    with httpx.Client(base_url=base, timeout=30) as c:
        yield c


def check(status: int, content_type: str, text: str, path: str) -> None:
    """The properties every answer has."""
    assert status < 500, (status, text[:500])
    if status >= 400:
        assert content_type.startswith("application/json"), (status, content_type, text[:300])
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error
        assert error["type"] == "invalid_request_error", error
        assert error["param"] is None or isinstance(error["param"], str), error
    elif path == "/v1/chat/completions" and status == 200:
        if content_type.startswith("text/event-stream"):
            assert text.rstrip().endswith("data: [DONE]"), text[-300:]
        else:
            reply = json.loads(text)
            assert reply["object"] == "chat.completion" and reply["choices"], reply


# ---------------------------------------------------------------------------------------------------------------------
# every endpoint, from the OpenAPI document


# Listed here rather than read from the document at collection time (the document needs a loaded model); a test
# checks that the list is the document's. (schemathesis' `from_fixture(...).parametrize()` fails on pytest 9.) Input
# that breaks the schema (negative mode) exists only for the body: the path parameters are any string.
OPERATIONS = [("GET", "/"), ("GET", "/static/{name}"), ("GET", "/health"), ("GET", "/v1/models"),
              ("GET", "/v1/models/{name}"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"),
              ("POST", "/v1/completions")]
CASES = [(method, path, GenerationMode.POSITIVE) for method, path in OPERATIONS]
CASES += [("POST", path, GenerationMode.NEGATIVE) for path in ("/v1/chat/completions", "/v1/completions")]


@pytest.fixture(scope="module")
def api(base):
    return schemathesis.openapi.from_url(f"{base}/openapi.json")


def test_the_operations_are_the_documents(api):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api.get_all_operations()}
    assert listed == set(OPERATIONS)


@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_every_endpoint_from_the_openapi_document(api, base, method, path, mode):
    @given(case=api[path][method].as_strategy(mode))
    @FUZZ
    def run(case):
        response = case.call(base_url=base, timeout=30)
        check(response.status_code, response.headers.get("content-type", [""])[0], response.text, path)

    run()


def test_the_document_describes_the_bodies_and_the_errors(client):
    doc = client.get("/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatRequest"}
    schemas = doc["components"]["schemas"]
    assert {"ChatRequest", "Message", "ImagePart", "ErrorResponse"} <= set(schemas)
    assert schemas["ChatRequest"]["properties"]["length_penalty"]["anyOf"][0]["maximum"] == 10
    for status in ("400", "401", "404", "413", "503"):
        assert chat["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    assert all("422" not in op["responses"] for ops in doc["paths"].values() for op in ops.values())
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


# ---------------------------------------------------------------------------------------------------------------------
# chat bodies with a valid image and everything else fuzzed

IMAGES = [data_url(np.random.default_rng(i).integers(0, 256, (16 + 8 * i, 24, 3), dtype=np.uint8)) for i in range(3)]

edge_floats = st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e-7, 1e-5, 0.5, 1.0, 2.0, 10.0, 1e308, -1e308,
                               float("nan"), float("inf"), float("-inf")])
floats = st.one_of(edge_floats, st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3))
edge_ints = st.sampled_from([0, 1, 2, 8, 9, -1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**100])
ints = st.one_of(st.integers(-2, 10), edge_ints, st.integers())
# every code point, lone surrogates (which json.dumps writes as \ud800 escapes) and control characters included
text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
junk = st.recursive(st.none() | st.booleans() | ints | floats | text,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=8)


# each optional field: (a value the server should accept, anything of its type and beyond)
FIELDS = {
    "temperature": (st.floats(0, 2), floats), "top_p": (st.floats(0.01, 1), floats),
    "seed": (st.integers(0, 2**63 - 1), ints), "n": (st.integers(1, 3), ints), "num_beams": (st.integers(1, 3), ints),
    "stream": (st.booleans(), junk), "repetition_penalty": (st.floats(0.5, 3), floats),
    "length_penalty": (st.floats(-2, 2), floats), "min_tokens": (st.integers(0, 3), ints),
    "top_k": (st.integers(0, 50), ints), "no_repeat_ngram_size": (st.integers(0, 3), ints),
    "stop": (st.lists(text.filter(bool), max_size=2), text | st.lists(text, max_size=5)),
    "max_completion_tokens": (st.integers(1, 8), ints), "presence_penalty": (st.just(0.0), floats),
    "user": (text, junk), "unknown": (junk, junk), "response_format": (st.just({"type": "text"}), junk),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), junk),
    "logprobs": (st.booleans(), junk), "top_logprobs": (st.integers(0, 5), ints),
}
COMPLETION_FIELDS = {
    **{k: v for k, v in FIELDS.items() if k not in ("max_completion_tokens", "response_format", "logprobs",
                                                     "top_logprobs")},
    "logprobs": (st.integers(0, 5), ints), "echo": (st.just(False), junk), "suffix": (st.none(), junk),
    "best_of": (st.integers(1, 2), ints), "instruction": (text, junk),
}


@st.composite
def chat_bodies(draw) -> bytes:
    url = draw(st.sampled_from(IMAGES))
    image = draw(st.sampled_from([{"url": url}, {"url": url, "detail": "low"}, url]))
    parts = [{"type": "image_url", "image_url": image}]
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, 1)), {"type": "text", "text": draw(text)})
    messages = [{"role": "user", "content": parts}]
    if draw(st.booleans()):
        messages.insert(0, {"role": draw(st.sampled_from(["system", "assistant", "user", "developer"])),
                            "content": draw(text | st.none())})
    fields = {"model": MODEL, "messages": messages, "max_tokens": draw(st.integers(1, 8) | ints)}
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=5, unique=True)):
        sensible, fuzzed = FIELDS[name]
        fields[name] = draw(fuzzed if draw(st.integers(0, 3)) == 0 else sensible)  # mostly sensible: some get answered
    raw = json.dumps(fields)  # NaN and infinities go out as the literals Python writes
    depth = draw(st.sampled_from([0] * 12 + [5, 500, 990, 1000, 5000]))
    if depth:  # nesting json.dumps cannot write (it recurses): spliced in as text
        raw = raw[:-1] + f', "nested": {"[" * depth}{"]" * depth}}}'
    return raw.encode()


@st.composite
def completion_bodies(draw) -> bytes:
    url = draw(st.sampled_from(IMAGES))
    fields = {"model": MODEL, "image": draw(st.sampled_from([url, {"url": url}])),
              "prompt": draw(text | st.lists(text, max_size=3) | junk), "max_tokens": draw(st.integers(1, 8) | ints)}
    for name in draw(st.lists(st.sampled_from(sorted(COMPLETION_FIELDS)), max_size=5, unique=True)):
        sensible, fuzzed = COMPLETION_FIELDS[name]
        fields[name] = draw(fuzzed if draw(st.integers(0, 3)) == 0 else sensible)
    return json.dumps(fields).encode()


@given(raw=completion_bodies())
@settings(FUZZ, max_examples=60)
def test_fuzzed_completion_bodies_get_an_answer_or_an_openai_error(client, raw):
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    check(r.status_code, r.headers.get("content-type", ""), r.text, "/v1/completions")


@given(raw=chat_bodies())
@settings(FUZZ, max_examples=150)
def test_fuzzed_chat_bodies_get_an_answer_or_an_openai_error(client, raw):
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    check(r.status_code, r.headers.get("content-type", ""), r.text, "/v1/chat/completions")


def test_the_server_is_healthy_after_the_fuzzing(client):
    assert client.get("/health").json()["status"] == "ok"
    r = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 3, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGES[0]}}]}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
