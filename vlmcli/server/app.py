"""The FastAPI app: POST /v1/chat/completions (JSON or server-sent events), GET /v1/models,
GET /health. Every refusal is OpenAI's error shape; nothing returns a traceback.

A request is checked in this order, cheapest first: API key (401), body size (413), JSON
(400) and fields (422), model (404), n (400), messages and images (400), a place in the
engine (503), then the images are fetched and preprocessed and the prompt is built (400
for a bad image or a prompt that does not fit) before it joins the batch.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmcli.errors import ContextLengthError, ImageError, VlmError
from vlmcli.generate import SamplingOptions, Timings
from vlmcli.inputs import MAX_DOWNLOAD_BYTES
from vlmcli.pipeline import Pipeline
from vlmcli.server import messages as openai_messages
from vlmcli.server.engine import Delta, Engine, Failed, Finished, Job, QueueFull, ShuttingDown
from vlmcli.server.schemas import ApiError, ChatCompletionRequest

log = logging.getLogger("vlm.serve")

# A data: URL of the largest image `vlm describe` fetches (base64: 4 bytes per 3) and the JSON around it.
MAX_BODY_BYTES = MAX_DOWNLOAD_BYTES * 4 // 3 + 1024 * 1024
# A larger body is refused without reading the rest of it (the connection is closed).
_DRAIN_BYTES = 4 * MAX_BODY_BYTES
MAX_STOPS = 4  # as OpenAI


def create_app(
    pipe: Pipeline,
    engine: Engine,
    *,
    model_id: str,
    api_key: str | None = None,
    allow_local_files: bool = False,
    max_tokens_default: int = 256,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="vlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(ApiError(e.status_code, message, code=code).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return _validation_response(e.errors())

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.error("internal error: %s: %s", type(e).__name__, e)
        error = ApiError(500, "internal server error", type="server_error", code="internal_error")
        return JSONResponse(error.body(), status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "vlm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await _read_body(request, max_body_bytes)
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        try:
            req = ChatCompletionRequest.model_validate(data)
        except ValidationError as e:
            return _validation_response(e.errors())
        if req.model != model_id:
            raise ApiError(404, f"the model '{req.model}' does not exist; this server serves '{model_id}'", param="model", code="model_not_found")
        if req.n not in (None, 1):
            raise ApiError(400, "n must be 1: this server generates one choice per request", param="n", code="invalid_value")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"at most {MAX_STOPS} stop sequences", param="stop", code="invalid_value")
        if not pipe.family.chat and len(req.messages) > 1:
            raise ApiError(400, f"{pipe.family.name} models answer one prompt at a time: send one user message", param="messages")
        chat, images = openai_messages.convert(req.messages, allow_local_files=allow_local_files)
        opts = SamplingOptions(
            max_new_tokens=req.max_completion_tokens or req.max_tokens or max_tokens_default,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            seed=req.seed,
        )

        try:
            engine.reserve()
        except QueueFull:
            raise ApiError(503, "the server is busy: every place in the queue is taken; retry later", type="server_error", code="queue_full") from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
        try:
            seq, prepared = await run_in_threadpool(pipe.prepare_prompt, chat, images, Timings(), engine.context)
        except BaseException as e:
            engine.release()
            if isinstance(e, ContextLengthError):
                raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
            if isinstance(e, ImageError):
                raise ApiError(400, str(e), param="messages", code="invalid_image") from None
            if isinstance(e, VlmError):
                raise ApiError(400, str(e), param="messages") from None
            raise

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event) -> None:  # called on the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop has closed: nobody is listening
                pass

        job = Job(seq, prepared, opts, sink, stops)
        try:
            engine.submit(job)
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream(job, events, completion_id, model_id, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            while True:
                event = await events.get()
                if isinstance(event, Finished):
                    break
                if isinstance(event, Failed):
                    raise _failure(event)
        finally:
            job.cancel()  # a no-op once finished; frees the row if this handler was cancelled
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": event.text},
                    "logprobs": None,
                    "finish_reason": event.finish_reason,
                }
            ],
            "usage": _usage(event),
        }

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 past `limit` bytes. An oversized body is read to its end (up to
    _DRAIN_BYTES) and dropped, so the client gets the 413 rather than a reset connection."""
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    if too_large and int(declared) > _DRAIN_BYTES:
        raise ApiError(413, f"the request body is larger than the limit of {_mib(limit)}", code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_large = True
            chunks = []
            if size > _DRAIN_BYTES:
                break
        elif not too_large:
            chunks.append(chunk)
    if too_large:
        raise ApiError(413, f"the request body is larger than the limit of {_mib(limit)}", code="request_too_large")
    return b"".join(chunks)


def _validation_response(errors) -> JSONResponse:
    """422 with the first problem, named by its place in the body (messages[0].content)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = ""
    for part in first.get("loc", ()):
        if part == "body":
            continue
        if isinstance(part, int):
            param += f"[{part}]"
        elif "[" in str(part) or "-" in str(part) or ":" in str(part):  # pydantic's union branch labels
            continue
        else:
            param += ("." if param else "") + str(part)
    message = f"{param}: {first['msg']}" if param else first["msg"]
    error = ApiError(422, message, param=param or None, code="invalid_value")
    return JSONResponse(error.body(), status_code=422)


def _failure(event: Failed) -> ApiError:
    if event.message == "the request was cancelled":
        return ApiError(503, "the server is shutting down; the request was cancelled", type="server_error", code="shutting_down")
    return ApiError(500, event.message, type="server_error", code="internal_error")


def _usage(event: Finished) -> dict:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": event.cached_tokens, "image_tokens": event.image_tokens},
    }


async def _stream(job: Job, events: asyncio.Queue, completion_id: str, model_id: str, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. A client
    that goes away cancels this generator, which cancels the job: its row is freed at the
    next step."""
    created = int(time.time())

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield chunk({"content": event.text})
            elif isinstance(event, Finished):
                yield chunk({}, event.finish_reason)
                if include_usage:
                    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id, "choices": [], "usage": _usage(event)}
                    yield f"data: {json.dumps(body)}\n\n"
                break
            else:
                yield f"data: {json.dumps(_failure(event).body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"
