"""The HTTP layer of ``cag serve``: OpenAI-compatible routes over the model worker.

Thin on purpose: requests are validated by the models in ``schemas``, turned into
``GenerationRequest`` jobs for the one model worker, and its events are rendered as
OpenAI responses or server-sent events. Every failure leaves as an OpenAI-style error
object (``{"error": {"message", "type", "param", "code"}}``) with its HTTP status,
never a traceback, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cag.errors import (AuthenticationError, CacheMemoryError, CacheMismatchError, CacheNotFoundError, CagError,
                        ContextTooLongError, PromptError, RequestError)
from cag.generate import Sampling
from cag.model import LoadedModel

from . import schemas as s
from .metrics import CONTENT_TYPE, Metrics
from .worker import Completion, Delta, Failed, Finished, GenerationRequest, Job, Started, Worker, WorkerConfig

__all__ = ["ServerConfig", "create_app"]

log = logging.getLogger("cag.server")


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = field(default=None, repr=False)  # never in a repr, a log or an error
    max_tokens: int = 1024  # the most new tokens one request may ask for (and what it gets when it does not say)
    max_body: int = 16 << 20  # bytes of one request body
    worker: WorkerConfig = WorkerConfig()


# ------------------------------------------------------------------------ errors

# (error class, HTTP status, OpenAI error type, code); the first match wins.
_ERRORS: list[tuple[type[Exception], int, str, str | None]] = [
    (AuthenticationError, 401, "invalid_request_error", "invalid_api_key"),
    (CacheNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (ContextTooLongError, 400, "invalid_request_error", "context_length_exceeded"),
    (CacheMemoryError, 503, "server_error", "cache_memory_exceeded"),
    (RequestError, 400, "invalid_request_error", None),
    (PromptError, 400, "invalid_request_error", None),
    (CacheMismatchError, 400, "invalid_request_error", None),
    (CagError, 500, "server_error", None),
]


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = s.ErrorBody(error=s.ErrorDetail(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _error_of(exc: Exception) -> tuple[int, str, str, str | None, str | None]:
    """(status, message, type, param, code) of an exception, as a client may see it."""
    for cls, status, type_, code in _ERRORS:
        if isinstance(exc, cls):
            return status, str(exc) or type(exc).__name__, type_, getattr(exc, "param", None), code
    return 500, "the server failed to answer this request; it goes on serving (see its log)", "server_error", None, None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a request body as one line, and the field it concerns."""
    errors = exc.errors()
    if not errors:
        return "the request body is not valid", None
    first = errors[0]
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {message}", None
    return (f"{'.'.join(where)}: {message}" if where else message), (".".join(where) or None)


# ---------------------------------------------------------------------- rendering


class _Chat:
    """Renders a chat completion, whole or as chunks."""

    route = "/v1/chat/completions"

    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), model

    def _chunk(self, choices: list[s.ChunkChoice], usage: s.Usage | None = None) -> s.ChatCompletionChunk:
        return s.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def start(self) -> s.BaseModel | None:
        return self._chunk([s.ChunkChoice(delta=s.ChunkDelta(role="assistant", content=""))])

    def delta(self, text: str) -> s.BaseModel:
        return self._chunk([s.ChunkChoice(delta=s.ChunkDelta(content=text))])

    def end(self, finish_reason: str) -> s.BaseModel:
        return self._chunk([s.ChunkChoice(delta=s.ChunkDelta(), finish_reason=finish_reason)])

    def usage(self, usage: s.Usage) -> s.BaseModel:
        return self._chunk([], usage)

    def whole(self, c: Completion, usage: s.Usage) -> s.BaseModel:
        choice = s.ChatChoice(message=s.AssistantMessage(content=c.text), finish_reason=c.finish_reason)
        return s.ChatCompletion(id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage)


class _Text(_Chat):
    """Renders a text completion (``/v1/completions``), whole or as chunks."""

    route = "/v1/completions"

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.id = f"cmpl-{self.id.removeprefix('chatcmpl-')}"

    def _text(self, choices: list[s.TextChoice], usage: s.Usage | None = None) -> s.TextCompletion:
        return s.TextCompletion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def start(self) -> None:
        return None

    def delta(self, text: str) -> s.BaseModel:
        return self._text([s.TextChoice(text=text)])

    def end(self, finish_reason: str) -> s.BaseModel:
        return self._text([s.TextChoice(text="", finish_reason=finish_reason)])

    def usage(self, usage: s.Usage) -> s.BaseModel:
        return self._text([], usage)

    def whole(self, c: Completion, usage: s.Usage) -> s.BaseModel:
        return self._text([s.TextChoice(text=c.text, finish_reason=c.finish_reason)], usage)


def _sse(payload: Any) -> str:
    data = payload.model_dump_json() if isinstance(payload, s.BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def _usage(c: Completion) -> s.Usage:
    return s.Usage.of(c.prompt_tokens, c.cached_tokens, c.completion_tokens)


# ------------------------------------------------------------------- the app


class _Submission:
    """One job in the worker, seen from the event loop: its events arrive on an asyncio queue."""

    def __init__(self, worker: Worker, request: GenerationRequest) -> None:
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._worker = worker

        def emit(event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
                loop.call_soon_threadsafe(self._queue.put_nowait, event)

        self.job = Job(request, emit)
        worker.submit(self.job)

    async def next(self):
        return await self._queue.get()

    def cancel(self) -> None:
        self._worker.cancel(self.job)


class _Service:
    """What the routes share: the worker, the metrics, the limits, and one log line per request."""

    def __init__(self, lm: LoadedModel, open_store: Callable[[], Any], config: ServerConfig) -> None:
        self.config = config
        self.worker = Worker(lm, open_store, config.worker)
        self.metrics = Metrics(lambda: self.worker.contexts.bytes, lambda: self.worker.running,
                               lambda: self.worker.waiting)

    def record(self, request: Request | None, route: str, status: int, model: str = "-",
               completion: Completion | None = None, note: str = "") -> None:
        self.metrics.request(route, model, status)
        if completion is not None:
            self.metrics.answered(completion.prompt_tokens, completion.cached_tokens, completion.completion_tokens,
                                  completion.ttft_s)
            log.info("%s %d model=%s prompt_tokens=%d cached_tokens=%d ttft=%.3fs completion_tokens=%d total=%.3fs",
                     route, status, model, completion.prompt_tokens, completion.cached_tokens, completion.ttft_s,
                     completion.completion_tokens, completion.total_s)
        else:
            log.info("%s %d model=%s%s", route, status, model, f" ({note})" if note else "")

    def generation_request(self, body: s.ChatCompletionRequest | s.CompletionRequest, **what: Any) -> GenerationRequest:
        asked = body.requested_tokens()
        if asked is not None and asked > self.config.max_tokens:
            name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise RequestError(f"{name} is {asked}, more than this server's limit of {self.config.max_tokens} "
                               "(cag serve --max-tokens)", name)
        sampling = Sampling(temperature=body.temperature or 0.0, top_p=body.top_p or 1.0, seed=body.seed)
        return GenerationRequest(model=body.model, max_tokens=asked or self.config.max_tokens, sampling=sampling,
                                 stop=body.stop_strings(), **what)

    async def respond(self, request: Request, body, what: GenerationRequest, render: _Chat) -> Response:
        submission = _Submission(self.worker, what)
        first = await submission.next()
        if isinstance(first, Failed):
            raise first.error
        if body.stream:
            stream = self._stream(submission, render, body.wants_usage_in_stream(), what.model)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        completion = await self._collect(submission, request)
        if completion is None:
            self.record(request, render.route, 499, what.model, note="the client left")
            return Response(status_code=499)
        self.record(request, render.route, 200, what.model, completion)
        return JSONResponse(render.whole(completion, _usage(completion)).model_dump())

    async def _collect(self, submission: _Submission, request: Request) -> Completion | None:
        """The finished completion; None if the client left first (its row is dropped)."""
        while True:
            try:
                event = await asyncio.wait_for(submission.next(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    submission.cancel()
                    return None
                continue
            if isinstance(event, Finished):
                return event.completion
            if isinstance(event, Failed):
                raise event.error

    async def _stream(self, submission: _Submission, render: _Chat, include_usage: bool, model: str) -> AsyncIterator[str]:
        """Server-sent events: the text as it comes, then the finish reason, usage if asked, and [DONE]."""
        done = False
        try:
            start = render.start()
            if start is not None:
                yield _sse(start)
            while not done:
                event = await submission.next()
                if isinstance(event, Delta):
                    yield _sse(render.delta(event.text))
                elif isinstance(event, Finished):
                    done = True
                    yield _sse(render.end(event.completion.finish_reason))
                    if include_usage:
                        yield _sse(render.usage(_usage(event.completion)))
                    self.record(None, render.route, 200, model, event.completion)
                elif isinstance(event, Failed):
                    done = True
                    status, message, type_, param, code = _error_of(event.error)
                    self.record(None, render.route, status, model, note=message)
                    yield _sse(s.ErrorBody(error=s.ErrorDetail(message=message, type=type_, param=param, code=code)))
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client left mid-stream (or the server is going down): free the row
                submission.cancel()
                self.record(None, render.route, 499, model, note="the client left mid-stream")


class _Guard:
    """Checks the API key of every /v1 request and bounds request bodies, before any parsing."""

    def __init__(self, app, service: _Service) -> None:
        self.app = app
        self.service = service
        key = service.config.api_key
        self._key = key.encode() if key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        problem = self._check(scope["path"], headers)
        if problem is not None:
            status, message, code = problem
            self.service.record(None, scope["path"], status, note=message)
            response = error_response(status, message, "invalid_request_error", None, code)
            if status == 401:
                response.headers["WWW-Authenticate"] = "Bearer"
            return await response(scope, receive, send)
        await self.app(scope, self._bounded(receive), send)

    def _check(self, path: str, headers: dict[bytes, bytes]) -> tuple[int, str, str] | None:
        if self._key is not None and path.startswith("/v1"):
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            # compare_digest: the time taken says nothing about how much of the key was right.
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                return 401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'", "invalid_api_key"
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.service.config.max_body:
            return 413, f"the request body is larger than this server's limit of {self.service.config.max_body} bytes", \
                "request_too_large"
        return None

    def _bounded(self, receive):
        """A chunked body (no Content-Length) is counted as it arrives."""
        seen = 0
        limit = self.service.config.max_body

        async def bounded():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge()
            return message

        return bounded


class _BodyTooLarge(Exception):
    pass


def create_app(lm: LoadedModel, open_store: Callable[[], Any], config: ServerConfig = ServerConfig()) -> FastAPI:
    """The ASGI app of ``cag serve``; its worker starts and stops with the app's lifespan."""
    service = _Service(lm, open_store, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(service.worker.start)
        try:
            yield
        finally:
            # After uvicorn has let the requests in flight finish: stop, writing pending prompt caches.
            await asyncio.to_thread(service.worker.stop)

    app = FastAPI(title="cag", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    _routes(app, service)
    _handlers(app, service)
    app.add_middleware(_Guard, service=service)
    return app


def _routes(app: FastAPI, service: _Service) -> None:
    worker = service.worker

    @app.post("/v1/chat/completions")
    async def chat_completions(body: s.ChatCompletionRequest, request: Request) -> Response:
        what = service.generation_request(body, messages=tuple(m.as_turn() for m in body.messages))
        return await service.respond(request, body, what, _Chat(body.model))

    @app.post("/v1/completions")
    async def completions(body: s.CompletionRequest, request: Request) -> Response:
        what = service.generation_request(body, prompt=body.text())
        return await service.respond(request, body, what, _Text(body.model))

    @app.get("/v1/models")
    async def list_models() -> Response:
        names = await asyncio.wrap_future(worker.call(worker.models))
        created = int(time.time())
        cards = [s.ModelCard(id=n, created=created, owned_by="cag" if i else "base") for i, n in enumerate(names)]
        service.record(None, "/v1/models", 200)
        return JSONResponse(s.ModelList(data=cards).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        names = await asyncio.wrap_future(worker.call(worker.models))
        if model_id not in names:
            raise CacheNotFoundError(f"the model {model_id!r} does not exist: GET /v1/models lists the models here")
        service.record(None, "/v1/models/{id}", 200, model_id)
        card = s.ModelCard(id=model_id, created=int(time.time()), owned_by="cag" if names.index(model_id) else "base")
        return JSONResponse(card.model_dump())

    @app.get("/health")
    async def health() -> Response:
        alive = worker.alive
        body = {"status": "ok" if alive else "worker stopped", "model": worker.model_id,
                "running": worker.running, "waiting": worker.waiting}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)


def _handlers(app: FastAPI, service: _Service) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc)
        service.record(request, request.url.path, 400, note=message)
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc.__cause__, _BodyTooLarge):
            status, message = 413, f"the request body is larger than this server's limit of {service.config.max_body} bytes"
        else:
            status, message = exc.status_code, str(exc.detail)
        service.record(request, request.url.path, status, note=message)
        return error_response(status, message, "invalid_request_error" if status < 500 else "server_error")

    @app.exception_handler(CagError)
    async def refused(request: Request, exc: CagError) -> Response:
        status, message, type_, param, code = _error_of(exc)
        service.record(request, request.url.path, status, note=message)
        return error_response(status, message, type_, param, code)

    # Anything else is a bug: the client gets a plain 500 error object, the log gets the traceback
    # (Starlette re-raises after this handler, so uvicorn logs it).
    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> Response:
        status, message, type_, param, code = _error_of(exc)
        service.record(request, request.url.path, status, note=type(exc).__name__)
        return error_response(status, message, type_, param, code)
