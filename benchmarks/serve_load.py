"""Load test of `instructblip serve`: throughput and latency at several concurrencies, batching server against a
one-request-at-a-time server (`--max-batch-size 1`) on the same weights.

    python benchmarks/serve_load.py [--model DIR] [--concurrency 1 4 16] [--requests-per-client 3]
                                    [--max-tokens 32] [--dir /tmp/ib-serve-bench]

Without --model, a small random model is built (the "small" config of docs/performance.md: ViT 12L/384 on 224/14,
Q-Former 4L/384, LLaMA 4L/512 with a 32k vocabulary, 32 query tokens; the tokenizer files come from tests/assets.py).
Each server runs in its own process (`python -m instructblip serve`, vision cache off, so every request pays for its
image); the clients are asyncio + httpx in this process. Every request has its own random image and asks for exactly
--max-tokens greedy tokens (min_tokens = max_tokens), so both servers do the same work per request.
The two servers run side by side and take turns (each setting --repeats times, the fastest run reported), so that
both see the same load on a shared machine. Reported per (server, concurrency): requests/s, generated tokens/s, p50
and p99 latency, and the batching server's throughput over the baseline's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is in this image?", "Describe the picture.", "What colours do you see?",
             "Is there anything unusual here? Answer in detail."]


def build(directory: str) -> None:
    """A small random model with real tokenizers (LLaMA family)."""
    import torch

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from assets import make_checkpoint_dir

    from instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration

    os.makedirs(directory, exist_ok=True)
    make_checkpoint_dir(__import__("pathlib").Path(directory), "llama", num_query_tokens=32)
    config = InstructBlipConfig(
        vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                           image_size=224, patch_size=14),
        qformer_config=dict(vocab_size=30523, hidden_size=384, num_hidden_layers=4, num_attention_heads=6,
                            intermediate_size=1536, cross_attention_frequency=2),
        text_config=dict(model_type="llama", vocab_size=32064, hidden_size=512, intermediate_size=1376,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, bos_token_id=0,
                         eos_token_id=1, pad_token_id=32000, max_position_embeddings=2048),
        num_query_tokens=32, image_token_index=32001,
    )
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(directory)  # after the processor files: this config.json is the full one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch_size: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "instructblip", "serve", "--model", model, "--port", str(port),
           "--served-model-name", "bench", "--max-batch-size", str(max_batch_size), "--vision-cache-size", "0",
           "--max-queue", "256", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def images(n: int, seed: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        array = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, "JPEG", quality=90)
        out.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


async def load(base: str, concurrency: int, urls: list[str], max_tokens: int) -> tuple[list[float], float, int]:
    """`concurrency` clients send the requests one after the other; returns latencies, wall time, tokens."""
    import httpx

    todo = list(enumerate(urls))
    latencies: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while todo:
            i, url = todo.pop()
            body = {"model": "bench", "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTIONS[i % 4]},
                                                              {"type": "image_url", "image_url": {"url": url}}]}]}
            start = time.perf_counter()
            r = await http.post("/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - start)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
        return latencies, time.perf_counter() - start, tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a checkpoint directory (default: build a small random one)")
    parser.add_argument("--dir", default="/tmp/ib-serve-bench", help="where the random model is built")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many requests per run")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; the fastest is reported")
    args = parser.parse_args()
    model = args.model
    if model is None:
        model = args.dir
        if not os.path.isfile(os.path.join(model, "model.safetensors")):
            t = time.perf_counter()
            build(model)
            print(f"built a small random model in {model} ({time.perf_counter() - t:.0f} s)")
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{args.max_tokens} greedy tokens per request, one distinct image each, vision cache off\n")
    servers = {"one at a time": start_server(model, 1), "batching (16)": start_server(model, 16)}
    results: dict[tuple[str, int], list] = {}
    try:
        for _, base in servers.values():
            asyncio.run(load(base, 2, images(4, 999), args.max_tokens))  # warm-up
        seed = 0
        for c in args.concurrency:
            n = max(args.min_requests, c * args.requests_per_client)
            for _ in range(args.repeats):  # alternate the servers, so that both see the same machine load
                seed += 1
                urls = images(n, seed)
                for label, (_, base) in servers.items():
                    latencies, wall, tokens = asyncio.run(load(base, c, urls, args.max_tokens))
                    results.setdefault((label, c), []).append((n / wall, tokens / wall, latencies))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    rows = []
    for (label, c), runs in sorted(results.items(), key=lambda kv: (kv[0][0] != "one at a time", kv[0][1])):
        rps, tps, latencies = max(runs, key=lambda r: r[0])  # the least disturbed run
        rows.append((label, c, len(latencies), rps, tps, statistics.median(latencies), percentile(latencies, 99)))
    baseline = {c: rps for label, c, _, rps, *_ in rows if label == "one at a time"}
    print(f"| {'server':<14} | {'clients':>7} | {'requests':>8} | {'req/s':>6} | {'tokens/s':>8} | {'p50 s':>6} | "
          f"{'p99 s':>6} | {'vs one at a time':>16} |")
    print(f"|{'-' * 16}|{'-' * 9}|{'-' * 10}|{'-' * 8}|{'-' * 10}|{'-' * 8}|{'-' * 8}|{'-' * 18}|")
    for label, c, n, rps, tps, p50, p99 in rows:
        ratio = f"{rps / baseline[c]:.2f}x"
        print(f"| {label:<14} | {c:>7} | {n:>8} | {rps:>6.2f} | {tps:>8.1f} | {p50:>6.2f} | {p99:>6.2f} | "
              f"{ratio:>16} |")


if __name__ == "__main__":
    main()
