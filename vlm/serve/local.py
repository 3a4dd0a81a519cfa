"""`infer.py chat=true` and `infer.py requests=FILE.jsonl`: the engine on this machine, no server."""

from __future__ import annotations

from pathlib import Path

from vlm.serve.api import SamplingParams
from vlm.serve.engines import build_engine


def _engine(loaded, cfg):
    return build_engine(
        loaded, cfg.engine, dtype=cfg.get("dtype", "fp32"), model_name=cfg.get("model_name"), ckpt=cfg.ckpt
    )


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
