"""The server's /metrics (serving/metrics.py), its request ids and its per-request log line (serving/access.py): a
tiny model served live on loopback, a known sequence of requests, and the counts they must leave behind."""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from assets import encode, photo
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from test_server import live
from tiny_checkpoint import make_full_checkpoint

import instructblip
from instructblip.cli import serve_config, serve_parser
from instructblip.serving.access import line_format, request_id, text_line
from instructblip.serving.app import create_app
from instructblip.serving.metrics import Metrics

MODEL = "tiny"
CHAT = "/v1/chat/completions"
HEX_ID = re.compile(r"[0-9a-f]{32}")


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}, parsed by prometheus_client's own parser."""
    r = httpx.get(f"{base}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    labels = {"model_name": MODEL, **labels} if name.startswith("vllm:") else labels
    return samples[(name, tuple(sorted(labels.items())))]


def chat(url: str, **fields) -> dict:
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    # min_tokens = max_tokens: a known number of tokens from a random model
    return {"model": MODEL, "messages": [{"role": "user", "content": parts}], "temperature": 0, "max_tokens": 4,
            "min_tokens": 4, **fields}


def streamed_usage(text: str) -> dict:
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    return next(c["usage"] for c in chunks if c.get("usage"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_full_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def url():
    image = np.ascontiguousarray(photo("astronaut")[::4, ::4])
    return f"data:image/png;base64,{base64.b64encode(encode(Image.fromarray(image), 'PNG')).decode()}"


# ---------------------------------------------------------------------------------------------------------------------
# /metrics


def test_metrics_count_a_known_sequence_of_requests(ckpt, url):
    """3 chat completions, 1 streamed, a full queue (2 held, 1 turned away with 503), 1 bad request: the histograms
    count the 6 completed requests, the token counters add up their `usage`, the gauges are 0 when idle, and the
    vision cache found the repeated image 5 times out of 6."""
    vlm = instructblip.load(ckpt)
    entered, gate = threading.Event(), threading.Event()

    def hold(*_):  # the worker waits inside the Q-Former while the gate is closed
        entered.set()
        gate.wait(10)

    gate.set()
    hook = vlm.model.qformer.register_forward_pre_hook(hold)
    app = create_app(vlm, model_name=MODEL, max_batch_size=1, max_queue=1, batch_wait=0.0)
    usages = []
    with live(app) as base:
        idle = scrape(base)
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:num_preemptions_total",
                     "vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                     "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:mm_cache_queries_total"):
            assert value(idle, name) == 0, name
        for _ in range(3):
            r = httpx.post(f"{base}{CHAT}", json=chat(url), timeout=60)
            assert r.status_code == 200, r.text
            usages.append(r.json()["usage"])
        r = httpx.post(f"{base}{CHAT}", json=chat(url, stream=True, stream_options={"include_usage": True}),
                       timeout=60)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        usages.append(streamed_usage(r.text))

        # the queue full: one request in the worker, one waiting, the third turned away
        gate.clear()
        entered.clear()
        held = []
        threads = [threading.Thread(target=lambda: held.append(httpx.post(f"{base}{CHAT}", json=chat(url), timeout=60)))
                   for _ in range(2)]
        threads[0].start()
        assert entered.wait(10)
        threads[1].start()
        deadline = time.monotonic() + 10
        while app.state.scheduler.queue_depth < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        busy = scrape(base)
        r = httpx.post(f"{base}{CHAT}", json=chat(url), timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
        gate.set()
        for t in threads:
            t.join(60)
        assert [h.status_code for h in held] == [200, 200]
        usages += [h.json()["usage"] for h in held]

        r = httpx.post(f"{base}{CHAT}", json=chat(url, max_tokens=-1), timeout=10)
        assert r.status_code == 400
        done = scrape(base)
    hook.remove()

    assert value(busy, "vllm:num_requests_waiting") == value(busy, "vllm:num_requests_running") == 1
    completed = len(usages)
    assert completed == 6
    for name in ("vllm:time_to_first_token_seconds", "vllm:request_time_per_output_token_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"):
        assert value(done, f"{name}_count") == completed, name
        assert value(done, f"{name}_bucket", le="+Inf") == completed, name
        assert value(done, f"{name}_sum") > 0, name
    assert value(done, "vllm:time_to_first_token_seconds_sum") < value(done, "vllm:e2e_request_latency_seconds_sum")
    assert value(done, "vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert value(done, "vllm:generation_tokens_total") == sum(u["completion_tokens"] for u in usages) == 4 * completed
    assert value(done, "vllm:request_success_total", finished_reason="length") == completed
    assert value(done, "vllm:request_success_total", finished_reason="stop") == 0
    assert value(done, "vllm:request_success_total", finished_reason="abort") == 0
    assert value(done, "instructblip_requests_rejected_total", model_name=MODEL, reason="queue_full") == 1
    assert value(done, "instructblip_requests_failed_total", model_name=MODEL, code="timeout") == 0
    assert value(done, "instructblip_http_requests_total", path=CHAT, status="200") == completed
    assert value(done, "instructblip_http_requests_total", path=CHAT, status="503") == 1
    assert value(done, "instructblip_http_requests_total", path=CHAT, status="400") == 1
    assert value(done, "instructblip_http_requests_total", path="/metrics", status="200") == 2  # not this one yet
    assert value(done, "instructblip_batch_size_count") > 0  # how many: the scheduler's business (test_server.py)
    assert value(done, "vllm:num_requests_running") == value(done, "vllm:num_requests_waiting") == 0
    assert value(done, "vllm:num_preemptions_total") == 0
    # one image, six times: encoded once, then found in the cache
    assert value(done, "vllm:mm_cache_queries_total") == completed
    assert value(done, "vllm:mm_cache_hits_total") == completed - 1


def test_a_timeout_and_a_client_that_hangs_up_are_counted_apart_from_successes(ckpt, url):
    vlm = instructblip.load(ckpt)

    def slow(*_):  # 10 ms a step: 900 tokens take longer than the timeout
        time.sleep(0.01)

    vlm.model.language_model.register_forward_hook(slow)
    with live(create_app(vlm, model_name=MODEL, request_timeout=0.5, max_tokens_limit=1000)) as base:
        long = chat(url, max_tokens=900, min_tokens=900)
        r = httpx.post(f"{base}{CHAT}", json=long, timeout=30)
        assert r.status_code == 504
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}{CHAT}", json={**long, "max_tokens": 30, "min_tokens": 30},
                       timeout=httpx.Timeout(10, read=0.1))
        time.sleep(0.5)  # the server notices the hang-up
        samples = scrape(base)
    assert value(samples, "instructblip_requests_failed_total", model_name=MODEL, code="timeout") == 1
    assert value(samples, "vllm:request_success_total", finished_reason="abort") == 1
    assert value(samples, "vllm:e2e_request_latency_seconds_count") == 0  # latency: completed requests only
    assert value(samples, "vllm:generation_tokens_total") == 0


def test_gauges_and_counters_are_read_from_the_scheduler_at_scrape_time():
    scheduler = SimpleNamespace(queue_depth=3, running=2, preemptions=1, vision_cache=SimpleNamespace(hits=4, misses=1))
    metrics = Metrics(MODEL)
    metrics.watch(scheduler)
    samples = {(s.name, s.labels.get("model_name")): s.value
               for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert samples[("vllm:num_requests_waiting", MODEL)] == 3
    assert samples[("vllm:num_requests_running", MODEL)] == 2
    assert samples[("vllm:num_preemptions_total", MODEL)] == 1
    assert samples[("vllm:mm_cache_hits_total", MODEL)] == 4
    assert samples[("vllm:mm_cache_queries_total", MODEL)] == 5
    scheduler.queue_depth, scheduler.vision_cache.hits = 0, 9
    del scheduler.running, scheduler.preemptions  # a scheduler that keeps no such counts: 0
    samples = {(s.name, s.labels.get("model_name")): s.value
               for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert samples[("vllm:num_requests_waiting", MODEL)] == 0
    assert samples[("vllm:num_requests_running", MODEL)] == 0
    assert samples[("vllm:num_preemptions_total", MODEL)] == 0
    assert samples[("vllm:mm_cache_hits_total", MODEL)] == 9


def test_latency_semantics():
    """TTFT = first token - arrival; TPOT = (end - first token) / (tokens - 1) of the longest choice, only past one
    token; e2e = end - arrival."""
    metrics = Metrics(MODEL)
    choice = SimpleNamespace
    metrics.observe_completed(10.0, 11.0, 13.0, 7, [choice(tokens=5, finish_reason="stop"),
                                                    choice(tokens=3, finish_reason="length")])
    metrics.observe_completed(20.0, 20.5, 20.5, 7, [choice(tokens=1, finish_reason="stop")])
    samples = {(s.name, s.labels.get("finished_reason")): s.value
               for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert samples[("vllm:time_to_first_token_seconds_sum", None)] == pytest.approx(1.5)
    assert samples[("vllm:request_time_per_output_token_seconds_count", None)] == 1
    assert samples[("vllm:request_time_per_output_token_seconds_sum", None)] == pytest.approx(0.5)
    assert samples[("vllm:e2e_request_latency_seconds_sum", None)] == pytest.approx(3.5)
    assert samples[("vllm:generation_tokens_total", None)] == 9
    assert samples[("vllm:prompt_tokens_total", None)] == 14
    assert samples[("vllm:request_success_total", "length")] == 1  # any choice cut short
    assert samples[("vllm:request_success_total", "stop")] == 1


def test_http_requests_are_counted_by_route_template_not_by_path(ckpt):
    with live(create_app(instructblip.load(ckpt), model_name=MODEL)) as base:
        for path in ("/v1/models/a", "/v1/models/b", "/no/such/path", "/another/one", "/health"):
            httpx.get(f"{base}{path}")
        samples = scrape(base)
    http = {dict(labels)["path"]: v for (name, labels), v in samples.items()
            if name == "instructblip_http_requests_total"}
    assert http == {"/v1/models/{name:path}": 2, "other": 2, "/health": 1}


# ---------------------------------------------------------------------------------------------------------------------
# request ids and the log line


def access_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "instructblip.serving.access"]


def fields(line: str) -> dict:
    return {k: json.loads(v) if v.startswith('"') else v for k, v in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)}


def test_request_ids_are_echoed_or_made_and_every_request_logs_one_line(ckpt, url, caplog):
    caplog.set_level(logging.INFO, logger="instructblip.serving.access")
    app = create_app(instructblip.load(ckpt), model_name=MODEL)
    app.get("/boom")(lambda: 1 / 0)  # an error no handler answers: Starlette's outermost layer does
    with live(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        r = client.post(CHAT, json=chat(url), headers={"X-Request-Id": "client-id.42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "client-id.42"
        usage = r.json()["usage"]
        assert r.json()["id"].startswith("chatcmpl-")
        made = [client.get("/health").headers["x-request-id"] for _ in range(2)]
        assert all(HEX_ID.fullmatch(m) for m in made) and made[0] != made[1]
        for bad in ("has space", "x" * 129, "caf\u00e9", ""):
            rid = client.get("/health", headers={"X-Request-Id": bad.encode("utf-8")}).headers["x-request-id"]
            assert HEX_ID.fullmatch(rid), bad
        # errors and streams carry it too
        r = client.post(CHAT, json=chat("data:image/png;base64,AAAA"), headers={"X-Request-Id": "bad-one"})
        assert r.status_code == 400 and r.headers["x-request-id"] == "bad-one"
        assert HEX_ID.fullmatch(client.get("/v1/nothing").headers["x-request-id"])
        r = client.get("/boom", headers={"X-Request-Id": "boom-1"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "boom-1"
        with client.stream("POST", CHAT, json=chat(url, stream=True), headers={"X-Request-Id": "stream-1"}) as r:
            assert r.headers["x-request-id"] == "stream-1"
            text = "".join(r.iter_text())
        assert text.endswith("data: [DONE]\n\n")

    lines = {f["request_id"]: f for f in map(fields, access_lines(caplog))}
    assert len(access_lines(caplog)) == len(lines) == 11  # every request one line, whatever its outcome
    ok = lines["client-id.42"]
    assert set(ok) == {"request_id", "method", "path", "status", "prompt_tokens", "generation_tokens", "ttft_s",
                       "finish_reason", "e2e_s"}
    assert (ok["method"], ok["path"], ok["status"], ok["finish_reason"]) == ("POST", CHAT, "200", "length")
    assert (int(ok["prompt_tokens"]), int(ok["generation_tokens"])) == (usage["prompt_tokens"], 4)
    assert 0 < float(ok["ttft_s"]) <= float(ok["e2e_s"])
    assert lines[made[0]]["path"] == "/health" and "prompt_tokens" not in lines[made[0]]
    assert (lines["bad-one"]["status"], lines["bad-one"]["error"]) == ("400", "invalid_image")
    assert lines["boom-1"]["status"] == "500"
    streamed = lines["stream-1"]  # written when the stream ended
    assert (streamed["status"], streamed["generation_tokens"], streamed["finish_reason"]) == ("200", "4", "length")


def test_json_log_lines(ckpt, url, caplog):
    caplog.set_level(logging.INFO, logger="instructblip.serving.access")
    with live(create_app(instructblip.load(ckpt), model_name=MODEL, log_format="json")) as base:
        r = httpx.post(f"{base}{CHAT}", json=chat(url, n=2, temperature=0.7, seed=1), timeout=60,
                       headers={"X-Request-Id": "json-1"})
        assert r.status_code == 200
    line = json.loads(next(m for m in access_lines(caplog) if "json-1" in m))
    assert line["request_id"] == "json-1" and line["status"] == 200 and line["method"] == "POST"
    assert line["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert line["generation_tokens"] == r.json()["usage"]["completion_tokens"] == 8
    assert line["finish_reason"] == "length,length"  # one per choice
    assert isinstance(line["ttft_s"], float) and isinstance(line["e2e_s"], float)


def test_log_format_flag_and_text_quoting():
    assert serve_config(serve_parser().parse_args(["--log-format", "json"])).log_format == "json"
    assert serve_config(serve_parser().parse_args([])).log_format == "text"
    with pytest.raises(ValueError, match="log_format"):
        line_format("xml")
    # values a reader could mistake for more fields are quoted as JSON strings
    assert text_line({"path": '/a b"c=d\n', "status": 404}) == 'path="/a b\\"c=d\\n" status=404'
    assert request_id("abc-DEF_1.2:3") == "abc-DEF_1.2:3" and HEX_ID.fullmatch(request_id("a\nb"))
