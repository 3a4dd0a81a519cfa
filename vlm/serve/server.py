"""The OpenAI-compatible HTTP server: `python serve.py ckpt=PATH` (conf/serve.yaml).

    POST /v1/chat/completions   chat completions, streamed (server-sent events) or not
    GET  /v1/models             the one model served
    GET  /health                200 and the engine's counters while the server is up

Why FastAPI + uvicorn and not a model-serving framework (LitServe, Ray Serve): the batching is
ours (`vlm.serve.engine` puts every running request into each decoder step and shares prefix and
image caches across them); what the HTTP layer must do is stream each request's tokens as they
come, notice at once when its client goes away (to free the slot), and answer bad input with an
OpenAI-style 4xx before any work is queued. A framework that batches requests itself would sit a
second, blind batcher on top of ours. FastAPI gives the routing and per-request streaming
responses; uvicorn runs it.

Nothing a request sends reaches the engine unchecked: the body is size-capped and parsed by
`openai_protocol` (images checked from their headers, remote URLs refused), so a bad request gets
its 4xx and every other request carries on.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from vlm.serve.api import Delta, Finished, Overloaded, RequestError
from vlm.serve.bridge import ERROR, EventPump
from vlm.serve.media_urls import MediaPolicy
from vlm.serve.openai_protocol import (
    chunk_body,
    completion_body,
    delta_chunks,
    error_body,
    error_from,
    finish_chunks,
    parse_chat_request,
)

log = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    """default_max_tokens: when a request names neither max_tokens nor max_completion_tokens;
    default_temperature: when it names no temperature (OpenAI's default is 1).
    max_body_bytes: larger request bodies get 413 (images come inline, so allow for them).
    poll_s: how often a waiting request checks that its client is still there."""

    media: MediaPolicy = field(default_factory=MediaPolicy)
    default_max_tokens: int = 256
    max_body_bytes: int = 64 * 2**20
    poll_s: float = 0.5
    default_temperature: float = 1.0


def _error(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status, headers=headers)


async def _read_json(request: Request, cap: int):
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > cap:
        raise RequestError(f"the request body is {size} bytes, over the {cap} allowed", 413, None, "body_too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > cap:
            raise RequestError(f"the request body is over the {cap} bytes allowed", 413, None, "body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:200]
        raise RequestError(f"the request body is not valid JSON: {reason}", 400, None, "invalid_json") from None


def _sse(body) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def create_app(engine, options: ServerOptions | None = None) -> FastAPI:
    """The app for one running engine (started and closed by the caller)."""
    opts = options or ServerOptions()
    model = engine.model_name
    app = FastAPI(title="vlm", summary="OpenAI-compatible chat completions over a vlm checkpoint")

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError):
        return JSONResponse(error_from(e), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException):
        return _error(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(e).__name__}", code="internal_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model, "engine": engine.stats()}

    @app.get("/v1/models")
    async def models():
        card = {"id": model, "object": "model", "created": 0, "owned_by": "vlm", "max_model_len": engine.max_context}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_json(request, opts.max_body_bytes)
        # reading files and decoding base64 is blocking work: off the event loop
        parsed = await run_in_threadpool(
            parse_chat_request, body, model, opts.media, opts.default_max_tokens, opts.default_temperature
        )
        try:
            handle = engine.submit(parsed.request)
        except Overloaded as e:
            return _error(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": "1"})
        pump = EventPump(handle)
        handed_over = False  # to the stream, or the request ended: otherwise cancel it on the way out
        try:
            first = await pump.next(request, opts.poll_s)  # admitted: the prompt is built and fits
            if first is None:
                return Response(status_code=499)  # the client is gone: nobody reads this
            if first[0] == ERROR:
                handed_over = True
                raise first[1]
            rid, created = parsed.request.request_id, int(time.time())
            if parsed.stream:
                handed_over = True
                return StreamingResponse(
                    _stream(request, pump, rid, created, parsed.include_usage),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                    # runs however the response ends, also when the client left before the stream
                    # started (the generator's own `finally` never runs then); a no-op once finished
                    background=BackgroundTask(handle.cancel),
                )
            while True:
                item = await pump.next(request, opts.poll_s)
                if item is None:
                    return Response(status_code=499)
                ev = item[1]
                if isinstance(ev, Finished):
                    handed_over = True
                    if ev.finish_reason == "error":
                        raise ev.error or RequestError("the request failed", 500, None, "internal_error")
                    return completion_body(rid, model, ev, created)
        finally:
            if not handed_over:
                handle.cancel()

    async def _stream(request: Request, pump: EventPump, rid: str, created: int, include_usage: bool):
        done = False
        try:  # Starlette cancels this generator when the client disconnects: the finally frees the slot
            yield _sse(chunk_body(rid, model, created, {"role": "assistant", "content": ""}))
            while True:
                item = await pump.next(request, opts.poll_s)
                if item is None:
                    return
                ev = item[1]
                if isinstance(ev, Delta) and ev.text:
                    for chunk in delta_chunks(rid, model, created, ev):  # the choice's index, logprobs
                        yield _sse(chunk)
                elif isinstance(ev, Finished):
                    done = True
                    if ev.finish_reason == "error":
                        err = ev.error or RequestError("the request failed", 500, None, "internal_error")
                        yield _sse(error_from(err))
                    else:
                        for chunk in finish_chunks(rid, model, created, ev):  # one per choice
                            yield _sse(chunk)
                        if include_usage:
                            yield _sse(chunk_body(rid, model, created, None, usage=ev.usage))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not done:
                pump.handle.cancel()

    return app


def options_from(cfg) -> ServerOptions:
    m = cfg.media
    media = MediaPolicy(
        max_images=int(m.max_images),
        max_videos=int(m.max_videos),
        max_image_pixels=int(m.max_image_pixels),
        max_file_bytes=int(float(m.max_file_mb) * 2**20),
        local_media=bool(m.local_media),
        media_root=m.media_root,
    )
    return ServerOptions(
        media,
        default_max_tokens=int(cfg.default_max_tokens),
        max_body_bytes=int(float(cfg.max_body_mb) * 2**20),
        default_temperature=float(cfg.default_temperature),
    )


def run(cfg) -> None:
    """Load the checkpoint, start the engine and serve until Ctrl-C."""
    import torch
    import uvicorn

    from vlm.checkpoint.load import load_checkpoint
    from vlm.serve.engines import build_engine

    if not cfg.get("ckpt"):
        raise FileNotFoundError("no checkpoint given: pass ckpt=PATH (a .ckpt file or an export folder)")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    loaded = load_checkpoint(cfg.ckpt)
    engine = build_engine(loaded, cfg.engine, dtype=cfg.dtype, model_name=cfg.get("model_name"), ckpt=cfg.ckpt)
    app = create_app(engine, options_from(cfg))
    with engine:
        print(f"serving {engine.model_name!r} on http://{cfg.host}:{cfg.port}/v1 (Ctrl-C to stop)", flush=True)
        uvicorn.run(app, host=cfg.host, port=int(cfg.port), log_level=cfg.log_level)
