"""Several models behind one server, picked by a request's `model`: a base and its adapters.

`python serve.py ckpt=BASE 'adapters={support: ads/support, legal: ads/legal}'` serves the base
under its own name and one merged copy per adapter under the adapter's name
(`vlm.checkpoint.adapters.merge_adapter`). Each name gets its own engine (its own weights, batch
and caches): a copy of a small model costs less than merging per request would, and requests for
different adapters never wait for each other's weights. `NamedEngines` presents them to the server
as one engine: `submit` routes by `ChatRequest.model`, `/v1/models` lists every name.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack
from typing import Any

from vlm.errors import ServeConfigError


class NamedEngines:
    """Engines by served model name; the first is the default (a request that names no model)."""

    def __init__(self, engines: dict[str, Any]):
        if not engines:
            raise ServeConfigError("no engines to serve")
        self.engines = dict(engines)
        self.model_names = list(self.engines)
        self.model_name = self.model_names[0]
        self._stack: ExitStack | None = None

    @property
    def max_context(self) -> int:
        return min(e.max_context for e in self.engines.values())

    @property
    def alive(self) -> bool:
        return all(getattr(e, "alive", True) for e in self.engines.values())

    def full(self) -> bool:
        """Every engine's queue is full (one with room may still take the request)."""
        return all(getattr(e, "full", lambda: False)() for e in self.engines.values())

    def stats(self) -> dict:
        """The default engine's stats (what /metrics reads), with every engine's under `models`."""
        return {**self.engines[self.model_name].stats(), "models": {n: e.stats() for n, e in self.engines.items()}}

    def submit(self, request):
        return self.engines[getattr(request, "model", None) or self.model_name].submit(request)

    def __enter__(self) -> NamedEngines:
        self._stack = ExitStack()
        for e in self.engines.values():
            self._stack.enter_context(e)
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.__exit__(*exc)


def adapter_copies(loaded, adapters: dict) -> dict:
    """{name: a copy of `loaded` with that adapter folder merged}, every folder read and checked
    (`merge_adapter`). Made before an engine casts the base, so each merge is in its stored precision."""
    from vlm.checkpoint.adapters import merge_adapter

    for name, folder in adapters.items():
        if not isinstance(name, str) or not name:
            raise ServeConfigError(f"adapters: {name!r} is not a model name")
        if not isinstance(folder, str) or not folder:
            raise ServeConfigError(f"adapters.{name}={folder!r} is not an adapter folder")
    copies = {}
    for name, folder in adapters.items():
        c = copy.copy(loaded)
        c.model = copy.deepcopy(loaded.model)
        merge_adapter(c.model, folder)
        copies[name] = c
    return copies


def adapter_engines(base, copies: dict, build) -> NamedEngines:
    """`base` (an engine) under its name and `build(copy, name)` under each name of `copies`."""
    if base.model_name in copies:
        raise ServeConfigError(f"adapters: {base.model_name!r} is the base model's name (set model_name=…)")
    return NamedEngines({base.model_name: base, **{name: build(c, name) for name, c in copies.items()}})
