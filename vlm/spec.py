"""What data preparation needs to know about the model, derived once from the model config.

`Geometry.from_model_config(cfg.model)` reads the encoder's patch size and temporal patch, the
projector's merge and queries, the decoder's rope and the model's fusion, checks them in one
place, and is handed to the data side (`VLMDataModule.attach`, `build_processor`,
`build_template`), which never repeats them in its own config. Pretrained parts whose config
leaves a value to the checkpoint (`patch_size: null` on `model/encoder=siglip`) read it from the
model folder's `config.json` (no weights are opened).

A checkpoint's stored processor and template configs may still carry these keys (older
versions wrote them; `MediaProcessor.to_config` records the patch and merge it was built with):
`check_stored` refuses them, naming both values, when they disagree with the model's geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vlm.model.projector import token_grid, visual_token_count

ROPES = ("rope", "mrope")
FUSIONS = ("interleave", "cross_attn")
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


def _plain(v: Any) -> Any:
    if type(v).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(v, resolve=True)
    return v


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
        """The geometry of the model `model_cfg` describes ({encoder, projector, decoder, fusion, …}).

        trusted: a training config, whose pretrained parts may leave `patch_size` /
        `temporal_patch` / `merge_size` / `rope` to their folder's `config.json` (read here, config
        only). False for a checkpoint's config: every value must be in it, no file is read."""
        cfg = _plain(model_cfg)
        if not isinstance(cfg, dict):
            raise ValueError(f"model is not a mapping (got {type(cfg).__name__})")
        parts = {}
        for part in ("encoder", "projector", "decoder"):
            p = _plain(cfg.get(part))
            if not isinstance(p, dict):
                raise ValueError(f"model.{part} is missing or not a mapping")
            parts[part] = p
        enc, proj, dec = parts["encoder"], parts["projector"], parts["decoder"]
        folder = _folder_values(enc, proj, dec) if trusted else {}
        kind = proj.get("kind")
        queries = proj.get("queries")
        if kind is not None and (kind == "qformer") != bool(queries):
            raise ValueError(f"model.projector.queries is for kind=qformer only (kind={kind!r}, queries={queries!r})")

        def pick(d: dict, key: str, default: Any) -> Any:
            v = d.get(key)
            if v is None:
                v = folder.get(key, _class_default(d.get("_target_"), key, default))
            return v

        patch = pick(enc, "patch_size", None)
        if patch is None:
            raise ValueError(
                "model.encoder.patch_size is not set"
                + (" and its pretrained folder's config.json does not say it" if enc.get("pretrained") else "")
            )
        return cls(
            patch_size=patch,
            temporal_patch=pick(enc, "temporal_patch", 1),
            merge_size=pick(proj, "merge_size", 1),
            queries=queries or None,
            fusion=cfg.get("fusion") or "interleave",
            rope=pick(dec, "rope", "rope"),
        )

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


def _class_default(target: Any, key: str, default: Any) -> Any:
    """The default of `key` in the native class `target` names (a config may leave it out)."""
    import inspect

    from vlm.build import NATIVE_COMPONENTS

    for classes in NATIVE_COMPONENTS.values():
        cls = classes.get(target) if isinstance(target, str) else None
        if cls is not None:
            p = inspect.signature(cls).parameters.get(key)
            if p is not None and p.default is not p.empty and p.default is not None:
                return p.default
    return default


def _folder_values(enc: dict, proj: dict, dec: dict) -> dict[str, Any]:
    """Values a pretrained part's config leaves to its folder's `config.json`: patch_size and
    temporal_patch (vision towers), merge_size (Qwen2-VL's merger), rope (M-RoPE decoders)."""
    from vlm.model import hf

    out: dict[str, Any] = {}
    target = enc.get("_target_", "")
    if enc.get("pretrained") and (enc.get("patch_size") is None or enc.get("temporal_patch") is None):
        if target.endswith("pretrained_vision_encoder"):
            out.update(patch_size=hf.vision_kwargs(hf.read_config(enc["pretrained"]))["patch_size"], temporal_patch=1)
        elif target.endswith("pretrained_qwen2vl_vision"):
            v = hf._qwen2vl_vision_cfg(hf.read_config(enc["pretrained"]))
            out.update(patch_size=int(v.get("patch_size", 14)), temporal_patch=int(v.get("temporal_patch_size", 2)))
    if proj.get("pretrained") and proj.get("merge_size") is None:
        target = proj.get("_target_", "")
        if target.endswith("pretrained_qwen2vl_merger"):
            v = hf._qwen2vl_vision_cfg(hf.read_config(proj["pretrained"]))
            out["merge_size"] = int(v.get("spatial_merge_size", 2))
        elif target.endswith("pretrained_llava_projector"):
            out["merge_size"] = 1
    if dec.get("pretrained") and dec.get("rope") is None:
        out["rope"] = hf.decoder_kwargs(hf.read_config(dec["pretrained"])).get("rope", "rope")
    return out


# Data-config keys that used to copy the geometry, and the model key that holds it now.
DATA_KEYS = {
    **{f"data.processor.{k}": SOURCES[f] for k, f in PROCESSOR_KEYS.items()},
    **{f"data.processor.video.{k}": SOURCES[f] for k, f in VIDEO_KEYS.items()},
    **{f"data.template.{k}": SOURCES[f] for k, f in TEMPLATE_KEYS.items()},
}


def check_overrides(overrides: Sequence[str]) -> str | None:
    """The message for a command-line override of a data key the geometry replaced
    (`data.processor.patch_size=8` -> set model.encoder.patch_size), else None."""
    for a in overrides:
        key = a.split("=", 1)[0].lstrip("+~")
        if key in DATA_KEYS:
            return (
                f"{key} is not a data key: the media geometry comes from the model config; set {DATA_KEYS[key]} instead"
            )
    return None
