"""What data preparation needs to know about the model, derived once from the model's spec.

`Geometry.from_model_config(cfg.model)` is `ModelSpec.geometry` (`vlm.model.config`): the
encoder's patch size and temporal patch, the projector's merge and queries, the decoder's rope
and the model's fusion. It is handed to the data side (`VLMDataModule.attach`, `build_processor`,
`build_template`), which never repeats them in its own config. Pretrained parts whose config
leaves a value to the checkpoint (`patch_size: null` on `model/encoder=siglip`) take it from the
model folder's `config.json`, as their spec does (no weights are opened).

A checkpoint's stored processor and template configs may still carry these keys (older
versions wrote them; `MediaProcessor.to_config` records the patch and merge it was built with):
`check_stored` refuses them, naming both values, when they disagree with the model's geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vlm.model.config import FUSIONS, ROPES
from vlm.model.projector import token_grid, visual_token_count

# Where each geometry field comes from in the model config (error messages).
SOURCES = {
    "patch_size": "model.encoder.patch_size",
    "temporal_patch": "model.encoder.temporal_patch",
    "merge_size": "model.projector.merge_size",
    "queries": "model.projector.queries",
    "fusion": "model.fusion",
    "rope": "model.decoder.rope",
}
# The keys older data configs and checkpoints carried, per section, and the field each copies.
PROCESSOR_KEYS = {"patch_size": "patch_size", "merge_size": "merge_size"}
VIDEO_KEYS = {"temporal_patch": "temporal_patch"}
TEMPLATE_KEYS = {"merge_size": "merge_size", "queries": "queries", "fusion": "fusion", "rope": "rope"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Geometry:
    """The model's media geometry: patch_size, temporal_patch (encoder), merge_size, queries
    (projector; qformer only), fusion (model) and rope (decoder)."""

    patch_size: int
    temporal_patch: int = 1
    merge_size: int = 1
    queries: int | None = None
    fusion: str = "interleave"
    rope: str = "rope"

    def __post_init__(self) -> None:
        for k in ("patch_size", "temporal_patch", "merge_size"):
            v = getattr(self, k)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{SOURCES[k]}={v!r} is not a positive int")
        if self.queries is not None and (not _is_int(self.queries) or self.queries < 1):
            raise ValueError(f"{SOURCES['queries']}={self.queries!r} is not a positive int (or null)")
        if self.fusion not in FUSIONS:
            raise ValueError(f"{SOURCES['fusion']}={self.fusion!r} is not one of {', '.join(FUSIONS)}")
        if self.rope not in ROPES:
            raise ValueError(f"{SOURCES['rope']}={self.rope!r} is not one of {', '.join(ROPES)}")

    # ---- the token layout ------------------------------------------------------------------------
    @property
    def layout(self) -> dict[str, Any]:
        """`token_grid` / `visual_token_count`'s layout arguments."""
        return {"merge_size": self.merge_size, "queries": self.queries, "fusion": self.fusion}

    def token_grid(self, grid_thw: Sequence[int]) -> tuple[int, int, int]:
        """The LLM-side token grid of one media item with patch grid `grid_thw`."""
        return token_grid(grid_thw, **self.layout)

    def token_count(self, grid_thw: Sequence[int]) -> int:
        """LLM tokens for one media item with patch grid `grid_thw`."""
        return visual_token_count(grid_thw, **self.layout)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ---- from the model config ---------------------------------------------------------------------
    @classmethod
    def from_model_config(cls, model_cfg: Any, trusted: bool = True) -> Geometry:
        """The geometry of the model `model_cfg` describes ({encoder, projector, decoder, fusion, …}):
        `ModelSpec.geometry` of its spec (`vlm.build.model_spec`, every field checked).

        trusted: a training config, whose pretrained parts may leave `patch_size` /
        `temporal_patch` / `merge_size` / `rope` to their folder's `config.json` (read here, config
        only). False for a checkpoint's config: native components only, no file is read."""
        from vlm.build import model_spec  # vlm.build builds the data side with this module

        spec, _ = model_spec(model_cfg, trusted)
        return spec.geometry

    # ---- the keys older configs carried ------------------------------------------------------------
    def check_stored(self, processor_cfg: dict | None, template_cfg: dict | None, where: str = "") -> None:
        """ValueError naming both values when a processor / template config carries a geometry key
        (`processor.patch_size`, `template.merge_size`, …) that disagrees with this geometry."""
        for section, cfg, keys in (
            ("processor", processor_cfg, PROCESSOR_KEYS),
            (
                "processor.video",
                (processor_cfg or {}).get("video") if isinstance(processor_cfg, dict) else None,
                VIDEO_KEYS,
            ),
            ("template", template_cfg, TEMPLATE_KEYS),
        ):
            if not isinstance(cfg, dict):
                continue
            for key, field in keys.items():
                if key not in cfg:
                    continue
                ours, theirs = getattr(self, field), _normal(field, cfg[key])
                if theirs != ours:
                    raise ValueError(
                        f"{where}{section}.{key}={cfg[key]!r} disagrees with the model's "
                        f"{SOURCES[field]}={ours!r}: the geometry comes from the model config"
                    )


def _normal(field: str, v: Any) -> Any:
    """A stored key as the geometry has it (older configs wrote null for the defaults)."""
    if v is None:
        return {"temporal_patch": 1, "merge_size": 1, "fusion": "interleave", "rope": "rope"}.get(field)
    if field == "queries" and v == 0:
        return None
    return v


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
    from vlm.model.config import COMPONENTS, OPTIONS, CrossAttnConfig, FreezeConfig
    from vlm.model.fields import SpecError

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
