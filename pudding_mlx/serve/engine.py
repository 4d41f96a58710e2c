"""The generation side of `pudding serve`: continuous batching on one worker thread.

MLX generation is not thread-safe (the model's block list is swapped while it runs), so every
request is routed, tokenized, prefilled and decoded on the same thread. The event loop hands it
`Job`s and reads their events (`Started`, text, then `Finished` or `Failed`) from an asyncio
queue. Between two decode steps the worker takes up to `prompt_concurrency` waiting jobs, each
routed and prefilled alone (continuing from the prompt cache), and adds them to the decode
batch (`batch.py`), up to `decode_concurrency` rows; each step then decodes one token for
every row, under each row's own route. A client that leaves cancels its job: a waiting one
leaves the queue at the worker's next turn, a running one at its next token (or prefill chunk).
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p

from ..errors import PuddingError
from ..model import PuddingModel, Route
from .batch import RoutedBatch, decode_batch
from .prompt_cache import PromptCache


@dataclass
class Started:
    route: Route
    prompt_tokens: int
    cached_tokens: int  # taken from the prompt cache, not prefilled


@dataclass
class Finished:
    reason: str  # "stop", "length", or "cancelled" (the client left)
    completion_tokens: int


@dataclass
class Failed:
    error: Exception


class Cancelled(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass(eq=False)  # hashed by identity: the engine keeps a set of jobs
class Job:
    """One request as the worker sees it."""

    mode: str  # "router", "dense" or "static"
    route_text: str  # what the router reads
    prompt: list[dict] | str  # chat messages (templated) or completion text (as is)
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    tolerance: float | None = None  # fidelity routers (PuddingModel.route)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None

    def emit(self, event: Started | str | Finished | Failed) -> None:
        """From the worker thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """From the event loop."""
        self.cancelled.set()


class StopText:
    """Generated text, released as soon as no stop string can begin in it."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0

    def feed(self, segment: str) -> tuple[str, bool]:
        """(text to release now, whether a stop string was hit)."""
        self.text += segment
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            return self._release(min(hits)), True
        held = max((k for s in self.stops for k in range(1, len(s))
                    if self.text.endswith(s[:k])), default=0)
        return self._release(max(self.sent, len(self.text) - held)), False

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], end
        return out


def encode_prompt(pm: PuddingModel, prompt: list[dict] | str) -> list[int]:
    """Chat messages through the chat template (their contents joined as plain text when the
    tokenizer has none), or completion text as is."""
    tok = pm.tokenizer
    if isinstance(prompt, str):
        tokens = pm.encode(prompt, chat_template=False)
    elif getattr(tok, "has_chat_template", False):
        try:
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises for conversations a template refuses
            raise PuddingError(f"the chat template refused these messages: {e}") from None
        tokens = list(tok.encode(text, add_special_tokens=False))
    else:
        tokens = pm.encode("\n".join(m["content"] for m in prompt), chat_template=False)
    if not tokens:
        raise PuddingError("the prompt is empty")
    return tokens


@dataclass
class Row:
    """A job in the decode batch."""

    job: Job
    route: Route
    tokens: list[int]  # the prompt, then each generated token
    prompt_tokens: int
    detokenizer: object  # mlx-lm's streaming detokenizer
    stop: StopText
    key: mx.array | None  # sampling state (temperature > 0)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_tokens

    def sample(self, logprobs: mx.array) -> mx.array:
        """The next token from this row's log-probabilities [V] (greedy at temperature 0)."""
        job = self.job
        if job.temperature == 0:
            return mx.argmax(logprobs)
        if 0 < job.top_p < 1:
            logprobs = apply_top_p(logprobs, job.top_p)
        self.key, key = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1 / job.temperature), key=key)


class Engine:
    """Decodes up to `decode_concurrency` jobs together on a worker thread, with at most
    `max_queue` more waiting."""

    def __init__(self, pm: PuddingModel, max_queue: int, prompt_cache_bytes: int,
                 decode_concurrency: int = 8, prompt_concurrency: int = 4):
        self.pm = pm
        self.max_queue = max_queue
        self.batch = decode_batch(pm.model)
        # a model that cannot run block by block (OneRow) decodes one request at a time
        self.decode_concurrency = decode_concurrency if isinstance(self.batch, RoutedBatch) else 1
        self.prompt_concurrency = prompt_concurrency
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self.rows: list[Row] = []  # in batch order; the worker's own
        self.pending = 0  # decoding or waiting; changed on the event loop only
        self.jobs: set[Job] = set()
        self.stopped = False
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._worker = threading.Thread(target=self._loop, name="pudding-generate", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> bool:
        """Queue `job` (from the event loop); False when the batch and the queue are full."""
        if self.stopped or self.pending >= self.decode_concurrency + self.max_queue:
            return False
        self.pending += 1
        self.jobs.add(job)
        job.loop = asyncio.get_running_loop()
        with self._wake:
            self._waiting.append(job)
            self._wake.notify()
        return True

    def _done(self, job: Job) -> None:
        self.pending -= 1
        self.jobs.discard(job)

    def stop(self) -> None:
        """Take no more jobs, and end each one in flight now with ShuttingDown."""
        self.stopped = True
        for job in list(self.jobs):
            job.events.put_nowait(Failed(ShuttingDown("the server is shutting down")))
            job.cancel()

    def close(self) -> None:
        self.stop()
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._worker.join()

    # --- the worker thread ---------------------------------------------------------------------

    def _end(self, job: Job, event: Finished | Failed) -> None:
        job.emit(event)
        with suppress(RuntimeError):  # the event loop has closed: nobody is waiting
            job.loop.call_soon_threadsafe(self._done, job)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self.rows or self._waiting or self._closing):
                    mx.clear_cache()  # idle: hand MLX's cached buffers back
                    self._wake.wait()
                if self._closing:
                    break
                room = min(self.prompt_concurrency, self.decode_concurrency - len(self.rows))
                admitted = []
                for job in list(self._waiting):
                    if job.cancelled.is_set():
                        self._waiting.remove(job)
                        self._end(job, Finished("cancelled", 0))
                    elif len(admitted) < room:
                        self._waiting.remove(job)
                        admitted.append(job)
            for job in admitted:
                try:
                    self._start(job)
                except Cancelled:
                    self._end(job, Finished("cancelled", 0))
                except Exception as e:
                    self._end(job, Failed(e))
            if self.rows:
                try:
                    self._step()
                except Exception as e:  # every row fails with it; the server goes on
                    for row in self.rows:
                        self._end(row.job, Failed(e))
                    self.rows = []
                    self.batch = type(self.batch)(self.pm.model)
        for job in [*self._waiting, *(row.job for row in self.rows)]:
            self._end(job, Finished("cancelled", 0))

    def _start(self, job: Job) -> None:
        """Route, tokenize and prefill `job` (all of its prompt but the last token, which its
        first decode step feeds), then add it to the batch."""
        if job.cancelled.is_set():
            raise Cancelled
        pm = self.pm
        route = pm.route(job.route_text, job.mode, tolerance=job.tolerance)
        tokens = encode_prompt(pm, job.prompt)
        cache, cached = self.prompt_cache.fetch(route.skip, tokens)
        if cache is None:
            cache = pm.make_cache(route)
        job.emit(Started(route, len(tokens), cached))

        def check() -> None:
            if job.cancelled.is_set():
                raise Cancelled  # the half-filled cache is dropped

        pm.prefill(route, tokens, cache, start=cached, check=check)
        seed = job.seed if job.seed is not None else random.getrandbits(63)
        key = mx.random.key(seed) if job.temperature > 0 else None
        self.batch.add(route.skip, cache)
        self.rows.append(Row(job, route, tokens, len(tokens), pm.tokenizer.detokenizer,
                             StopText(job.stop), key))

    def _step(self) -> None:
        """One token for every row; rows that finish leave the batch (their caches, which hold
        every token but the last, go to the prompt cache)."""
        logits = self.batch.step([row.tokens[-1] for row in self.rows])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = mx.stack([row.sample(logprobs[i]) for i, row in enumerate(self.rows)])
        eos = self.pm.tokenizer.eos_token_ids
        finished = []
        for i, (row, token) in enumerate(zip(self.rows, tokens.tolist(), strict=True)):
            row.tokens.append(token)
            reason = "stop" if token in eos else None
            if reason is None:
                row.detokenizer.add_token(token)
                if row.generated == row.job.max_tokens:
                    reason = "length"
            if reason:
                row.detokenizer.finalize()
            text, hit = row.stop.feed(row.detokenizer.last_segment)
            if hit:
                reason = "stop"
            elif reason:
                text += row.stop.flush()
            if text:
                row.job.emit(text)
            if reason is None and row.job.cancelled.is_set():
                reason = "cancelled"
            if reason:
                finished.append((i, Finished(reason, row.generated)))
        for i, event in reversed(finished):
            row = self.rows.pop(i)
            cache = self.batch.remove(i, keep_cache=self.prompt_cache.max_bytes > 0)
            if cache is not None:
                self.prompt_cache.store(row.route.skip, row.tokens[:-1], cache)
            self._end(row.job, event)
