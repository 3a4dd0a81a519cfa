"""Image–caption pairs -> chat shards (user: image + a prompt drawn from a list, assistant: the
caption). Inputs: a folder of images with same-stem ``.txt`` captions, a CSV / TSV of
(path, caption), or JSON Lines / a JSON array of ``{"image", "caption"}``."""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vlm.convert.common import BUILDERS, BadRecord, ConvertError, Skip, input_fingerprint, meta_id
from vlm.convert.images import media_ctx, read_image, resolve_image_path
from vlm.convert.pipeline import convert
from vlm.convert.records import iter_records

DEFAULT_CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image.",
    "What is in this picture?",
    "Write a short caption for this image.",
    "What does this image show?",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def _walk_images(root: Path) -> Iterator[Path]:
    """Image files under ``root``, depth first, sorted per directory (deterministic order)."""
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                subdirs.append(Path(e.path))
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                yield Path(e.path)
        stack.extend(reversed(subdirs))


def iter_caption_records(source: str | os.PathLike) -> Iterator[Any]:
    """Caption records ``{"image": path, "caption": text}`` (or ``"caption_file"``) from a folder,
    a CSV with a ``path,caption`` header (``image``/``file`` and ``text`` are accepted too), or
    JSON Lines / a JSON array of such objects."""
    source = Path(source)
    if source.is_dir():
        for img in _walk_images(source):
            rel = img.relative_to(source).as_posix()
            txt = img.with_suffix(".txt")
            yield {"image": rel, "caption_file": txt.relative_to(source).as_posix() if txt.is_file() else None}
        return
    if source.suffix.lower() in (".csv", ".tsv"):
        with open(source, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t" if source.suffix.lower() == ".tsv" else ",")
            header = next(reader, None)
            if header is None:
                return
            cols = [h.strip().lower() for h in header]
            pcol = next((cols.index(c) for c in ("path", "image", "file", "filename") if c in cols), None)
            ccol = next((cols.index(c) for c in ("caption", "text") if c in cols), None)
            if pcol is None or ccol is None:
                raise ConvertError(f"{source}: the CSV header must name a 'path' and a 'caption' column, got {header}")
            for lineno, row in enumerate(reader, 2):
                if not row:
                    continue
                if len(row) != len(cols):
                    yield BadRecord("bad_record", f"CSV line {lineno}: {len(row)} fields, header has {len(cols)}")
                    continue
                yield {"image": row[pcol], "caption": row[ccol]}
        return
    yield from iter_records(source)


def _build_caption(rec: Any, key: str, ctx: dict):
    if not isinstance(rec, dict):
        raise Skip("bad_record", "expected an object with 'image' and 'caption'")
    path = rec.get("image", rec.get("path"))
    if "caption_file" in rec:  # folder mode: read the .txt beside the image
        caption = None
        if rec["caption_file"] is not None:
            cpath = resolve_image_path(ctx["image_root"], rec["caption_file"])
            try:
                with open(cpath, "rb") as f:
                    caption = f.read(ctx["max_text_bytes"] + 1).decode("utf-8-sig")
            except UnicodeDecodeError:
                raise Skip("bad_text", f"{rec['caption_file']}: not UTF-8") from None
            except OSError as e:
                raise Skip("empty_caption", f"{rec['caption_file']}: {e.strerror or e}") from None
    else:
        caption = rec.get("caption", rec.get("text"))
    if caption is not None and not isinstance(caption, str):
        raise Skip("bad_record", f"caption must be a string, got {type(caption).__name__}")
    caption = (caption or "").strip()
    if not caption:
        raise Skip("empty_caption", f"no caption for {path!r:.120}")
    if len(caption.encode("utf-8", "surrogatepass")) > ctx["max_text_bytes"]:
        raise Skip("bad_text", f"caption longer than max_text_bytes={ctx['max_text_bytes']}")
    media = [read_image(ctx["image_root"], path, ctx, key)]
    prompts = ctx["prompts"]
    prompt = prompts[random.Random(f"{ctx['seed']}-{key}").randrange(len(prompts))]
    sample = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "media": 0}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]},
        ],
        "meta": {"source": "captions", "image": path, **meta_id(rec)},
    }
    return sample, media, []


def convert_captions(
    input: str | os.PathLike,
    out_dir: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    name: str = "captions",
    maxcount: int = 1000,
    workers: int = 2,
    prompts: Iterable[str] = DEFAULT_CAPTION_PROMPTS,
    seed: int = 0,
    maxsize: int | None = None,
    max_pixels: int = 50_000_000,
    max_image_bytes: int = 64 << 20,
    max_text_bytes: int = 1 << 20,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Image–caption pairs -> chat shards: user = image + a prompt drawn from ``prompts`` (seeded by
    ``seed`` and the sample key, so deterministic), assistant = the caption.

    ``input``: a folder of images with same-stem ``.txt`` captions (``image_root`` defaults to it),
    a CSV with a ``path,caption`` header, or JSONL / a JSON array of ``{"image", "caption"}``
    (``image_root`` defaults to the file's folder). A missing or blank caption: ``empty_caption``."""
    input = Path(input)
    if input.is_dir():
        if image_root is not None and Path(image_root).resolve() != input.resolve():
            raise ValueError("with a folder input, image paths are relative to that folder: leave image_root unset")
        image_root = input
    elif image_root is None:
        image_root = input.parent
    prompts = [str(p) for p in prompts]
    if not prompts or not all(p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    ctx = media_ctx(image_root, max_pixels, max_image_bytes)
    ctx.update(prompts=prompts, seed=int(seed), max_text_bytes=int(max_text_bytes))
    options = {
        "input": input_fingerprint(input),
        "image_root": ctx["image_root"],
        "max_pixels": ctx["max_pixels"],
        "max_image_bytes": ctx["max_image_bytes"],
        "max_text_bytes": ctx["max_text_bytes"],
        "prompts": prompts,
        "seed": int(seed),
    }
    return convert(
        "captions",
        iter_caption_records(input),
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


BUILDERS["captions"] = _build_caption
