"""`instructblip serve` under input and clients that broke it: each case gets a 4xx in OpenAI's error shape (or a
correct answer) and the server stays healthy; idle and half-sent connections do not lock other clients out; the
command's own errors (port, host, model) are one line and exit status 2, before the model loads."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from test_server import MODEL, body, data_url, live
from tiny_checkpoint import make_full_checkpoint

import instructblip
from instructblip.serving.app import create_app
from instructblip.serving.connections import HTTPProtocol


@contextlib.contextmanager
def running(app, max_connections: int = 512, header_timeout: float = 10.0):
    """`app` under uvicorn with the server's HTTP protocol (connection cap, header timeout), in a thread on a free
    loopback port; yields the port."""
    with live(app, http=HTTPProtocol.factory(max_connections, header_timeout)) as base:
        yield int(base.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_full_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def vlm(ckpt):
    return instructblip.load(ckpt)


@pytest.fixture(scope="module")
def image():
    return data_url(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def client(vlm):
    app = create_app(vlm, model_name=MODEL, max_tokens_limit=8, default_max_tokens=4, num_beams=2, batch_wait=0.001)
    with running(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        yield c


def post(client: httpx.Client, raw: bytes | dict) -> httpx.Response:
    content = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    return client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})


def assert_error(r: httpx.Response, status: int, param: str | None = None, word: str = "") -> dict:
    """`r` is an error in OpenAI's shape with this status (and `param`, and `word` in its message)."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["param"] == param and word.lower() in error["message"].lower(), error
    return error


def assert_healthy(client: httpx.Client) -> None:
    assert client.get("/health").json()["status"] == "ok"


def with_field(raw: dict, name: str, literal: str) -> bytes:
    """`raw` as JSON with one more field written as `literal` (NaN, Infinity, 1e999: what json.dumps will not)."""
    return json.dumps(raw).encode()[:-1] + f', "{name}": {literal}}}'.encode()


# ---------------------------------------------------------------------------------------------------------------------
# hostile bodies


def test_json_nested_a_thousand_deep_is_a_400(client, image):
    for where in ("messages", "tools", "unknown_field"):
        raw = json.dumps(body(image)).encode()[:-1] + f', "{where}": {"[" * 1000}{"]" * 1000}}}'.encode()
        error = assert_error(post(client, raw), 400, word="nested too deeply")
        assert error["code"] == "invalid_json"
    assert_error(post(client, b"[" * 100_000 + b"]" * 100_000), 400, word="nested too deeply")
    assert_healthy(client)


def test_a_lone_surrogate_is_a_400_naming_the_field_and_a_pair_is_served(client, image):
    cases = {
        "messages.0.content.0.text": body(image, "what is \ud800 this?"),
        "messages.0.content": {"model": MODEL, "messages": [{"role": "user", "content": "\udfff"}]},
        "stop.0": body(image, stop=["\udc00"]),
        "model": {**body(image), "model": "tiny\ud83d"},
    }
    for param, raw in cases.items():
        encoded = json.dumps(raw).encode()  # ensure_ascii: the surrogate travels as a \ud800 escape
        error = assert_error(post(client, encoded), 400, param=param, word="surrogate")
        assert error["code"] == "invalid_unicode"
    key = json.dumps({**body(image), "x\ud800": 1}).encode()
    assert_error(post(client, key), 400, param="x\\ud800", word="surrogate")
    # the same code point written as raw UTF-8 bytes is not UTF-8 at all
    raw_bytes = json.dumps(body(image, "X")).encode().replace(b'"X"', b'"\xed\xa0\x80"')
    assert_error(post(client, raw_bytes), 400, word="utf-8")
    # a complete pair is a character like any other
    r = post(client, body(image, "what is \U0001f600?", max_tokens=2, temperature=0))
    assert r.status_code == 200, r.text
    assert_healthy(client)


def test_a_seed_beyond_int64_or_negative_is_a_400_naming_seed(client, image):
    for seed in (2**63, 2**70, 10**300, -1, -(2**63)):
        assert_error(post(client, body(image, temperature=1.0, seed=seed, max_tokens=2)), 400, param="seed")
    r = post(client, body(image, temperature=1.0, seed=2**63 - 1, max_tokens=2))
    assert r.status_code == 200, r.text
    assert_error(post(client, with_field(body(image, temperature=1.0), "seed", "9" * 5000)), 400, word="4,300")
    assert_healthy(client)


def test_a_tiny_temperature_is_greedy_and_answers_like_temperature_0(client, image):
    def answer(**fields) -> list[str]:
        r = post(client, body(image, max_tokens=8, **fields))
        assert r.status_code == 200, r.text
        return [c["message"]["content"] for c in r.json()["choices"]]

    greedy = answer(temperature=0)
    for temperature in (1e-300, 5e-324, 1e-7, 9.9e-6):
        assert answer(temperature=temperature) == greedy, temperature
        assert answer(temperature=temperature, seed=3, top_p=0.5) == greedy, temperature
    assert answer(temperature=1e-300, n=2) == greedy * 2  # greedy n > 1: copies, as temperature 0
    assert_healthy(client)


def test_a_huge_length_penalty_is_a_400(client, image):
    for value in ("1e308", "-1e308", "1e999", "11", "-10.5"):
        assert_error(post(client, with_field(body(image, num_beams=2, n=2), "length_penalty", value)), 400,
                     param="length_penalty")
    r = post(client, body(image, num_beams=2, length_penalty=10.0, max_tokens=8))
    assert r.status_code == 200, r.text
    assert_healthy(client)


@pytest.mark.parametrize("field", ["length_penalty", "repetition_penalty", "temperature", "top_p",
                                   "presence_penalty", "unknown_field"])
def test_nan_and_infinity_are_a_400(client, image, field):
    for literal in ("NaN", "Infinity", "-Infinity"):
        error = assert_error(post(client, with_field(body(image, num_beams=2), field, literal)), 400,
                             word=f"{literal.lstrip('-')} is not a JSON number")
        assert error["code"] == "invalid_json"
    # a number that overflows to infinity is refused by the field's own check, which names it
    if field != "unknown_field":
        assert_error(post(client, with_field(body(image, num_beams=2), field, "-1e999")), 400, param=field)
    assert_healthy(client)


def test_repetition_penalty_out_of_its_range_is_a_400(client, image):
    for value in (1e308, 10.5, 0.0, -1.0):
        assert_error(post(client, body(image, repetition_penalty=value)), 400, param="repetition_penalty")
    r = post(client, body(image, repetition_penalty=10.0, max_tokens=4, temperature=0))
    assert r.status_code == 200, r.text
    assert_healthy(client)


# ---------------------------------------------------------------------------------------------------------------------
# slow and idle clients


def _closed_by_server(sock: socket.socket, within: float) -> bytes:
    """Everything the server sent on `sock` before closing it, which it must do within `within` seconds."""
    sock.settimeout(within)
    data = b""
    while True:
        chunk = sock.recv(65536)  # socket.timeout (a failure) if the server keeps it open
        if not chunk:
            return data
        data += chunk


def test_idle_and_half_sent_connections_do_not_lock_clients_out(vlm, image):
    """Twenty slowloris sockets on a server capped at 30 connections: /health and a chat completion are served at
    once; the server closes the idle sockets after the header timeout and the body-less one after the body timeout
    (408); a connection past the cap gets a 503 and is closed."""
    app = create_app(vlm, model_name=MODEL, max_tokens_limit=8, body_timeout=1.5, batch_wait=0.001)
    with running(app, max_connections=30, header_timeout=1.5) as port:
        def connect(data: bytes = b"") -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(data)
            return sock

        chat = json.dumps(body(image, max_tokens=4, temperature=0)).encode()
        idle = [connect() for _ in range(7)]
        partial = [connect(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty") for _ in range(7)]
        bodiless = [connect(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(chat), chat[:10])) for _ in range(6)]
        time.sleep(0.2)
        start = time.monotonic()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert_healthy(client)
            r = post(client, json.loads(chat))
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
        assert time.monotonic() - start < 5  # promptly, not after the timeouts
        # up to the cap the server takes connections; one past it is answered 503 (OpenAI's shape) and closed
        more = [connect() for _ in range(10)]
        time.sleep(0.2)
        extra = connect(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = _closed_by_server(extra, 5)
        assert reply.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in reply.lower(), reply[:300]
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"
        for sock in idle + partial + more:
            assert _closed_by_server(sock, 5) == b""
        for sock in bodiless:
            reply = _closed_by_server(sock, 5)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
            assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_timeout"
        assert time.monotonic() - start < 8
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert_healthy(client)
            assert post(client, json.loads(chat)).status_code == 200
        for sock in [*idle, *partial, *bodiless, *more, extra]:
            sock.close()


def test_requests_in_progress_are_capped_apart_from_connections(vlm, image):
    """Two chat requests waiting for their bodies fill a cap of 2: a third API request gets a 503 with Retry-After,
    /health is still served; once they time out, the API answers again."""
    app = create_app(vlm, model_name=MODEL, max_tokens_limit=8, max_running_requests=2, body_timeout=1.0)
    with running(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        stalled = []
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            stalled.append(sock)
        time.sleep(0.3)
        r = post(client, body(image, max_tokens=2))
        assert assert_error(r, 503)["code"] == "too_many_requests"
        assert r.headers["retry-after"] == "1"
        assert_error(client.get("/v1/models"), 503)
        assert_healthy(client)
        for sock in stalled:
            assert _closed_by_server(sock, 5).startswith(b"HTTP/1.1 408")
            sock.close()
        assert post(client, body(image, max_tokens=2, temperature=0)).status_code == 200


# ---------------------------------------------------------------------------------------------------------------------
# the command's own errors


@pytest.fixture(scope="module")
def serve_error_cases(ckpt, tmp_path_factory):
    """{name: (serve's arguments, words its one line must hold: the problem and the fix)}; a port is kept busy."""
    tmp = tmp_path_factory.mktemp("serve-errors")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    no_weights = tmp / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((ckpt / "config.json").read_text())
    truncated = tmp / "truncated"
    truncated.mkdir()
    for name in os.listdir(ckpt):
        if (ckpt / name).is_file():
            data = (ckpt / name).read_bytes()
            (truncated / name).write_bytes(data[:1000] if name.endswith(".safetensors") else data)
    bad_config = tmp / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{")
    model = ["--model", str(ckpt)]
    yield {
        "port too large": (["--port", "70000", *model], ["--port 70000", "out of range", "1 to 65535"]),
        "negative port": (["--port", "-1", *model], ["--port -1", "out of range", "1 to 65535"]),
        "port in use": (["--port", str(busy.getsockname()[1]), *model], ["already in use", "another --port"]),
        "host does not resolve": (["--host", "no-such-host.invalid", "--port", "0", *model],
                                  ["--host no-such-host.invalid", "does not resolve", "127.0.0.1"]),
        "model path missing": (["--port", "0", "--model", str(tmp / "missing")],
                               ["--model", "neither a local directory nor a hub id", "like"]),
        "model is a file": (["--port", "0", "--model", str(ckpt / "config.json")], ["is a file", "directory"]),
        "not a model directory": (["--port", "0", "--model", str(tmp)],
                                  ["not a model directory", "config.json", "pass --model"]),
        "unreadable config": (["--port", "0", "--model", str(bad_config)], ["not valid JSON", "pass --model"]),
        "no weights": (["--port", "0", "--model", str(no_weights)], ["has no weights", "pass --model"]),
        "truncated weights": (["--port", "0", "--model", str(truncated)], ["safetensors", "re-download"]),
    }
    busy.close()


def _one_line(name: str, err: str, words: list[str]) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("instructblip serve: error: "), (name, err[-2000:])
    for word in words:
        assert word in lines[0], (name, word, lines[0])


def test_serve_errors_are_one_line_and_status_2_before_the_model_loads(serve_error_cases, capsys, monkeypatch):
    """Every case, through `main` in this process: loading the model would fail the test."""
    from instructblip import api, cli

    monkeypatch.delenv("INSTRUCTBLIP_DEBUG", raising=False)
    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    for name, (args, words) in serve_error_cases.items():
        assert cli.main(["serve", *args]) == 2, name
        out, err = capsys.readouterr()
        assert not out, name
        _one_line(name, err, words)


def test_the_serve_command_reports_them_at_once(serve_error_cases):
    """Three of them through `python -m instructblip serve`, at once: status 2, one line, no traceback, quick."""
    env = {**{k: v for k, v in os.environ.items() if k != "INSTRUCTBLIP_DEBUG"}, "PYTHONWARNINGS": "ignore",
           "HF_HUB_OFFLINE": "1"}
    names = ("port too large", "port in use", "model path missing")
    start = time.monotonic()
    procs = {name: subprocess.Popen([sys.executable, "-m", "instructblip", "serve", *serve_error_cases[name][0]],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in names}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 2 and not out, (name, proc.returncode, err[-2000:])
            _one_line(name, err, serve_error_cases[name][1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert time.monotonic() - start < 30  # interpreter and torch start-up only
