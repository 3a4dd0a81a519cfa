"""OpenAI's chat-completions wire format <-> the engine's types (`vlm.serve.api`).

`parse_chat_request` turns a request body (already JSON-decoded) into a `ChatRequest`, or raises a
`RequestError` whose status, param and code become the OpenAI-style error body. The HTTP server
and the offline batch runner share it, so a body that works in one works in the other.

What is accepted: `messages` with roles system / developer (as system) / user / assistant and
content as a string or a list of `text`, `image_url` and `video_url` parts (see `media_urls`);
`max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `stop`, `seed`, `n`, `logprobs`,
`top_logprobs`, `presence_penalty`, `frequency_penalty`, `response_format` (text, json_object,
json_schema), the vLLM extras `top_k`, `min_p`, `repetition_penalty`, `stream` and
`stream_options.include_usage` (ranges: `vlm.serve.engine_config.check_sampling`; what each does:
`vlm.model.generate.SamplerOptions`). Parameters that would change the answer in a way this server
cannot honour (tools, logit_bias) are refused rather than silently ignored; other unknown fields
(`user`, `metadata`, ...) are ignored.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from vlm.serve.api import ChatRequest, Delta, Finished, Logprob, RequestError, SamplingParams, Usage
from vlm.serve.engine_config import (
    MAX_N,
    MAX_REPETITION_PENALTY,
    MAX_TOP_LOGPROBS,
    PENALTY_RANGE,
    check_sampling,
)
from vlm.serve.media_urls import MediaPolicy, check_image, media_bytes

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MEDIA_PARTS = {"image_url": "image", "video_url": "video"}
MAX_STOP = 16
MAX_STOP_CHARS = 256  # per stop string: each one is matched against the answer's tail every token
# field -> the values that mean "not used" (anything else is refused)
_UNSUPPORTED = {
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "logit_bias": (None, {}),
}


@dataclass
class ParsedRequest:
    request: ChatRequest
    stream: bool
    include_usage: bool


def _bad(message: str, param: str | None, code: str = "invalid_value", status: int = 400) -> RequestError:
    return RequestError(message, status=status, param=param, code=code)


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not (lo < v if lo_open else lo <= v) or not v <= hi:
        kind = "an integer" if integer else "a number"
        fmt = (lambda x: str(int(x))) if integer else (lambda x: f"{x:g}")
        rng = f"{'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}]"
        raise _bad(f"{name} must be {kind} in {rng}, got {v!r}", name)
    return v


def _parts(content, where: str) -> list:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return content
    raise _bad(f"{where}.content must be a string or a list of content parts", "messages")


def _media(part: dict, kind: str, where: str, policy: MediaPolicy) -> dict:
    field = part.get(f"{kind}_url")  # {"url": ...}, or the bare string some clients send
    url = field.get("url") if isinstance(field, dict) else field
    data = media_bytes(url, kind, where, policy)
    if kind == "image":
        check_image(data, where, policy)
    return {"type": kind, kind: data}


def parse_messages(messages, policy: MediaPolicy) -> list[dict]:
    """OpenAI messages -> our conversation with the media bytes inline (`vlm.serve.api`)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    counts = {"image": 0, "video": 0}
    for m in messages:  # count first: refuse too many media before reading or decoding any
        for p in m.get("content") if isinstance(m, dict) and isinstance(m.get("content"), list) else []:
            kind = _MEDIA_PARTS.get(p.get("type")) if isinstance(p, dict) else None
            if kind:
                counts[kind] += 1
    for kind, cap in (("image", policy.max_images), ("video", policy.max_videos)):
        if counts[kind] > cap:
            raise _bad(
                f"{counts[kind]} {kind}s in one request; this server takes at most {cap}",
                "messages",
                f"too_many_{kind}s",
            )
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'", "messages")
        role = ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise _bad(f"{where}.role={m.get('role')!r} is not one of {', '.join(ROLES)}", "messages")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        parts = []
        for j, p in enumerate(_parts(content, where)):
            at = f"{where}.content[{j}]"
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text":
                if not isinstance(p.get("text"), str):
                    raise _bad(f"{at}: a text part needs a string 'text'", "messages")
                parts.append({"type": "text", "text": p["text"]})
            elif kind in _MEDIA_PARTS:
                if role == "system":
                    raise _bad(f"{at}: a {m['role']} message cannot hold media", "messages")
                parts.append(_media(p, _MEDIA_PARTS[kind], at, policy))
            else:
                raise _bad(f"{at}: unsupported content part type {kind!r} (text, image_url, video_url)", "messages")
        out.append({"role": role, "content": parts})
    return out


def _stop(v) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v) or len(v) > MAX_STOP:
        raise _bad(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    longest = max((len(s) for s in v), default=0)
    if longest > MAX_STOP_CHARS:
        raise _bad(f"a stop string is {longest} characters long; this server takes at most {MAX_STOP_CHARS}", "stop")
    return v


def parse_chat_request(
    body, model_name: str, policy: MediaPolicy, default_max_tokens: int = 256, default_temperature: float = 1.0
) -> ParsedRequest:
    """A chat-completions body -> the engine's request (module docstring). The defaults apply to
    fields the body leaves out (OpenAI's temperature default is 1: sampling)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_request")
    model = body.get("model")
    names = [model_name] if isinstance(model_name, str) else list(model_name)  # several: base + adapters
    if model is not None and model not in names:
        raise _bad(
            f"the model {model!r} does not exist; this server serves {', '.join(map(repr, names))}",
            "model",
            "model_not_found",
            404,
        )
    if "messages" not in body:
        raise _bad("missing required parameter: 'messages'", "messages", "missing_required_parameter")
    for name, unused in _UNSUPPORTED.items():
        if name in body and body[name] not in unused:
            raise _bad(f"{name} is not supported by this server", name, "unsupported_parameter")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad(f"stream must be true or false, got {stream!r}", "stream")
    opts = body.get("stream_options")
    if opts is not None and (not stream or not isinstance(opts, dict)):
        raise _bad("stream_options is an object, and only allowed with stream=true", "stream_options")
    include_usage = bool((opts or {}).get("include_usage", False))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, default_max_tokens, 1, 2**31, integer=True)
    seed = _number(body, "seed", None, -(2**63), 2**64 - 1, integer=True)
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _bad(f"logprobs must be true or false, got {logprobs!r}", "logprobs")
    top_logprobs = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
    if top_logprobs and not logprobs:
        raise _bad("top_logprobs needs logprobs=true", "top_logprobs")
    lo, hi = PENALTY_RANGE
    sampling = SamplingParams(
        max_tokens=int(max_tokens),
        temperature=float(_number(body, "temperature", default_temperature, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
        stop=_stop(body.get("stop")),
        seed=None if seed is None else seed % 2**63,  # any int64 the client sends -> a generator seed
        top_k=int(_number(body, "top_k", 0, -1, 2**31, integer=True)),
        min_p=float(_number(body, "min_p", 0.0, 0.0, 1.0)),
        presence_penalty=float(_number(body, "presence_penalty", 0.0, lo, hi)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, lo, hi)),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0.0, MAX_REPETITION_PENALTY, lo_open=True)),
        n=int(_number(body, "n", 1, 1, MAX_N, integer=True)),
        logprobs=bool(logprobs),
        top_logprobs=int(top_logprobs),
        response_format=_response_format(body.get("response_format")),
    )
    check_sampling(sampling)  # the schema compiles (a bad one is a 400 naming response_format)
    messages = parse_messages(body["messages"], policy)
    chosen = model if model is not None and len(names) > 1 else None
    return ParsedRequest(ChatRequest(messages, sampling, request_id=new_id(), model=chosen), stream, include_usage)


def _response_format(v) -> dict | None:
    """OpenAI's response_format -> `SamplingParams.response_format` (None: plain text)."""
    if v is None:
        return None
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        raise _bad("response_format must be an object with a 'type'", "response_format")
    kind = v["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = v.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise _bad("response_format json_schema needs json_schema.schema (an object)", "response_format")
        return {"type": "json_schema", "schema": spec["schema"]}
    raise _bad(f"response_format type must be text, json_object or json_schema, got {kind!r}", "response_format")


# ---- response bodies ---------------------------------------------------------------------------
def new_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def usage_body(u: Usage) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "visual_tokens": u.visual_tokens},
    }


def _lp(x: float) -> float:
    return x if x > -9999.0 else -9999.0  # JSON has no -inf: OpenAI's floor for impossible tokens


def logprobs_body(lps: list[Logprob] | None) -> dict | None:
    """`choices[i].logprobs`: `{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`."""
    if lps is None:
        return None
    content = [
        {
            "token": e.token,
            "logprob": _lp(e.logprob),
            "bytes": e.bytes,
            "top_logprobs": [{"token": t.token, "logprob": _lp(t.logprob), "bytes": t.bytes} for t in e.top],
        }
        for e in lps
    ]
    return {"content": content, "refusal": None}


def completion_body(request_id: str, model: str, fin: Finished, created: int | None = None) -> dict:
    """A whole answer; with n > 1 one choice per `fin.choices`."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": logprobs_body(c.logprobs),
            }
            for c in (fin.choices or [fin])
        ],
        "usage": usage_body(fin.usage),
    }


def delta_chunks(request_id: str, model: str, created: int, ev: Delta) -> list[dict]:
    """The chunks of one `Delta` (none when it holds no text)."""
    if not ev.text:
        return []
    return [chunk_body(request_id, model, created, {"content": ev.text}, index=ev.index, logprobs=ev.logprobs)]


def finish_chunks(request_id: str, model: str, created: int, fin: Finished) -> list[dict]:
    """The last chunk of each choice (its finish_reason)."""
    return [chunk_body(request_id, model, created, {}, c.finish_reason, index=c.index) for c in (fin.choices or [fin])]


def chunk_body(
    request_id: str,
    model: str,
    created: int,
    delta: dict | None,
    finish_reason=None,
    usage=None,
    index: int = 0,
    logprobs: list[Logprob] | None = None,
) -> dict:
    """One streamed chunk; `delta=None` is the usage-only chunk (empty choices) of include_usage."""
    choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs_body(logprobs)}
    choices = [] if delta is None else [choice]
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage_body(usage) if isinstance(usage, Usage) else usage
    return body


_ERROR_TYPES = {429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def error_body(message: str, status: int = 400, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_from(e: RequestError) -> dict:
    return error_body(str(e), e.status, e.param, e.code)
