"""Command-line overrides that cannot work, caught before Hydra composes the config (whose
"Key 'patch_size' is not in struct" does not say where the key went)."""

from __future__ import annotations

from collections.abc import Sequence

from vlm.errors import SpecError
from vlm.model.config import COMPONENTS, OPTIONS, CrossAttnConfig, FreezeConfig
from vlm.model.geometry import PROCESSOR_KEYS, SOURCES, TEMPLATE_KEYS, VIDEO_KEYS

# Data-config keys that used to copy the geometry, and the model key that holds it now.
DATA_KEYS = {
    **{f"data.processor.{k}": SOURCES[f] for k, f in PROCESSOR_KEYS.items()},
    **{f"data.processor.video.{k}": SOURCES[f] for k, f in VIDEO_KEYS.items()},
    **{f"data.template.{k}": SOURCES[f] for k, f in TEMPLATE_KEYS.items()},
}


def check_overrides(overrides: Sequence[str]) -> str | None:
    """The message for a command-line override that cannot work, else None: a data key the
    geometry replaced (`data.processor.patch_size=8` -> set model.encoder.patch_size), or a model
    key that is not a field of its spec (`model.encoder.dimm=3`; `vlm.model.config`)."""
    for a in overrides:
        key = a.split("=", 1)[0].lstrip("+~")
        if key in DATA_KEYS:
            return (
                f"{key} is not a data key: the media geometry comes from the model config; set {DATA_KEYS[key]} instead"
            )
        problem = model_key_problem(key)
        if problem:
            return problem
    return None


def model_key_problem(key: str) -> str | None:
    """Why `model.<section>.<field>` names no field of the model spec, or None. Hydra's own
    message for an unknown key ("Key 'dimm' is not in struct") does not say what the keys are."""
    parts = key.split(".")
    if parts[0] != "model" or len(parts) < 2 or "/" in key:
        return None
    if parts[1] not in (*COMPONENTS, *OPTIONS):
        return f"{'.'.join(parts[:2])} is not a field of ModelSpec (known: {', '.join([*COMPONENTS, *OPTIONS])})"
    sections = {**COMPONENTS, "cross_attn": CrossAttnConfig, "freeze": FreezeConfig}
    if len(parts) < 3 or parts[1] not in sections:
        return None
    extra = ("_target_", "pretrained") if parts[1] in COMPONENTS else ()
    try:  # a pretrained part takes its folder besides the fields
        sections[parts[1]].check_keys([parts[2]], extra=extra)
    except SpecError as e:
        return str(e)
    return None
