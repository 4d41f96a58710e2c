"""`pudding serve`: an OpenAI-compatible local server with routed inference (FastAPI on uvicorn).

Model names: the bundle's folder name routes each request with the router; `<name>:dense` and
`<name>:static` skip no block or the bundle's static set. A chat request is routed on its last
user message; the route comes back in the `pudding` field and the `x-pudding-route` header.
Up to `decode_concurrency` requests are decoded together, each under its own route
(`engine.py`, `batch.py`); up to `max_queue` more wait their turn and further ones get 503.
KV caches are kept between requests (`prompt_cache.py`), so the next turn of a chat prefills
only its new tokens.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Literal

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from ..errors import PuddingError
from ..model import PuddingModel, Route, clean_text
from .engine import Engine, Failed, Finished, Job, ShuttingDown, Started


@dataclass
class ServeConfig:
    name: str  # the model name clients ask for
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_queue: int = 8  # requests waiting while the decode batch is full; more get 503
    max_tokens_limit: int = 2048  # cap on every request; also the default
    max_body_bytes: int = 4 << 20
    prompt_cache_bytes: int = 512 << 20
    decode_concurrency: int = 8  # requests decoded together
    prompt_concurrency: int = 4  # waiting prompts prefilled between two decode steps


# --- requests ----------------------------------------------------------------------------------

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return clean_text("".join(p.text for p in self.content))
        return clean_text(self.content or "")


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both endpoints share; other OpenAI fields are accepted and ignored."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # greedy unless asked, as mlx_lm.server
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # pudding's own: fidelity routers' tolerance for this request (PuddingModel.route)
    tolerance: float | None = Field(None, ge=0.0)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]


# --- responses ---------------------------------------------------------------------------------

class ApiError(HTTPException):
    """An error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.type, self.param, self.code = type, param, code


def error_response(e: HTTPException) -> JSONResponse:
    kind = "invalid_request_error" if e.status_code < 500 else "server_error"
    body = {"message": str(e.detail), "type": getattr(e, "type", kind),
            "param": getattr(e, "param", None), "code": getattr(e, "code", None)}
    return JSONResponse({"error": body}, e.status_code, headers=e.headers)


def worker_error(e: Exception) -> ApiError:
    if isinstance(e, PuddingError):
        return ApiError(400, str(e))
    if isinstance(e, ShuttingDown):
        return ApiError(503, str(e), type="server_error", code="shutting_down")
    return ApiError(500, f"{type(e).__name__}: {e}", type="server_error")


def route_info(route: Route) -> dict:
    """The `pudding` field of a response (also its `x-pudding-route` header, as JSON)."""
    return {"set": route.name, "skip": route.skip, "router_ms": round(route.seconds * 1e3, 3),
            "reason": route.reason, "predicted": route.predicted, "tolerance": route.tolerance}


def usage(started: Started, finished: Finished) -> dict:
    p, c = started.prompt_tokens, finished.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": started.cached_tokens}}


@dataclass
class Reply:
    """What every response and chunk of one request shares."""

    chat: bool
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, text: str | None, finish: str | None, stream: bool, first: bool = False,
             **extra) -> dict:
        if not self.chat:
            choices = [{"index": 0, "text": text or "", "logprobs": None,
                        "finish_reason": finish}]
            kind, prefix = "text_completion", "cmpl-"
        else:
            message = {} if text is None else {"content": text}
            if first or not stream:
                message = {"role": "assistant", **message}
            choices = [{"index": 0, "delta" if stream else "message": message,
                        "logprobs": None, "finish_reason": finish}]
            kind = "chat.completion.chunk" if stream else "chat.completion"
            prefix = "chatcmpl-"
        return {"id": prefix + self.id, "object": kind, "created": self.created,
                "model": self.model, "choices": choices, **extra}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def job_events(request: Request, job: Job) -> AsyncIterator:
    """The job's events up to the last one; the job stops when the client leaves."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, job))
    try:
        while True:
            event = await job.events.get()
            yield event
            if isinstance(event, Finished | Failed):
                return
    finally:
        watcher.cancel()
        job.cancel()


async def stream_body(reply: Reply, started: Started, events: AsyncIterator,
                      include_usage: bool) -> AsyncIterator[str]:
    first = True
    async with aclosing(events):
        async for event in events:
            if isinstance(event, str):
                yield sse(reply.body(event, None, True, first))
                first = False
            elif isinstance(event, Failed):
                yield sse(error_response(worker_error(event.error)).body.decode())
            elif event.reason != "cancelled":
                yield sse(reply.body(None, event.reason, True,
                                     pudding=route_info(started.route)))
                if include_usage:
                    yield sse({**reply.body(None, None, True), "choices": [],
                               "usage": usage(started, event)})
    yield sse("[DONE]")


# --- the app -----------------------------------------------------------------------------------

class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes` (declared or as read)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        received = 0

        async def limited():
            nonlocal received
            too_large = ApiError(413, f"the request body exceeds {self.max_bytes} bytes",
                                 code="request_too_large")
            if not declared.isdigit() or int(declared) > self.max_bytes:
                raise too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited, send)


def add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI error object; a malformed body or field is a 400."""

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            return error_response(ApiError(400, f"the body is not valid JSON "
                                                f"({err.get('ctx', {}).get('error')})"))
        where = ".".join(str(x) for x in err["loc"][1:]) or None
        return error_response(ApiError(400, f"{where or 'body'}: {err['msg']}", param=where))


def authorizer(api_key: str | None):
    """The /v1 dependency that checks `Authorization: Bearer KEY` when a key is set."""

    async def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if api_key and not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return authorize


@dataclass
class Completions:
    """Turns a request into a job on the engine and the job's events into a reply."""

    engine: Engine
    config: ServeConfig

    @property
    def modes(self) -> dict[str, str]:
        """Model name -> route mode: NAME routes, NAME:dense and NAME:static do not."""
        name = self.config.name
        return {name: "router", f"{name}:dense": "dense", f"{name}:static": "static"}

    def mode_of(self, model: str | None) -> str:
        if model is None:
            return "router"
        if model not in self.modes:
            raise ApiError(404, f"model {model!r} not found; this server has "
                                f"{', '.join(self.modes)}", param="model",
                           code="model_not_found")
        return self.modes[model]

    async def respond(self, request: Request, body: Sampling, chat: bool, route_text: str,
                      prompt: list[dict] | str, max_tokens: int | None):
        limit = self.config.max_tokens_limit
        job = Job(self.mode_of(body.model), route_text, prompt, min(max_tokens or limit, limit),
                  body.temperature, body.top_p,
                  [body.stop] if isinstance(body.stop, str) else body.stop or [], body.seed,
                  body.tolerance)
        if not self.engine.submit(job):
            raise ApiError(503, "the server is busy; retry shortly", type="server_error",
                           code="server_busy", headers={"Retry-After": "1"})
        events = job_events(request, job)
        started = await anext(events)
        if not isinstance(started, Started):
            await events.aclose()
            raise (worker_error(started.error) if isinstance(started, Failed)
                   else ApiError(503, "the request was cancelled", type="server_error"))
        reply = Reply(chat, body.model or self.config.name)
        headers = {"x-pudding-route": json.dumps(route_info(started.route))}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_body(reply, started, events, include_usage),
                                     media_type="text/event-stream", headers=headers)
        text = ""
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Failed):
                    raise worker_error(event.error)
                if isinstance(event, str):
                    text += event
        return JSONResponse(reply.body(text, event.reason, False, usage=usage(started, event),
                                       pudding=route_info(started.route)), headers=headers)


def create_app(pm: PuddingModel, config: ServeConfig) -> FastAPI:
    engine = Engine(pm, config.max_queue, config.prompt_cache_bytes, config.decode_concurrency,
                    config.prompt_concurrency)
    api = Completions(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="pudding serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    add_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorizer(config.api_key))])

    @v1.get("/models")
    async def models() -> dict:
        created = int(pm.path.stat().st_mtime)
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": created, "owned_by": "pudding-mlx"}
            for m in api.modes]}

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return await api.respond(request, body, True, last_user, messages,
                                          body.max_completion_tokens or body.max_tokens)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = clean_text(body.prompt if isinstance(body.prompt, str) else body.prompt[0])
        return await api.respond(request, body, False, prompt, prompt, body.max_tokens)

    @app.get("/health")
    async def health() -> dict:
        cache = engine.prompt_cache  # read while the worker may change it: a snapshot
        busy = engine.decode_concurrency
        return {"status": "ok", "model": config.name,
                "generating": min(engine.pending, busy), "waiting": max(engine.pending - busy, 0),
                "prompt_cache": {"entries": len(cache.entries), "bytes": cache.nbytes}}

    app.include_router(v1)
    return app


class Server(uvicorn.Server):
    """uvicorn's server; at shutdown (Ctrl-C) the requests in flight end at once, streams with
    an error event and the rest with 503, rather than being cut off after a grace period."""

    def __init__(self, pm: PuddingModel, config: ServeConfig, **settings):
        """`settings` go to uvicorn.Config (log_level, ...)."""
        app = create_app(pm, config)
        super().__init__(uvicorn.Config(app, host=config.host, port=config.port,
                                        timeout_graceful_shutdown=10, **settings))
        self.engine = app.state.engine

    async def shutdown(self, sockets=None) -> None:
        self.engine.stop()
        await super().shutdown(sockets)
