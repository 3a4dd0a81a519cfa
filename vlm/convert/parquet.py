"""Parquet files and Arrow (``datasets.save_to_disk``) folders of conversations + images -> chat shards.

Column layouts (the first of these columns present is used; ``column_map`` names others):

``conversations`` (ShareGPT / LLaVA)
    a list of ``{from, value}`` turns (``human``/``gpt``/``system``; ``user``/``assistant`` too, and
    ``{role, content}`` structs are read the same way); ``<image>`` markers in human turns place the
    images, as in :mod:`vlm.convert.llava`.
``messages``
    a list of ``{role, content}`` turns; ``content`` is a string (``<image>`` markers, as above) or a
    list of ``{type: "image"|"text", text}`` items (each image item takes the row's next image).
``texts`` (The Cauldron)
    a list of ``{user, assistant}`` exchanges; the row's images go before the first user text
    (or at its ``<image>`` markers, when the text has exactly one per image).

Images (column ``images`` or ``image``): a struct ``{bytes, path}`` (the ``datasets`` Image
feature), a list of them (several images per row), raw binary, a string path (relative to
``image_root``), or a list of binaries / paths. Bytes win over a path when a struct has both.
Every image goes through the validated reader of :mod:`vlm.convert.images`.

Reading: :mod:`pyarrow` (the ``parquet`` extra), only the columns used, ``batch_size`` rows at a
time (Parquet: buffered reads within a row group, no pre-buffering of whole row groups; Arrow: the
IPC stream batch by batch, read rather than memory-mapped so that RSS stays bounded). Records then
go through :func:`vlm.convert.pipeline.convert` like every other converter (chunks, one chunk =
one shard, resumable, counts by reason).

Whole-input problems stop the run with a :class:`ConvertError` before anything is written: a
missing column (the message names the columns found), a file that is not Parquet/Arrow or whose
footer is cut off, files whose layouts differ. A file cut inside its data stops the run when the
reader reaches it (the finished shards are kept). Per-row problems are counted: see
:data:`SKIP_REASONS`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlm.convert.common import BUILDERS, BadRecord, ConvertError, Skip, meta_id
from vlm.convert.images import check_image_bytes, media_ctx, read_image
from vlm.convert.pipeline import convert

IMAGE_MARKER = "<image>"
LAYOUTS = ("conversations", "messages", "texts")  # default column name = layout name
IMAGE_COLUMNS = ("images", "image")
MAP_KEYS = (*LAYOUTS, "image", "id")
PARQUET_SUFFIXES = (".parquet", ".pq")

# Skip reasons of this converter (besides the image reader's media_*, path_escape, url_not_allowed, bad_path).
SKIP_REASONS = {
    "wrong_column_type": "a column whose type is not one this layout can hold (e.g. `conversations` stored as a string)",
    "empty_conversation": "no turns (null, an empty list) or only blank turns",
    "missing_image": "the text asks for an image the row does not have (null cell, a null list element, a struct with neither bytes nor path)",
    "image_marker_mismatch": "the number of <image> markers / image items differs from the number of images",
    "bad_roles": "turns are not user/assistant alternating after an optional system turn, ending with assistant",
    "empty_turn": "a turn with no text and no image",
}

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_IMAGE = object()  # an image's place in a turn


def _pyarrow():
    """The pyarrow modules, or a one-line error naming the extra that installs them."""
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise ConvertError("reading Parquet/Arrow needs pyarrow: pip install -e '.[parquet]'") from None
    return pa, pq


# ------------------------------------------------------------------------------------ input files


def input_files(path: str | os.PathLike) -> list[Path]:
    """The files of an input: one ``.parquet`` / ``.arrow`` file; a ``save_to_disk`` folder (the
    ``data-*.arrow`` files in ``state.json``'s order); or a folder of ``.parquet`` files (searched
    recursively, sorted), else of ``.arrow`` files."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConvertError(f"{path}: no such file or folder")
    state = path / "state.json"
    if state.is_file():
        try:
            names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ConvertError(f"{state}: not a datasets state.json ({type(e).__name__}: {e})") from None
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConvertError(f"{state} lists files that are not there: {missing[:3]}")
        return files
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in PARQUET_SUFFIXES and p.is_file())
    files = files or sorted(p for p in path.glob("*.arrow") if p.is_file())
    if files:
        return files
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise ConvertError(f"{path} is a DatasetDict: convert one split's folder ({', '.join(splits)})")
    raise ConvertError(f"{path}: no .parquet or .arrow files")


def _is_parquet(path: Path) -> bool:
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return True
    if path.suffix.lower() == ".arrow":
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


class _Source:
    """One input file: its schema, and its rows' columns ``batch_size`` rows at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.parquet = _is_parquet(path)
        pa, pq = _pyarrow()
        try:
            if self.parquet:
                # buffer_size: read column chunks piecewise (a whole row group is never loaded at once)
                self.pf = pq.ParquetFile(str(path), buffer_size=1 << 20, pre_buffer=False)
                self.schema = self.pf.schema_arrow
            else:
                reader, source = self._open_ipc()
                self.schema = reader.schema
                source.close()
        except (pa.ArrowException, OSError) as e:
            kind = "Parquet" if self.parquet else "Arrow IPC"
            raise ConvertError(f"{path}: not a readable {kind} file (truncated or corrupt?): {_one_line(e)}") from None

    def _open_ipc(self):
        pa, _ = _pyarrow()
        source = pa.OSFile(str(self.path))
        try:
            try:
                return pa.ipc.open_stream(source), source  # what datasets.save_to_disk writes
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source), source
        except BaseException:
            source.close()
            raise

    def batches(self, columns: list[str], batch_size: int) -> Iterator[Any]:
        """Record batches of ``columns``; a read error is a :class:`ConvertError` naming the file."""
        pa, _ = _pyarrow()
        try:
            if self.parquet:
                yield from self.pf.iter_batches(batch_size=batch_size, columns=columns)
                return
            reader, source = self._open_ipc()
            try:
                if hasattr(reader, "num_record_batches"):  # IPC file format
                    for i in range(reader.num_record_batches):
                        yield from _slices(reader.get_batch(i), batch_size)
                else:
                    for batch in reader:
                        yield from _slices(batch, batch_size)
            finally:
                source.close()
        except (pa.ArrowException, OSError) as e:
            raise ConvertError(f"{self.path}: read error (truncated or corrupt?): {_one_line(e)}") from None


def _slices(batch, batch_size: int):
    for start in range(0, batch.num_rows, batch_size):
        yield batch.slice(start, batch_size)  # zero-copy; only the columns asked for are converted


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


# ----------------------------------------------------------------------------------- columns


def parse_column_map(items) -> dict[str, str]:
    """``["conversations=dialog", "image=img,id=uid"]`` -> ``{"conversations": "dialog", ...}``.
    ``image=`` (empty) means rows have no image column (text-only conversations)."""
    out: dict[str, str] = {}
    for item in items or ():
        for part in str(item).split(","):
            if not part.strip():
                continue
            key, sep, col = part.partition("=")
            key = key.strip()
            if not sep or key not in MAP_KEYS:
                raise ConvertError(f"--map {part!r}: expected KEY=COLUMN with KEY one of {', '.join(MAP_KEYS)}")
            if key in LAYOUTS and any(k in LAYOUTS for k in out if k != key):
                raise ConvertError("--map names one conversation column (conversations, messages or texts)")
            out[key] = col.strip()
    return out


def resolve_columns(names: list[str], column_map: dict[str, str], where: str) -> dict:
    """``{"layout", "turns", "image", "id"}`` (column names; image/id may be None) for a file with
    columns ``names``, or :class:`ConvertError` naming the columns found."""
    found = f"columns found: {', '.join(names) or '(none)'}"
    mapped = [k for k in LAYOUTS if k in column_map]
    if mapped:
        layout, turns = mapped[0], column_map[mapped[0]]
        if turns not in names:
            raise ConvertError(f"{where}: no column {turns!r} (--map {layout}={turns}); {found}")
    else:
        layout = next((k for k in LAYOUTS if k in names), None)
        if layout is None:
            raise ConvertError(
                f"{where}: no conversation column (looked for {', '.join(LAYOUTS)}; "
                f"name yours with --map conversations=COL, messages=COL or texts=COL); {found}"
            )
        turns = layout
    if "image" in column_map:
        image = column_map["image"] or None
        if image is not None and image not in names:
            raise ConvertError(f"{where}: no column {image!r} (--map image={image}); {found}")
    else:
        image = next((c for c in IMAGE_COLUMNS if c in names), None)
        if image is None:
            raise ConvertError(
                f"{where}: no image column (looked for {', '.join(IMAGE_COLUMNS)}; name yours with "
                f"--map image=COL, or --map image= for text-only rows); {found}"
            )
    id_col = column_map.get("id", "id" if "id" in names else None) or None
    if id_col is not None and id_col not in names:
        raise ConvertError(f"{where}: no column {id_col!r} (--map id={id_col}); {found}")
    return {"layout": layout, "turns": turns, "image": image, "id": id_col}


def _type_problem(pa, field_type, what: str) -> str | None:
    """Why a column of ``field_type`` cannot hold ``what`` ("turns" or "images"), or None."""
    t = pa.types
    is_list = lambda x: t.is_list(x) or t.is_large_list(x) or t.is_fixed_size_list(x)  # noqa: E731
    is_bin = lambda x: t.is_binary(x) or t.is_large_binary(x) or t.is_fixed_size_binary(x)  # noqa: E731
    is_str = lambda x: t.is_string(x) or t.is_large_string(x)  # noqa: E731
    if what == "turns":
        if is_list(field_type) and t.is_struct(field_type.value_type):
            return None
        return f"is {field_type}, expected a list of structs"
    one = lambda x: t.is_struct(x) or is_bin(x) or is_str(x) or t.is_null(x)  # noqa: E731
    if one(field_type) or (is_list(field_type) and one(field_type.value_type)):
        return None
    return f"is {field_type}, expected an image struct {{bytes, path}}, binary, a path string, or a list of them"


def _iter_rows(sources: list[_Source], cols: dict, batch_size: int) -> Iterator[Any]:
    """Records ``{"turns", "image", "id"}`` of every file in order; every row of a file whose column
    types cannot be read as this layout is a ``wrong_column_type`` :class:`BadRecord`."""
    pa, _ = _pyarrow()
    for src in sources:
        problems = []
        for key, what in (("turns", "turns"), ("image", "images")):
            if cols[key] is not None:
                why = _type_problem(pa, src.schema.field(cols[key]).type, what)
                if why:
                    problems.append(f"column {cols[key]!r} {why}")
        wanted = [c for c in dict.fromkeys((cols["turns"], cols["image"], cols["id"])) if c is not None]
        if problems:
            bad = BadRecord("wrong_column_type", f"{src.path.name}: {'; '.join(problems)}")
            for batch in src.batches(wanted[:1], batch_size):  # only the row count is needed
                for _ in range(batch.num_rows):
                    yield bad
            continue
        for batch in src.batches(wanted, batch_size):
            values = {c: batch.column(c).to_pylist() for c in wanted}
            empty = [None] * batch.num_rows
            yield from (
                {"turns": t, "image": i, "id": r}
                for t, i, r in zip(
                    values[cols["turns"]],
                    values[cols["image"]] if cols["image"] else empty,
                    values[cols["id"]] if cols["id"] else empty,
                )
            )


# ------------------------------------------------------------------------------------ records


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Skip("wrong_column_type", f"{what} is {type(value).__name__}, expected a string")
    return value


def _split_markers(text: str) -> list:
    pieces: list = []
    for j, piece in enumerate(text.split(IMAGE_MARKER)):
        if j:
            pieces.append(_IMAGE)
        pieces.append(piece)
    return pieces


def _turns(layout: str, value: Any) -> list[tuple[str, list]]:
    """``[(speaker, pieces)]``: pieces are strings and ``_IMAGE`` places, in order."""
    if value is None:
        raise Skip("empty_conversation", "no turns (null)")
    if not isinstance(value, list):
        raise Skip("wrong_column_type", f"turns are {type(value).__name__}, expected a list")
    turns = []
    for t in value:
        if not isinstance(t, dict):
            raise Skip("wrong_column_type", f"a turn is {type(t).__name__}, expected a struct")
        if layout == "texts":
            turns.append(("user", _split_markers(_text(t.get("user"), "'user'"))))
            turns.append(("assistant", _split_markers(_text(t.get("assistant"), "'assistant'"))))
            continue
        speaker = t.get("from") if t.get("from") is not None else t.get("role")
        content = t.get("value") if t.get("value") is not None else t.get("content")
        if isinstance(content, list):  # [{type: image|text, text}] items
            pieces: list = []
            for item in content:
                if not isinstance(item, dict):
                    raise Skip("wrong_column_type", f"a content item is {type(item).__name__}, expected a struct")
                if item.get("type") == "image":
                    pieces.append(_IMAGE)
                elif item.get("type") == "text":
                    pieces.append(_text(item.get("text"), "a text item's 'text'"))
                else:
                    raise Skip("bad_record", f"content item type {item.get('type')!r}, expected 'image' or 'text'")
        else:
            pieces = _split_markers(_text(content, "a turn's text"))
        turns.append((str(speaker).lower() if speaker is not None else "", pieces))
    if not any(p is _IMAGE or p.strip() for _, pieces in turns for p in pieces):
        raise Skip("empty_conversation", "no turns" if not turns else "every turn is blank")
    return turns


def _image_refs(value: Any) -> list:
    """The row's images as a list of bytes / path strings / None (a missing one)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    refs = []
    for it in items:
        if isinstance(it, dict):
            data, path = it.get("bytes"), it.get("path")
            if data is not None and not isinstance(data, (bytes, bytearray)):
                raise Skip("wrong_column_type", f"image 'bytes' is {type(data).__name__}")
            if path is not None and not isinstance(path, str):
                raise Skip("wrong_column_type", f"image 'path' is {type(path).__name__}")
            it = data if data is not None else (path or None)
        elif it is not None and not isinstance(it, (bytes, bytearray, str)):
            raise Skip("wrong_column_type", f"an image is {type(it).__name__}")
        refs.append(it)
    return refs


def _build_parquet(rec: Any, key: str, ctx: dict):
    layout = ctx["layout"]
    turns = _turns(layout, rec["turns"])

    roles = []
    for speaker, _ in turns:
        role = _ROLES.get(speaker)
        if role is None:
            raise Skip("bad_roles", f"unknown speaker {speaker!r}")
        roles.append(role)
    body = roles[1:] if roles[0] == "system" else roles
    if not body or len(body) % 2 or body != ["user", "assistant"] * (len(body) // 2):
        raise Skip(
            "bad_roles",
            f"roles {roles}: need user/assistant alternating after an optional system turn, ending with assistant",
        )
    turns = [(role, pieces) for role, (_, pieces) in zip(roles, turns)]

    refs = _image_refs(rec["image"])
    places = sum(p is _IMAGE for role, pieces in turns if role == "user" for p in pieces)
    stray = sum(p is _IMAGE for role, pieces in turns if role != "user" for p in pieces)
    if layout == "texts" and not places and not stray and refs:  # The Cauldron: images before the first question
        first = roles.index("user")
        turns[first] = ("user", [_IMAGE] * len(refs) + turns[first][1])
        places = len(refs)
    if (places or stray) and (not refs or any(r is None for r in refs)):
        n_null = sum(r is None for r in refs)
        raise Skip("missing_image", f"{places + stray} image places, {len(refs)} images ({n_null} null)")
    if stray or places != len(refs):
        where = f" ({stray} outside user turns)" if stray else ""
        raise Skip("image_marker_mismatch", f"{places} image places in user turns{where}, {len(refs)} images")

    messages, m = [], 0
    for role, pieces in turns:
        content: list[dict] = []
        for p in pieces:
            if p is _IMAGE:
                content.append({"type": "image", "media": m})
                m += 1
            elif p.strip():
                content.append({"type": "text", "text": p.strip()})
        if not content:
            raise Skip("empty_turn", f"an empty {role} turn")
        messages.append({"role": role, "content": content})

    media = []
    for n, ref in enumerate(refs):
        if isinstance(ref, str):
            media.append(read_image(ctx["image_root"], ref, ctx, key))
        else:
            media.append(check_image_bytes(bytes(ref), f"image {n} ({len(ref)} bytes)", ctx, key))
    return {"messages": messages, "meta": {"source": "parquet", **meta_id(rec)}}, media, []


# ---------------------------------------------------------------------------------------- API


def convert_parquet(
    input: str | os.PathLike,
    out_dir: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    column_map: dict[str, str] | None = None,
    name: str = "parquet",
    maxcount: int = 1000,
    workers: int = 2,
    batch_size: int = 64,
    maxsize: int | None = None,
    max_pixels: int = 50_000_000,
    max_image_bytes: int = 64 << 20,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict:
    """Parquet file(s) or an Arrow ``save_to_disk`` folder -> chat shards in ``out_dir``; returns the report.

    ``input``: a ``.parquet`` / ``.arrow`` file, a folder of ``.parquet`` files, or a
    ``save_to_disk`` folder. ``image_root``: where path images are looked up (default: the input
    folder, or the input file's folder). ``column_map``: ``{"conversations"|"messages"|"texts":
    COLUMN, "image": COLUMN or "", "id": COLUMN}`` for other column names (see the module
    docstring for the layouts). ``batch_size``: rows read from a file at a time."""
    _pyarrow()
    input = Path(input)
    column_map = dict(column_map or {})
    bad = sorted(set(column_map) - set(MAP_KEYS))
    if bad:
        raise ConvertError(f"column_map keys {bad}: expected some of {', '.join(MAP_KEYS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    files = input_files(input)
    sources = [_Source(f) for f in files]
    cols = None
    for src in sources:
        got = resolve_columns(list(src.schema.names), column_map, str(src.path))
        if cols is not None and got != cols:
            raise ConvertError(f"{src.path}: columns {got} differ from {files[0]}'s {cols}; convert them separately")
        cols = got
    if image_root is None:
        image_root = input if input.is_dir() else input.parent
    ctx = media_ctx(image_root, max_pixels, max_image_bytes)
    ctx["layout"] = cols["layout"]
    options = {
        "input": {
            "path": str(input.resolve()),
            "files": [f.relative_to(input).as_posix() if input.is_dir() else f.name for f in files],
            "bytes": sum(f.stat().st_size for f in files),
        },
        "columns": cols,
        "image_root": ctx["image_root"],
        "max_pixels": ctx["max_pixels"],
        "max_image_bytes": ctx["max_image_bytes"],
    }
    return convert(
        "parquet",
        _iter_rows(sources, cols, batch_size),
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


BUILDERS["parquet"] = _build_parquet
