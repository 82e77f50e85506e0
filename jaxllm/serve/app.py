"""The HTTP side of the server: FastAPI routes in OpenAI's shapes over one `Engine`.

    POST /v1/completions        POST /v1/chat/completions        (stream: server-sent events)
    GET  /v1/models             GET  /health                     GET  /  (the chat page)

Every error is OpenAI's error object. Bad input gets a 4xx status (503 with Retry-After when
the queue is full): malformed JSON, a body over the size limit, an unknown field or model, a
wrong type or a value out of range. A failure of the engine itself is a 500. A request's text prompt is tokenized, and its constraint compiled, on a
worker thread, so the event loop keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from pathlib import Path

import anyio
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import FileResponse, JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from jaxllm.errors import JaxllmError
from jaxllm.request import RequestError
from jaxllm.serve import protocol
from jaxllm.serve.engine import Engine, EngineError, Job
from jaxllm.serve.protocol import ApiError

STATIC = Path(__file__).resolve().parent / "static"
RETRY_AFTER_S = 1


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               max_n: int = 4, grace_s: float = 0.0) -> FastAPI:
    """The app over `engine` (started with the app, stopped when it shuts down, after letting
    running requests finish for up to `grace_s`). With `api_key`, /v1/* needs
    `Authorization: Bearer <api_key>`."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine._thread is None:
            engine.start()
        yield
        await run_in_threadpool(engine.stop, grace_s)

    app = FastAPI(title="jaxllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error(e: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
        if e.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown path, wrong method
        return error(ApiError(str(e.detail), e.status_code, code="not_found" if e.status_code == 404 else None))

    if api_key:
        app.add_middleware(_BearerKey, api_key=api_key, refuse=lambda: error(ApiError(
            "a valid API key is needed: Authorization: Bearer <key>", 401, code="invalid_api_key",
            kind="authentication_error")))

    async def read_json(request: HttpRequest):
        length = request.headers.get("content-length")
        if length and length.isascii() and length.isdecimal() and int(length) > max_body_bytes:
            raise ApiError(f"the request body is larger than {max_body_bytes} bytes", 413)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_body_bytes:
                raise ApiError(f"the request body is larger than {max_body_bytes} bytes", 413)
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise ApiError("the request body is not valid JSON") from None

    def prepare(request, meta):
        """Tokenizes and checks against the model (worker thread); chat's default max_tokens is the
        rest of the context."""
        try:
            prepared = engine.prepare(request, rest_of_context=meta["chat"] and meta["max_tokens"] is None)
            return prepared.request, prepared
        except RequestError as e:
            first = e.fields[0] if e.fields else None
            raise ApiError(e.render(lambda f: protocol.API_NAMES.get(f, f)), param=protocol.API_NAMES.get(first, first)) from None
        except (EngineError, JaxllmError) as e:  # the prompt is too long, an id out of range, ...
            about_prompt = str(e).startswith(("prompt", "the prompt"))
            raise ApiError(str(e), getattr(e, "status", 400),
                           param=("messages" if meta["chat"] else "prompt") if about_prompt else None) from None

    async def generate(http: HttpRequest, chat: bool):
        body = await read_json(http)
        request, meta = protocol.to_request(body, chat, model=model_name, vocab_size=engine.cfg.vocab_size, max_n=max_n)
        request, prepared = await run_in_threadpool(prepare, request, meta)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event):  # from the engine's thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: no one is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(request, emit, prepared=prepared, wants_text=meta["stream"])
        try:
            engine.submit(job)
        except EngineError as e:
            raise ApiError(str(e), e.status, code="server_busy" if e.status == 503 else None) from None
        if meta["stream"]:
            # On shutdown, a running stream goes on for up to grace_s (then it is cancelled)
            return EventSourceResponse(_stream(job, events, meta), ping=15, shutdown_event=anyio.Event(),
                                       shutdown_grace_period=grace_s)
        try:
            while True:
                try:
                    kind, *rest = await asyncio.wait_for(events.get(), 0.25)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return JSONResponse({}, status_code=499)  # no one reads it; the slot is freed below
                    continue
                if kind == "done":
                    return JSONResponse(protocol.response(rest[0], meta, engine.tokenizer))
                if kind == "error":
                    raise ApiError(str(rest[0]), rest[0].status)
        finally:
            job.cancel()  # a no-op once the job has finished

    async def _stream(job: Job, events: asyncio.Queue, meta: dict):
        try:
            if meta["chat"]:
                for row in range(len(job.prepared.prompts)):
                    yield {"data": json.dumps(protocol.chunk(meta, row, first=True))}
            while True:
                kind, *rest = await events.get()
                if kind == "text":
                    row, piece = rest
                    yield {"data": json.dumps(protocol.chunk(meta, row, piece))}
                elif kind == "done":
                    result = rest[0]
                    for row, reason in enumerate(result.finish_reasons):
                        yield {"data": json.dumps(protocol.chunk(meta, row, reason=protocol.finish_reason(reason)))}
                    if meta["include_usage"]:
                        yield {"data": json.dumps(protocol.usage_chunk(meta, result))}
                    break
                else:
                    yield {"data": json.dumps(ApiError(str(rest[0]), rest[0].status).body())}
                    break
            yield {"data": "[DONE]"}
        finally:
            job.cancel()  # the client went away (or the stream ended: then a no-op)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await generate(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await generate(http, chat=True)

    created = int(time.time())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "jaxllm",
                                            "max_model_len": engine.context}]}

    @app.get("/health")
    async def health():
        if not engine.alive:
            return error(ApiError("the engine has stopped", 503, code="engine_stopped"))
        return {"status": "ok", "model": model_name, "slots": engine.slots, "busy_slots": engine.busy_slots,
                "queued": engine.queued}

    @app.get("/")
    async def page():
        index = STATIC / "index.html"
        if not index.is_file():
            raise ApiError("no chat page in this installation", 404)
        return FileResponse(index, media_type="text/html")

    return app


class _BearerKey:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <api_key>` (a plain ASGI wrapper, which
    leaves streaming and disconnect detection as they are)."""

    def __init__(self, app, api_key: str, refuse):
        self.app, self.key, self.refuse = app, api_key.encode(), refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode("latin-1"), self.key):
                return await self.refuse()(scope, receive, send)
        return await self.app(scope, receive, send)
