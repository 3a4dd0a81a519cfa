"""Build the engine a front end runs on from its Hydra options (`conf/engine/*.yaml`).

`kind: continuous` is the continuous-batching `vlm.serve.engine.Engine` (prefix and image caches,
many requests per step); `kind: serial` is `vlm.serve.serial.SerialEngine` (one request at a time,
no caches: the reference). Both read the same `EngineConfig` (`vlm.serve.engine_config`), take the
same requests and give the same events.
"""

from __future__ import annotations

from pathlib import Path

from vlm.errors import ServeConfigError
from vlm.serve.engine_config import EngineConfig
from vlm.serve.serial import SerialEngine

KINDS = ("continuous", "serial")


def engine_class(kind: str):
    """The engine class of `engine.kind`."""
    if kind == "serial":
        return SerialEngine
    if kind == "continuous":
        try:
            from vlm.serve.engine import Engine
        except ImportError as e:
            raise ServeConfigError(f"the continuous engine is not available here ({e}); use engine=serial") from None
        return Engine
    raise ServeConfigError(f"engine.kind={kind!r} is not one of {', '.join(KINDS)}")


def build_engine(loaded, options: dict, *, dtype: str | None = None, model_name: str | None = None, ckpt=None):
    """An engine (not started) for `loaded` (a `LoadedVLM`). options: the `engine` config group
    (`kind` plus `EngineConfig` fields; an option the chosen engine does not use is refused).
    dtype None: `engine_config.default_dtype` (the same rule for both engines). device None: CUDA
    when there is one. The served model name defaults to the checkpoint's folder or file name."""
    opts = {k: v for k, v in dict(options or {}).items() if k != "kind"}
    kind = str((options or {}).get("kind", "serial"))
    engine_cls = engine_class(kind)
    taken = engine_cls.OPTIONS
    unknown = sorted(set(opts) - taken)
    if unknown:
        raise ServeConfigError(
            f"engine option(s) {', '.join(unknown)} not known to engine={kind} ({engine_cls.__name__} takes: "
            f"{', '.join(sorted(taken))})"
        )
    if model_name is None and ckpt is not None:
        p = Path(str(ckpt)).resolve()
        model_name = p.stem if p.is_file() else p.name
    opts.update({k: v for k, v in {"dtype": dtype, "model_name": model_name}.items() if v is not None})
    try:
        return engine_cls(loaded, EngineConfig(**opts))
    except (TypeError, ValueError) as e:
        raise ServeConfigError(f"bad engine options: {e}") from None
