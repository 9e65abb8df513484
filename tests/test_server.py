"""`instructblip serve`: the OpenAI-compatible server, live on loopback, driven by the official `openai` client,
httpx and (when installed) headless Chromium. Every connection goes to 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
import torch
from assets import encode, photo, png_header_only
from PIL import Image
from tiny_checkpoint import make_full_checkpoint

import instructblip
from instructblip.accel import cpu_linear as ops
from instructblip.cli import security_warnings
from instructblip.serving.app import create_app
from instructblip.serving.media import ImageError, fetch_remote_image, is_public_address
from instructblip.serving.protocol import ChatRequest, ServerConfig, plan_chat

MODEL = "tiny"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")


# ---------------------------------------------------------------------------------------------------------------------
# fixtures and helpers


@contextlib.contextmanager
def live(app, **config):
    """Run `app` with uvicorn (extra `uvicorn.Config` settings in `config`) in a thread on a free loopback port;
    yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=5, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def data_url(image: np.ndarray | bytes, fmt: str = "PNG") -> str:
    data = image if isinstance(image, bytes) else encode(Image.fromarray(image), fmt)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def messages(url: str, text: str = "What is this?") -> list[dict]:
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": parts}]


def body(url: str, text: str = "What is this?", **fields) -> dict:
    return {"model": MODEL, "messages": messages(url, text), **fields}


def direct(vlm, image: np.ndarray, instruction: str, **generation) -> tuple[str, int, str]:
    """What `generate` gives for one request: (text, tokens incl. eos, finish reason)."""
    inputs = vlm.processor(images=[image], text=[instruction], return_tensors="pt").to(vlm.device)
    generation = {"repetition_penalty": 1.5, "num_beams": 1, **generation}
    row = vlm.model.generate(**inputs, **generation)[0].tolist()
    eos = 2 if vlm.model.config.text_config.eos_token_id == 1 else vlm.model.config.text_config.eos_token_id
    end = row.index(eos) if eos in row else None
    ids = row if end is None else row[:end]
    text = vlm.processor.decode(ids, skip_special_tokens=True).lstrip()  # answers start at their first character
    return text, len(row) if end is None else end + 1, (
        "length" if end is None else "stop")


def prompt_tokens(vlm, image, instruction) -> int:
    return len(vlm.processor(images=[image], text=[instruction], return_tensors=None)["input_ids"][0])


def openai_client(base: str, api_key: str = "unused", **kwargs):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_full_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def vlm(ckpt):
    return instructblip.load(ckpt)


@pytest.fixture(scope="module")
def images():
    return {name: np.ascontiguousarray(photo(name)[::2, ::2]) for name in PHOTOS}  # half size: smaller bodies


@pytest.fixture(scope="module")
def media(tmp_path_factory, images):
    d = tmp_path_factory.mktemp("media")
    Image.fromarray(images["coffee"]).save(d / "coffee.png")
    return d


@pytest.fixture(scope="module")
def server(vlm, media):
    app = create_app(vlm, model_name=MODEL, batch_wait=0.02, allow_remote_images=True,
                     allowed_local_media_path=str(media), max_body_bytes=3 * 2**20, max_image_bytes=2 * 2**20,
                     image_fetch_timeout=2.0)
    with live(app) as base:
        yield base


# ---------------------------------------------------------------------------------------------------------------------
# the OpenAI client


def test_non_streaming_answers_like_generate_with_usage_and_ids(server, vlm, images):
    client = openai_client(server)
    assert [m.id for m in client.models.list().data] == [MODEL]
    url = data_url(images["astronaut"])
    before = time.time()
    r = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=7, temperature=0)
    text, tokens, finish = direct(vlm, images["astronaut"], "What is this?", max_new_tokens=7)
    assert r.choices[0].message.content == text and text and not text[0].isspace()
    # as `ask` prints it: no leading space, whatever the decoder keeps before a first word
    raw = vlm.processor.decode(vlm.model.generate(**vlm.processor(images=[images["astronaut"]], text=["What is this?"],
                               return_tensors="pt"), max_new_tokens=7, num_beams=1, repetition_penalty=1.5)[0],
                               skip_special_tokens=True)
    assert raw.lstrip() == text
    assert r.choices[0].message.role == "assistant" and r.choices[0].index == 0
    assert r.choices[0].finish_reason == finish == "length"
    prompt = prompt_tokens(vlm, images["astronaut"], "What is this?")
    assert prompt == 4 + len(vlm.processor.tokenizer("What is this?")["input_ids"])  # 4 query-token placeholders
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt, 7, prompt + 7)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert before - 1 <= r.created <= time.time() + 1
    other = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=7, temperature=0)
    assert other.id != r.id

    # no temperature: InstructBLIP's beam search (5 beams, repetition penalty 1.5), as `instructblip ask`
    r = client.chat.completions.create(model=MODEL, messages=messages(url, "Describe it."),
                                       max_completion_tokens=6)
    assert r.choices[0].message.content == direct(vlm, images["astronaut"], "Describe it.", max_new_tokens=6,
                                                  num_beams=5)[0]
    # extra settings through extra_body
    r = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=6, temperature=0,
                                       extra_body={"repetition_penalty": 1.0, "num_beams": 3, "length_penalty": 0.5})
    assert r.choices[0].message.content == direct(vlm, images["astronaut"], "What is this?", max_new_tokens=6,
                                                  num_beams=3, repetition_penalty=1.0, length_penalty=0.5)[0]
    # seeded sampling equals generate() with a generator seeded the same way
    r = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=8, temperature=0.7,
                                       top_p=0.9, seed=123)
    g = torch.Generator().manual_seed(123)
    sampled = direct(vlm, images["astronaut"], "What is this?", max_new_tokens=8, do_sample=True, temperature=0.7,
                     top_p=0.9, top_k=0, generator=g)
    assert r.choices[0].message.content == sampled[0]


def test_answers_start_like_ask_prints_them():
    """The shipped model's tokenizer keeps the space before a first word when decoding; the server's answers, whole
    and streamed, start at the first character, as `ask` and `stream` print them."""
    from fastapi.testclient import TestClient

    vlm = instructblip.load(device="cpu", dtype="float32")
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    question = "What color is the shape?"
    tokens = vlm.model.generate(**vlm.processor(images=[image], text=[question], return_tensors="pt"), num_beams=1)
    assert vlm.processor.decode(tokens[0], skip_special_tokens=True).startswith(" ")  # the case this is about
    asked = vlm.ask(image, question, num_beams=1)
    url = data_url(np.asarray(image))
    with TestClient(create_app(vlm, ServerConfig(model_name=MODEL))) as client:
        whole = client.post("/v1/chat/completions", json=body(url, question, temperature=0))
        streamed = client.post("/v1/chat/completions", json=body(url, question, temperature=0,
                                                                 stream=True))
    assert whole.json()["choices"][0]["message"]["content"] == asked and not asked[0].isspace()
    pieces = [json.loads(line[6:])["choices"][0]["delta"].get("content") for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    assert "".join(p for p in pieces if p) == asked
    assert "".join(vlm.stream(image, question, num_beams=1)) == asked


def test_served_tokens_equal_generate_under_every_setting(server, vlm, images):
    """The server decodes on the token iterator `generate` runs on: requests sent together (so that they share
    decoding runs), each with its own settings, give the tokens `generate` gives for each alone, with stop strings
    applied to the text as `generate(stop_strings=...)` ends the row."""
    tokenizer = vlm.processor.tokenizer
    cases = [
        ("greedy", "astronaut", dict(temperature=0, max_tokens=12), dict(max_new_tokens=12)),
        ("sampled", "chelsea", dict(temperature=1.3, top_p=0.9, seed=7, max_tokens=10),
         dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_p=0.9, top_k=0, seed=7)),
        ("penalty", "coffee", dict(temperature=0, max_tokens=12, extra_body={"repetition_penalty": 2.5}),
         dict(max_new_tokens=12, repetition_penalty=2.5)),
        ("ngrams", "chelsea", dict(temperature=0, max_tokens=14,
                                   extra_body={"no_repeat_ngram_size": 1, "repetition_penalty": 1.0}),
         dict(max_new_tokens=14, no_repeat_ngram_size=1, repetition_penalty=1.0)),  # its plain answer repeats
        ("lengths", "camera", dict(temperature=0, max_tokens=9, extra_body={"min_tokens": 8}),
         dict(max_new_tokens=9, min_new_tokens=8)),
    ]
    plain = direct(vlm, images["astronaut"], "What is this?", max_new_tokens=12)[0]
    stop = plain[3:5]
    assert stop.strip()
    cases.append(("stop", "astronaut", dict(temperature=0, max_tokens=12, stop=[stop]),
                  dict(max_new_tokens=12, stop_strings=[stop], tokenizer=tokenizer)))

    def expected(image: str, generation: dict) -> tuple[str, int]:
        inputs = vlm.processor(images=[images[image]], text=["What is this?"], return_tensors="pt")
        row = vlm.model.generate(**inputs, **{"repetition_penalty": 1.5, **generation})[0].tolist()
        eos = 2
        ids = row[: row.index(eos)] if eos in row else [t for t in row if t != 0]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if generation.get("stop_strings"):
            text = text[: text.find(stop)]
        return text, len(ids) + (eos in row)

    client = openai_client(server)
    results: dict[str, object] = {}

    def ask(name: str, image: str, fields: dict) -> None:
        results[name] = client.chat.completions.create(model=MODEL, messages=messages(data_url(images[image])),
                                                       **fields)

    threads = [threading.Thread(target=ask, args=(name, image, fields)) for name, image, fields, _ in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for name, image, _, generation in cases:
        text, tokens = expected(image, generation)
        answer = results[name]
        assert answer.choices[0].message.content == text, name
        if name != "stop":
            assert answer.usage.completion_tokens == tokens, name
    assert results["lengths"].usage.completion_tokens >= 8
    assert results["stop"].choices[0].finish_reason == "stop"
    repeats = expected("chelsea", dict(max_new_tokens=14, repetition_penalty=1.0))[0]
    assert results["ngrams"].choices[0].message.content != repeats  # the n-gram ban changed the answer


def test_streaming_matches_non_streaming_and_ends_with_done(server, vlm, images):
    client = openai_client(server)
    url = data_url(images["chelsea"])
    plain = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=9, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=9, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it came in pieces
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # the raw protocol: event-stream headers, data: lines, [DONE] at the end
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=30,
                      json=body(url, max_tokens=4, temperature=0, stream=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert '"usage"' not in raw  # only with stream_options.include_usage


def test_n_choices_seed_and_greedy_copies(server, images):
    client = openai_client(server)
    url = data_url(images["coffee"])
    r = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=6, temperature=1.0, n=3,
                                       seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # three samples, not one repeated
    assert r.usage.completion_tokens == 18
    again = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=6, temperature=1.0, n=3,
                                           seed=7)
    assert [c.message.content for c in again.choices] == texts
    greedy = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=5, temperature=0, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    assert greedy.usage.completion_tokens == 10
    beams = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=5, n=2)
    assert len(beams.choices) == 2 and beams.choices[0].message.content != beams.choices[1].message.content
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=5,
                                                   temperature=1.0, n=2, seed=3, stream=True))
    by_index = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            by_index[choice.index] += choice.delta.content or ""
    sampled = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=5, temperature=1.0,
                                             n=2, seed=3)
    assert [by_index[0], by_index[1]] == [c.message.content for c in sampled.choices]


def test_stop_strings_cut_the_answer(server, images):
    client = openai_client(server)
    url = data_url(images["rocket"])
    full = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=14, temperature=0)
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    expected = text[: text.find(stop)]
    r = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=14, temperature=0,
                                       stop=[stop, "never appears"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 14
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=14, temperature=0,
                                                 stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    beam_text = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=14).choices[0]
    beam_text = beam_text.message.content
    stop = beam_text[4:7]
    beams = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=14, stop=stop)
    assert beams.choices[0].message.content == beam_text[: beam_text.find(stop)]
    assert beams.choices[0].finish_reason == "stop" and beams.usage.completion_tokens < 14


def test_eos_min_tokens_and_finish_reason_stop(ckpt, images):
    vlm = instructblip.load(ckpt)
    lm = vlm.model.language_model
    logits = lm.logits
    bias = torch.zeros(vlm.model.config.text_config.vocab_size)
    bias[2] = 1e4  # the Vicuna-style eos (</s> = 2) wins every step, unless min_tokens masks it
    lm.logits = lambda hidden: logits(hidden) + bias
    with live(create_app(vlm, model_name=MODEL)) as base:
        client = openai_client(base)
        url = data_url(images["camera"])
        r = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=8, temperature=0)
        assert (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 1)
        r = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=8, temperature=0,
                                           extra_body={"min_tokens": 3})
        text, tokens, finish = direct(vlm, images["camera"], "What is this?", max_new_tokens=8, min_new_tokens=3)
        assert (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) == (
            text, "stop", 4) and (tokens, finish) == (4, "stop") and text
        r = client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=8, extra_body={
            "min_tokens": 2})  # beam search stops on eos too
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 3


def test_32_concurrent_clients_batch_and_match_one_at_a_time(server, images):
    from openai import AsyncOpenAI

    urls = [data_url(images[name], "JPEG") for name in PHOTOS]
    questions = ["What is this?", "Describe the picture in detail, please.", "Colour?",
                 "How many objects are there in this photo, and where are they?"]
    requests = [dict(model=MODEL, messages=messages(urls[i % 5], questions[i % 4]), max_tokens=3 + i % 10,
                     temperature=0) for i in range(32)]
    before = httpx.get(f"{server}/metrics").text

    async def all_at_once():
        client = AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*[client.chat.completions.create(**r) for r in requests])
        finally:
            await client.close()

    together = asyncio.run(all_at_once())
    after = httpx.get(f"{server}/metrics").text
    client = openai_client(server)
    alone = [client.chat.completions.create(**r) for r in requests]
    assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in alone]
    assert [r.usage.model_dump() for r in together] == [r.usage.model_dump() for r in alone]
    assert all(r.choices[0].message.content for r in together)
    batches = metric(after, "instructblip_batch_size_count") - metric(before, "instructblip_batch_size_count")
    single = 'instructblip_batch_size_bucket{le="1.0"}'
    one = metric(after, single) - metric(before, single)
    assert batches < 32 and one < batches  # some batches held more than one request
    hits = 'vllm:mm_cache_hits_total{model_name="tiny"}'
    assert metric(after, hits) > metric(before, hits)
    assert metric(after, 'vllm:num_requests_waiting{model_name="tiny"}') == 0


# ---------------------------------------------------------------------------------------------------------------------
# bad and hostile input


@pytest.fixture(scope="module")
def listener():
    """A loopback TCP listener that records connections: hostile URLs must be refused before connecting."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.05)
    accepted = []
    stop = threading.Event()

    def run():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            accepted.append(conn)
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield sock.getsockname()[1], accepted
    stop.set()
    thread.join(2)
    sock.close()


def _hostile_cases(images, port: int) -> list[tuple[str, object, int, str]]:
    """(name, body (dict, or raw bytes), status, a word the error message must contain)."""
    good = data_url(images["astronaut"])
    png = encode(Image.fromarray(images["astronaut"]))
    two_images = messages(good)
    two_images[0]["content"].append({"type": "image_url", "image_url": {"url": good}})
    small = data_url(np.zeros((8, 8, 3), np.uint8))
    many = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": small}} for _ in range(20)]}]
    earlier = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": good}}]},
               {"role": "assistant", "content": "ok"}, *messages(good)]
    cases = [
        ("invalid JSON", b'{"model": "tiny", "messages": [', 400, "JSON"),
        ("not an object", b"[1, 2, 3]", 400, "object"),
        ("not UTF-8", b'{"model": "\xff\xfe"}', 400, "JSON"),
        ("max_tokens is a string", body(good, max_tokens="ten"), 400, "max_tokens"),
        ("temperature is a string", body(good, temperature="hot"), 400, "temperature"),
        ("n is a bool", body(good, n=True), 400, "n"),
        ("messages is a string", {"model": MODEL, "messages": "hello"}, 400, "messages"),
        ("content is a number", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "content"),
        ("unknown part type", {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {}}]}]}, 400, "type"),
        ("tool role", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
        ("no messages", {"model": MODEL, "messages": []}, 400, "messages"),
        ("messages missing", {"model": MODEL}, 400, "messages"),
        ("model missing", {"messages": messages(good)}, 400, "model"),
        ("unknown model", {**body(good), "model": "gpt-4o"}, 404, "does not exist"),
        ("no image", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 400, "image"),
        ("two images", {"model": MODEL, "messages": two_images}, 400, "too many images"),
        ("twenty images", {"model": MODEL, "messages": many}, 400, "too many images"),
        ("image in an earlier turn too", {"model": MODEL, "messages": earlier}, 400, "too many images"),
        ("last message from the assistant", {"model": MODEL, "messages": [*messages(good), {
            "role": "assistant", "content": "Sure"}]}, 400, "last message"),
        ("non-image data URL", body("data:text/plain;base64,aGVsbG8="), 400, "not an image"),
        ("data URL without base64", body("data:image/png,abc"), 400, "base64"),
        ("bad base64", body("data:image/png;base64,@@@not*base64@@@"), 400, "base64"),
        ("corrupt image", body(data_url(os.urandom(3000))), 400, "not an image"),
        ("truncated image", body(data_url(png[: len(png) // 2])), 400, "truncated"),
        ("empty data URL", body("data:image/png;base64,"), 400, "no data"),
        ("not a URL", body("just text"), 400, "data: URL"),
        ("decompression bomb header", body(data_url(png_header_only(20000, 20000))), 400, "pixels"),
        ("image bytes over the limit", body(data_url(b"\x89PNG" + b"\0" * (2 * 2**20 + 100))), 400, "larger"),
        ("http to 127.0.0.1", body(f"http://127.0.0.1:{port}/a.png"), 400, "non-public"),
        ("http to localhost", body(f"http://localhost:{port}/a.png"), 400, "non-public"),
        ("http to ::1", body(f"http://[::1]:{port}/a.png"), 400, "non-public"),
        ("http to mapped loopback", body(f"http://[::ffff:127.0.0.1]:{port}/a.png"), 400, "non-public"),
        ("http to decimal loopback", body(f"http://2130706433:{port}/a.png"), 400, "non-public"),
        ("http to cloud metadata", body("http://169.254.169.254/latest/meta-data/"), 400, "non-public"),
        ("http to a private address", body("http://10.0.0.1/a.png"), 400, "non-public"),
        ("https to a private address", body("https://192.168.1.1/a.png"), 400, "non-public"),
        ("credentials in the URL", body("http://user:pw@example.com/a.png"), 400, "credentials"),
        ("backslash in the URL", body("http://example.com\\@127.0.0.1/a.png"), 400, "backslash"),
        ("ftp URL", body("ftp://example.com/a.png"), 400, "data: URL"),
        ("file:///etc/passwd", body("file:///etc/passwd"), 400, "outside"),
        ("file URL with a host", body("file://example.com/etc/passwd"), 400, "local path"),
        ("logprobs with beam search", body(good, logprobs=True, num_beams=3), 400, "logprobs"),
        ("top_logprobs without logprobs", body(good, top_logprobs=2), 400, "top_logprobs"),
        ("unsupported tools", body(good, tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
        ("max_tokens above the limit", body(good, max_tokens=100000), 400, "limit"),
        ("min_tokens above max_tokens", body(good, max_tokens=3, min_tokens=5), 400, "min_tokens"),
        ("n too large", body(good, n=100), 400, "n"),
        ("five stop strings", body(good, stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        ("empty stop string", body(good, stop=[""]), 400, "stop"),
        ("stream with beam search", body(good, stream=True, num_beams=3), 400, "num_beams"),
        ("temperature out of range", body(good, temperature=5), 400, "temperature"),
        ("prompt too long", body(good, "word " * 3000), 400, "tokens"),
        ("prompt far too long", body(good, "x" * 200000), 400, "limit"),
    ]
    return cases


def test_bad_and_hostile_input_gets_a_json_4xx_and_the_server_stays_healthy(server, images, listener):
    port, accepted = listener
    with httpx.Client(base_url=server, timeout=30) as client:
        for name, request, status, word in _hostile_cases(images, port):
            if isinstance(request, bytes):
                r = client.post("/v1/chat/completions", content=request, headers={"content-type": "application/json"})
            else:
                r = client.post("/v1/chat/completions", json=request)
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            error = r.json()["error"]
            assert word.lower() in error["message"].lower(), (name, error)
            assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        # oversized body: refused from its Content-Length, and while streaming a body that does not announce it
        big = b'{"model": "tiny", "messages": [], "pad": "' + b"x" * (4 * 2**20) + b'"}'
        r = client.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        r = client.post("/v1/chat/completions", content=iter([big[i:i + 2**16] for i in range(0, len(big), 2**16)]))
        assert r.status_code == 413 and "larger" in r.json()["error"]["message"]
        # unknown paths and methods: the same JSON shape
        r = client.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["message"]
        r = client.get("/v1/chat/completions")
        assert r.status_code == 405 and r.json()["error"]["message"]
        assert client.get("/health").json()["status"] == "ok"
        r = client.post("/v1/chat/completions", json=body(data_url(images["astronaut"]), max_tokens=3, temperature=0))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        metrics = client.get("/metrics").text
    assert accepted == []  # no hostile URL got as far as a connection
    assert metric(metrics, 'instructblip_http_requests_total{path="/v1/chat/completions",status="400"}') >= 40


def test_local_files_only_under_the_allowed_directory(server, vlm, images, media, tmp_path):
    client = openai_client(server)
    r = client.chat.completions.create(model=MODEL, messages=messages(f"file://{media}/coffee.png"), max_tokens=5,
                                       temperature=0)
    assert r.choices[0].message.content == direct(vlm, images["coffee"], "What is this?", max_new_tokens=5)[0]
    outside = tmp_path / "secret.png"
    Image.fromarray(images["coffee"]).save(outside)
    link = media / "link.png"
    link.symlink_to(outside)
    from openai import BadRequestError

    for url in (f"file://{outside}", f"file://{link}", f"file://{media}/../{tmp_path.name}/secret.png",
                f"file://{media}/missing.png"):
        with pytest.raises(BadRequestError):
            client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=3, temperature=0)


def test_api_key_and_closed_defaults(vlm, images):
    from openai import AuthenticationError, BadRequestError

    with live(create_app(vlm, model_name=MODEL, api_key="s3cret")) as base:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/metrics")):
                r = httpx.request(method, base + path, headers=headers, json=body(data_url(images["chelsea"])))
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
        assert httpx.get(base + "/health").status_code == 200 and httpx.get(base + "/").status_code == 200
        with pytest.raises(AuthenticationError):
            openai_client(base, api_key="nope").models.list()
        client = openai_client(base, api_key="s3cret")
        r = client.chat.completions.create(model=MODEL, messages=messages(data_url(images["chelsea"])), max_tokens=3,
                                           temperature=0)
        assert r.choices[0].message.content
        # remote and local images are off unless switched on
        for url, word in (("http://example.com/a.png", "--allow-remote-images"),
                          ("file:///etc/passwd", "--allowed-local-media-path")):
            with pytest.raises(BadRequestError, match=word):
                client.chat.completions.create(model=MODEL, messages=messages(url), max_tokens=3)
    assert security_warnings("0.0.0.0", None, False) and security_warnings("192.168.1.5", "", False)
    assert not security_warnings("127.0.0.1", None, False) and not security_warnings("0.0.0.0", "key", False)
    assert not security_warnings("::1", None, False) and not security_warnings("localhost", None, False)


# ---------------------------------------------------------------------------------------------------------------------
# the scheduler: queue, timeouts, disconnects, a responsive event loop


def _gate(module: torch.nn.Module) -> tuple[threading.Event, threading.Event, list]:
    """Make `module`'s forward wait until `open` is set (10 s at most); `entered` is set when it is waiting."""
    entered, gate = threading.Event(), threading.Event()

    def hook(*_):
        entered.set()
        gate.wait(10)

    return entered, gate, [module.register_forward_pre_hook(hook)]


def test_full_queue_gives_503_with_retry_after_and_timeouts_504(ckpt, images):
    vlm = instructblip.load(ckpt)
    entered, gate, hooks = _gate(vlm.model.qformer)
    url = data_url(images["astronaut"])
    request = body(url, max_tokens=3, temperature=0)
    app = create_app(vlm, model_name=MODEL, max_batch_size=1, max_queue=1, batch_wait=0.0)
    with live(app) as base:
        results = []
        first = threading.Thread(target=lambda: results.append(httpx.post(f"{base}/v1/chat/completions",
                                                                          json=request, timeout=30)))
        first.start()
        assert entered.wait(10)  # the worker holds the first request
        second = threading.Thread(target=lambda: results.append(httpx.post(f"{base}/v1/chat/completions",
                                                                           json=request, timeout=30)))
        second.start()
        deadline = time.monotonic() + 10
        while app.state.scheduler.queue_depth < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.post(f"{base}/v1/chat/completions", json=request, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
        assert metric(httpx.get(f"{base}/metrics").text, 'vllm:num_requests_waiting{model_name="tiny"}') == 1
        gate.set()
        first.join(30)
        second.join(30)
        assert [x.status_code for x in results] == [200, 200]
    gate.clear()
    entered.clear()
    with live(create_app(vlm, model_name=MODEL, request_timeout=0.5)) as base:
        start = time.monotonic()
        r = httpx.post(f"{base}/v1/chat/completions", json=request, timeout=10)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert r.headers["x-should-retry"] == "false" and time.monotonic() - start < 5
        chunks = httpx.post(f"{base}/v1/chat/completions", json={**request, "stream": True}, timeout=10).text
        assert '"code":"timeout"' in chunks and chunks.endswith("data: [DONE]\n\n")
        gate.set()
        assert httpx.get(f"{base}/health").status_code == 200
    for h in hooks:
        h.remove()


def test_a_request_that_breaks_the_model_fails_alone(ckpt, images):
    vlm = instructblip.load(ckpt)
    features = vlm.model.get_image_features

    def flaky(pixel_values, *args, **kwargs):  # a flat image "breaks the model"
        flat = pixel_values[:, 0].flatten(1)
        if bool((flat.amax(1) == flat.amin(1)).any()):
            raise RuntimeError("boom")
        return features(pixel_values, *args, **kwargs)

    vlm.model.get_image_features = flaky
    good = body(data_url(images["rocket"]), max_tokens=4, temperature=0)
    bad = body(data_url(np.zeros((32, 32, 3), np.uint8)), max_tokens=4, temperature=0)
    with live(create_app(vlm, model_name=MODEL, batch_wait=0.3)) as base:

        async def together():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                return await asyncio.gather(*[client.post("/v1/chat/completions", json=r) for r in (good, bad)])

        ok, failed = asyncio.run(together())
        metrics = httpx.get(f"{base}/metrics").text
        assert httpx.get(f"{base}/health").json()["status"] == "ok"
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["message"]["content"] == direct(vlm, images["rocket"], "What is this?",
                                                                    max_new_tokens=4)[0]
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error", failed.text
    assert failed.headers["x-should-retry"] == "false"
    assert metric(metrics, 'instructblip_batch_size_bucket{le="1.0"}') == 0  # the two did share a batch


def test_disconnected_clients_stop_their_work_and_the_loop_stays_responsive(ckpt, images):
    vlm = instructblip.load(ckpt)
    steps = []
    vlm.model.language_model.register_forward_hook(lambda *_: steps.append(1))
    long = body(data_url(images["rocket"]), max_tokens=1800, temperature=0, min_tokens=1800)
    with live(create_app(vlm, model_name=MODEL, max_tokens_limit=1900)) as base:

        def settled() -> int:
            while True:
                n = len(steps)
                time.sleep(0.4)
                if len(steps) == n:
                    return n

        # streaming: read a few chunks, check /health meanwhile, hang up
        with httpx.Client(timeout=30) as client, client.stream("POST", f"{base}/v1/chat/completions",
                                                                json={**long, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
            start = time.monotonic()
            assert httpx.get(f"{base}/health", timeout=5).status_code == 200
            assert time.monotonic() - start < 1.0  # the event loop answers while the model works
        after_stream = settled()
        assert after_stream < 1000  # the worker stopped long before 1800 tokens
        # non-streaming: the client gives up after 0.5 s
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json=long, timeout=httpx.Timeout(10, read=0.5))
        after = settled()
        assert after - after_stream < 1000
        r = httpx.post(f"{base}/v1/chat/completions", json={**long, "max_tokens": 3, "min_tokens": 0}, timeout=30)
        assert r.status_code == 200  # the worker is free again


@pytest.mark.skipif(not ops.HAS_ONEDNN, reason="this torch build has no oneDNN: weights are never packed")
def test_batches_of_three_rows_pack_the_decoder_and_answer_the_same(ckpt, images, monkeypatch):
    """The worker's own decoding loop packs the decoder's weights (ops.pack_for_decoding) for 3+ rows a step, as
    `generate` does, and not for one row; the answers stay those of one request at a time. (The tiny model's LM head,
    32064 x 32, is the layer wide enough to be packed.)"""
    monkeypatch.setattr(ops, "PACK", True)
    vlm = instructblip.load(ckpt)
    head = vlm.model.language_model.lm_head
    requests = [body(data_url(images[name]), "What?", max_tokens=4, temperature=0) for name in PHOTOS[:3]]
    with live(create_app(vlm, model_name=MODEL, batch_wait=1.0)) as base:
        alone = [httpx.post(f"{base}/v1/chat/completions", json=r, timeout=60).json() for r in requests]
        assert not head.packed

        async def together():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                return await asyncio.gather(*[client.post("/v1/chat/completions", json=r) for r in requests])

        batched = [r.json() for r in asyncio.run(together())]
        metrics = httpx.get(f"{base}/metrics").text
    assert metric(metrics, "instructblip_batch_size_count") == len(requests) + 1  # one at a time, then one batch
    assert head.packed
    assert [r["choices"][0]["message"]["content"] for r in batched] == [
        r["choices"][0]["message"]["content"] for r in alone]


def test_t5_batches_match_one_at_a_time(tmp_path_factory, images):
    vlm = instructblip.load(make_full_checkpoint(tmp_path_factory.mktemp("tiny-t5"), "t5"))
    requests = [body(data_url(images[name]), q, max_tokens=2 + i, temperature=0)
                for i, (name, q) in enumerate(zip(PHOTOS, ["What?", "Describe this photo.", "Colour?", "Where?",
                                                             "What is the main object?"], strict=True))]
    requests.append(body(data_url(images["coffee"]), "Sample it.", max_tokens=5, temperature=0.8, seed=5, n=2))
    with live(create_app(vlm, model_name=MODEL, batch_wait=0.2)) as base:

        async def together():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                return await asyncio.gather(*[client.post("/v1/chat/completions", json=r) for r in requests])

        batched = [r.json() for r in asyncio.run(together())]
        alone = [httpx.post(f"{base}/v1/chat/completions", json=r, timeout=60).json() for r in requests]
        metrics = httpx.get(f"{base}/metrics").text
    assert [[c["message"]["content"] for c in r["choices"]] for r in batched] == [
        [c["message"]["content"] for c in r["choices"]] for r in alone]
    assert batched[0]["choices"][0]["message"]["content"] == direct(vlm, images["astronaut"], "What?",
                                                                     max_new_tokens=2)[0]
    assert metric(metrics, "instructblip_batch_size_count") < 2 * len(requests)


# ---------------------------------------------------------------------------------------------------------------------
# pieces: chat mapping, address checks, the fetcher


def test_chat_mapping_last_turn_or_folded_history():
    url = "data:image/png;base64,AAAA"
    chat = ChatRequest.model_validate({"model": MODEL, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": url}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "Which colour"}, {"type": "text", "text": "is it?"}]},
    ]})
    plan = plan_chat(chat, ServerConfig())
    assert (plan.instruction, plan.prompt, plan.image_url) == ("Which colour\nis it?", "Which colour\nis it?", url)
    folded = plan_chat(chat, ServerConfig(history="fold"))
    assert folded.instruction == "Which colour\nis it?"
    assert folded.prompt == "Be brief.\nQuestion: What?\nAnswer: A cat.\nWhich colour\nis it?"
    caption = ChatRequest.model_validate({"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}]})
    assert plan_chat(caption, ServerConfig()).instruction == "A short image description:"


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("127.8.9.10", False),
    ("::1", False), ("10.0.0.1", False), ("172.16.5.4", False), ("192.168.1.1", False), ("169.254.169.254", False),
    ("100.100.100.200", False), ("0.0.0.0", False), ("224.0.0.1", False), ("255.255.255.255", False),
    ("fe80::1", False), ("fd00:ec2::254", False), ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True),
    ("64:ff9b::a00:1", False), ("2002:7f00:1::", False), ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),
])
def test_only_public_addresses_pass(address, public):
    import ipaddress

    assert is_public_address(ipaddress.ip_address(address)) is public


class _ImageServer(BaseHTTPRequestHandler):
    """Loopback test server: /ok.png, /big.png (no Content-Length), /slow.png, redirects."""

    png = b""

    def do_GET(self):
        port = self.server.server_address[1]
        if self.path == "/ok.png":
            self._send(self.png)
        elif self.path == "/big.png":
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 65536)
        elif self.path == "/slow.png":
            self.send_response(200)
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"\0" * 10)
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path == "/hop":
            self._redirect("/ok.png")
        elif self.path == "/elsewhere":
            self._redirect(f"http://127.0.0.2:{port}/ok.png")
        elif self.path == "/loop":
            self._redirect("/loop")
        else:
            self.send_error(404)

    def _send(self, data: bytes):
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_fetcher_checks_every_hop_and_caps_bytes_and_time(images):
    import ipaddress

    _ImageServer.png = encode(Image.fromarray(images["camera"]))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ImageServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    only_this = lambda ip: ip == ipaddress.ip_address("127.0.0.1")  # noqa: E731  the test's stand-in for "public"
    try:
        assert fetch_remote_image(f"{base}/ok.png", 2**20, 5, allowed=only_this) == _ImageServer.png
        assert fetch_remote_image(f"{base}/hop", 2**20, 5, allowed=only_this) == _ImageServer.png
        with pytest.raises(ImageError, match="non-public"):  # the redirect target is checked before connecting
            fetch_remote_image(f"{base}/elsewhere", 2**20, 5, allowed=only_this)
        with pytest.raises(ImageError, match="redirects more than"):
            fetch_remote_image(f"{base}/loop", 2**20, 5, allowed=only_this)
        with pytest.raises(ImageError, match="larger than"):
            fetch_remote_image(f"{base}/big.png", 2**20, 5, allowed=only_this)
        start = time.monotonic()
        with pytest.raises(ImageError, match="longer than"):
            fetch_remote_image(f"{base}/slow.png", 2**20, 1.0, allowed=only_this)
        assert time.monotonic() - start < 2.5
        with pytest.raises(ImageError, match="HTTP 404"):
            fetch_remote_image(f"{base}/missing", 2**20, 5, allowed=only_this)
        with pytest.raises(ImageError, match="non-public"):  # the real rule refuses loopback
            fetch_remote_image(f"{base}/ok.png", 2**20, 5)
    finally:
        httpd.shutdown()
        httpd.server_close()


# ---------------------------------------------------------------------------------------------------------------------
# the command and the web page


def test_instructblip_serve_command(ckpt, images):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "INSTRUCTBLIP_API_KEY": "k3y"}
    proc = subprocess.Popen([sys.executable, "-m", "instructblip", "serve", "--model", str(ckpt), "--port", str(port),
                             "--served-model-name", MODEL, "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the server did not come up"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        client = openai_client(f"http://127.0.0.1:{port}", api_key="k3y")
        r = client.chat.completions.create(model=MODEL, messages=messages(data_url(images["chelsea"])), max_tokens=4,
                                           temperature=0)
        assert r.choices[0].message.content and r.usage.completion_tokens == 4
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason="headless Chromium is not installed (apt-get install chromium chromium-driver)")
def test_web_page_in_headless_chromium(server, vlm, images, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra has it)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = httpx.get(server + "/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert "<script" in page.text and "cdn" not in page.text.lower() and "http" not in page.text.split("<body>")[1]
    path = tmp_path / "chelsea.png"
    Image.fromarray(images["chelsea"]).save(path)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(server + "/")
        driver.find_element(By.ID, "image-input").send_keys(str(path))
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("hidden") is None)
        driver.find_element(By.ID, "instruction").send_keys("What is this?")
        driver.find_element(By.TAG_NAME, "summary").click()  # open the settings
        tokens = driver.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys("8")
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
        status = driver.find_element(By.ID, "status")
        assert status.get_attribute("data-state") == "done", status.text
        answer = driver.find_element(By.ID, "answer").get_attribute("textContent")
    finally:
        driver.quit()
    assert answer == direct(vlm, images["chelsea"], "What is this?", max_new_tokens=8)[0] and answer
