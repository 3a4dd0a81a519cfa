"""Build the engine a front end runs on from its Hydra options (`conf/engine/*.yaml`).

`kind: continuous` is the continuous-batching `vlm.serve.engine.Engine` (prefix and image caches,
many requests per step); `kind: serial` is `vlm.serve.serial.SerialEngine` (one request at a time,
no caches: the reference). Both take the same requests and give the same events.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlm.errors import ServeConfigError
from vlm.serve.serial import SerialConfig, SerialEngine

KINDS = ("continuous", "serial")


def _classes(kind: str):
    if kind == "serial":
        return SerialEngine, SerialConfig
    if kind == "continuous":
        try:
            from vlm.serve.engine import Engine, EngineConfig
        except ImportError as e:
            raise ServeConfigError(f"the continuous engine is not available here ({e}); use engine=serial") from None
        return Engine, EngineConfig
    raise ServeConfigError(f"engine.kind={kind!r} is not one of {', '.join(KINDS)}")


def build_engine(loaded, options: dict, *, dtype: str | None = None, model_name: str | None = None, ckpt=None):
    """An engine (not started) for `loaded` (a `LoadedVLM`). options: the `engine` config group
    (`kind` plus that engine's own options). dtype None: the engine's default (bf16 on CUDA).
    device None: CUDA when there is one. The served model name defaults to the checkpoint's folder
    or file name."""
    opts = {k: v for k, v in dict(options or {}).items() if k != "kind"}
    engine_cls, config_cls = _classes(str((options or {}).get("kind", "serial")))
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(opts) - fields)
    if unknown:
        raise ServeConfigError(
            f"engine option(s) {', '.join(unknown)} not known to {engine_cls.__name__} (it takes: {', '.join(sorted(fields))})"
        )
    if model_name is None and ckpt is not None:
        p = Path(str(ckpt)).resolve()
        model_name = p.stem if p.is_file() else p.name
    if "device" in fields and opts.get("device") is None:
        import torch

        opts["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    opts.update({k: v for k, v in {"dtype": dtype, "model_name": model_name}.items() if k in fields and v is not None})
    try:
        return engine_cls(loaded, config_cls(**opts))
    except (TypeError, ValueError) as e:
        raise ServeConfigError(f"bad engine options: {e}") from None
