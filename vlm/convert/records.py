"""Streaming readers of JSON inputs: a ``.json`` array parsed incrementally, or JSON Lines line by
line, one record in memory at a time."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlm.convert.common import BadRecord, ConvertError

_JSON_DELIMS = frozenset(" \t\r\n,]")


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
