"""`python infer.py ckpt=PATH …`: answer one prompt (streamed), or evaluate on held-out shards.

    python infer.py ckpt=PATH image=a.png prompt="…"
    python infer.py ckpt=PATH 'image=[a.png,b.png]' prompt="Which image has more shapes, the first or the second?"
    python infer.py ckpt=PATH video=clip.mp4 prompt="Which way is the red circle moving?"
    python infer.py ckpt=PATH video=frames/ prompt="…"          # a folder of frames (sorted by name)

Images come first (media 0, 1, …), then videos, placed before or after the prompt as in training
(`template.image_position`).

Model, image processor, template and tokenizer all come from the checkpoint, never from a
training config, so preprocessing at inference is the preprocessing the model was trained with.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from vlm.checkpoint import LoadedVLM, load_checkpoint
from vlm.data.collate import Collator, collate
from vlm.data.media import MediaError, decode_image, read_file
from vlm.data.sample import SampleProcessor, format_skips
from vlm.data.video import probe_video
from vlm.data.webdataset import ShardDataset
from vlm.generate import generate
from vlm.metrics import CharErrorRateByType, ExactMatchByType, normalize_answer


def _special(tok, template_cfg: dict | None = None) -> tuple[list[int], list[int]]:
    from vlm.build import stop_ids

    eos = stop_ids(tok, template_cfg)
    suppress = [tok.pad_id, tok.im_start_id, tok.vision_start_id, tok.vision_end_id, tok.image_pad_id, tok.video_pad_id]
    return eos, suppress


def prompt_batch(loaded: LoadedVLM, images: list[bytes], prompt: str, videos: list | None = None) -> dict:
    """One chat prompt: images then videos, placed where the model saw them in training
    (template.image_position). A video is its encoded bytes, or a list of frame images (bytes)."""
    videos = list(videos or [])
    messages = loaded.template.prompt_messages(len(images), prompt, n_videos=len(videos))
    raw = {"__key__": "prompt", "json": json.dumps({"messages": messages}).encode()}
    for i, b in enumerate(images):
        raw[f"{i}.png"] = b  # the decoder sniffs the real format; the name only marks it as media
    for j, v in enumerate(videos):
        i = len(images) + j
        if isinstance(v, (list, tuple)):
            for f, b in enumerate(v):
                raw[f"{i}.{f}.png"] = b
        else:
            raw[f"{i}.mp4"] = v
    sample = SampleProcessor(loaded.processor, loaded.template, mode="eval")(raw)
    return collate([sample], loaded.tokenizer.pad_id, padding_side="left")


_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_video(path: str) -> bytes | list[bytes]:
    """A video file's bytes (header checked), or a folder's frame images sorted by name."""
    p = Path(path)
    if p.is_dir():
        frames = sorted(f for f in p.iterdir() if f.suffix.lower() in _FRAME_SUFFIXES)
        if not frames:
            raise FileNotFoundError(f"video folder {p} holds no frame images ({', '.join(_FRAME_SUFFIXES)})")
        return [_checked_image(f) for f in frames]
    data = read_file(p)  # a regular file within its cap: never a pipe or a device
    probe_video(data, key=str(p))  # fail early with one clear line (not a video, too large…)
    return data


def _checked_image(path) -> bytes:
    """An image file's bytes, read once within its cap and checked to decode (one clear line if not)."""
    data = read_file(path)
    decode_image(data, key=str(path))
    return data


def answer(loaded: LoadedVLM, image_paths: list[str], prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0, stream="stdout", video_paths: list[str] | None = None,
           prune: dict | None = None) -> str:
    """Stream the answer to `stream` (default: the current `sys.stdout`, looked up at call time; None:
    silent) and return it. Images are media 0…n-1, videos follow."""
    if isinstance(stream, str) and stream == "stdout":
        stream = sys.stdout
    images = [_checked_image(p) for p in image_paths]  # fail early with one clear line (missing, bomb…)
    videos = [read_video(p) for p in (video_paths or [])]
    batch = prompt_batch(loaded, images, prompt, videos)
    tok = loaded.tokenizer
    eos, suppress = _special(tok, loaded.config.get("template"))
    ids: list[int] = []
    printed = ""

    def on_token(t: torch.Tensor) -> None:
        nonlocal printed
        if int(t[0]) < 0 or int(t[0]) in eos:
            return
        ids.append(int(t[0]))
        text = tok.decode(ids)
        if stream is not None and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
            stream.write(text[len(printed):])
            stream.flush()
            printed = text

    gen = torch.Generator().manual_seed(seed)
    generate(loaded.model, batch, max_new_tokens, eos, temperature, top_p, suppress, generator=gen, on_token=on_token,
             prune=prune)
    if stream is not None:
        stream.write("\n")
    return tok.decode(ids)


def evaluate(loaded: LoadedVLM, shards, batch_size: int = 64, max_new_tokens: int = 32, num_workers: int = 1,
             out_path: str | None = None, max_samples: int | None = None, prune: dict | None = None) -> dict:
    """Greedy answers on held-out shards; returns {'table': str, 'metrics': exact match per type (and
    'mean', 'overall'), 'cer': character error rate per type, 'n': int,
    'seconds': float, 'skipped': {...}, 'visual_tokens': mean visual tokens per sample the decoder saw}."""
    proc = SampleProcessor(loaded.processor, loaded.template, mode="eval")
    ds = ShardDataset(shards, proc, train=False)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=min(num_workers, len(ds.urls)),
                        collate_fn=Collator(loaded.tokenizer.pad_id, "left"))
    qtypes = list(loaded.config.get("val_qtypes") or [])
    metric = ExactMatchByType(qtypes + ["other"])
    cer = CharErrorRateByType(qtypes + ["other"])
    eos, suppress = _special(loaded.tokenizer, loaded.config.get("template"))
    n, t0, skipped = 0, time.perf_counter(), Counter()
    is_media = loaded.model.is_media
    keep = float((prune or {}).get("keep_ratio", 1.0))
    visual = 0
    out = open(out_path, "w") if out_path else None
    try:
        for batch in loader:
            skipped.update(batch["skipped"])
            if batch.get("empty"):
                continue
            gen = generate(loaded.model, batch, max_new_tokens, eos, suppress_ids=suppress, prune=prune)
            # tokens per media span after pruning: ceil(keep · n), at least one (vlm.prune)
            spans = _span_lengths(is_media(batch["input_ids"]))
            visual += sum(max(1, math.ceil(keep * s)) for s in spans) if keep < 1 else sum(spans)
            preds = [loaded.tokenizer.decode(g) for g in gen]
            metric.update(preds, batch["answers"], batch["qtypes"])
            cer.update(preds, batch["answers"], batch["qtypes"])
            if out:
                for k, q, pr, a, p in zip(batch["keys"], batch["qtypes"], batch["prompts"], batch["answers"], preds):
                    out.write(json.dumps({"key": k, "qtype": q, "question": pr, "answer": a, "prediction": p,
                                          "correct": normalize_answer(p) == normalize_answer(a)}) + "\n")
            n += len(preds)
            if max_samples and n >= max_samples:
                break
    finally:
        if out:
            out.close()
    res = {k: float(v) for k, v in metric.compute().items()}
    cers = {k: float(v) for k, v in cer.compute().items()}
    counts = {q: int(metric.total[i]) for i, q in enumerate(metric.qtypes)}
    rows = ["| question type | n | exact match | character error rate |", "| --- | ---: | ---: | ---: |"]
    for q in metric.qtypes:
        if counts[q]:
            c = f"{100 * cers[q]:.1f}%" if q in cers else "-"
            rows.append(f"| {q} | {counts[q]} | {100 * res[q]:.1f}% | {c} |")
    if res:
        rows.append(f"| **mean over types** | {n} | {100 * res['mean']:.1f}% | |")
    return {"table": "\n".join(rows), "metrics": res, "cer": cers, "n": n, "seconds": time.perf_counter() - t0, "skipped": dict(skipped),
            "visual_tokens": visual / max(n, 1)}


def _span_lengths(is_media: torch.Tensor) -> list[int]:
    """`[B, L]` bool -> the length of every contiguous media span, row by row."""
    from vlm.model.vlm import media_span_ids

    return [n for row in media_span_ids(is_media) for n in torch.bincount(row)[1:].tolist()]


def run(cfg: DictConfig) -> dict:
    if not cfg.get("ckpt"):
        raise FileNotFoundError("no checkpoint given: pass ckpt=PATH (a .ckpt file or an export folder)")
    loaded = load_checkpoint(cfg.ckpt)
    prune = dict(cfg.get("infer", {}).get("prune") or {}) or None
    torch.manual_seed(cfg.seed)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    data = cfg.get("data")
    if data and data.get("val_shards"):
        res = evaluate(loaded, data.val_shards, data.get("batch_size", 64), cfg.max_new_tokens,
                       data.get("num_workers", 1), cfg.get("out"), data.get("max_samples"), prune)
        print(res["table"])
        print(f"{res['n']} samples in {res['seconds']:.1f} s; " + format_skips(res["skipped"], "evaluation"))
        if cfg.get("out"):
            print(f"predictions written to {cfg.out}")
        return res
    if cfg.get("prompt") is None:
        raise FileNotFoundError("nothing to do: pass image=PATH (or video=PATH) prompt=\"…\" or data=synthvqa_heldout")
    images, videos = _paths(cfg.get("image")), _paths(cfg.get("video"))
    text = answer(loaded, images, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed,
                  video_paths=videos, prune=prune)
    return {"answer": text}


def _paths(v) -> list[str]:
    """`image=a.png`, `image=[a.png,b.png]` or null -> a list of paths."""
    if v is None:
        return []
    return [str(v)] if isinstance(v, (str, Path)) else [str(x) for x in v]


__all__ = ["MediaError", "answer", "evaluate", "prompt_batch", "read_video", "run"]
