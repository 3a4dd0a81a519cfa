"""Offline batch: `python infer.py ckpt=PATH requests=FILE.jsonl out=answers.jsonl`.

Each input line is an OpenAI chat-completions request body (the HTTP server's parser reads it), or
an OpenAI Batch API line `{"custom_id": ..., "body": {...}}`. The `model` field is ignored (the
file may have been written for another server). Local image paths are relative to the requests
file's folder.

Every request goes to the engine, which batches them; at most `in_flight` are submitted and not yet
written, so the engine's queue never overflows. Answers are written in input order, one line each:

    {"line": 3, "custom_id": ..., "id": "chatcmpl-...", "answer": "...", "finish_reason": "stop",
     "usage": {"prompt_tokens": ..., "completion_tokens": ..., ...}}

A line that cannot run (bad JSON, a missing image, too long for the context) gets
`{"line": N, "error": {"message", "type", "param", "code"}}` and the rest go on.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

from vlm.serve.api import Finished, Overloaded, RequestError
from vlm.serve.media_urls import MediaPolicy
from vlm.serve.openai_protocol import error_from, logprobs_body, parse_chat_request, usage_body


def _load(line: str):
    """-> (custom_id, request body); RequestError for a line that is not JSON."""
    try:
        body = json.loads(line)
    except (ValueError, RecursionError):
        raise RequestError("the line is not valid JSON", 400, None, "invalid_json") from None
    custom_id = None
    if isinstance(body, dict) and isinstance(body.get("body"), dict):  # an OpenAI Batch API line
        custom_id, body = body.get("custom_id"), body["body"]
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("model", "stream", "stream_options")}
    return custom_id, body


def _record(line_no: int, custom_id, request_id: str | None, fin: Finished | None, error: RequestError | None) -> dict:
    rec: dict = {"line": line_no}
    if custom_id is not None:
        rec["custom_id"] = custom_id
    if error is None and fin is not None and fin.finish_reason == "error":
        error = fin.error or RequestError("the request failed", 500, None, "internal_error")
    if error is not None:
        rec["error"] = error_from(error)["error"]
        return rec
    rec.update(id=request_id, answer=fin.text, finish_reason=fin.finish_reason, usage=usage_body(fin.usage))
    if fin.logprobs is not None:
        rec["logprobs"] = logprobs_body(fin.logprobs)
    if fin.choices:  # n > 1: every answer (`answer` is choice 0's)
        rec["choices"] = [
            {
                "index": c.index,
                "answer": c.text,
                "finish_reason": c.finish_reason,
                "logprobs": logprobs_body(c.logprobs),
            }
            for c in fin.choices
        ]
    return rec


def _submit(engine, request):
    while True:
        try:
            return engine.submit(request)
        except Overloaded:  # someone else shares the engine: wait for room
            time.sleep(0.05)


def run_batch(
    engine,
    requests_path,
    out_path,
    policy: MediaPolicy | None = None,
    default_max_tokens: int = 256,
    default_temperature: float = 0.0,
    in_flight: int = 64,
    progress: bool = True,
) -> dict:
    """Answer every line of `requests_path` into `out_path`; returns {'n', 'ok', 'errors', 'seconds'}."""
    from tqdm import tqdm

    src = Path(requests_path)
    if not src.is_file():
        raise FileNotFoundError(f"requests file not found: {src}")
    policy = replace(policy or MediaPolicy(), base_dir=str(src.resolve().parent))
    with open(src, "rb") as f:
        total = sum(1 for _ in f)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    counts = {"n": 0, "ok": 0, "errors": 0}
    t0 = time.perf_counter()
    pending: deque = deque()  # (line_no, custom_id, request_id, handle | None, error | None), input order

    def write_head(out, bar) -> None:
        line_no, custom_id, rid, handle, error = pending.popleft()
        fin = handle.result() if handle is not None else None
        rec = _record(line_no, custom_id, rid, fin, error)
        counts["errors" if "error" in rec else "ok"] += 1
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        bar.update(1)

    with (
        open(src, encoding="utf-8", errors="replace") as f,
        open(out_path, "w", encoding="utf-8") as out,
        tqdm(total=total, desc="requests", unit="req", disable=not progress, dynamic_ncols=True) as bar,
    ):
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                bar.update(1)
                continue
            counts["n"] += 1
            custom_id = None
            try:
                custom_id, body = _load(line)
                request = parse_chat_request(
                    body, engine.model_name, policy, default_max_tokens, default_temperature
                ).request
            except RequestError as e:
                pending.append((line_no, custom_id, None, None, e))
            else:
                pending.append((line_no, custom_id, request.request_id, _submit(engine, request), None))
            # write what is done at the head; block on the head while too many are in flight
            while pending and (pending[0][3] is None or pending[0][3].finished is not None):
                write_head(out, bar)
            while sum(1 for p in pending if p[3] is not None) >= in_flight:
                write_head(out, bar)
        while pending:
            write_head(out, bar)
    counts["seconds"] = time.perf_counter() - t0
    return counts
