"""What every converter shares: the errors, the registry of record builders, the record id that
goes to ``meta.id``, the input fingerprint kept in the options, and the report helpers (atomic
JSON write, a few example messages per reason)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERSION = 1
_EXAMPLES_PER_REASON = 3


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


# Converter kind -> record builder: (record, key, ctx) -> (sample dict, [(bytes, ext)], [Skip of
# each dropped image]), or raises Skip for the whole record. Each format module (llava.py,
# captions.py, interleaved.py) adds its own when the package is imported. Shard writers look the
# builder up here by kind, so a builder replaced in this dict is the one every writer uses.
BUILDERS: dict[str, Callable] = {}


def meta_id(rec: dict) -> dict:
    """``{"id": ...}`` when the record has a string or integer ``id``, else ``{}``."""
    rid = rec.get("id")
    return {"id": rid} if isinstance(rid, (str, int)) and not isinstance(rid, bool) else {}


def input_fingerprint(path: Path) -> dict:
    """The input's absolute path and size, recorded in the options (a changed input is other options)."""
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size if path.is_file() else None}


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a ``.tmp`` renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def add_example(examples: dict, reason: str, where: str, message: str) -> None:
    """Keep the first few messages of each reason (``examples[reason]``), each cut to 300 characters."""
    lst = examples.setdefault(reason, [])
    if len(lst) < _EXAMPLES_PER_REASON:
        lst.append(f"{where}: {message}"[:300])
