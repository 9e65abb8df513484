"""The server's Prometheus metrics (GET /metrics), on `prometheus_client`, named as vLLM names them where vLLM has the
metric, so that dashboards made for vLLM read them; the `model_name` label is the served model's id, as vLLM's.

Chat and text completions (observed when one ends; the latency histograms count completed requests only):
- `vllm:time_to_first_token_seconds`: arrival to the first generated token.
- `vllm:request_time_per_output_token_seconds`: (last token - first token) / (tokens - 1), one observation per request
  with more than one token (vLLM's per-request TPOT; its deprecated `vllm:time_per_output_token_seconds` is a
  per-token interval, which this server does not time). With n > 1 choices, tokens are the longest choice's. A beam
  search's tokens all arrive at its end: its TTFT is its whole search, its TPOT near 0.
- `vllm:e2e_request_latency_seconds`: arrival to the last token.
- `vllm:request_queue_time_seconds`: from entering the queue to the worker taking it (to join the running batch).
- `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`: the `usage` of completed requests.
- `vllm:request_success_total{finished_reason}`: `stop` or `length` (`length` when any choice ran out of tokens), and
  `abort` for a request whose client went away.
- `instructblip_requests_failed_total{code}`: accepted requests that ended in an error (`timeout`, `internal_error`,
  `shutting_down`), streamed ones included (their HTTP status is already 200).
- `instructblip_requests_rejected_total{reason}`: turned away before queueing (503: `queue_full`, `shutting_down`).

Read from the scheduler at scrape time: `vllm:num_requests_running`, `vllm:num_requests_waiting`,
`vllm:num_preemptions_total` (the scheduler's `preemptions` count if it keeps one, else 0), `vllm:mm_cache_hits_total`
and `vllm:mm_cache_queries_total` (the vision-feature cache: images looked up and found; misses = queries - hits).

Also `instructblip_http_requests_total{path,status}` (every HTTP request; `path` is the matched route's template, or
`other`, so that scanners cannot grow the label set) and `instructblip_batch_size` (requests per batch the worker runs).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# bucket bounds in seconds: from a tiny model on a GPU (milliseconds) to a large one on a CPU (minutes)
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
                160.0, 640.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0,
               960.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

CONTENT_TYPE = CONTENT_TYPE_LATEST  # the /metrics page's: the exposition format `generate_latest` writes


class Metrics:
    """One app's metrics in a registry of its own (not prometheus_client's global one: tests run many apps in one
    process, and two apps must not count into each other). `render()` is the /metrics page."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, model = self.registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.", model,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.tpot = Histogram("vllm:request_time_per_output_token_seconds",
                              "Time per output token of a request, after its first, in seconds.", model,
                              buckets=TPOT_BUCKETS, registry=r).labels(model_name)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Time requests spent waiting in the queue, in "
                                    "seconds.", model, buckets=E2E_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End to end request latency in seconds.", model,
                             buckets=E2E_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of completed requests.", model,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated for completed requests.", model,
                                         registry=r).labels(model_name)
        self.success = Counter("vllm:request_success", "Requests that ended, by finish reason (abort: the client went "
                               "away).", [*model, "finished_reason"], registry=r)
        self.failed = Counter("instructblip_requests_failed", "Accepted chat completions that ended in an error.",
                              [*model, "code"], registry=r)
        self.rejected = Counter("instructblip_requests_rejected", "Chat completions turned away before queueing (503).",
                                [*model, "reason"], registry=r)
        self.http = Counter("instructblip_http_requests", "HTTP requests answered, by route and status.",
                            ["path", "status"], registry=r)
        self.batch_size = Histogram("instructblip_batch_size", "Requests per batch the worker runs.",
                                    buckets=BATCH_BUCKETS, registry=r)
        # the series exist at 0 from the start, so that rate() and alerts see them before the first event
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)
        for code in ("timeout", "internal_error", "shutting_down"):
            self.failed.labels(model_name, code)
        for reason in ("queue_full", "shutting_down"):
            self.rejected.labels(model_name, reason)

    def watch(self, scheduler) -> None:
        """Read the scheduler's gauges and the vision cache's counts at every scrape."""
        self.registry.register(_SchedulerCollector(scheduler, self.model_name))

    # ---- what the server reports ----

    def observe_http(self, path: str, status: int) -> None:
        self.http.labels(path, str(status)).inc()

    def observe_batch(self, size: int) -> None:  # called from the worker thread (prometheus_client locks)
        self.batch_size.observe(size)

    def observe_rejected(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def observe_completed(self, arrived: float, first_token_at: float | None, finished_at: float | None,
                          prompt_tokens: int, choices: Sequence,
                          queued: tuple[float | None, float | None] = (None, None)) -> None:
        """A completed request: `arrived`, `first_token_at`, `finished_at` are time.monotonic() stamps (None where
        the worker set none); `choices` the `Completed` event's (`.tokens`, `.finish_reason`); `queued`: when it
        entered the queue and when the worker took it."""
        finished_at = time.monotonic() if finished_at is None else finished_at
        if None not in queued:
            self.queue_time.observe(queued[1] - queued[0])
        if first_token_at is not None:
            self.ttft.observe(first_token_at - arrived)
            steps = max(c.tokens for c in choices)  # n rows decode side by side: the longest sets the pace
            if steps > 1:
                self.tpot.observe((finished_at - first_token_at) / (steps - 1))
        self.e2e.observe(finished_at - arrived)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(sum(c.tokens for c in choices))
        reason = "length" if any(c.finish_reason == "length" for c in choices) else "stop"
        self.success.labels(self.model_name, reason).inc()

    def observe_unanswered(self, code: str) -> None:
        """An accepted chat completion that ended without an answer: `abort` (its client went away) or an error
        code."""
        if code == "abort":
            self.success.labels(self.model_name, "abort").inc()
        else:
            self.failed.labels(self.model_name, code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SchedulerCollector:
    """Values the scheduler and the vision cache already keep, read when scraped rather than copied as they change."""

    def __init__(self, scheduler, model_name: str):
        self.scheduler = scheduler
        self.model_name = model_name

    def collect(self):
        scheduler, labels = self.scheduler, [self.model_name]
        cache = scheduler.vision_cache
        hits, misses = (cache.hits, cache.misses) if cache is not None else (0, 0)
        for family, name, text, value in (
            (GaugeMetricFamily, "vllm:num_requests_running", "Requests being decoded.",
             getattr(scheduler, "running", 0)),  # a scheduler that does not count them: 0
            (GaugeMetricFamily, "vllm:num_requests_waiting", "Requests waiting for the worker.",
             scheduler.queue_depth),
            (CounterMetricFamily, "vllm:num_preemptions", "Requests preempted (put back to wait) by the scheduler.",
             getattr(scheduler, "preemptions", 0)),
            (CounterMetricFamily, "vllm:mm_cache_queries", "Images looked up in the vision-feature cache.",
             hits + misses),
            (CounterMetricFamily, "vllm:mm_cache_hits", "Images whose vision features came from the cache.", hits),
        ):
            metric = family(name, text, labels=["model_name"])
            metric.add_metric(labels, value)
            yield metric
