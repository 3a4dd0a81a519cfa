"""Converters from common data formats to `vlm` shards (see ``data/README.md``).

Three converters share one machinery:

``convert_llava``
    LLaVA / ShareGPT conversation JSON + an image folder -> chat samples.
``convert_captions``
    a folder of images with same-stem ``.txt`` captions, or a CSV / JSONL of (path, caption)
    -> chat samples (user: image + a prompt drawn from a list, assistant: the caption).
``convert_interleaved``
    JSONL documents of text and images (OBELICS parallel lists, ``items`` lists, or MMC4
    ``text_list`` + ``image_info``) -> ``document`` samples.

Machinery (all converters):

* **Streaming.** Input records are read one at a time: ``.jsonl`` line by line, ``.json`` arrays
  with an incremental ``JSONDecoder.raw_decode`` over a buffered file, CSV with :mod:`csv`, image
  folders by a sorted walk. Records are grouped into chunks of ``maxcount``; at most
  ``2 * workers`` chunks are in flight, so memory is bounded whatever the input size.
* **One chunk = one shard.** Chunk ``i`` (records ``i*maxcount`` .. ``(i+1)*maxcount-1``) becomes
  ``out/NAME-%06d.tar``, written by a process pool (fork) of ``workers`` processes
  (``workers <= 1``: in-process). Because a chunk maps to exactly one shard, shard ``i`` is the
  same whatever the number of workers, and resuming only needs the chunk index. ``maxsize`` is
  therefore a *soft* cap: a shard that ends up bigger is kept and reported (``over_maxsize`` in its
  report, a warning on stdout); lower ``maxcount`` if that happens.
* **Resumable.** A shard is written to ``*.tar.tmp`` and renamed when complete, then its report
  ``NAME-%06d.json`` is written (also atomically). Re-running skips every chunk whose report
  exists and was made with the same options (a report from other options is an error unless
  ``overwrite=True``, which first deletes this converter's files for ``NAME``). ``dataset.json``
  is removed at the start and written last.
* **Validated media, original bytes.** Every image is read from under ``image_root`` (paths that
  leave it: ``path_escape``; URLs: ``url_not_allowed``; no network is ever used), fully decoded
  with :func:`vlm.data.media.decode_image` (refusals count as ``media_<reason>``, e.g.
  ``media_missing``, ``media_corrupt``, ``media_too_many_pixels``), and stored as the original
  bytes under an extension sniffed from the data (``KEY.0.jpg``, ``KEY.1.png``), never the file
  name's.
* **Keys** are ``NAME-SSSSSS-IIIIII`` (shard, index in the shard: never a dot); the record's own id
  goes to ``meta.id``.
* **Reports.** Per shard and in ``dataset.json``: records read, samples written, skipped by reason
  (exact counts), images written, images dropped by reason (interleaved), shards, bytes, the
  options, and a few example messages per reason. Run facts (seconds, shards written / reused,
  peak RSS) live under ``run`` so that the rest of ``dataset.json`` is identical after a resume.

Skip reasons (whole record): ``bad_json`` (a JSONL line that is not JSON), ``bad_record`` (not the
expected structure), ``path_escape``, ``url_not_allowed``, ``bad_path``, ``media_*``,
``image_marker_mismatch``, ``bad_roles``, ``empty_turn``, ``empty_caption``, ``no_text``,
``bad_text`` (text that cannot be encoded as UTF-8, e.g. a lone surrogate), ``internal_error`` (an
unexpected exception while building one record: counted with its message, the run goes on).
When a record fails several checks, the first one that fails is counted.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import random
import re
import resource
import sys
import tarfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vlm.data.media import MediaError, decode_image

__all__ = [
    "DEFAULT_CAPTION_PROMPTS",
    "BadRecord",
    "ConvertError",
    "Skip",
    "convert",
    "convert_captions",
    "convert_interleaved",
    "convert_llava",
    "format_report",
    "iter_caption_records",
    "iter_json_array",
    "iter_records",
    "resolve_image_path",
]

VERSION = 1
IMAGE_MARKER = "<image>"
DEFAULT_CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image.",
    "What is in this picture?",
    "Write a short caption for this image.",
    "What does this image show?",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# Pillow format -> the extension stored in the shard (the loader accepts all of these).
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # a scheme of 2+ chars (not a Windows drive letter)
_EXAMPLES_PER_REASON = 3
_JSON_DELIMS = frozenset(" \t\r\n,]")


class ConvertError(RuntimeError):
    """The conversion cannot go on (bad options, unreadable input, a previous run's other options)."""


class Skip(Exception):
    """A record that is not converted; ``reason`` is counted in the report."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"[{reason}] {message}")
        self.reason, self.message = reason, message


@dataclass
class BadRecord:
    """Yielded by a reader in place of a record it could not parse (counted, not fatal)."""

    reason: str
    message: str


# ------------------------------------------------------------------------------------- readers


def iter_json_array(f, bufsize: int = 1 << 16, max_record_chars: int = 64 << 20) -> Iterator[Any]:
    """Yield the elements of a JSON array read incrementally from text file ``f``.

    Only one element (plus a read buffer) is in memory at a time. Raises :class:`ConvertError`
    on a syntax error (a broken array cannot be resynchronised) and on an element longer than
    ``max_record_chars`` (so a broken file cannot make the reader swallow the rest of it)."""
    dec = json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def fill(need_more: bool) -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        # Grow the read with the buffer so a record larger than bufsize costs O(size), not O(size²).
        chunk = f.read(max(bufsize, len(buf) - pos) if need_more else bufsize)
        if not chunk:
            eof = True
            return False
        buf = buf[pos:] + chunk
        pos = 0
        return True

    def skip_ws() -> bool:  # True when a non-space character is at buf[pos]
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return True
            if not fill(False):
                return False

    if not skip_ws() or buf[pos] != "[":
        raise ConvertError("a .json input must be a JSON array of records (or use JSON Lines)")
    pos += 1
    first, count = True, 0
    while True:
        if not skip_ws():
            raise ConvertError("JSON array is truncated (no closing ']')")
        if buf[pos] == "]":
            return
        if not first:
            if buf[pos] != ",":
                raise ConvertError(f"JSON array: expected ',' or ']' but found {buf[pos]!r}")
            pos += 1
            if not skip_ws():
                raise ConvertError("JSON array is truncated after ','")
        while True:
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if len(buf) - pos > max_record_chars:
                    raise ConvertError(f"JSON array: {e.msg}, or a record over {max_record_chars} characters") from None
                if fill(True):
                    continue
                raise ConvertError(f"JSON array: element {count} is broken or truncated ({e.msg})") from None
            # A number cut by the buffer edge ("1" of "123", "1.5" of "1.5e-3") parses as a shorter
            # number: read on and parse again until a delimiter follows it.
            cut = end == len(buf) or (isinstance(obj, (int, float)) and buf[end] not in _JSON_DELIMS)
            if cut and len(buf) - pos <= max_record_chars and fill(True):
                continue
            break
        pos = end
        first = False
        count += 1
        yield obj


def _iter_jsonl(f) -> Iterator[Any]:
    for lineno, raw in enumerate(f, 1):
        if not raw.strip():
            continue
        try:
            yield json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            yield BadRecord("bad_json", f"line {lineno}: {e}")


def iter_records(path: str | os.PathLike) -> Iterator[Any]:
    """Records of a ``.json`` array or a JSON Lines file, one at a time (detected from the first
    non-space character: ``[`` means an array). Unparseable JSONL lines yield :class:`BadRecord`."""
    path = Path(path)
    with open(path, "rb") as fb:
        head = fb.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        with open(path, encoding="utf-8-sig") as f:
            yield from iter_json_array(f)
    else:
        with open(path, "rb") as f:
            yield from _iter_jsonl(f)


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


# ---------------------------------------------------------------------------------- media


def resolve_image_path(image_root: str | os.PathLike, rel: Any) -> Path:
    """``image_root / rel``, or :class:`Skip`.

    ``url_not_allowed``: anything with a URL scheme (``http:``, ``s3:``, ``file:``, ``data:``…).
    ``path_escape``: a ``..`` component anywhere (never resolved), or an absolute path that is not
    under ``image_root``. ``bad_path``: not a non-empty string, or a NUL byte. Symlinks *inside*
    the root are followed: the root is the user's, the records are what is untrusted."""
    if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
        raise Skip("bad_path", f"image path must be a non-empty string, got {rel!r:.80}")
    if "://" in rel or _URL_RE.match(rel):
        raise Skip("url_not_allowed", f"{rel!r:.120}: URLs are not fetched; download the images and give paths")
    parts = re.split(r"[\\/]", rel)
    if ".." in parts:
        raise Skip("path_escape", f"{rel!r:.120} contains '..'")
    root = os.path.abspath(image_root)
    if os.path.isabs(rel):
        p = os.path.normpath(rel)
        if os.path.commonpath([root, p]) != root:
            raise Skip("path_escape", f"{rel!r:.120} is outside the image root")
        return Path(p)
    return Path(os.path.normpath(os.path.join(root, rel)))


def _read_image(image_root: str, rel: Any, opts: dict, key: str) -> tuple[bytes, str]:
    """Validated original bytes and their true extension, or :class:`Skip`."""
    path = resolve_image_path(image_root, rel)
    try:
        size = os.stat(path).st_size
        if size > opts["max_image_bytes"]:
            raise Skip("media_too_large", f"{rel}: {size} bytes > max_image_bytes={opts['max_image_bytes']}")
        with open(path, "rb") as f:
            data = f.read(opts["max_image_bytes"] + 1)
    except FileNotFoundError:
        raise Skip("media_missing", f"no such file: {rel}") from None
    except OSError as e:
        raise Skip("media_unreadable", f"{rel}: {e.strerror or e}") from None
    try:
        decode_image(data, max_pixels=opts["max_pixels"], key=key)
    except MediaError as e:
        raise Skip(f"media_{e.reason}", f"{rel}: {e.message}") from None
    with Image.open(io.BytesIO(data)) as im:  # header only: the format that decoded
        ext = _FORMAT_EXT.get(im.format or "", "")
    if not ext:  # pragma: no cover - decode_image only accepts the formats above
        raise Skip("media_unidentified", f"{rel}: format {im.format}")
    return data, ext


# ------------------------------------------------------------------------------ converters
# Each builder: (record, key, ctx) -> (sample dict, [(bytes, ext)], [Skip of each dropped image]),
# or raises Skip for the whole record.


def _text_items(text: str) -> list[dict]:
    return [{"type": "text", "text": text}] if text else []


def _meta_id(rec: dict) -> dict:
    rid = rec.get("id")
    return {"id": rid} if isinstance(rid, (str, int)) and not isinstance(rid, bool) else {}


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
        raise Skip("bad_roles", f"roles {[r for r, _ in turns]}: need human/gpt alternating after an optional system turn, ending with gpt")

    markers = sum(v.count(IMAGE_MARKER) for r, v in turns if r == "user")
    stray = sum(v.count(IMAGE_MARKER) for r, v in turns if r != "user")
    if stray or markers != len(images):
        where = f" ({stray} outside human turns)" if stray else ""
        raise Skip("image_marker_mismatch", f"{markers} <image> markers in human turns{where}, {len(images)} images")

    media = [_read_image(ctx["image_root"], p, ctx, key) for p in images]
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
    return {"messages": messages, "meta": {"source": "llava", **_meta_id(rec)}}, media, []


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
    media = [_read_image(ctx["image_root"], path, ctx, key)]
    prompts = ctx["prompts"]
    prompt = prompts[random.Random(f"{ctx['seed']}-{key}").randrange(len(prompts))]
    sample = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "media": 0}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]},
        ],
        "meta": {"source": "captions", "image": path, **_meta_id(rec)},
    }
    return sample, media, []


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
                media.append(_read_image(ctx["image_root"], value, ctx, key))
            except Skip as e:
                dropped.append(e)
                continue
            document.append({"type": "image", "media": len(media) - 1})
    if not any(it["type"] == "text" for it in document):
        raise Skip("no_text", f"no text left ({sum(k == 'image' for k, _ in items)} images, {len(dropped)} dropped)")
    meta = {"source": "interleaved", **_meta_id(rec)}
    if isinstance(rec.get("url"), str):
        meta["url"] = rec["url"]
    if dropped:
        meta["dropped_images"] = dict(sorted(Counter(d.reason for d in dropped).items()))
    return {"document": document, "meta": meta}, media, dropped


BUILDERS: dict[str, Callable] = {"llava": _build_llava, "captions": _build_caption, "interleaved": _build_interleaved}


# ---------------------------------------------------------------------------------- shards


def _shard_paths(out_dir: Path, name: str, index: int) -> tuple[Path, Path]:
    stem = f"{name}-{index:06d}"
    return out_dir / f"{stem}.tar", out_dir / f"{stem}.json"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _add_example(examples: dict, reason: str, where: str, message: str) -> None:
    lst = examples.setdefault(reason, [])
    if len(lst) < _EXAMPLES_PER_REASON:
        lst.append(f"{where}: {message}"[:300])


class _TarSink:
    """Minimal WebDataset tar writer (stdlib :mod:`tarfile`; importing webdataset would pull torch
    into every converter process). Members are written in sample order, mtime 0, read-only."""

    def __init__(self, fileobj, owner: str):
        self.tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT)
        self.owner = owner

    def write(self, key: str, members: list[tuple[str, bytes]]) -> None:
        for suffix, data in members:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = self.owner
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


def _write_shard(task: tuple) -> dict:
    """Pool task: convert one chunk of records into one shard + its report. Returns the report."""
    kind, index, first_record, records, ctx, out_dir, name, options = task
    build = BUILDERS[kind]
    tar_path, report_path = _shard_paths(Path(out_dir), name, index)
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    skipped, dropped, examples = Counter(), Counter(), {}
    samples = images = 0
    with open(tmp, "wb") as f:
        sink = _TarSink(f, name)
        try:
            for i, rec in enumerate(records):
                key = f"{name}-{index:06d}-{i:06d}"
                where = f"record {first_record + i}"
                if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)):
                    where += f" (id {rec['id']!r:.60})"
                try:
                    if isinstance(rec, BadRecord):
                        raise Skip(rec.reason, rec.message)
                    sample, media, drops = build(rec, key, ctx)
                    try:
                        doc = json.dumps(sample, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise Skip("bad_text", f"text cannot be encoded as UTF-8: {e.reason}") from None
                except Skip as e:
                    skipped[e.reason] += 1
                    _add_example(examples, e.reason, where, e.message)
                    continue
                except Exception as e:  # a bug or an input nobody foresaw: count it, keep the other records
                    skipped["internal_error"] += 1
                    _add_example(examples, "internal_error", where, f"{type(e).__name__}: {e}")
                    continue
                sink.write(key, [("json", doc), *((f"{m}.{ext}", data) for m, (data, ext) in enumerate(media))])
                samples += 1
                images += len(media)
                for d in drops:
                    dropped[d.reason] += 1
                    _add_example(examples, f"dropped_{d.reason}", where, d.message)
        finally:  # also when interrupted: the .tmp is complete tar, just never renamed
            sink.close()
    if samples:
        os.replace(tmp, tar_path)
        nbytes = tar_path.stat().st_size
    else:  # nothing to load: no shard file, the report says why
        tmp.unlink()
        nbytes = 0
    report = {
        "shard": tar_path.name if samples else None,
        "index": index,
        "records": len(records),
        "samples": samples,
        "images": images,
        "bytes": nbytes,
        "skipped": dict(sorted(skipped.items())),
        "dropped_images": dict(sorted(dropped.items())),
        "examples": examples,
        "options": options,
    }
    if options.get("maxsize") and nbytes > options["maxsize"]:
        report["over_maxsize"] = True
    _write_json(report_path, report)
    return report


def _chunks(records: Iterable[Any], size: int) -> Iterator[list]:
    chunk: list = []
    for r in records:
        chunk.append(r)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _load_report(path: Path, options: dict) -> dict | None:
    """A finished shard's report, None when the shard must be (re)written."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # a damaged report: rewrite the shard
    if report.get("options") != options:
        raise ConvertError(
            f"{path} was written with other options ({_diff(report.get('options'), options)}); "
            "use another output folder or overwrite=True (--overwrite)"
        )
    if report.get("shard") and not (path.parent / report["shard"]).is_file():
        return None  # the report survived, the shard did not
    return report


def _diff(a: Any, b: dict) -> str:
    if not isinstance(a, dict):
        return "unreadable options"
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:4])


def _clear(out_dir: Path, name: str) -> None:
    """Remove what a previous run for ``name`` wrote (only files this module writes)."""
    pat = re.compile(rf"^{re.escape(name)}-\d{{6}}\.(tar|json)(\.tmp)?$")
    for p in out_dir.iterdir():
        if pat.match(p.name):
            p.unlink()
    (out_dir / "dataset.json").unlink(missing_ok=True)


def _peak_rss_mb() -> dict:
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # ru_maxrss: KiB on Linux, bytes on macOS
    return {
        "main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1),
        "workers": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale, 1),
    }


def _input_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size if path.is_file() else None}


def convert(
    kind: str,
    records: Iterable[Any],
    out_dir: str | os.PathLike,
    *,
    name: str,
    options: dict,
    ctx: dict,
    maxcount: int = 1000,
    maxsize: int | None = None,
    workers: int = 2,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Run converter ``kind`` over ``records`` (an iterator, consumed once) into ``out_dir``.

    ``options`` are recorded in every report and in ``dataset.json`` (and decide whether an earlier
    run's shards can be reused); ``ctx`` is what the record builder needs. Returns the report that
    is also written to ``out_dir/dataset.json``."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown converter {kind!r}")
    if not _NAME_RE.match(name):
        raise ValueError(f"name must be letters, digits, '-' or '_' (no dots), got {name!r}")
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _clear(out, name)
    (out / "dataset.json").unlink(missing_ok=True)
    options = {"converter": kind, "version": VERSION, "name": name, "maxcount": int(maxcount),
               "maxsize": int(maxsize) if maxsize else None, **options}
    options = json.loads(json.dumps(options))  # what a report read back will compare equal to

    t0 = time.perf_counter()
    reports: dict[int, dict] = {}
    reused = written = 0
    say = print if verbose else (lambda *a, **k: None)

    def finished(rep: dict) -> None:
        nonlocal written
        written += 1
        reports[rep["index"]] = rep
        if rep.get("over_maxsize"):
            say(f"[convert {name}] warning: {rep['shard']} is {rep['bytes']} bytes > maxsize={maxsize}; lower maxcount", flush=True)
        say(f"[convert {name}] shard {rep['index']:06d}: {rep['samples']}/{rep['records']} samples "
            f"({time.perf_counter() - t0:.1f}s)", flush=True)

    pool = None
    if workers > 1:
        # fork: workers inherit the imported modules (no re-import of the caller's script, as spawn
        # would do). ProcessPoolExecutor, not multiprocessing.Pool: a writer killed by the OS (OOM)
        # raises BrokenProcessPool here instead of leaving the run waiting forever.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
    pending: deque = deque()
    try:
        for index, chunk in enumerate(_chunks(records, maxcount)):
            rep = _load_report(_shard_paths(out, name, index)[1], options)
            if rep is not None:
                reports[index] = rep
                reused += 1
                continue
            task = (kind, index, index * maxcount, chunk, ctx, str(out), name, options)
            if pool is None:
                finished(_write_shard(task))
                continue
            pending.append(pool.submit(_write_shard, task))
            while len(pending) >= 2 * workers:  # bounded: the reader never runs far ahead
                finished(pending.popleft().result())
        while pending:
            finished(pending.popleft().result())
    except BaseException:
        if pool is not None:  # interrupted or failed: stop the writers now (finished shards stay)
            for f in pending:
                f.cancel()
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            pool = None
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)

    # Stray shards past the end of this input (a previous, longer input) would be mixed in silently.
    n = len(reports)
    extra = sorted(p.name for p in out.glob(f"{name}-*.tar") if re.fullmatch(rf"{re.escape(name)}-(\d{{6}})\.tar", p.name)
                   and int(p.name[len(name) + 1 : len(name) + 7]) >= n)
    if extra:
        raise ConvertError(f"{out} holds shards beyond this input's {n} chunks ({extra[:3]}…); use overwrite=True")

    ordered = [reports[i] for i in range(n)]
    skipped, dropped, examples = Counter(), Counter(), {}
    for r in ordered:
        skipped.update(r["skipped"])
        dropped.update(r["dropped_images"])
        for reason, lst in r["examples"].items():
            for ex in lst:
                _add_example(examples, reason, f"{r['index']:06d}", ex)
    info = {
        "name": name,
        "converter": kind,
        "records": sum(r["records"] for r in ordered),
        "samples": sum(r["samples"] for r in ordered),
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
        "images": sum(r["images"] for r in ordered),
        "dropped_images": dict(sorted(dropped.items())),
        "shards": [r["shard"] for r in ordered if r["shard"]],
        "shard_samples": [r["samples"] for r in ordered if r["shard"]],
        "bytes": sum(r["bytes"] for r in ordered),
        "over_maxsize": [r["shard"] for r in ordered if r.get("over_maxsize")],
        "examples": examples,
        "options": options,
        "run": {"seconds": round(time.perf_counter() - t0, 2), "shards_written": written, "shards_reused": reused,
                "workers": workers, "peak_rss_mb": _peak_rss_mb()},
    }
    _write_json(out / "dataset.json", info)
    say(format_report(info, out), flush=True)
    return info


def format_report(info: dict, out_dir: str | os.PathLike | None = None) -> str:
    """A few human lines from a ``dataset.json`` dict."""
    run = info.get("run", {})
    lines = [
        f"[convert {info['name']}] {info['converter']}: {info['samples']} samples written of {info['records']} records, "
        f"{len(info['shards'])} shards, {info['bytes'] / 1e6:.1f} MB, {info['images']} images"
        + (f" -> {out_dir}" if out_dir is not None else ""),
        f"  skipped {info['skipped_total']}: " + (", ".join(f"{k}={v}" for k, v in info["skipped"].items()) or "none"),
    ]
    if info["dropped_images"]:
        lines.append("  images dropped from kept documents: " + ", ".join(f"{k}={v}" for k, v in info["dropped_images"].items()))
    for reason, exs in info["examples"].items():
        lines.append(f"  e.g. {reason}: {exs[0]}")
    if info["over_maxsize"]:
        lines.append(f"  over maxsize: {info['over_maxsize'][:5]}")
    if run:
        lines.append(f"  {run['seconds']}s, {run['shards_written']} shards written, {run['shards_reused']} reused, "
                     f"peak RSS {run['peak_rss_mb']['main']} MB (workers {run['peak_rss_mb']['workers']} MB)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ public API


def _media_ctx(image_root, max_pixels: int, max_image_bytes: int) -> dict:
    root = Path(image_root)
    if not root.is_dir():
        raise ConvertError(f"image_root {root} is not a directory")
    return {"image_root": str(root.resolve()), "max_pixels": int(max_pixels), "max_image_bytes": int(max_image_bytes)}


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
    ctx = _media_ctx(image_root, max_pixels, max_image_bytes)
    options = {"input": _input_fingerprint(input), "image_root": ctx["image_root"], "max_pixels": ctx["max_pixels"],
               "max_image_bytes": ctx["max_image_bytes"]}
    return convert("llava", iter_records(input), out_dir, name=name, options=options, ctx=ctx, maxcount=maxcount,
                   maxsize=maxsize, workers=workers, overwrite=overwrite, verbose=verbose)


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
    ctx = _media_ctx(image_root, max_pixels, max_image_bytes)
    ctx.update(prompts=prompts, seed=int(seed), max_text_bytes=int(max_text_bytes))
    options = {"input": _input_fingerprint(input), "image_root": ctx["image_root"], "max_pixels": ctx["max_pixels"],
               "max_image_bytes": ctx["max_image_bytes"], "max_text_bytes": ctx["max_text_bytes"],
               "prompts": prompts, "seed": int(seed)}
    return convert("captions", iter_caption_records(input), out_dir, name=name, options=options, ctx=ctx,
                   maxcount=maxcount, maxsize=maxsize, workers=workers, overwrite=overwrite, verbose=verbose)


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
    ctx = _media_ctx(image_root, max_pixels, max_image_bytes)
    ctx.update(text_joiner=str(text_joiner), max_images=None if max_images is None else int(max_images))
    options = {"input": _input_fingerprint(input), "image_root": ctx["image_root"], "max_pixels": ctx["max_pixels"],
               "max_image_bytes": ctx["max_image_bytes"], "text_joiner": ctx["text_joiner"], "max_images": ctx["max_images"]}
    return convert("interleaved", iter_records(input), out_dir, name=name, options=options, ctx=ctx,
                   maxcount=maxcount, maxsize=maxsize, workers=workers, overwrite=overwrite, verbose=verbose)


# ------------------------------------------------------------------------------ CLI helpers


def add_common_arguments(p) -> None:
    """The options every converter script takes (``data/convert_*.py``)."""
    p.add_argument("--out", required=True, help="output folder for NAME-%%06d.tar, their reports and dataset.json")
    p.add_argument("--name", default=None, help="shard name prefix (letters, digits, - and _; default: the converter's)")
    p.add_argument("--maxcount", type=int, default=1000, help="records per chunk = per shard (default 1000)")
    p.add_argument("--maxsize", type=float, default=None,
                   help="soft byte cap per shard: a bigger shard is kept and reported (lower --maxcount then)")
    p.add_argument("--workers", type=int, default=2, help="writer processes (default 2; 1 = in-process)")
    p.add_argument("--max-pixels", type=int, default=50_000_000, help="refuse images whose header claims more pixels")
    p.add_argument("--max-image-bytes", type=int, default=64 << 20, help="refuse image files larger than this")
    p.add_argument("--overwrite", action="store_true", help="delete this NAME's shards and reports first")
    p.add_argument("--quiet", action="store_true", help="only the final report")


def common_kwargs(args) -> dict:
    kw = {"out_dir": args.out, "maxcount": args.maxcount, "maxsize": int(args.maxsize) if args.maxsize else None,
          "workers": args.workers, "max_pixels": args.max_pixels, "max_image_bytes": args.max_image_bytes,
          "overwrite": args.overwrite, "verbose": not args.quiet}
    if args.name:
        kw["name"] = args.name
    return kw


def run_cli(fn: Callable[..., dict], kwargs: dict) -> int:
    """Call a converter; exit status 0, 2 on a usage error (bad options or input, options that differ
    from the finished shards), 130 when interrupted (re-run resumes)."""
    try:
        info = fn(**kwargs)
    except (ConvertError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    if kwargs.get("verbose") is False:
        print(format_report(info, kwargs.get("out_dir")))
    return 0
