"""Load test of `instructblip serve`: continuous batching (this tree) against the round scheduler it replaced (the
same server at `--baseline-ref`, whose worker gathered a batch and decoded it to its last token before taking new
requests), same weights, same machine, taking turns.

    python benchmarks/serve_load.py [--models builtin random] [--clients 16 64] [--rate-per-client 0.5]
                                    [--requests-per-client 4] [--repeats 2] [--write benchmarks/RESULTS.md]

Load: open loop. Each of `--clients` clients sends requests at Poisson times (rate `--rate-per-client` each),
whether or not its earlier ones are answered, so a slow server meets the same arrivals as a fast one. Every request
has its own random image (the vision cache sees each once), one of four questions, and asks for exactly L greedy
tokens (min_tokens = max_tokens = L), L log-uniform in `--lengths` (8 to 256); it streams, so that the client sees
its first token. Measured per request from its scheduled arrival: time to first token (TTFT), time per output token
after it (TPOT), end to end (e2e). Throughput: requests and tokens per second from the first arrival to the last
answer. A lone request's TTFT (the continuous server, idle, the same kinds of requests one at a time) is the yardstick
for TTFT under load.

`--in-process N` also times the two schedulers without HTTP (N requests queued at once, in a process of its own on
either tree), to tell the scheduler's share from the server's.

Models: `builtin` is the easy-vqa model shipped in the package (the default of `serve`); `random` a larger random
model built here (ViT 12L/384 on 224/14, Q-Former 4L/384, LLaMA 4L/512 with a 32k vocabulary, 32 query tokens; the
tokenizer files from tests/assets.py). Both servers run with their defaults but for the queue, connection and
request caps raised to 4096 (nothing is turned away) and a vision cache of 0 (of 64 with `--image-pool`). The
continuous server's default batch is larger than the round scheduler's 16 (64 for these models); `--in-process` also
times the round scheduler at that batch size, so that the report shows what the batch size gives apart from the
scheduling.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is in this image?", "Describe the picture.", "What colours do you see?",
             "Is there anything unusual here? Answer in detail."]
BASELINE_REF = "38d24f6"  # the last commit with the round scheduler


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


def baseline_tree(ref: str, directory: str) -> str:
    """The `src` of commit `ref`, extracted under `directory` (what PYTHONPATH points the baseline server at)."""
    archive = subprocess.run(["git", "-C", REPO, "archive", ref, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)
    return os.path.join(directory, "src")


def start_server(model: str | None, source: str, extra: list[str], cache: int = 0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "instructblip", "serve", "--port", str(port), "--served-model-name", "bench",
           "--vision-cache-size", str(cache), "--max-queue", "4096", "--max-connections", "4096", "--max-tokens-limit",
           "1024", "--log-level", "warning", *extra]
    if model is not None:
        cmd += ["--model", model]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": source}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server ({source}) exited with status {proc.returncode}")
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


def workload(clients: int, per_client: int, rate: float, lengths: tuple[int, int], seed: int,
             stream_share: float = 1.0, pool: int = 0) -> list[dict]:
    """The requests of one run: arrival time (s from the start), answer length, image, question. `pool`: the images
    are drawn from this many (0: each request its own)."""
    rng = random.Random(seed)
    n = clients * per_client
    urls = images(n, seed) if not pool else [rng.choice(images(pool, seed)) for _ in range(n)]
    out = []
    for _client in range(clients):
        t = 0.0
        for _ in range(per_client):
            t += rng.expovariate(rate)
            length = round(math.exp(rng.uniform(math.log(lengths[0]), math.log(lengths[1]))))
            out.append({"at": t, "length": length, "url": urls[len(out)], "question": rng.choice(QUESTIONS),
                        "stream": rng.random() < stream_share})
    return sorted(out, key=lambda r: r["at"])


FIRST_TEXT = re.compile(rb'"(?:content|text)":"[^"]')  # a chunk with text (not the role chunk's empty content)
USAGE = re.compile(rb'"completion_tokens":(\d+)')


async def one(host: str, port: int, request: dict, start: float) -> dict:
    """Send one request at its arrival time; stream it; return its timings. A bare HTTP/1.1 client over asyncio
    streams that looks for two patterns in the bytes: the client shares the machine with the server, and parsing
    every chunk's JSON (httpx, the openai client) would take CPU from it."""
    arrival = start + request["at"]
    await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
    L = request["length"]
    stream = request["stream"]
    body = json.dumps({"model": "bench", "max_tokens": L, "min_tokens": L, "temperature": 0, "stream": stream,
                       **({"stream_options": {"include_usage": True}} if stream else {}),
                       "messages": [{"role": "user", "content": [
                           {"type": "text", "text": request["question"]},
                           {"type": "image_url", "image_url": {"url": request["url"]}}]}]}).encode()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise SystemExit(f"HTTP {status!r}: {(await reader.read(300))!r}")
    first, tail = None, b""
    while data := await reader.read(65536):
        window = tail + data
        if first is None and FIRST_TEXT.search(window):
            first = time.perf_counter()
        tail = window[-4096:]
    end = time.perf_counter()
    writer.close()
    tokens = int(USAGE.findall(tail)[-1])
    first = end if first is None or not stream else first
    return {"stream": stream, "ttft": first - arrival, "e2e": end - arrival, "end": end, "tokens": tokens,
            "tpot": (end - first) / (tokens - 1) if tokens > 1 else None}


async def run_load(base: str, requests: list[dict]) -> dict:
    host, port = base.removeprefix("http://").split(":")
    start = time.perf_counter()
    results = await asyncio.gather(*[one(host, int(port), r, start) for r in requests])
    wall = max(r["end"] for r in results) - (start + requests[0]["at"])
    tokens = sum(r["tokens"] for r in results)
    return {"results": results, "rps": len(results) / wall, "tps": tokens / wall, "wall": wall}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summary(run: dict) -> dict:
    rs = run["results"]
    streamed = [r for r in rs if r["stream"]] or rs  # TTFT and TPOT are seen by streaming clients only
    tpot = [r["tpot"] for r in streamed if r["tpot"] is not None]
    out = {"rps": run["rps"], "tps": run["tps"]}
    for name, values in (("ttft", [r["ttft"] for r in streamed]), ("tpot", tpot), ("e2e", [r["e2e"] for r in rs])):
        out[f"{name}50"], out[f"{name}99"] = percentile(values, 50), percentile(values, 99)
    return out


def machine() -> str:
    import torch

    with open("/proc/cpuinfo") as info:
        flags = info.read()
    isa = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags)
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, flags: {isa}; torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["builtin", "random"], choices=["builtin", "random"])
    parser.add_argument("--dir", default="/tmp/ib-serve-bench", help="where the random model is built")
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rate-per-client", type=float, default=0.5, help="requests per second per client")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs=2, default=[8, 256], help="answer lengths, log-uniform")
    parser.add_argument("--lone", type=int, default=6, help="lone requests for the TTFT yardstick")
    parser.add_argument("--image-pool", type=int, default=0,
                        help="draw the images from this many, vision cache on (0: every request its own, cache off)")
    parser.add_argument("--stream-share", type=float, default=1.0,
                        help="share of the requests that stream (the others ask for the whole answer)")
    parser.add_argument("--in-process", type=int, default=0, metavar="N",
                        help="also time the two schedulers without HTTP, N requests queued at once (0: not)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting, the servers taking turns")
    parser.add_argument("--rounds-batch", type=int, default=0, metavar="N",
                        help="also run the round scheduler with --max-batch-size N (0: not)")
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--write", default=None, help="add the report to this markdown file (RESULTS.md)")
    args = parser.parse_args()
    lines = [f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (`serve_load.py "
             f"{' '.join(sys.argv[1:])}`). Machine: {machine()}.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"continuous": os.path.join(REPO, "src"), "rounds": baseline_tree(args.baseline_ref, tmp)}
        for model_name in args.models:
            model = None
            if model_name == "random":
                model = args.dir
                if not os.path.isfile(os.path.join(model, "model.safetensors")):
                    build(model)
            lines += report(model_name, model, sources, args)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        sys.path.insert(0, os.path.join(REPO, "src"))
        from instructblip.files import write_text

        old = ""
        if os.path.exists(args.write):
            with open(args.write) as f:
                old = f.read()
        marker = "\n## "
        cut = old.find(marker)
        head, rest = (old[:cut], old[cut:]) if cut >= 0 else (old, "")
        write_text(args.write, head + f"\n## Serving under load (serve_load.py)\n\n{text}" + rest)


# The scheduler alone, without HTTP: every request queued at once, in a process of its own on either tree (the Job
# and Scheduler interfaces are the same in both), so that the server's per-request costs (HTTP, JSON, image decoding,
# the event loop's share of the interpreter) do not hide what the scheduling itself gains.
IN_PROCESS = """
import json, math, random, sys, threading, time
import numpy as np, torch, instructblip
from instructblip.serving.scheduler import Completed, Job, Scheduler
from instructblip.generation.config import GenerationConfig
model, n, low, high, seed, batch = json.loads(sys.argv[1])
vlm = instructblip.load(model)
if not batch:  # what `serve` runs with by default: the tree's automatic batch size where it has one
    try:
        from instructblip.serving.scheduler import default_batch_size
        batch = default_batch_size(vlm.model, 256)
    except ImportError:
        batch = 16
proc = vlm.processor
rng = np.random.default_rng(seed)
encoded = []
for _ in range(16):
    e = proc(images=[rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)], text=["What color is it?"],
             return_tensors=None)
    encoded.append((torch.from_numpy(e["pixel_values"][0]), e["qformer_input_ids"][0], e["input_ids"][0]))
r = random.Random(seed)
lengths = [round(math.exp(r.uniform(math.log(low), math.log(high)))) for _ in range(n)]
s = Scheduler(vlm.model, proc, vision_cache=None, max_queue=n + 1, max_batch_size=batch)
s.start()
done = threading.Semaphore(0)
def emit(events):
    for e in events:
        if isinstance(e, Completed):
            done.release()
image_tokens = proc.num_query_tokens if proc.insert_image_tokens else 0
start = time.perf_counter()
for i, length in enumerate(lengths):
    pv, q, ids = encoded[i % len(encoded)]
    s.submit(Job(pixel_values=pv, qformer_input_ids=q, input_ids=ids, image_tokens=image_tokens, emit=emit,
                 params=GenerationConfig(max_new_tokens=length, min_new_tokens=length)))
for _ in lengths:
    done.acquire()
wall = time.perf_counter() - start
s.stop()
print(json.dumps({"rps": n / wall, "tps": sum(lengths) / wall, "batch": batch}))
"""


def in_process(model: str | None, source: str, n: int, lengths: tuple[int, int], seed: int, batch: int = 0) -> dict:
    """`batch`: the scheduler's max_batch_size (0: `serve`'s default on that tree)."""
    env = {**os.environ, "PYTHONPATH": source}
    out = subprocess.run([sys.executable, "-c", IN_PROCESS, json.dumps([model, n, *lengths, seed, batch])], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def longest_answer(model: str | None, wanted: int) -> int:
    """`wanted`, or less where the model's context leaves less room after a prompt (64 positions kept for it)."""
    directory = model or os.path.join(REPO, "src", "instructblip", "default_model")
    with open(os.path.join(directory, "config.json")) as f:
        text = json.load(f)["text_config"]
    context = text.get("max_position_embeddings") if text.get("model_type") != "t5" else None
    return wanted if context is None else min(wanted, context - 64)


def report(model_name: str, model: str | None, sources: dict, args) -> list[str]:
    lengths = (args.lengths[0], longest_answer(model, args.lengths[1]))
    # the baseline had no cap on requests in progress (its connection cap, above, played that part)
    extra = {"continuous": ["--max-running-requests", "4096"], "rounds": []}
    cache = 64 if args.image_pool else 0  # a pool of images: the vision cache (serve's default size) finds them
    runs: dict[tuple[str, int], list[dict]] = {}
    offered: dict[int, list[float]] = {}
    alone: dict[str, list[dict]] = {}
    for repeat in range(args.repeats if args.in_process else 0):  # before the servers start: a quiet machine
        for label, source in sources.items():
            alone.setdefault(label, []).append(in_process(model, source, args.in_process, lengths, repeat))
        batch = alone["continuous"][-1]["batch"]
        if batch != alone["rounds"][-1]["batch"]:  # the round scheduler given the same batch size, for fairness
            alone.setdefault("rounds, same batch", []).append(
                in_process(model, sources["rounds"], args.in_process, lengths, repeat, batch))
    plan = {label: (source, extra[label]) for label, source in sources.items()}
    if args.rounds_batch:  # the round scheduler at a batch size of our choice, as a third server
        plan[f"rounds, batch {args.rounds_batch}"] = (sources["rounds"], ["--max-batch-size", str(args.rounds_batch)])
    servers = {label: start_server(model, source, more, cache) for label, (source, more) in plan.items()}
    try:
        for _, base in servers.values():  # warm-up
            asyncio.run(run_load(base, workload(2, 1, 50.0, (8, 16), seed=999)))
        lone = []
        for request in workload(1, args.lone, 1000.0, lengths, seed=1234):
            lone += asyncio.run(run_load(servers["continuous"][1], [{**request, "at": 0.0}]))["results"]
        seed = 0
        for clients in args.clients:
            for _ in range(args.repeats):
                seed += 1
                requests = workload(clients, args.requests_per_client, args.rate_per_client, lengths, seed,
                                    args.stream_share, args.image_pool)
                # the rate the requests arrived at (below the nominal clients x rate: the last arrival is the latest
                # of every client's)
                offered.setdefault(clients, []).append(len(requests) / (requests[-1]["at"] - requests[0]["at"]))
                for label, (_, base) in servers.items():  # taking turns: both see the same machine
                    runs.setdefault((label, clients), []).append(summary(asyncio.run(run_load(base, requests))))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    lone_ttft = percentile([r["ttft"] for r in lone], 50)
    out = [f"### {model_name} model", "",
           f"A lone request's TTFT (median of {len(lone)}): {lone_ttft * 1000:.0f} ms. "
           f"{args.requests_per_client} requests per client at {args.rate_per_client} per second each, answers of "
           f"{lengths[0]}-{lengths[1]} tokens; {args.repeats} runs per row (ranges).", "",
           "| server | clients | req/s | tokens/s | TTFT p50 / p99 s | TPOT p50 / p99 ms | e2e p50 / p99 s |",
           "|---|---|---|---|---|---|---|"]

    def span(values, scale=1.0, digits=2):
        lo, hi = min(values) * scale, max(values) * scale
        return f"{lo:.{digits}f}" if f"{lo:.{digits}f}" == f"{hi:.{digits}f}" else f"{lo:.{digits}f}-{hi:.{digits}f}"

    order = list(plan)
    for (label, clients), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0] != "rounds",
                                                                      order.index(kv[0][0]))):
        out.append(f"| {label} | {clients} | {span([r['rps'] for r in rs])} | {span([r['tps'] for r in rs], digits=0)}"
                   f" | {span([r['ttft50'] for r in rs])} / {span([r['ttft99'] for r in rs])}"
                   f" | {span([r['tpot50'] for r in rs], 1000, 1)} / {span([r['tpot99'] for r in rs], 1000, 1)}"
                   f" | {span([r['e2e50'] for r in rs])} / {span([r['e2e99'] for r in rs])} |")
    out.append("")
    for clients in args.clients:
        new, old = runs[("continuous", clients)], runs[("rounds", clients)]
        ratios = [a["rps"] / b["rps"] for a, b in zip(new, old, strict=True)]
        ttft = [r["ttft99"] / lone_ttft for r in new]
        # a round scheduler that keeps up with the arrivals serves the offered load: no throughput to gain
        saturated = any(r["rps"] < 0.8 * rate for r, rate in zip(old, offered[clients], strict=True))
        verdict = ("target 1.5x: " + ("PASS" if min(ratios) >= 1.5 else "FAIL") if saturated else
                   "under capacity: both serve the requests as they arrive; the 1.5x target is for saturation")
        out.append(f"- {clients} clients: throughput {span(ratios)}x the round scheduler's ({verdict}); "
                   f"p99 TTFT {span(ttft, digits=1)}x a lone request's "
                   f"(target 3x: {'PASS' if max(ttft) <= 3 else 'FAIL'})")
        if args.rounds_batch:
            same = runs[(f"rounds, batch {args.rounds_batch}", clients)]
            ratios = [a["rps"] / b["rps"] for a, b in zip(new, same, strict=True)]
            out.append(f"- {clients} clients: throughput {span(ratios)}x "
                       f"the round scheduler's at batch {args.rounds_batch}; its p99 TTFT "
                       f"{span([r['ttft99'] for r in same])} s")
    if alone:
        new, old = alone["continuous"], alone["rounds"]
        out.append(f"- The scheduler alone (no HTTP; {args.in_process} requests queued at once, 16 images, "
                   f"{args.repeats} runs each): continuous (batch {new[0]['batch']}) "
                   f"{span([r['rps'] for r in new], digits=1)} req/s "
                   f"({span([r['tps'] for r in new], digits=0)} tokens/s), rounds (batch {old[0]['batch']}) "
                   f"{span([r['rps'] for r in old], digits=1)} req/s "
                   f"({span([r['tps'] for r in old], digits=0)} tokens/s): "
                   f"{span([a['rps'] / b['rps'] for a, b in zip(new, old, strict=True)])}x")
        if "rounds, same batch" in alone:
            same = alone["rounds, same batch"]
            out.append(f"- The round scheduler alone at the same batch size ({same[0]['batch']}): "
                       f"{span([r['rps'] for r in same], digits=1)} req/s; continuous is "
                       f"{span([a['rps'] / b['rps'] for a, b in zip(new, same, strict=True)])}x that")
    return out + [""]


if __name__ == "__main__":
    main()
