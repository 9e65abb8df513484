"""The server's metrics in the Prometheus text format, with no dependency: requests by path and status, chat
latency, batch sizes, queue depth, tokens, vision-cache hits; and the middleware that counts requests."""

from __future__ import annotations

import threading
import time


class _Histogram:
    """A Prometheus histogram: cumulative counts per upper bound, the sum and the count of what was observed."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts,
                                                                                   strict=True)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{braces} {_num(self.sum)}", f"{name}_count{braces} {self.count}"]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Metrics:
    """The server's counters, rendered as Prometheus text by `render` (GET /metrics)."""

    LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
    PATHS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.batch_size = _Histogram(self.BATCH_BUCKETS)
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        path = path if path in self.PATHS else "other"
        with self._lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            if path == "/v1/chat/completions":
                self.latency.setdefault(str(status), _Histogram(self.LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self.batch_size.observe(size)

    def add_tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def render(self, queue_depth: int, cache) -> str:
        with self._lock:
            out = ["# HELP instructblip_requests_total HTTP requests answered, by path and status.",
                   "# TYPE instructblip_requests_total counter"]
            for (path, status), count in sorted(self.requests.items()):
                out.append(f'instructblip_requests_total{{path="{path}",status="{status}"}} {count}')
            out += ["# HELP instructblip_request_duration_seconds Chat completion latency (arrival to last byte).",
                    "# TYPE instructblip_request_duration_seconds histogram"]
            for status, hist in sorted(self.latency.items()):
                out += hist.lines("instructblip_request_duration_seconds", f'status="{status}"')
            out += ["# HELP instructblip_batch_size Requests per batch run by the worker.",
                    "# TYPE instructblip_batch_size histogram", *self.batch_size.lines("instructblip_batch_size")]
            out += ["# HELP instructblip_queue_depth Requests waiting for the worker.",
                    "# TYPE instructblip_queue_depth gauge", f"instructblip_queue_depth {queue_depth}"]
            out += ["# HELP instructblip_prompt_tokens_total Prompt tokens of completed requests.",
                    "# TYPE instructblip_prompt_tokens_total counter",
                    f"instructblip_prompt_tokens_total {self.prompt_tokens}",
                    "# HELP instructblip_completion_tokens_total Tokens generated for completed requests.",
                    "# TYPE instructblip_completion_tokens_total counter",
                    f"instructblip_completion_tokens_total {self.completion_tokens}"]
        hits, misses = (cache.hits, cache.misses) if cache is not None else (0, 0)
        out += ["# HELP instructblip_vision_cache_hits_total Images whose vision features came from the cache.",
                "# TYPE instructblip_vision_cache_hits_total counter", f"instructblip_vision_cache_hits_total {hits}",
                "# HELP instructblip_vision_cache_misses_total Images run through the vision encoder.",
                "# TYPE instructblip_vision_cache_misses_total counter",
                f"instructblip_vision_cache_misses_total {misses}"]
        return "\n".join(out) + "\n"


class MetricsMiddleware:
    """Counts every HTTP request by path and status, and times chat completions to their last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.monotonic(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(scope.get("path", ""), status, time.monotonic() - start)
