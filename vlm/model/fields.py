"""Typed config fields: the checks every model config dataclass runs when it is made.

A config dataclass (`vlm.model.config`) mixes in :class:`Fields` and calls `check_fields()` first
in its `__post_init__`: every field must have its annotated type and be in range (ints >= 0 except
layer indices, module counts capped, every int bounded, every float finite). The same checks run
for a training config and for a checkpoint's (untrusted) one, always before any module is built:
building is linear in the module counts, even on the meta device, so an absurd `n_layers` must
never reach a constructor. Every failure is one `SpecError` line naming the config key
(`model.decoder.n_layers=-3 is negative`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from typing import Any, ClassVar

from vlm.errors import SpecError

# Layer indices may count from the end; everything else is a size, a count or a rate.
NEGATIVE_OK = frozenset({"feature_layer", "feature_layers"})
MODULE_COUNTS = frozenset({"n_layers", "blocks"})
MAX_MODULE_COUNT = 1024
MAX_INT = 2**31 - 1


def short(v: Any, n: int = 80) -> str:
    """`repr(v)`, cut to `n` characters (a hostile value may be huge)."""
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def type_ok(v: Any, hint: Any) -> bool:
    """Whether `v` has the annotated type `hint` (bool is not an int; an int is a float)."""
    if hint is Any:
        return True
    if hint is type(None):
        return v is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(v, h) for h in typing.get_args(hint))
    if origin in (list, tuple, collections.abc.Sequence):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(v, (list, tuple)) and (not args or all(any(type_ok(x, a) for a in args) for x in v))
    if origin is dict or hint is dict:
        return isinstance(v, dict)
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if hint is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if hint is str:
        return isinstance(v, str)
    return isinstance(hint, type) and isinstance(v, hint)


def type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_number(v: Any, key: str, path: str) -> None:
    """`v` (a number or a list of them) is finite, >= 0 unless `key` is a layer index, and bounded."""
    items = v if isinstance(v, (list, tuple)) else [v]
    for x in items:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            continue
        if isinstance(x, float) and not math.isfinite(x):
            raise SpecError(f"{path}={short(v)} is not a finite number")
        if isinstance(x, int):
            if x < 0 and key not in NEGATIVE_OK:
                raise SpecError(f"{path}={short(v)} is negative")
            cap = MAX_MODULE_COUNT if key in MODULE_COUNTS else MAX_INT
            if abs(x) > cap:
                raise SpecError(f"{path}={short(v)} is out of range (at most {cap})")


class Fields:
    """Mixin for the config dataclasses. `WHERE` is the config key the section lives under
    (`model.encoder`), so messages name what the user wrote."""

    WHERE: ClassVar[str] = ""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def check_keys(cls, keys: collections.abc.Iterable[str], extra: tuple[str, ...] = ()) -> None:
        """SpecError naming the first key that is neither a field nor one of `extra`."""
        known = (*extra, *cls.field_names())
        for k in keys:
            if k not in known:
                raise SpecError(f"{cls.WHERE}.{k} is not a field of {cls.__name__} (known: {', '.join(known)})")

    @classmethod
    def from_dict(cls, d: dict) -> Any:
        """The config from a plain mapping; an unknown key is a SpecError naming it."""
        if not isinstance(d, dict):
            raise SpecError(f"{cls.WHERE} is not a mapping (got {type(d).__name__})")
        cls.check_keys(d)
        return cls(**d)

    def check_fields(self) -> None:
        """Every field of its annotated type and in range (module docstring)."""
        for name, hint in self.field_types().items():
            v = getattr(self, name)
            if not type_ok(v, hint):
                raise SpecError(f"{self.WHERE}.{name}={short(v)} is not of type {type_name(hint)}")
            check_number(v, name, f"{self.WHERE}.{name}")

    def fail(self, key: str, why: str) -> SpecError:
        """A SpecError about field `key`: `model.encoder.dim=24 <why>`."""
        return SpecError(f"{self.WHERE}.{key}={short(getattr(self, key))} {why}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples): what a checkpoint stores."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)
        }

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)
