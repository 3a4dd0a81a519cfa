"""LLaVA / ShareGPT conversation JSON (array or JSONL) + an image folder -> chat shards."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vlm.convert.common import BUILDERS, Skip, input_fingerprint, meta_id
from vlm.convert.images import media_ctx, read_image
from vlm.convert.pipeline import convert
from vlm.convert.records import iter_records

IMAGE_MARKER = "<image>"


def _text_items(text: str) -> list[dict]:
    return [{"type": "text", "text": text}] if text else []


_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _build_llava(rec: Any, key: str, ctx: dict):
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
        raise Skip("bad_record", "expected an object with a 'conversations' list")
    image = rec.get("image")
    if image is None:
        images: list = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list):
        images = image
    else:
        raise Skip("bad_record", f"'image' must be a path or a list of paths, got {type(image).__name__}")

    turns = []
    for t in rec["conversations"]:
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise Skip("bad_record", "each turn must be an object with a string 'value'")
        role = _LLAVA_ROLES.get(str(t.get("from", "")).lower())
        if role is None:
            raise Skip("bad_roles", f"unknown speaker {t.get('from')!r}")
        turns.append((role, t["value"]))
    body = turns[1:] if turns and turns[0][0] == "system" else turns
    expected = ["user", "assistant"] * ((len(body) + 1) // 2)
    if not body or [r for r, _ in body] != expected[: len(body)] or len(body) % 2:
        raise Skip(
            "bad_roles",
            f"roles {[r for r, _ in turns]}: need human/gpt alternating after an optional system turn, ending with gpt",
        )

    markers = sum(v.count(IMAGE_MARKER) for r, v in turns if r == "user")
    stray = sum(v.count(IMAGE_MARKER) for r, v in turns if r != "user")
    if stray or markers != len(images):
        where = f" ({stray} outside human turns)" if stray else ""
        raise Skip("image_marker_mismatch", f"{markers} <image> markers in human turns{where}, {len(images)} images")

    media = [read_image(ctx["image_root"], p, ctx, key) for p in images]
    messages, m = [], 0
    for role, value in turns:
        content: list[dict] = []
        if role == "user":
            pieces = value.split(IMAGE_MARKER)
            for j, piece in enumerate(pieces):
                content += _text_items(piece.strip())
                if j < len(pieces) - 1:
                    content.append({"type": "image", "media": m})
                    m += 1
        else:
            content = _text_items(value.strip())
        if not content:
            raise Skip("empty_turn", f"an empty {role} turn")
        messages.append({"role": role, "content": content})
    return {"messages": messages, "meta": {"source": "llava", **meta_id(rec)}}, media, []


def convert_llava(
    input: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    name: str = "llava",
    maxcount: int = 1000,
    workers: int = 2,
    maxsize: int | None = None,
    max_pixels: int = 50_000_000,
    max_image_bytes: int = 64 << 20,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """LLaVA / ShareGPT JSON (array or JSONL) -> chat shards in ``out_dir``; returns the report.

    Each ``<image>`` marker in a human turn becomes an image item at that position (text around
    it kept, stripped); the number of markers must equal the number of images
    (``image_marker_mismatch`` otherwise, including an image without any marker: we do not guess
    where it goes). Roles: human/gpt alternating after an optional system turn, ending with gpt
    (``bad_roles``)."""
    input = Path(input)
    ctx = media_ctx(image_root, max_pixels, max_image_bytes)
    options = {
        "input": input_fingerprint(input),
        "image_root": ctx["image_root"],
        "max_pixels": ctx["max_pixels"],
        "max_image_bytes": ctx["max_image_bytes"],
    }
    return convert(
        "llava",
        iter_records(input),
        out_dir,
        name=name,
        options=options,
        ctx=ctx,
        maxcount=maxcount,
        maxsize=maxsize,
        workers=workers,
        overwrite=overwrite,
        verbose=verbose,
    )


BUILDERS["llava"] = _build_llava
