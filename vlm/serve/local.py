"""`infer.py image=… prompt=…`, `infer.py chat=true` and `infer.py requests=FILE.jsonl`: the engine
on this machine (the `engine` config group, as `serve.py` uses), no server."""

from __future__ import annotations

import sys
from pathlib import Path

from vlm.errors import SampleError
from vlm.serve.api import ChatRequest, Delta, Finished, RequestError, SamplingParams
from vlm.serve.engines import build_engine


def engine_options(cfg, **overrides) -> dict:
    """The `engine` group, with `infer.prune` (when it prunes) as the engine's pruning options."""
    options = dict(cfg.engine)
    prune = dict((cfg.get("infer") or {}).get("prune") or {})
    if float(prune.get("keep_ratio", 1.0)) < 1.0:
        options["prune_keep_ratio"] = float(prune["keep_ratio"])
        options.update({f"prune_{k}": prune[k] for k in ("method", "seed") if prune.get(k) is not None})
    return {**options, **overrides}


def _engine(loaded, cfg, **overrides):
    return build_engine(
        loaded,
        engine_options(cfg, **overrides),
        dtype=cfg.get("dtype"),
        model_name=cfg.get("model_name"),
        ckpt=cfg.ckpt,
    )


def one_turn(template, images: list, prompt: str, videos: list | None = None) -> list[dict]:
    """One user message: images (media 0…n-1), then videos, placed before or after the text as
    the model saw them in training (`template.image_position`). An image is its encoded bytes; a
    video its encoded bytes or a list of frame images."""
    media = [{"type": "image", "image": b} for b in images]
    media += [{"type": "video", "video": v} for v in videos or []]
    text = [{"type": "text", "text": prompt}]
    content = [*media, *text] if template.image_position == "first" else [*text, *media]
    return [{"role": "user", "content": content}]


def stream_answer(engine, request: ChatRequest, out=None) -> Finished:
    """Submit `request`, write each `Delta` to `out` as it arrives (None: silent), return the
    `Finished`. A request the engine refuses raises `SampleError` (one line at the command line)."""
    handle = engine.submit(request)
    try:
        for ev in handle:
            if isinstance(ev, Delta) and out is not None:
                out.write(ev.text)
                out.flush()
            elif isinstance(ev, Finished):
                break
    except KeyboardInterrupt:
        handle.cancel()
        raise
    if ev.finish_reason == "error":
        err = ev.error or RequestError("the request failed", 500)
        raise SampleError(err.code or "invalid_request", "prompt", str(err)) from None
    return ev


def answer(loaded, cfg, out="stdout") -> dict:
    """`infer.py image=… video=… prompt=…`: one request on the engine, streamed to `out` (default:
    the current `sys.stdout`; None: silent). The media files are read and checked first, so a bad
    one is one clear line before the model is touched."""
    from vlm.serve.local_media import checked_image, path_list, read_video

    if isinstance(out, str) and out == "stdout":
        out = sys.stdout
    images = [checked_image(p) for p in path_list(cfg.get("image"))]
    videos = [read_video(p) for p in path_list(cfg.get("video"))]
    sampling = SamplingParams(int(cfg.max_new_tokens), float(cfg.temperature), float(cfg.top_p), [], int(cfg.seed))
    request = ChatRequest(one_turn(loaded.template, images, str(cfg.prompt), videos), sampling)
    one_slot = {"max_batch": 1} if cfg.engine.get("kind") == "continuous" else {}  # one request: one KV slot
    with _engine(loaded, cfg, **one_slot) as engine:
        finished = stream_answer(engine, request, out)
    if out is not None:
        out.write("\n")
        out.flush()
    return {"answer": finished.text, "finish_reason": finished.finish_reason, "usage": finished.usage}


def chat(loaded, cfg) -> dict:
    from vlm.serve.chat import ChatSession, run_chat
    from vlm.serve.local_media import path_list

    sampling = SamplingParams(int(cfg.max_new_tokens), float(cfg.temperature), float(cfg.top_p), [], int(cfg.seed))
    first = [("image", p) for p in path_list(cfg.get("image"))] + [("video", p) for p in path_list(cfg.get("video"))]
    with _engine(loaded, cfg) as engine:
        session = ChatSession(engine, sampling, media_first=loaded.template.image_position == "first")
        turns = run_chat(engine, session, verbose=bool(cfg.get("verbose")), first_media=first)
    return {"turns": turns}


def batch(loaded, cfg) -> dict:
    from vlm.serve.batch import run_batch

    out = cfg.get("out") or str(Path(cfg.requests).with_suffix(".answers.jsonl"))
    in_flight = int(cfg.engine.get("max_queue") or 64)
    with _engine(loaded, cfg) as engine:
        res = run_batch(
            engine,
            cfg.requests,
            out,
            default_max_tokens=int(cfg.max_new_tokens),
            default_temperature=float(cfg.temperature),
            in_flight=in_flight,
        )
    print(f"{res['ok']} answered, {res['errors']} refused, in {res['seconds']:.1f} s; written to {out}")
    return {**res, "out": out}
