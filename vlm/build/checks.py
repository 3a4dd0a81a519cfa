"""Checks shared by every config read from outside: Hydra's special keys, the size of the
structure, and keyword arguments against a signature (the processor's and the template's;
the model's components are dataclasses and check themselves, `vlm.model.fields`)."""

from __future__ import annotations

import inspect
import typing
from typing import Any

from vlm.model.fields import check_number, short, type_name, type_ok

# Hydra's instantiate keys; any other `_name_` key is refused as well.
HYDRA_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")
MAX_CONFIG_NODES = 100_000
MAX_CONFIG_DEPTH = 32


def plain(v: Any) -> Any:
    """OmegaConf containers (a composed config handed over as is) -> plain dicts and lists."""
    if type(v).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(v, resolve=True)
    return v


def check_config_keys(cfg: Any, where: str, targets: tuple[str, ...] = ()) -> None:
    """Refuse Hydra's special keys (`_args_`, `_partial_`, …, any `_name_` key) anywhere in `cfg`,
    and `_target_` except at the paths in `targets` (e.g. "model.encoder"). Also bounds the size
    and depth of the structure (a checkpoint's hyper_parameters may share one list many times)."""
    budget = [MAX_CONFIG_NODES]

    def walk(node: Any, path: str, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError(f"{where}: more than {MAX_CONFIG_NODES} values: not a config")
        if depth > MAX_CONFIG_DEPTH:
            raise ValueError(f"{path}: nested deeper than {MAX_CONFIG_DEPTH} levels: not a config")
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise ValueError(f"{path}: key {short(k)} is not a string")
                if k.startswith("_") and k.endswith("_") and len(k) > 1:
                    if k == "_target_" and path in targets:
                        continue
                    if k == "_target_":
                        raise ValueError(
                            f"refusing to build {path}._target_={short(v)}: a _target_ is only accepted "
                            f"as {', '.join(t + '._target_' for t in targets) or 'nothing here'}"
                        )
                    raise ValueError(
                        f"refusing to build {path}.{k}: Hydra's special keys ({', '.join(HYDRA_KEYS[1:])}, "
                        "any _name_ key) are not accepted"
                    )
                walk(v, f"{path}.{k}", depth + 1)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]", depth + 1)

    walk(cfg, where, 0)


def check_arguments(fn: Any, kwargs: dict, where: str, skip: tuple[str, ...] = (), name: str | None = None) -> None:
    """Every key of `kwargs` is an argument of `fn` (not one in `skip`, which the caller passes
    itself) of the annotated type, within range (`check_number`); required arguments are there.
    One line naming the config key otherwise."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
    name = name or getattr(fn, "__qualname__", str(fn))
    params = {
        k: p
        for k, p in sig.parameters.items()
        if k != "self" and k not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    for k, v in kwargs.items():
        if k not in params:
            raise ValueError(f"{where}.{k} is not an argument of {name} (known: {', '.join(params)})")
        hint = hints.get(k, Any)
        if not type_ok(v, hint):
            raise ValueError(f"{where}.{k}={short(v)} is not of type {type_name(hint)}")
        check_number(v, k, f"{where}.{k}")
    required = [k for k, p in params.items() if p.default is p.empty and k not in kwargs]
    if required:
        raise ValueError(f"{where}.{required[0]} is missing (required by {name})")
