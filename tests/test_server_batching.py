"""The server's continuous batching and its token-level API: requests that join a running batch get the answers they
get alone, a short request overtakes a long one (by the order of events, not by timing), beam searches run beside
sampled rows, and log-probabilities come in OpenAI's chat and text-completion shapes. Live on loopback."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import httpx
import numpy as np
import pytest
from test_server import MODEL, PHOTOS, body, data_url, live, openai_client
from tiny_checkpoint import make_full_checkpoint

import instructblip
from instructblip.serving.app import create_app

QUESTIONS = ["What is this?", "Describe the picture in detail, please.", "Colour?", "Where is it?"]


@pytest.fixture(scope="module")
def images():
    from assets import photo

    return {name: np.ascontiguousarray(photo(name)[::4, ::4]) for name in PHOTOS}


def serve(tmp_path_factory, family: str):
    vlm = instructblip.load(make_full_checkpoint(tmp_path_factory.mktemp(f"tiny-{family}"), family))
    app = create_app(vlm, model_name=MODEL, max_tokens_limit=1500, batch_wait=0.0, max_batch_size=16)
    with live(app) as base:
        yield base, app, vlm


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    yield from serve(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    yield from serve(tmp_path_factory, "t5")


class Long:
    """A long streamed greedy answer in a thread; `first` is set at its first text, `events` records its end."""

    def __init__(self, base: str, request: dict, events: list[str]):
        self.first = threading.Event()
        self.text = []
        self.thread = threading.Thread(target=self._run, args=(base, request, events), daemon=True)
        self.thread.start()
        assert self.first.wait(60), "the long answer never started"

    def _run(self, base: str, request: dict, events: list[str]) -> None:
        with httpx.Client(timeout=120) as client, client.stream(
                "POST", f"{base}/v1/chat/completions", json={**request, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                    if delta:
                        self.text.append(delta)
                        self.first.set()
        events.append("long")

    def join(self) -> None:
        self.thread.join(120)
        assert not self.thread.is_alive()


def post_all(base: str, requests: list[dict], events: list[str], path: str = "/v1/chat/completions") -> list[dict]:
    """Send the requests at once; each appends its name ("short 3") to `events` when its answer arrives."""

    async def one(client, i, request):
        r = await client.post(path, json=request)
        events.append(f"short {i}")
        assert r.status_code == 200, r.text
        return r.json()

    async def run():
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            return await asyncio.gather(*[one(client, i, r) for i, r in enumerate(requests)])

    return asyncio.run(run())


def answers(replies: list[dict]) -> list[list[str]]:
    return [[c["message"]["content"] for c in r["choices"]] for r in replies]


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_requests_that_join_mid_decode_get_the_answers_they_get_alone(request, family, images):
    base, app, _ = request.getfixturevalue(family)
    urls = [data_url(images[name]) for name in PHOTOS]
    others = [body(urls[i % 5], QUESTIONS[i % 4], max_tokens=3 + 2 * i, temperature=0) for i in range(6)]
    others += [body(urls[1], "Sample it.", max_tokens=6, temperature=0.9, seed=7, n=2),
               body(urls[2], "Penalise it.", max_tokens=9, temperature=0, repetition_penalty=1.3,
                    no_repeat_ngram_size=2, min_tokens=9)]
    scheduler = app.state.scheduler
    joins, events = scheduler.joins, []
    long = Long(base, body(urls[0], "Tell a long story.", max_tokens=1200, min_tokens=1200, temperature=0), events)
    together = post_all(base, others, events)
    long.join()
    assert events[-1] == "long" and len(events) == len(others) + 1  # every short answer came before the long one
    assert scheduler.joins > joins  # they joined the running batch
    alone = [httpx.post(f"{base}/v1/chat/completions", json=r, timeout=60).json() for r in others]
    assert answers(together) == answers(alone)
    assert [r["usage"] for r in together] == [r["usage"] for r in alone]
    assert all(text for r in together for text in answers([r])[0])


def test_a_short_request_sent_during_a_long_answer_finishes_first(llama, images):
    base, app, _ = llama
    events = []
    long = Long(base, body(data_url(images["rocket"]), "Go on.", max_tokens=256, min_tokens=256, temperature=0),
                events)
    events.append("sent")
    (short,) = post_all(base, [body(data_url(images["coffee"]), "Colour?", max_tokens=8, temperature=0)], events)
    long.join()
    assert events == ["sent", "short 0", "long"]
    assert short["choices"][0]["message"]["content"]
    assert len("".join(long.text)) > 0


def test_beam_searches_run_in_their_own_lane(llama, images):
    """A long beam search does not hold up a greedy request sent while it runs (nor the other way round)."""
    base, app, _ = llama
    scheduler = app.state.scheduler
    events: list[str] = []
    beam = body(data_url(images["camera"]), "Search.", max_tokens=700, min_tokens=700, num_beams=3)
    result = {}

    def run_beam():
        result["beam"] = httpx.post(f"{base}/v1/chat/completions", json=beam, timeout=120)
        events.append("beam")

    thread = threading.Thread(target=run_beam, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while scheduler.running < 1:  # the search is in the lane
        assert time.monotonic() < deadline
        time.sleep(0.005)
    quick = body(data_url(images["astronaut"]), "What?", max_tokens=5, temperature=0)
    (reply,) = post_all(base, [quick], events)
    thread.join(120)
    assert events == ["short 0", "beam"]
    assert result["beam"].status_code == 200 and result["beam"].json()["usage"]["completion_tokens"] >= 700
    alone = httpx.post(f"{base}/v1/chat/completions", json=quick, timeout=60).json()
    assert answers([reply]) == answers([alone])


def test_chat_logprobs_in_openai_shape(llama, images):
    base, _, vlm = llama
    client = openai_client(base)
    url = data_url(images["chelsea"])
    request = dict(model=MODEL, messages=body(url, "What is this?")["messages"], max_tokens=6, temperature=0,
                   logprobs=True, top_logprobs=3, extra_body={"repetition_penalty": 1.0})
    r = client.chat.completions.create(**request)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 6 and all(len(t.top_logprobs) == 3 for t in content)
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True) and all(x <= 0 for x in tops)
        # greedy without penalties: the chosen token is the most likely one
        assert (t.token, t.logprob) == (t.top_logprobs[0].token, t.top_logprobs[0].logprob)
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token or t.token.startswith("\\x")
    joined = "".join(t.token for t in content).strip()
    assert joined == r.choices[0].message.content.strip()
    # streamed: the same entries, spread over the chunks
    streamed = []
    for chunk in client.chat.completions.create(**request, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    # logprobs make the default search greedy; without top_logprobs, no alternatives
    plain = client.chat.completions.create(model=MODEL, messages=request["messages"], max_tokens=6, logprobs=True)
    assert plain.choices[0].logprobs.content and all(t.top_logprobs == [] for t in plain.choices[0].logprobs.content)
    assert client.chat.completions.create(model=MODEL, messages=request["messages"], max_tokens=3).choices[
        0].logprobs is None


def test_text_completions_with_one_image(llama, images):
    base, _, vlm = llama
    client = openai_client(base)
    url = data_url(images["coffee"])
    chat = client.chat.completions.create(model=MODEL, messages=body(url, "What is on the table?")["messages"],
                                          max_tokens=7, temperature=0)
    r = client.completions.create(model=MODEL, prompt="What is on the table?", max_tokens=7, temperature=0,
                                  logprobs=2, extra_body={"image": url})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    choice = r.choices[0]
    assert choice.text == chat.choices[0].message.content and choice.finish_reason == chat.choices[0].finish_reason
    assert r.usage.model_dump() == chat.usage.model_dump()
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) >= 1
    assert all(len(top) <= 2 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)
    assert all(math.isfinite(v) and v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)
    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="What is on the table?", max_tokens=7, temperature=0, stream=True,
        extra_body={"image": url}) if c.choices]
    assert "".join(pieces) == choice.text
    default = client.completions.create(model=MODEL, prompt="Hi", extra_body={"image": url})
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions


@pytest.mark.parametrize("fields,param", [
    ({"prompt": "x"}, "image"),
    ({"prompt": ["a", "b"], "image": "IMG"}, "prompt"),
    ({"prompt": "x", "image": "IMG", "echo": True}, "echo"),
    ({"prompt": "x", "image": "IMG", "suffix": "!"}, "suffix"),
    ({"prompt": "x", "image": "IMG", "best_of": 3}, "best_of"),
    ({"prompt": "x", "image": "IMG", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "image": "IMG", "logprobs": 1, "num_beams": 2}, "num_beams"),
    ({"image": "IMG"}, "prompt"),
])
def test_text_completion_errors(llama, images, fields, param):
    base, _, _ = llama
    url = data_url(images["rocket"])
    request = {"model": MODEL, **{k: url if v == "IMG" else v for k, v in fields.items()}}
    r = httpx.post(f"{base}/v1/completions", json=request, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_the_default_batch_is_what_memory_holds(tmp_path):
    """Without --max-batch-size the server runs as many requests at once as a quarter of the free memory holds the
    KV caches of (answers of the default length), 64 at most: a 7B model on a 24 GB machine gets a small batch, a GPU
    or a small model a full one."""
    from types import SimpleNamespace

    import torch

    from instructblip import InstructBlipConfig
    from instructblip.serving.scheduler import MAX_DEFAULT_BATCH, default_batch_size

    def model(preset: str, dtype=torch.bfloat16):
        return SimpleNamespace(config=InstructBlipConfig.from_name(preset), dtype=dtype, device=torch.device("cpu"))

    # Vicuna-7B: 32 layers x 2 x 4096 x 2 bytes per position, 32 + 64 + 256 positions: 184.5 MB per request
    assert default_batch_size(model("vicuna-7b"), 256, available=8 * 10**9) == 2 * 10**9 // 184_549_376 == 10
    assert default_batch_size(model("vicuna-7b"), 256, available=80 * 10**9) == MAX_DEFAULT_BATCH
    assert default_batch_size(model("vicuna-7b"), 256, available=10**8) == 1  # never none
    # Flan-T5-XL: 24 decoder layers x 2 x (32 x 64) x 2 bytes per position
    assert default_batch_size(model("flan-t5-xl"), 256, available=8 * 10**9) == 2 * 10**9 // (2 * 24 * 2048 * 352 * 2)
    assert default_batch_size(model("vicuna-7b", torch.float32), 256, available=8 * 10**9) == 5
    vlm = instructblip.load(make_full_checkpoint(tmp_path, "llama"))
    assert create_app(vlm, model_name=MODEL).state.scheduler.max_batch_size == MAX_DEFAULT_BATCH
    assert create_app(vlm, model_name=MODEL, max_batch_size=3).state.scheduler.max_batch_size == 3


def test_under_load_the_event_loop_takes_the_workers_events_less_often():
    """The worker's events reach the event loop at once for a lone request, and at most every 0.5 ms per request
    that had events under load (each flush writes to every stream; `_Mailbox`), but for a request's first token and
    its end, which go out at once."""
    from instructblip.serving.app import FLUSH_PER_REQUEST, _Mailbox

    async def main():
        box = _Mailbox(asyncio.get_running_loop())
        queues = [asyncio.Queue() for _ in range(64)]
        box.post(queues[0], ["a"])
        for _ in range(2):
            await asyncio.sleep(0)
        assert queues[0].qsize() == 1  # alone: at once
        await asyncio.sleep(0.002)
        for q in queues:
            box.post(q, ["b"])
        for _ in range(2):
            await asyncio.sleep(0)
        assert all(q.qsize() == 1 + (q is queues[0]) for q in queues)
        assert box._interval == 64 * FLUSH_PER_REQUEST
        box.post(queues[1], ["c"])
        for _ in range(2):
            await asyncio.sleep(0)
        assert queues[1].qsize() == 1  # held back for the interval
        box.post(queues[2], ["c"])
        box.post(queues[2], ["the end"], urgent=True)
        for _ in range(2):
            await asyncio.sleep(0)
        assert queues[2].qsize() == 3  # an urgent event goes out at once, after what its request had pending
        assert [queues[2].get_nowait() for _ in range(3)] == [["b"], ["c"], ["the end"]]
        assert queues[1].qsize() == 1  # the others still wait
        await asyncio.sleep(0.1)
        assert queues[1].qsize() == 2

    asyncio.run(main())
