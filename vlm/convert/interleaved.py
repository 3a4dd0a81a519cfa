"""Interleaved documents (JSONL of text and images: OBELICS parallel lists, ``items`` lists, or
MMC4 ``text_list`` + ``image_info``) -> ``document`` shards. An unusable image is dropped from its
document and counted; the document is kept while it has text."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from vlm.convert.common import BUILDERS, Skip, input_fingerprint, meta_id
from vlm.convert.images import media_ctx, read_image
from vlm.convert.pipeline import convert
from vlm.convert.records import iter_records


def _interleaved_items(rec: Any) -> list[tuple[str, Any]]:
    """A record in any accepted layout -> [("text", str) | ("image", path)] in reading order."""
    if not isinstance(rec, dict):
        raise Skip("bad_record", "expected a JSON object")
    if "items" in rec:
        if not isinstance(rec["items"], list):
            raise Skip("bad_record", "'items' must be a list")
        out = []
        for it in rec["items"]:
            kind = it.get("type") if isinstance(it, dict) else None
            if kind == "text":
                out.append(("text", it.get("text")))
            elif kind == "image":
                out.append(("image", it.get("path", it.get("image"))))
            else:
                raise Skip("bad_record", f"unknown item type {kind!r}")
        return out
    if "texts" in rec and "images" in rec:  # OBELICS: parallel lists, one of the two set per position
        texts, images = rec["texts"], rec["images"]
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            raise Skip("bad_record", "'texts' and 'images' must be lists of the same length")
        out = []
        for t, i in zip(texts, images):
            if t is not None and i is not None:
                raise Skip("bad_record", "a position has both a text and an image")
            if t is not None:
                out.append(("text", t))
            elif i is not None:
                out.append(("image", i))
        return out
    if "text_list" in rec:  # MMC4: images placed before the sentence they were matched to
        texts, infos = rec["text_list"], rec.get("image_info") or []
        if not isinstance(texts, list) or not isinstance(infos, list):
            raise Skip("bad_record", "'text_list' and 'image_info' must be lists")
        before: dict[int, list] = {}
        for info in infos:
            if not isinstance(info, dict) or not isinstance(info.get("matched_text_index"), int):
                raise Skip("bad_record", "each image_info needs an integer 'matched_text_index'")
            path = info.get("path", info.get("image_path", info.get("image_name")))
            before.setdefault(info["matched_text_index"], []).append(path)
        if any(not 0 <= k <= len(texts) for k in before):
            raise Skip("bad_record", "matched_text_index out of range")
        out = []
        for j in range(len(texts) + 1):
            out += [("image", p) for p in before.get(j, [])]
            if j < len(texts):
                out.append(("text", texts[j]))
        return out
    raise Skip("bad_record", "expected 'items', 'texts'+'images' or 'text_list'")


def _build_interleaved(rec: Any, key: str, ctx: dict):
    items = _interleaved_items(rec)
    document: list[dict] = []
    media: list[tuple[bytes, str]] = []
    dropped: list[Skip] = []
    for kind, value in items:
        if kind == "text":
            if not isinstance(value, str):
                raise Skip("bad_record", f"text item is {type(value).__name__}, not a string")
            if not value.strip():
                continue
            if document and document[-1]["type"] == "text":  # adjacent texts (e.g. an image dropped between)
                document[-1]["text"] += ctx["text_joiner"] + value
            else:
                document.append({"type": "text", "text": value})
        else:
            if ctx["max_images"] is not None and len(media) >= ctx["max_images"]:
                dropped.append(Skip("over_max_images", f"more than max_images={ctx['max_images']}"))
                continue
            try:
                media.append(read_image(ctx["image_root"], value, ctx, key))
            except Skip as e:
                dropped.append(e)
                continue
            document.append({"type": "image", "media": len(media) - 1})
    if not any(it["type"] == "text" for it in document):
        raise Skip("no_text", f"no text left ({sum(k == 'image' for k, _ in items)} images, {len(dropped)} dropped)")
    meta = {"source": "interleaved", **meta_id(rec)}
    if isinstance(rec.get("url"), str):
        meta["url"] = rec["url"]
    if dropped:
        meta["dropped_images"] = dict(sorted(Counter(d.reason for d in dropped).items()))
    return {"document": document, "meta": meta}, media, dropped


def convert_interleaved(
    input: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    name: str = "interleaved",
    maxcount: int = 1000,
    workers: int = 2,
    text_joiner: str = "\n\n",
    max_images: int | None = None,
    maxsize: int | None = None,
    max_pixels: int = 50_000_000,
    max_image_bytes: int = 64 << 20,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Interleaved JSONL documents -> ``document`` shards.

    Accepted records: ``{"texts": [...], "images": [...]}`` (OBELICS parallel lists, ``null`` where
    the other one is set), ``{"items": [{"type": "text", "text"}, {"type": "image", "path"}]}``, or
    MMC4 ``{"text_list": [...], "image_info": [{"image_name", "matched_text_index"}]}`` (an image goes
    before its matched sentence). An image that cannot be used is dropped from its document and
    counted in ``dropped_images`` by reason; adjacent texts are joined with ``text_joiner``; a
    document left without text is skipped (``no_text``). ``max_images`` caps images per document
    (the rest dropped as ``over_max_images``)."""
    input = Path(input)
    ctx = media_ctx(image_root, max_pixels, max_image_bytes)
    ctx.update(text_joiner=str(text_joiner), max_images=None if max_images is None else int(max_images))
    options = {
        "input": input_fingerprint(input),
        "image_root": ctx["image_root"],
        "max_pixels": ctx["max_pixels"],
        "max_image_bytes": ctx["max_image_bytes"],
        "text_joiner": ctx["text_joiner"],
        "max_images": ctx["max_images"],
    }
    return convert(
        "interleaved",
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


BUILDERS["interleaved"] = _build_interleaved
