"""Reading the files of a checkpoint that may be hostile, without trusting any of them.

Every reader refuses anything but a regular file (a FIFO, a device or a directory is refused
without blocking), caps the bytes it reads, and fails with one `CheckpointError` line naming the
file: config.yaml (UTF-8, safe YAML without aliases, not interpolated), tokenizer.json, a
safetensors header (checked against the file's size before any tensor is read) and a torch file
(`torch.load(weights_only=True)` of an uncompressed zip whose members fit in the file).
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml

from vlm.errors import CheckpointError
from vlm.files import FileRefused, checked_stat, kind_of, read_regular_file
from vlm.tokenizer import TextTokenizer

MAX_CONFIG_BYTES = 64 << 20  # config.yaml
MAX_TOKENIZER_BYTES = 64 << 20  # tokenizer.json (a 150k-token BPE is ~10 MiB)
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit


def one_line(e: BaseException | str, limit: int = 300) -> str:
    """An exception's message on one line (YAML and tokenizer errors span several), shortened."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refused(e: FileRefused, path, what: str, limit: int | None = None) -> CheckpointError:
    if e.reason == "missing":
        return CheckpointError(f"{path}: {what} is missing")
    if e.reason == "too_large" and limit is not None:
        return CheckpointError(f"{path} is more than the {limit >> 20} MiB allowed for {what}")
    return CheckpointError(e.message)


def check_regular_file(path: str | Path, what: str) -> os.stat_result:
    """`os.stat` of `path` (links followed), refusing anything but a regular file (`vlm.files`)."""
    try:
        return checked_stat(path)
    except FileRefused as e:
        raise _refused(e, path, what) from None


def read_capped(path: str | Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (`vlm.files.read_regular_file`: a named
    pipe, a device such as /dev/zero or a directory is refused at once)."""
    try:
        return read_regular_file(path, limit)
    except FileRefused as e:
        raise _refused(e, path, what, limit) from None


def _yaml_loader():
    try:  # OmegaConf's scalar rules (e.g. `1e-6` is a float), as `OmegaConf.load` read it before
        from omegaconf._utils import get_yaml_loader

        base = get_yaml_loader()
    except ImportError:  # pragma: no cover
        base = yaml.SafeLoader

    class NoAliasLoader(base):  # type: ignore[valid-type, misc]
        """Safe YAML without aliases: `*ref` would let a few bytes expand exponentially."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.events.AliasEvent):
                raise yaml.composer.ComposerError(
                    None, None, "YAML aliases (*name) are not accepted", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)

    return NoAliasLoader


_NO_ALIAS_LOADER = _yaml_loader()


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return one_line(getattr(e, "problem", None) or e, 160) + where


def read_config_file(path: str | Path) -> dict:
    """A checkpoint's config.yaml as a plain dict (no interpolation), or one-line CheckpointError."""
    data = read_capped(path, MAX_CONFIG_BYTES, "config.yaml")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {e.start})") from None
    try:
        config = yaml.load(text, Loader=_NO_ALIAS_LOADER)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not valid YAML ({_yaml_problem(e)})") from None
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a YAML mapping (got {type(config).__name__})")
    return config


def tokenizer_from_text(text: Any, where: str) -> TextTokenizer:
    if not isinstance(text, str):
        raise CheckpointError(f"{where}: the tokenizer is not JSON text (got {type(text).__name__})")
    if len(text) > MAX_TOKENIZER_BYTES:
        raise CheckpointError(f"{where}: the tokenizer is more than the {MAX_TOKENIZER_BYTES >> 20} MiB allowed")
    try:
        return TextTokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for any parse error
        raise CheckpointError(f"{where}: not a tokenizer ({one_line(e, 200)})") from None


def read_tokenizer_file(path: str | Path) -> TextTokenizer:
    data = read_capped(path, MAX_TOKENIZER_BYTES, "tokenizer.json")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {e.start})") from None
    return tokenizer_from_text(text, str(path))


# safetensors dtype -> bytes per element (the format's table)
_ST_DTYPES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "C64": 8,
    "U64": 8,
    "U32": 4,
    "U16": 2,
}
_ST_FLOAT = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ"}


def read_safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's header, read and checked without
    reading or allocating any tensor: the 8-byte header length against the file size, the JSON,
    each dtype, shape and byte range (inside the file, the size the shape and dtype need, no two
    overlapping). One-line CheckpointError naming the file otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: model.safetensors is missing") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the weights ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path} is {kind_of(st.st_mode)}, not a regular file")
        size = st.st_size
        if size < 8:
            raise CheckpointError(
                f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)"
            )
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if n > MAX_SAFETENSORS_HEADER or n > size - 8:
            raise CheckpointError(f"{path}: not a safetensors file (its header claims {n} bytes; the file has {size})")
        raw = os.pread(fd, n, 8)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the weights ({e.strerror})") from None
    finally:
        os.close(fd)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data_len = size - 8 - n
    out, ranges = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = (
            isinstance(info, dict)
            and info.get("dtype") in _ST_DTYPES
            and isinstance(info.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])
        )
        if not ok:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry")
        begin, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(
                f"{path}: tensor {name!r} lies outside the file (bytes {begin}..{end} of {data_len}): "
                "truncated or damaged"
            )
        if end - begin != numel * _ST_DTYPES[info["dtype"]]:
            raise CheckpointError(
                f"{path}: tensor {name!r} {info['dtype']}{info['shape']} needs "
                f"{numel * _ST_DTYPES[info['dtype']]} bytes but its range holds {end - begin}"
            )
        ranges.append((begin, end, name))
        out[name] = (info["dtype"], tuple(info["shape"]))
    ranges.sort()
    for (_, e0, a), (b1, _, b) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap")
    return out


def read_torch_file(path: str | Path, map_location: str = "cpu", mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` of a regular file that is an uncompressed torch zip whose
    members fit in the file (no zip bomb); tensors and plain containers only, a pickled object is
    refused. One-line CheckpointError naming the file otherwise."""
    p = Path(path)
    st = check_regular_file(p, "the checkpoint")
    why = None
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
        why = "not a torch zip file" if st.st_size else "an empty file"
        infos = []
    total = 0
    for info in infos:
        total += info.file_size
        if info.compress_type != zipfile.ZIP_STORED:
            why = f"member {info.filename!r} is compressed (torch writes them stored)"
        elif total > st.st_size:
            why = "its members claim more bytes than the file holds"
        if why:
            break
    if why is None and not any(i.filename.endswith("data.pkl") for i in infos):
        why = "no data.pkl: not a torch file"
    if why:
        raise CheckpointError(f"{p} is not a loadable checkpoint ({why})")
    try:
        return torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # not a torch file, or it holds pickled objects we refuse to run
        msg = str(e)
        refused = re.search(r"Unsupported (global: GLOBAL \S+|operand \S+)", msg)
        if refused:
            raise CheckpointError(
                f"{p} is not a loadable checkpoint (it holds pickled objects, refused: "
                f"{one_line(refused.group(0), 200)})"
            ) from None
        raise CheckpointError(
            f"{p} is not a loadable checkpoint ({type(e).__name__}: "
            f"{one_line(msg.splitlines()[0] if msg else '', 200)})"
        ) from None
