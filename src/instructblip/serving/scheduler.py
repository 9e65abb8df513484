"""The continuous-batching worker behind `instructblip serve`: one thread owns the model; requests wait in a bounded
queue and join the running batch between decoding steps.

One iteration of the worker:
1. admit: while fewer than `max_batch_size` requests run, waiting requests are taken (requests whose client went
   away or whose deadline passed are dropped). Greedy and sampled ones form one admission group: their images are
   encoded at once (vision encoder + Q-Former; the vision cache, keyed by pixel content, skips images seen recently)
   and their prompts prefilled, `prefill_chunk` positions per iteration when long, so that the running rows wait
   at most one chunk per step. Beam-search requests start a search of their own in the beam lane (one search per
   group of identical settings: beam search keeps one length limit per call).
2. decode: one step of the running batch, `generation.Decoding`, the token iterator `generate` runs on. Every row
   has its own settings (a `GenerationConfig`: lengths, sampling, penalties, seed, stop strings) and step count,
   and stops on its own (eos, max_tokens, a stop string, its client gone, its deadline). A request whose rows are
   all done is answered at once; its rows leave the batch when the next admission group joins it
   (`Decoding.admit`, one copy of the KV cache for both) or once half the batch has ended. Sampling with `n` > 1
   gives n rows; greedy `n` > 1 decodes one row and returns n copies.
3. one step of every beam search in the lane, so that a long search does not hold up the sampled and greedy rows
   (nor they it).
4. results go back through each request's `emit` callback (called from this thread) as lists of events:
   `TextDelta` / `ChoiceEnd` while streaming, then `Completed`, or `Failed`.

Since the loop and the logits processing are `generation`'s, a request decoded here gives the tokens
`generation.generate` gives for it alone, whenever it joins.

Memory is bounded by `max_batch_size` requests (times their rows: `n`, beams) and the queue by `max_queue`; a step
runs at most `max_step_tokens` positions (the running rows plus a prefill chunk).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from instructblip.generation.beam import BeamSearch
from instructblip.generation.config import GenerationConfig, Settings, default_eos_ids, settle
from instructblip.generation.decode import (
    Decoding,
    Prompt,
    TokenLogprobs,
    penalty_prefix,
    prefill,
    prefill_chunks,
    prepare_prompt,
)
from instructblip.generation.detokenize import first_stop
from instructblip.generation.features import VisionCache, image_features

log = logging.getLogger("instructblip.serving.app")


# ---------------------------------------------------------------------------------------------------------------------
# what a request asks for, and what comes back


@dataclass
class TextDelta:
    index: int  # choice index
    text: str
    logprobs: list[tuple[int, TokenLogprobs]] | None = None  # (token id, its log-probabilities) since the last delta


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
    logprobs: list[tuple[int, TokenLogprobs]] | None = None  # per generated token (eos excluded), when asked for


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

    pixel_values: Tensor  # (3, H, W) float32, preprocessed; a video's frames (T, 3, H, W)
    qformer_input_ids: list[int]  # the instruction in the Q-Former's vocabulary, special tokens included
    input_ids: list[int]  # the language model's prompt: the `<image>` ids (if any), then the text ids
    image_tokens: int  # how many leading ids of `input_ids` are `<image>` ids (kept in front when padding); T x Q for
    # a video of T frames
    params: GenerationConfig  # validated; lengths in new tokens
    emit: Callable[[list[Event]], None]
    n: int = 1  # choices: sampled rows, the n best beams, or copies of one greedy row
    logprobs: int | None = None  # None, or how many most likely tokens to report with each token's log-probability
    stream: bool = False
    deadline: float = float("inf")  # time.monotonic() after which the request has timed out
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # Completed or Failed was emitted
    emitted_text: bool = False  # some streamed text went out (the job cannot be run again after a failure)
    # time.monotonic() stamps the scheduler sets, for metrics and the request log
    queued_at: float | None = None  # `submit` took it
    admitted_at: float | None = None  # the worker took it from the queue
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


# While a batch runs, waiting requests are admitted in groups: once a quarter of the slots are free, or every
# ADMIT_INTERVAL steps. Each admission costs an image-encoder call, a prefill and a copy of the running batch's cache,
# whatever its size, and a small image encoder runs up to twice as fast per image in a batch (docs/performance.md,
# "Serving").
ADMIT_FRACTION = 4
ADMIT_INTERVAL = 8


# Without `max_batch_size`, as many requests run at once as leave BATCH_MEMORY_SHARE of the memory free after loading
# to their KV caches (answers of the default length), MAX_DEFAULT_BATCH at most: a decoding step costs far less than
# in proportion to its rows (docs/performance.md, "Serving"), so a fuller batch is more throughput for little latency.
BATCH_MEMORY_SHARE = 0.25
MAX_DEFAULT_BATCH = 64


def default_batch_size(model, answer_tokens: int, available: int | None = None) -> int:
    """`max_batch_size` for `model` when none is set: MAX_DEFAULT_BATCH, or fewer where the KV caches of that many
    requests (each `answer_tokens` after a prompt of the query tokens and 64 more) would take more than
    BATCH_MEMORY_SHARE of `available` bytes (default: what the model's device has free)."""
    config = model.config
    text = config.text_config
    if text.is_encoder_decoder:  # T5: self-attention over the answer, cross-attention over the prompt
        layers, width = text.num_decoder_layers, text.num_heads * text.d_kv
    else:
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        layers, width = text.num_hidden_layers, heads * (getattr(text, "head_dim", None)
                                                         or text.hidden_size // text.num_attention_heads)
    positions = config.num_query_tokens + 64 + answer_tokens
    per_request = 2 * layers * width * positions * model.dtype.itemsize  # keys and values
    if available is None:
        device = model.device
        if device.type == "cuda":
            available = torch.cuda.mem_get_info(device)[0]
        else:
            from instructblip.weights.memory import available_bytes

            available = available_bytes()
    if available is None:
        return MAX_DEFAULT_BATCH
    return max(1, min(MAX_DEFAULT_BATCH, int(available * BATCH_MEMORY_SHARE) // per_request))


class QueueFull(Exception):
    """The queue holds `max_queue` requests already."""


class ShuttingDown(Exception):
    """The scheduler is stopping and takes no new requests."""


# ---------------------------------------------------------------------------------------------------------------------
# the worker


@dataclass
class _Admission:
    """Greedy and sampled requests on their way into the running batch: their prompt, prefilled a chunk at a time."""

    jobs: list[Job]
    rows: list[_Row]
    prompt: Prompt
    settings: list[Settings]
    copies: list[int]
    prefix: Tensor
    prefill: Iterator  # generation.decode.prefill_chunks


@dataclass
class _BeamGroup:
    """Beam-search requests with identical settings, searched together in the beam lane."""

    jobs: list[Job]
    search: BeamSearch


class Scheduler:
    """Runs `Job`s on `model` in one worker thread, with continuous batching. `start()` it, `submit()` jobs, `stop()`
    it.

    Args:
        model: an `InstructBlipForConditionalGeneration` in eval mode.
        processor: the `InstructBlipProcessor` whose tokenizers built the jobs' ids (pad ids and sides, decoding).
        max_batch_size: most requests running at once (decoding, prefilling or in the beam lane).
        max_queue: most requests waiting; `submit` raises `QueueFull` beyond.
        batch_wait: seconds an idle worker waits for more requests once one has arrived, so that a burst starts as
            one group (0: take what is there); a busy worker admits between steps without waiting.
        on_batch: called with the number of requests of every admission group (metrics).
        vision_cache: vision-encoder outputs kept across requests (`generation.features.VisionCache`), or None.
        max_step_tokens: most positions one step runs: the running rows plus a prefill chunk.
        prefill_chunk: most prompt positions prefilled per step for a group joining a running batch (decoder-only
            models; T5's encoder reads its prompt whole).
    """

    def __init__(self, model, processor, max_batch_size: int = 16, max_queue: int = 64, batch_wait: float = 0.005,
                 on_batch: Callable[[int], None] | None = None, vision_cache: VisionCache | None = None,
                 max_step_tokens: int = 1024, prefill_chunk: int = 256):
        if max_batch_size < 1 or max_queue < 1 or batch_wait < 0 or max_step_tokens < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_size, max_queue, max_step_tokens and prefill_chunk must be >= 1 and "
                             "batch_wait >= 0")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self.on_batch = on_batch
        self.vision_cache = vision_cache
        self.max_step_tokens = max_step_tokens
        self.prefill_chunk = prefill_chunk
        self.eos = default_eos_ids(model.config)
        text = model.config.text_config
        self.llm_pad = _pad_id(self.tokenizer, text.pad_token_id, self.eos)
        self.qformer_pad = _pad_id(processor.qformer_tokenizer, None, [0])
        self.batches = 0  # admission groups started
        self.steps = 0  # decoding steps of the running batch
        self.joins = 0  # admission groups that joined a running batch
        self.preemptions = 0  # requests put back to wait: none (a request keeps its rows until it ends)
        self._admitted_at_step = 0
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._run: Decoding | None = None  # the running batch of greedy and sampled rows
        self._rows: list[_Row] = []  # its rows, in its order
        self._admission: _Admission | None = None
        self._starting: list[Job] = []  # taken from the queue, images being encoded
        self._beams: list[_BeamGroup] = []
        self._thread = threading.Thread(target=self._loop, name="instructblip-worker", daemon=True)

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
            job.queued_at = time.monotonic()
            self._queue.append(job)
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        """Requests the worker holds: decoding, prefilling or searching."""
        return len(self._active_jobs())

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def _active_jobs(self) -> list[Job]:
        jobs = {id(job): job for job in list(self._starting)}
        jobs.update((id(row.job), row.job) for row in list(self._rows) if not row.done)
        admission = self._admission
        if admission is not None:
            jobs.update((id(job), job) for job in admission.jobs)
        for group in list(self._beams):
            jobs.update((id(job), job) for job in group.jobs)
        return list(jobs.values())

    # ---- the thread ----

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                newcomers = self._take()
                if newcomers is None:
                    break
                self._admit(newcomers)
                self._advance_admission()
                self._decode_step()
                self._beam_steps()
        for job in self._active_jobs():
            job.fail(503, "the server is shutting down", "shutting_down")

    def _take(self) -> list[Job] | None:
        """Waiting jobs to admit now (room permitting); blocks while there is nothing to do. None: stop."""
        with self._cond:
            idle = not self._rows and self._admission is None and not self._beams
            while idle and not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            if idle:
                until = time.monotonic() + self.batch_wait
                while len(self._queue) < self.max_batch_size and not self._stopping:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            room = self.max_batch_size - self.running
            if not idle and room < max(1, self.max_batch_size // ADMIT_FRACTION) and (
                    self.steps - self._admitted_at_step < ADMIT_INTERVAL):
                return []  # a few slots free: wait a few steps for more to free, and admit them as one group
            taken: list[Job] = []
            tokens = len(self._rows) + sum(group.search.B * group.search.K for group in self._beams)  # rows a step runs
            shape = None  # the pixels' shape of the group's first job: images and videos are admitted apart
            while self._queue and len(taken) < room:
                job = self._queue[0]
                beam = job.params.beam
                if not beam and self._admission is not None:
                    break  # one admission group prefills at a time; this one waits for the next
                if not beam and shape is not None and job.pixel_values.shape != shape:
                    break  # an image after a video (or the reverse) waits for the next group
                if not beam and shape is None:
                    shape = job.pixel_values.shape
                if not beam and taken and tokens + len(job.input_ids) > self.max_step_tokens:
                    break
                self._queue.popleft()
                job.admitted_at = time.monotonic()
                taken.append(job)
                tokens += 0 if beam else len(job.input_ids)
        if taken:
            self._admitted_at_step = self.steps
        return [job for job in taken if self._still_wanted(job)]

    def _still_wanted(self, job: Job) -> bool:
        if job.cancelled.is_set() or job.finished:
            return False
        if job.expired():
            job.fail(504, "the request timed out", "timeout")
            return False
        return True

    # ---- admission ----

    def _admit(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        self._starting = jobs
        try:
            self._start(jobs)
        finally:
            self._starting = []

    def _start(self, jobs: list[Job]) -> None:
        sampled = [job for job in jobs if not job.params.beam]
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            if job.params.beam:
                groups.setdefault(_beam_group(job), []).append(job)
        if sampled:
            self._guarded(sampled, self._start_admission)
        for members in groups.values():
            self._guarded(members, self._start_beams)

    def _guarded(self, jobs: list[Job], start: Callable[[list[Job], bool], None]) -> None:
        """Start a group; if that fails, start its jobs one by one, so that a request that breaks the model fails
        alone (500) and the others run."""
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(len(jobs))
        try:
            start(jobs, True)
            return
        except Exception:
            log.exception("starting a group of %d requests failed", len(jobs))
        for job in jobs:
            if len(jobs) == 1:
                job.fail(500, "the model failed on this request", "internal_error")
                continue
            try:
                start([job], False)
            except Exception:
                log.exception("a request failed on its own")
                job.fail(500, "the model failed on this request", "internal_error")

    def _start_admission(self, jobs: list[Job], chunked: bool) -> None:
        """Encode the group's images and set up its prefill; `chunked` False: prefill it whole now and join."""
        features = self._encode(jobs)  # (B, Q, D)
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
        prefix, ignore = penalty_prefix(self.model, prompt, "generated")
        longest = max(s.max_new_tokens for s in settings)
        chunk = L
        if chunked and self._rows:  # a batch is running: bound the stall its rows see
            budget = max(self.max_step_tokens - len(self._rows), len(jobs))
            chunk = max(1, min(self.prefill_chunk, budget // len(jobs)))
        prefill = prefill_chunks(self.model.language_model, prompt, longest, copies, prefix, ignore, chunk)
        admission = _Admission(jobs, rows, prompt, settings, copies, prefix, prefill)
        self._admission = admission
        if not chunked:
            try:
                while self._admission is admission:
                    self._prefill_step(admission)
            finally:
                if self._admission is admission:
                    self._admission = None

    def _advance_admission(self) -> None:
        """One prefill chunk of the admission group; once its prefill is done, it joins the running batch."""
        admission = self._admission
        if admission is None:
            return
        try:
            self._prefill_step(admission)
        except Exception:
            log.exception("prefilling a group of %d requests failed", len(admission.jobs))
            self._admission = None
            for job in admission.jobs:
                if len(admission.jobs) == 1:
                    job.fail(500, "the model failed on this request", "internal_error")
                    continue
                try:
                    self._start_admission([job], False)
                except Exception:
                    log.exception("a request failed on its own")
                    job.fail(500, "the model failed on this request", "internal_error")

    def _prefill_step(self, admission: _Admission) -> None:
        done = next(admission.prefill)
        if done is None:
            return
        self._admission = None
        jobs = admission.jobs
        live_text = [job.stream or bool(job.params.stop_strings) for job in jobs]
        run = Decoding(self.model, admission.prompt, admission.settings, admission.copies, prefix=admission.prefix,
                       tokenizer=self.tokenizer, detokenize=live_text, logprobs=[job.logprobs for job in jobs],
                       prefilled=done)
        if self._run is None:
            self._run, self._rows = run, admission.rows
            return
        keep = _live(self._rows)  # requests that ended leave in the copy the join makes anyway
        try:
            self._run.admit(run, keep)
        except Exception:  # the running batch may be half joined: nothing in it can go on
            self._fail_running()
            raise
        self._rows = [self._rows[i] for i in keep] + admission.rows
        self.joins += 1

    def _start_beams(self, jobs: list[Job], chunked: bool) -> None:
        """Encode and prefill a group of beam-search requests (identical settings) and put its search in the lane."""
        model = self.model
        features = self._encode(jobs)
        p, n = jobs[0].params, jobs[0].n  # the group shares every setting but the stop strings
        seed = p.seed
        if p.do_sample and seed is None:
            seed = random.SystemRandom().getrandbits(63)
        config = replace(p, num_return_sequences=n, stop_strings=(), seed=seed, eos_token_id=self.eos)
        config.validate()
        prompt = self._prompt(jobs, features)
        s = settle(config, model.config, prompt.attention_mask.shape[1], features.device)
        prefix, ignore = penalty_prefix(model, prompt, config.penalty_scope)
        copies = [max(s.num_beams, s.num_return_sequences)] * len(jobs)
        lm = model.language_model
        search = BeamSearch(lm, *prefill(lm, prompt, s.max_new_tokens, copies, prefix, ignore), s)
        self._beams.append(_BeamGroup(jobs, search))

    # ---- steps ----

    def _encode(self, jobs: list[Job]) -> Tensor:
        model = self.model
        pixels = torch.stack([job.pixel_values for job in jobs]).to(model.device, model.dtype)  # (B, [T,] 3, H, W)
        if self.processor.qformer_tokenizer is None:  # BLIP-2: the Q-Former reads no instruction
            return image_features(model, pixels, cache=self.vision_cache)
        side = self.processor.qformer_tokenizer.padding_side
        ids, mask = pad([job.qformer_input_ids for job in jobs], self.qformer_pad, side, model.device)
        return image_features(model, pixels, ids, mask, cache=self.vision_cache)

    def _prompt(self, jobs: list[Job], features: Tensor) -> Prompt:
        ids, mask = pad_prompts(jobs, self.llm_pad, self.tokenizer.padding_side, features.device)
        return prepare_prompt(self.model, image_features=features, input_ids=ids, attention_mask=mask)

    def _decode_step(self) -> None:
        """One step of the running batch; requests whose rows are all done leave it."""
        run = self._run
        if run is None:
            return
        rows = self._rows
        try:
            tokens = next(run)
        except Exception:
            log.exception("a decoding step of %d rows failed", len(rows))
            self._fail_running()
            return
        self.steps += 1
        logprobs = run.logprobs if run.top_logprobs and any(k is not None for k in run.top_logprobs) else None
        for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            row.step(token, run.reason[i], run.text[i], run.count[i], logprobs[i] if logprobs else None)
        self._check_jobs(rows)
        rows_of: dict[int, list[_Row]] = {}
        for row in rows:
            rows_of.setdefault(id(row.job), []).append(row)
        self._deliver(rows, rows_of)
        # a job's rows leave the batch together, once all are done: its sampled rows share one generator, whose
        # draws depend on how many rows it samples (so the answers stay those of the request alone)
        keep = _live(rows)
        if not keep:
            self._run, self._rows = None, []
            return
        for i, row in enumerate(rows):
            if row.done and run.reason[i] is None:  # cancelled, timed out: padding from now on
                run.finish(i, "abort")
        # Rows of requests that ended stay in the batch, decoding padding, until the next admission group joins
        # (the join copies the cache anyway and leaves them out) or until they are as many as the running rows:
        # leaving at once copied the whole cache at every departure, and a step costs far less than in proportion
        # to its rows (docs/performance.md, "Serving").
        if len(rows) - len(keep) >= len(keep):
            run.keep(keep)
            self._rows = [rows[i] for i in keep]

    def _fail_running(self) -> None:
        for job in {id(row.job): row.job for row in self._rows}.values():
            job.fail(500, "the model failed on this request", "internal_error")
        self._run, self._rows = None, []

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
                choices = [Choice(i, r.text, r.finish_reason, r.count, r.logprobs if job.logprobs is not None
                                  else None) for r in mine for i in r.indices]
                events.append(Completed(sorted(choices, key=lambda c: c.index)))
            job.send(events)

    # ---- the beam lane ----

    def _beam_steps(self) -> None:
        """One step of every search in the lane; a finished search answers its requests."""
        for group in list(self._beams):
            for job in group.jobs:
                if job.finished or job.cancelled.is_set():
                    continue
                if self._stopping:
                    job.fail(503, "the server is shutting down", "shutting_down")
                elif job.expired():
                    job.fail(504, "the request timed out", "timeout")
            if all(job.finished or job.cancelled.is_set() for job in group.jobs):
                self._beams.remove(group)
                continue
            try:
                done = group.search.step()
            except Exception:
                log.exception("a beam search of %d requests failed", len(group.jobs))
                self._beams.remove(group)
                for job in group.jobs:
                    job.fail(500, "the model failed on this request", "internal_error")
                continue
            if done:
                self._beams.remove(group)
                self._answer_beams(group.jobs, group.search.result())

    def _answer_beams(self, jobs: list[Job], out: Tensor) -> None:
        n = jobs[0].n
        now = time.monotonic()
        eos = set(self.eos)
        for b, job in enumerate(jobs):
            job.first_token_at = job.first_token_at or now  # a beam search's tokens are final only at its end
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
        self.logprobs: list[tuple[int, TokenLogprobs]] = []
        self._unsent = 0  # entries of `logprobs` not yet streamed
        self._text = None  # the run's `Detokenizer` of this row, when its text is kept up to date

    def step(self, token: int, reason: str | None, text, count: int, logprobs: TokenLogprobs | None = None) -> None:
        """This step's token, with the run's verdict on the row (None: still running), its detokenizer, the
        tokens it generated so far and the token's log-probabilities (when the job asked)."""
        if self.done:
            return
        if self.job.first_token_at is None:
            self.job.first_token_at = time.monotonic()
        self._text = text
        self.count = count
        if token not in self.scheduler.eos:
            self.ids.append(token)
            if logprobs is not None:
                self.logprobs.append((token, logprobs))
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
            self._send(self._text.delta(final=True) if self._text is not None else self.text, final=True)
            self.pending += [ChoiceEnd(i, reason) for i in self.indices]

    def _send(self, delta: str, final: bool = False) -> None:
        """Stream a piece of text, with the log-probabilities of the tokens since the last piece (at the end, the
        rest of them even without text)."""
        unsent = self.logprobs[self._unsent:]
        if delta or (final and unsent):
            self._unsent = len(self.logprobs)
            logprobs = unsent if self.job.logprobs is not None else None
            self.pending += [TextDelta(i, delta, logprobs) for i in self.indices]


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _live(rows: list[_Row]) -> list[int]:
    """The rows whose request still runs: a request's rows leave together, once all are done."""
    running = {id(row.job) for row in rows if not row.done}
    return [i for i, row in enumerate(rows) if id(row.job) in running]


def _beam_group(job: Job) -> tuple:
    """Beam-search requests run together only with identical settings (stop strings are applied afterwards; a seed
    matters only when sampling) and pixels of one shape (images apart from videos)."""
    p = job.params
    return (replace(p, stop_strings=(), seed=p.seed if p.do_sample else None), job.n, tuple(job.pixel_values.shape))


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
