"""The generation side of `pudding serve`: one worker thread runs one request at a time.

MLX generation is not thread-safe (a SkipView shortens the model's block list while it runs),
so every request is routed, tokenized and generated on the same thread, in turn. The event
loop hands it `Job`s and reads their events (`Started`, text, then `Finished` or `Failed`)
from an asyncio queue. A client that leaves cancels its job: a waiting one leaves the queue at
once, a running one stops at its next token (or prefill step) and frees the model.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from ..errors import PuddingError
from ..model import PuddingModel, Route
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
    future: Future | None = None

    def emit(self, event: Started | str | Finished | Failed) -> None:
        """From the worker thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """From the event loop."""
        self.cancelled.set()
        if self.future is not None and self.future.cancel():
            self.events.put_nowait(Finished("cancelled", 0))


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


class Engine:
    """Runs jobs one at a time on a worker thread, with at most `max_queue` waiting."""

    def __init__(self, pm: PuddingModel, max_queue: int, prompt_cache_bytes: int):
        self.pm = pm
        self.max_queue = max_queue
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self.pending = 0  # running or waiting; changed on the event loop only
        self.jobs: set[Job] = set()
        self.stopped = False
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="pudding-generate")

    def submit(self, job: Job) -> bool:
        """Queue `job` (from the event loop); False when the queue is full."""
        if self.stopped or self.pending > self.max_queue:
            return False
        self.pending += 1
        self.jobs.add(job)
        job.loop = asyncio.get_running_loop()
        job.future = self._worker.submit(self._run, job)
        job.future.add_done_callback(lambda _: job.loop.call_soon_threadsafe(self._done, job))
        return True

    def _done(self, job: Job) -> None:
        self.pending -= 1
        self.jobs.discard(job)
        if self.pending == 0 and not self.stopped:
            self._worker.submit(mx.clear_cache)  # idle: hand MLX's cached buffers back

    def stop(self) -> None:
        """Take no more jobs, and end each one in flight now with ShuttingDown."""
        self.stopped = True
        for job in list(self.jobs):
            job.events.put_nowait(Failed(ShuttingDown("the server is shutting down")))
            job.cancel()

    def close(self) -> None:
        self.stop()
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: Job) -> None:
        try:
            if job.cancelled.is_set():
                raise Cancelled
            job.emit(self._generate(job))
        except Cancelled:
            job.emit(Finished("cancelled", 0))
        except Exception as e:
            job.emit(Failed(e))

    def _generate(self, job: Job) -> Finished:
        pm = self.pm
        route = pm.route(job.route_text, job.mode, tolerance=job.tolerance)
        tokens = encode_prompt(pm, job.prompt)
        cache, cached = self.prompt_cache.fetch(route.skip, tokens)
        if cache is None:
            cache = pm.make_cache(route)
        job.emit(Started(route, len(tokens), cached))
        if job.seed is not None:
            mx.random.seed(job.seed)

        def check(processed: int, total: int) -> None:
            if job.cancelled.is_set():
                raise Cancelled  # during prefill: the half-filled cache is dropped

        stop, generated, reason = StopText(job.stop), [], None
        responses = pm.stream_generate(
            tokens[cached:], max_tokens=job.max_tokens, route=route, prompt_cache=cache,
            sampler=make_sampler(job.temperature, job.top_p), prompt_progress_callback=check)
        try:
            for r in responses:
                if r.generation_tokens > len(generated):  # each token once; all are in the cache
                    generated.append(r.token)
                text, hit = stop.feed(r.text)
                reason = "stop" if hit else r.finish_reason
                if reason and not hit:
                    text += stop.flush()
                if text:
                    job.emit(text)
                if reason is None and job.cancelled.is_set():
                    reason = "cancelled"
                if reason:
                    break
        finally:
            responses.close()
        self.prompt_cache.store(route.skip, tokens + generated, cache)
        return Finished(reason, len(generated))
