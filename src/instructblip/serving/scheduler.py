"""The batching worker behind `instructblip serve`: one thread owns the model, requests wait in a bounded queue and
run in batches.

One round of the worker:
1. gather: wait for a request, then up to `batch_wait` seconds for more, at most `max_batch_size` requests;
   requests whose client went away or whose deadline passed while they waited are dropped.
2. encode every image of the round at once (vision encoder + Q-Former; the vision cache, keyed by pixel
   content, skips images it has seen recently).
3. decode:
   - greedy and sampled requests run together on `generation.Decoding`, the token iterator `generate` runs on:
     every row has its own settings (a `GenerationConfig`: lengths, sampling, penalties, seed, stop strings) and
     stops on its own (eos, max_tokens, a stop string, its client gone, its deadline); a finished request's rows
     leave the batch (the KV cache is compacted), so a long answer does not make the short ones wait. Sampling with
     `n` > 1 gives n rows; greedy `n` > 1 decodes one row and returns n copies.
   - beam-search requests go through `generation.generate`, one call per group of identical settings (beam search
     keeps a single length limit per call), after the sampled ones. Stop strings cut the finished text; a client that
     goes away is noticed between groups, not inside a search.
4. results go back through each request's `emit` callback (called from this thread) as lists of events:
   `TextDelta` / `ChoiceEnd` while streaming, then `Completed`, or `Failed`.

Since the loop and the logits processing are `generation`'s, a request decoded here gives the tokens
`generation.generate` gives for it alone.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from instructblip.generation.config import GenerationConfig, default_eos_ids, settle
from instructblip.generation.decode import Decoding, generate, prepare_prompt
from instructblip.generation.detokenize import first_stop
from instructblip.generation.features import VisionCache, image_features

log = logging.getLogger("instructblip.serving.app")


# ---------------------------------------------------------------------------------------------------------------------
# what a request asks for, and what comes back


@dataclass
class TextDelta:
    index: int  # choice index
    text: str


@dataclass
class ChoiceEnd:
    index: int
    finish_reason: str  # "stop" (eos or a stop string) or "length"


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str
    tokens: int  # tokens the model produced for this choice (eos included, the tokens of a stop string too)


@dataclass
class Completed:
    choices: list[Choice]


@dataclass
class Failed:
    status: int  # the HTTP status the server answers with
    message: str
    code: str


Event = TextDelta | ChoiceEnd | Completed | Failed


@dataclass
class Job:
    """One chat completion as the worker sees it. `emit` is called from the worker thread with a list of events."""

    pixel_values: Tensor  # (3, H, W) float32, preprocessed
    qformer_input_ids: list[int]  # the instruction in the Q-Former's vocabulary, special tokens included
    input_ids: list[int]  # the language model's prompt: the `<image>` ids (if any), then the text ids
    image_tokens: int  # how many leading ids of `input_ids` are `<image>` ids (kept in front when padding)
    params: GenerationConfig  # validated; lengths in new tokens
    emit: Callable[[list[Event]], None]
    n: int = 1  # choices: sampled rows, the n best beams, or copies of one greedy row
    stream: bool = False
    deadline: float = float("inf")  # time.monotonic() after which the request has timed out
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # Completed or Failed was emitted
    emitted_text: bool = False  # some streamed text went out (the job cannot be run again after a failure)
    # time.monotonic() stamps the worker sets, for metrics and the request log
    first_token_at: float | None = None  # the first generated token of any choice
    finished_at: float | None = None  # Completed or Failed was emitted

    def send(self, events: list[Event]) -> None:
        if self.finished or not events:
            return
        if any(isinstance(e, (Completed, Failed)) for e in events):
            self.finished = True
            self.finished_at = time.monotonic()
        if any(isinstance(e, TextDelta) for e in events):
            self.emitted_text = True
        try:
            self.emit(events)
        except Exception:  # the receiving side is gone (event loop closed): nothing left to tell
            log.debug("could not deliver events", exc_info=True)

    def fail(self, status: int, message: str, code: str) -> None:
        self.send([Failed(status, message, code)])

    def expired(self) -> bool:
        return time.monotonic() > self.deadline


class QueueFull(Exception):
    """The queue holds `max_queue` requests already."""


class ShuttingDown(Exception):
    """The scheduler is stopping and takes no new requests."""


# ---------------------------------------------------------------------------------------------------------------------
# the worker


class Scheduler:
    """Runs `Job`s on `model` in one worker thread, in batches. `start()` it, `submit()` jobs, `stop()` it.

    Args:
        model: an `InstructBlipForConditionalGeneration` in eval mode.
        processor: the `InstructBlipProcessor` whose tokenizers built the jobs' ids (pad ids and sides, decoding).
        max_batch_size: most requests run together.
        max_queue: most requests waiting; `submit` raises `QueueFull` beyond.
        batch_wait: seconds to wait for more requests once one has arrived (0: take what is there).
        on_batch: called with the number of requests of every batch run (metrics).
        vision_cache: vision-encoder outputs kept across requests (`generation.features.VisionCache`), or None.
    """

    def __init__(self, model, processor, max_batch_size: int = 16, max_queue: int = 64, batch_wait: float = 0.005,
                 on_batch: Callable[[int], None] | None = None, vision_cache: VisionCache | None = None):
        if max_batch_size < 1 or max_queue < 1 or batch_wait < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and batch_wait >= 0")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self.on_batch = on_batch
        self.vision_cache = vision_cache
        self.eos = default_eos_ids(model.config)
        text = model.config.text_config
        self.llm_pad = _pad_id(self.tokenizer, text.pad_token_id, self.eos)
        self.qformer_pad = _pad_id(processor.qformer_tokenizer, None, [0])
        self.batches = 0
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="instructblip-worker", daemon=True)

    # ---- the outside ----

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Fail the waiting jobs (503), stop the running ones at their next step, and end the thread."""
        with self._cond:
            self._stopping = True
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in waiting:
            job.fail(503, "the server is shutting down", "shutting_down")
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDown()
            if len(self._queue) >= self.max_queue:
                raise QueueFull()
            self._queue.append(job)
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    # ---- the thread ----

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                jobs = self._gather()
                if jobs is None:
                    return
                if jobs:
                    self._run_batch(jobs)

    def _gather(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            until = time.monotonic() + self.batch_wait
            while len(self._queue) < self.max_batch_size and not self._stopping:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            jobs = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
        return [job for job in jobs if self._still_wanted(job)]

    def _still_wanted(self, job: Job) -> bool:
        if job.cancelled.is_set() or job.finished:
            return False
        if job.expired():
            job.fail(504, "the request timed out", "timeout")
            return False
        return True

    def _run_batch(self, jobs: list[Job]) -> None:
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(len(jobs))
        try:
            self._execute(jobs)
        except Exception:
            log.exception("a batch of %d requests failed", len(jobs))
            # isolate the request that breaks the batch: run the others again, one at a time
            for job in jobs:
                if job.finished:
                    continue
                if len(jobs) == 1 or job.emitted_text:
                    job.fail(500, "the model failed on this request", "internal_error")
                    continue
                try:
                    self._execute([job])
                except Exception:
                    log.exception("a request failed on its own")
                    job.fail(500, "the model failed on this request", "internal_error")
        for job in jobs:  # a job the worker dropped without a word (it should not happen): tell its client
            if not job.finished and not job.cancelled.is_set():
                job.fail(500, "the request ended without a result", "internal_error")

    def _execute(self, jobs: list[Job]) -> None:
        features = self._encode(jobs)  # (B, Q, D)
        sampled = [i for i, job in enumerate(jobs) if not job.params.beam]
        if sampled:
            self._decode([jobs[i] for i in sampled], features[sampled])
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            if job.params.beam:
                groups.setdefault(_beam_group(job), []).append(i)
        for members in groups.values():
            live = [i for i in members if self._still_wanted(jobs[i])]
            if live:
                self._beam_search([jobs[i] for i in live], features[live])

    # ---- steps ----

    def _encode(self, jobs: list[Job]) -> Tensor:
        model = self.model
        pixels = torch.stack([job.pixel_values for job in jobs]).to(model.device, model.dtype)
        side = self.processor.qformer_tokenizer.padding_side
        ids, mask = pad([job.qformer_input_ids for job in jobs], self.qformer_pad, side, model.device)
        return image_features(model, pixels, ids, mask, cache=self.vision_cache)

    def _prompt(self, jobs: list[Job], features: Tensor):
        ids, mask = pad_prompts(jobs, self.llm_pad, self.tokenizer.padding_side, features.device)
        return prepare_prompt(self.model, image_features=features, input_ids=ids, attention_mask=mask)

    def _decode(self, jobs: list[Job], features: Tensor) -> None:
        """Greedy and sampled requests together on `generation.Decoding`; see the module docstring."""
        prompt = self._prompt(jobs, features)
        L, device = prompt.attention_mask.shape[1], features.device
        settings, copies, rows = [], [], []
        for job in jobs:
            p, n = job.params, job.n
            seed = p.seed
            if p.do_sample and seed is None:
                seed = random.SystemRandom().getrandbits(63)
            config = replace(p, seed=seed, eos_token_id=self.eos, pad_token_id=self.llm_pad)
            settings.append(settle(config, self.model.config, L, device))
            copies.append(n if p.do_sample else 1)
            rows += [_Row(self, job, [c]) for c in range(n)] if p.do_sample else [_Row(self, job, list(range(n)))]
        live_text = [job.stream or bool(job.params.stop_strings) for job in jobs]
        run = Decoding(self.model, prompt, settings, copies, tokenizer=self.tokenizer, detokenize=live_text)
        rows_of = {id(job): [row for row in rows if row.job is job] for job in jobs}
        for tokens in run:
            for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
                row.step(token, run.reason[i], run.text[i], run.count[i])
            self._check_jobs(rows)
            self._deliver(rows, rows_of)
            # a job's rows leave the batch together, once all are done: its sampled rows share one generator, whose
            # draws depend on how many rows it samples (so the answers stay those of the request alone)
            keep = [i for i, row in enumerate(rows) if not all(r.done for r in rows_of[id(row.job)])]
            if not keep:
                break
            if len(keep) < len(rows):
                run.keep(keep)
                rows = [rows[i] for i in keep]

    def _check_jobs(self, rows: list[_Row]) -> None:
        """Stop the rows of jobs that were cancelled, timed out, or that a shutdown interrupts."""
        for row in rows:
            job = row.job
            if row.done:
                continue
            if self._stopping:
                job.fail(503, "the server is shutting down", "shutting_down")
            elif job.expired() and not job.finished:
                job.fail(504, "the request timed out", "timeout")
            if job.cancelled.is_set() or job.finished:
                row.done = True

    @staticmethod
    def _deliver(rows: list[_Row], rows_of: dict[int, list[_Row]]) -> None:
        """Send each job the events of this step, with `Completed` once all of its rows are done."""
        by_job: dict[int, tuple[Job, list[Event]]] = {}
        for row in rows:
            job, events = by_job.setdefault(id(row.job), (row.job, []))
            events.extend(row.pending)
            row.pending = []
        for job_id, (job, events) in by_job.items():
            mine = rows_of[job_id]
            if all(r.done for r in mine) and not job.finished and not job.cancelled.is_set():
                choices = [Choice(i, r.text, r.finish_reason, r.count) for r in mine for i in r.indices]
                events.append(Completed(sorted(choices, key=lambda c: c.index)))
            job.send(events)

    def _beam_search(self, jobs: list[Job], features: Tensor) -> None:
        p, n = jobs[0].params, jobs[0].n  # the group shares every setting but the stop strings
        ids, mask = pad_prompts(jobs, self.llm_pad, self.tokenizer.padding_side, features.device)
        seed = p.seed
        if p.do_sample and seed is None:
            seed = random.SystemRandom().getrandbits(63)
        config = replace(p, num_return_sequences=n, stop_strings=(), seed=seed, eos_token_id=self.eos)
        out = generate(self.model, image_features=features, input_ids=ids, attention_mask=mask,
                       generation_config=config)
        now = time.monotonic()
        for job in jobs:  # a beam search's tokens are final only once the search is done
            job.first_token_at = job.first_token_at or now
        eos = set(self.eos)
        for b, job in enumerate(jobs):
            if job.cancelled.is_set() or job.finished:
                continue
            choices = []
            for c in range(n):
                row = out[b * n + c].tolist()
                end = next((i for i, token in enumerate(row) if token in eos), None)
                ids_ = row if end is None else row[:end]
                text, cut = self.decode(ids_), None
                if job.params.stop_strings:
                    cut = first_stop(text, job.params.stop_strings)
                if cut is not None:
                    tokens = _tokens_until(self, ids_, job.params.stop_strings)
                    choices.append(Choice(c, text[:cut], "stop", tokens))
                elif end is not None:
                    choices.append(Choice(c, text, "stop", end + 1))
                else:
                    choices.append(Choice(c, text, "length", len(row)))
            job.send([Completed(choices)])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).lstrip()  # as Detokenizer.text


class _Row:
    """One decoded sequence of a job (greedy `n` > 1: one row serves every choice index)."""

    def __init__(self, scheduler: Scheduler, job: Job, indices: list[int]):
        self.scheduler = scheduler
        self.job = job
        self.indices = indices
        self.ids: list[int] = []  # generated tokens, eos excluded
        self.count = 0  # tokens generated, eos included
        self.text = ""
        self.done = False
        self.finish_reason = "stop"
        self.pending: list[Event] = []  # events of this step, collected by `Scheduler._deliver`
        self._text = None  # the run's `Detokenizer` of this row, when its text is kept up to date

    def step(self, token: int, reason: str | None, text, count: int) -> None:
        """This step's token, with the run's verdict on the row (None: still running), its detokenizer and the
        tokens it generated so far."""
        if self.done:
            return
        if self.job.first_token_at is None:
            self.job.first_token_at = time.monotonic()
        self._text = text
        self.count = count
        if token not in self.scheduler.eos:
            self.ids.append(token)
        if reason is not None:
            self._finish(reason)
        elif self.job.stream and text is not None:
            self._send(text.delta())

    def _finish(self, reason: str) -> None:
        self.done = True
        self.finish_reason = reason
        if self._text is not None:
            self.text = self._text.text
        else:
            self.text = self.scheduler.decode(self.ids)
        if self.job.stream:
            self._send(self._text.delta(final=True) if self._text is not None else self.text)
            self.pending += [ChoiceEnd(i, reason) for i in self.indices]

    def _send(self, delta: str) -> None:
        if delta:
            self.pending += [TextDelta(i, delta) for i in self.indices]


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _beam_group(job: Job) -> tuple:
    """Beam-search requests run together only with identical settings (stop strings are applied afterwards; a seed
    matters only when sampling)."""
    p = job.params
    return (replace(p, stop_strings=(), seed=p.seed if p.do_sample else None), job.n)


def pad(rows: list[list[int]], pad_id: int, side: str, device) -> tuple[Tensor, Tensor]:
    """Id lists -> (ids, mask) (B, L) padded on `side`."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(L - len(r), L) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def pad_prompts(jobs: list[Job], pad_id: int, side: str, device) -> tuple[Tensor, Tensor]:
    """The language-model prompts padded as `InstructBlipProcessor` pads a batch: the text ids are padded, then the
    `<image>` ids go in front of every row."""
    texts = [job.input_ids[job.image_tokens:] for job in jobs]
    ids, mask = pad(texts, pad_id, side, "cpu")
    images = [job.input_ids[: job.image_tokens] for job in jobs]
    if any(images):
        if len({len(i) for i in images}) != 1:
            raise ValueError("every prompt of a batch must hold the same number of image tokens")
        ids = torch.cat([torch.tensor(images, dtype=torch.long), ids], 1)
        mask = torch.cat([torch.ones(len(jobs), len(images[0]), dtype=torch.long), mask], 1)
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer, configured: int | None, fallback: list[int]) -> int:
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = configured
    if pad_id is None:
        pad_id = fallback[0] if fallback else 0
    return int(pad_id)


def _tokens_until(scheduler: Scheduler, ids: list[int], stops: Sequence[str]) -> int:
    """How many tokens it takes for a stop string to appear in the decoded text."""
    for k in range(1, len(ids) + 1):
        if first_stop(scheduler.decode(ids[:k]), stops) is not None:
            return k
    return len(ids)
