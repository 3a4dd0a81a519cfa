"""The OpenAI-compatible HTTP server: `python serve.py ckpt=PATH` (conf/serve.yaml).

    POST /v1/chat/completions   chat completions, streamed (server-sent events) or not
    GET  /v1/models             the one model served
    GET  /health                200 while the engine runs (503 once it stopped or while draining)
    GET  /metrics               Prometheus metrics (`vlm.serve.metrics`)

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

One request cannot hold up the others: the queue-full and bytes-in-flight checks come before a
body is read (`Retry-After` answers), JSON parsing and image checks run in worker threads, never
on the event loop that streams every other client's tokens, and a request that outlives
`request_timeout_s` ends with an error and frees its slot.

Safe defaults: no local files unless `media_root` names a folder (`media_urls`); an optional API
key (`Authorization: Bearer`, everything but `/health`); requests that carry an `Origin` header (a
web page in a browser) are refused unless the origin is listed in `cors_origins`, so a page the
operator visits cannot drive a server on localhost; a server on a loopback address also answers only
requests whose `Host` names a loopback address (`allowed_hosts`), so a page that rebinds its own
DNS name to 127.0.0.1 cannot read it either.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from vlm.serve.api import Delta, Finished, Overloaded, RequestError
from vlm.serve.bridge import ERROR, TICK, EventPump
from vlm.serve.media_urls import MediaPolicy
from vlm.serve.metrics import CONTENT_TYPE_LATEST, ServerMetrics
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
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # a client's X-Request-Id used as is
_OPEN_PATHS = ("/health",)  # answered without the API key (load balancers, probes)


@dataclass
class ServerOptions:
    """default_max_tokens: when a request names neither max_tokens nor max_completion_tokens;
    default_temperature: when it names no temperature (OpenAI's default is 1).
    max_body_bytes: larger request bodies get 413 (images come inline, so allow for them).
    max_inflight_bytes: request bytes being received or parsed at once, all clients together;
    beyond it a request gets 503 + Retry-After before more of its body is read.
    poll_s: how often a waiting request checks that its client is still there.
    api_key: if set, every endpoint but /health wants `Authorization: Bearer <api_key>`.
    cors_origins: web origins allowed to call the server from a browser ("*": any); a request
    with an Origin header not listed is refused (403).
    allowed_hosts: the `Host` header values (without port) this server answers (None: any); a
    request naming another host is refused (421) before anything else is read.
    request_timeout_s: a request still running this long after it arrived ends (None: never).
    keepalive_s: a stream that has sent nothing for this long gets an SSE comment line."""

    media: MediaPolicy = field(default_factory=lambda: MediaPolicy(local_media=False))
    default_max_tokens: int = 256
    max_body_bytes: int = 64 * 2**20
    poll_s: float = 0.5
    default_temperature: float = 1.0
    max_inflight_bytes: int = 256 * 2**20
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] | None = None
    request_timeout_s: float | None = 600.0
    keepalive_s: float = 15.0

    def __repr__(self) -> str:  # never print the key
        return f"ServerOptions(media={self.media!r}, api_key={'set' if self.api_key else None}, ...)"


def _error(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status, headers=headers)


class _InFlight:
    """Bytes of request bodies being received or parsed, all requests together."""

    def __init__(self, cap: int):
        self.cap, self.used = cap, 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.cap:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


def _busy(cap: int) -> RequestError:
    e = RequestError(
        f"the server is receiving {cap} bytes of other requests; try again shortly", 503, None, "server_busy"
    )
    e.headers = {"Retry-After": "1"}
    return e


async def _read_body(request: Request, cap: int, inflight: _InFlight, held: list[int]) -> bytes:
    """The body, at most `cap` bytes; `held[0]` counts what it holds of `inflight` (the caller gives it back)."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > cap:
        raise RequestError(f"the request body is {size} bytes, over the {cap} allowed", 413, None, "body_too_large")
    if size.isdigit():  # reserve the whole body before reading any of it
        if not inflight.take(int(size)):
            raise _busy(inflight.cap)
        held[0] = int(size)
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > cap:
            raise RequestError(f"the request body is over the {cap} bytes allowed", 413, None, "body_too_large")
        if n > held[0]:  # no (or a wrong) Content-Length: reserve as it comes
            if not inflight.take(n - held[0]):
                raise _busy(inflight.cap)
            held[0] = n
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:200]
        raise RequestError(f"the request body is not valid JSON: {reason}", 400, None, "invalid_json") from None


def _sse(body) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _timeout_error(seconds: float) -> RequestError:
    return RequestError(f"the request ran past this server's {seconds:g} s limit", 504, None, "request_timeout")


def _unavailable(draining: bool) -> RequestError:
    if draining:
        return RequestError("the server is shutting down; try another replica", 503, None, "server_shutting_down")
    return RequestError("the engine has stopped; the server cannot answer", 503, None, "engine_stopped")


class _Guard:
    """ASGI middleware before any route: the request id, the Origin check and the API key.

    Refusals are answered without reading the body. The id is the client's `X-Request-Id` when it
    is short and plain (`_REQUEST_ID`), a new one otherwise; every response carries it back."""

    def __init__(self, app, opts: ServerOptions, metrics: ServerMetrics):
        self.app, self.opts, self.metrics = app, opts, metrics
        self.key = opts.api_key.encode() if opts.api_key else None
        self.any_origin = "*" in opts.cors_origins
        self.origins = {o.rstrip("/") for o in opts.cors_origins}
        self.hosts = None if opts.allowed_hosts is None else {h.lower().strip("[]") for h in opts.allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        if self.hosts is not None and _host_name(headers.get("host", "")) not in self.hosts:
            return await self._refuse(
                scope, send_with_id, 421, "this server does not answer for that Host", "host_not_allowed"
            )
        origin = headers.get("origin")
        preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        if origin is not None and not (self.any_origin or origin.rstrip("/") in self.origins):
            return await self._refuse(
                scope, send_with_id, 403, "this origin may not call this server", "origin_not_allowed"
            )
        if self.key is not None and not preflight and scope["path"] not in _OPEN_PATHS:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                return await self._refuse(
                    scope,
                    send_with_id,
                    401,
                    "a valid API key is required (Authorization: Bearer <key>)",
                    "invalid_api_key",
                    {"WWW-Authenticate": "Bearer"},
                )
        return await self.app(scope, receive, send_with_id)

    async def _refuse(self, scope, send, status, message, code, headers=None):
        self.metrics.refusal(code)
        await _error(status, message, code=code, headers=headers)(scope, _no_body, send)


def _host_name(host: str) -> str:
    """A Host header's name, lower-case, without its port or an IPv6 address's brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "::1"]


async def _no_body():
    return {"type": "http.request", "body": b"", "more_body": False}


def create_app(engine, options: ServerOptions | None = None) -> FastAPI:
    """The app for one running engine (started and closed by the caller)."""
    opts = options or ServerOptions()
    model = engine.model_name
    app = FastAPI(title="vlm", summary="OpenAI-compatible chat completions over a vlm checkpoint")
    metrics = ServerMetrics(engine)
    inflight = _InFlight(opts.max_inflight_bytes)
    app.state.metrics = metrics
    app.state.inflight = inflight  # bytes of request bodies held now (`.used`)
    app.state.draining = False  # set by `run` on SIGTERM: new requests get 503, open ones finish

    def alive() -> bool:
        return bool(getattr(engine, "alive", True))

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError):
        metrics.refusal(e.code or str(e.status))
        return JSONResponse(error_from(e), status_code=e.status, headers=getattr(e, "headers", None))

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException):
        return _error(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        log.exception("unhandled error")
        metrics.refusal("internal_error")
        return _error(500, f"internal error: {type(e).__name__}", code="internal_error")

    @app.get("/health")
    async def health():
        ok = alive() and not app.state.draining
        status = "ok" if ok else ("draining" if alive() else "engine_stopped")
        body = {"status": status, "model": model, "engine": engine.stats()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        names = getattr(engine, "model_names", [model])  # a base and its adapters (vlm.serve.named)
        cards = [
            {"id": n, "object": "model", "created": 0, "owned_by": "vlm", "max_model_len": engine.max_context}
            for n in names
        ]
        return {"object": "list", "data": cards}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived, started = time.perf_counter(), time.monotonic()
        deadline = started + opts.request_timeout_s if opts.request_timeout_s else None
        if app.state.draining or not alive():
            raise _unavailable(app.state.draining)
        full = getattr(engine, "full", None)
        if full is not None and full():  # before reading the body: nothing to spend on it
            metrics.refusal("queue_full")
            return _error(429, "the engine's queue is full", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        held = [0]
        try:
            raw = await _read_body(request, opts.max_body_bytes, inflight, held)
            body = await run_in_threadpool(_parse_json, raw)  # a 64 MB body parses off the event loop
            del raw
            # reading files and decoding base64 is blocking work: off the event loop
            parsed = await run_in_threadpool(
                parse_chat_request,
                body,
                getattr(engine, "model_names", model),
                opts.media,
                opts.default_max_tokens,
                opts.default_temperature,
            )
            del body
        finally:
            inflight.give(held[0])
        rid = request.state.request_id
        parsed.request.request_id = rid if rid.startswith("chatcmpl-") else f"chatcmpl-{rid}"
        try:
            handle = engine.submit(parsed.request)
        except Overloaded as e:
            if not alive():
                raise _unavailable(False) from None
            metrics.refusal("queue_full")
            return _error(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": "1"})
        pump = EventPump(handle)
        handed_over = False  # to the stream, or the request ended: otherwise cancel it on the way out
        try:
            first = await pump.next(request, opts.poll_s, deadline)  # admitted: the prompt is built and fits
            if first is None:
                metrics.finished(None, "cancelled", arrived, time.perf_counter(), None)
                return Response(status_code=499)  # the client is gone: nobody reads this
            if first is TICK:
                metrics.finished(None, "timeout", arrived, time.perf_counter(), None)
                raise _timeout_error(opts.request_timeout_s)
            if first[0] == ERROR:
                handed_over = True
                raise first[1]
            rid, created = parsed.request.request_id, int(time.time())
            name = parsed.request.model or model
            if parsed.stream:
                handed_over = True
                return StreamingResponse(
                    _stream(request, pump, rid, created, parsed.include_usage, arrived, deadline, name),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                    # runs however the response ends, also when the client left before the stream
                    # started (the generator's own `finally` never runs then); a no-op once finished
                    background=BackgroundTask(handle.cancel),
                )
            last = None
            while True:
                item = await pump.next(request, opts.poll_s, deadline)
                now = time.perf_counter()
                if item is None:
                    metrics.finished(None, "cancelled", arrived, now, handle.first_token_at)
                    return Response(status_code=499)
                if item is TICK:
                    metrics.finished(None, "timeout", arrived, now, handle.first_token_at)
                    raise _timeout_error(opts.request_timeout_s)
                ev = item[1]
                if isinstance(ev, Delta):
                    if last is not None:
                        metrics.token_gap(now - last, len(ev.token_ids))
                    last = now
                elif isinstance(ev, Finished):
                    handed_over = True
                    metrics.finished(ev, ev.finish_reason, arrived, now, handle.first_token_at)
                    if ev.finish_reason == "error":
                        raise ev.error or RequestError("the request failed", 500, None, "internal_error")
                    return completion_body(rid, name, ev, created)
        finally:
            if not handed_over:
                handle.cancel()

    async def _stream(request, pump: EventPump, rid, created, include_usage, arrived, deadline, model=model):
        done = False
        sent = time.monotonic()  # when the client last got a line
        last = None  # perf_counter of the last Delta
        try:  # Starlette cancels this generator when the client disconnects: the finally frees the slot
            yield _sse(chunk_body(rid, model, created, {"role": "assistant", "content": ""}))
            while True:
                until = sent + opts.keepalive_s if opts.keepalive_s else None
                if deadline is not None:
                    until = deadline if until is None else min(until, deadline)
                item = await pump.next(request, opts.poll_s, until)
                if item is None:
                    return
                now = time.perf_counter()
                if item is TICK:
                    if deadline is not None and time.monotonic() >= deadline:
                        done = True
                        pump.handle.cancel()
                        metrics.finished(None, "timeout", arrived, now, pump.handle.first_token_at)
                        metrics.refusal("request_timeout")
                        yield _sse(error_from(_timeout_error(opts.request_timeout_s)))
                        yield "data: [DONE]\n\n"
                        return
                    yield ": keep-alive\n\n"
                    sent = time.monotonic()
                    continue
                ev = item[1]
                if isinstance(ev, Delta) and ev.text:
                    if last is not None:
                        metrics.token_gap(now - last, len(ev.token_ids))
                    last = now
                    for chunk in delta_chunks(rid, model, created, ev):  # the choice's index, logprobs
                        yield _sse(chunk)
                    sent = time.monotonic()
                elif isinstance(ev, Finished):
                    done = True
                    metrics.finished(ev, ev.finish_reason, arrived, now, pump.handle.first_token_at)
                    if ev.finish_reason == "error":
                        err = ev.error or RequestError("the request failed", 500, None, "internal_error")
                        metrics.refusal(err.code or str(err.status))
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
                metrics.finished(None, "cancelled", arrived, time.perf_counter(), pump.handle.first_token_at)

    app.add_middleware(_Guard, opts=opts, metrics=metrics)
    if opts.cors_origins:  # outermost: answers the browser's preflight for the listed origins
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(opts.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id"],
        )
    return app


def options_from(cfg) -> ServerOptions:
    m = cfg.media
    root = m.get("media_root")
    media = MediaPolicy(
        max_images=int(m.max_images),
        max_videos=int(m.max_videos),
        max_image_pixels=int(m.max_image_pixels),
        max_file_bytes=int(float(m.max_file_mb) * 2**20),
        local_media=bool(root),  # local files only from a named folder
        media_root=str(root) if root else None,
    )
    timeout = cfg.get("request_timeout_s")
    return ServerOptions(
        media,
        default_max_tokens=int(cfg.default_max_tokens),
        max_body_bytes=int(float(cfg.max_body_mb) * 2**20),
        default_temperature=float(cfg.default_temperature),
        max_inflight_bytes=int(float(cfg.get("max_inflight_mb", 256)) * 2**20),
        api_key=api_key_from(cfg),
        cors_origins=[str(o) for o in (cfg.get("cors_origins") or [])],
        allowed_hosts=allowed_hosts_from(cfg),
        request_timeout_s=float(timeout) if timeout else None,
        keepalive_s=float(cfg.get("keepalive_s", 15) or 0),
    )


def allowed_hosts_from(cfg) -> list[str] | None:
    """`allowed_hosts` from the config; unset: the loopback names when the server listens on a
    loopback address (the DNS-rebinding guard), any host otherwise (put a proxy's name here)."""
    hosts = cfg.get("allowed_hosts")
    if hosts:
        return [str(h) for h in hosts]
    return [*LOOPBACK_HOSTS, str(cfg.host).strip("[]").lower()] if _is_loopback(str(cfg.host)) else None


def api_key_from(cfg) -> str | None:
    """`api_key` from the config, else the VLM_API_KEY environment variable (None: no key)."""
    import os

    key = cfg.get("api_key") or os.environ.get("VLM_API_KEY") or None
    return str(key) if key else None


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The one-line warning for a server other machines can reach with no API key."""
    if api_key or _is_loopback(str(host)):
        return None
    return (
        f"warning: serving on {host} with no API key: anyone who can reach this port can use the model "
        "(set VLM_API_KEY or api_key=...)"
    )


def draining_server(app, config):
    """uvicorn's Server for `app`, which on SIGTERM / Ctrl-C first marks the app draining (new
    requests and /health get 503) while the open requests finish, for at most the config's
    `timeout_graceful_shutdown` seconds (`drain_timeout_s`); then the rest are cut off."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.draining = True
            super().handle_exit(sig, frame)

    return Server(config)


def run(cfg) -> None:
    """Load the checkpoint, start the engine and serve until SIGTERM / Ctrl-C (then drain)."""
    import torch
    import uvicorn

    from vlm.checkpoint.load import load_checkpoint
    from vlm.serve.engines import build_engine
    from vlm.serve.memory import freeze_loaded_objects, keep_freed_memory
    from vlm.serve.threads import single_threaded_here

    if not cfg.get("ckpt"):
        raise FileNotFoundError("no checkpoint given: pass ckpt=PATH (a .ckpt file or an export folder)")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))  # the engine thread's, and new threads' by default
    # this thread loads the model and then serves HTTP: single-threaded, so that the engine thread's
    # OpenMP team is the process's only one (`vlm.serve.threads`)
    single_threaded_here()
    keep_freed_memory()  # activations reuse freed pages instead of faulting in new ones (`vlm.serve.memory`)
    options = options_from(cfg)
    warning = exposure_warning(cfg.host, options.api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    loaded = load_checkpoint(cfg.ckpt)
    if loaded.model.lora is not None or cfg.get("adapter"):  # adapters folded into the weights
        from vlm.checkpoint.adapters import for_inference

        loaded = for_inference(loaded, cfg.get("adapter"))
    copies = {}
    if cfg.get("adapters"):  # one more model per adapter, picked by the request's `model` (vlm.serve.named)
        from vlm.serve.named import adapter_copies, adapter_engines

        copies = adapter_copies(loaded, dict(cfg.adapters))
    engine = build_engine(loaded, cfg.engine, dtype=cfg.dtype, model_name=cfg.get("model_name"), ckpt=cfg.ckpt)
    if copies:
        build = lambda lv, name: build_engine(lv, cfg.engine, dtype=cfg.dtype, model_name=name)
        engine = adapter_engines(engine, copies, build)
    app = create_app(engine, options)
    freeze_loaded_objects()  # the collector's full passes no longer walk the model (`vlm.serve.memory`)
    drain = cfg.get("drain_timeout_s")
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=int(cfg.port),
        log_level=cfg.log_level,
        timeout_graceful_shutdown=float(drain) if drain is not None else None,
    )
    with engine:
        print(f"serving {engine.model_name!r} on http://{cfg.host}:{cfg.port}/v1 (Ctrl-C to stop)", flush=True)
        draining_server(app, config).run()
