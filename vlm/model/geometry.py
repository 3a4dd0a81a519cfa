"""What data preparation needs to know about the model, derived once from the model's spec.

`vlm.build.model.geometry_of(cfg.model)` is `ModelSpec.geometry` (`vlm.model.config`): the
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


def token_grid(
    grid_thw, merge_size: int = 1, queries: int | None = None, fusion: str = "interleave"
) -> tuple[int, int, int]:
    """The LLM-side token grid `(t, h, w)` of one media item with patch grid `grid_thw`.

    Spatial projectors: `(t, h/m, w/m)`. `queries=N` (qformer): `(1, 1, N)` whatever the grid.
    `fusion="cross_attn"`: `(1, 1, 1)`, one marker token in the text (the visual tokens are read
    by cross-attention instead). M-RoPE lays the span's positions out on this grid.
    """
    t, h, w = (int(v) for v in grid_thw)
    if fusion == "cross_attn":
        return (1, 1, 1)
    if queries:
        return (1, 1, int(queries))
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid {h}x{w} is not divisible by merge_size {merge_size}")
    return (t, h // merge_size, w // merge_size)


def visual_token_count(grid_thw, merge_size: int = 1, queries: int | None = None, fusion: str = "interleave") -> int:
    """LLM tokens for one media item with grid (t, h, w) in patches (see `token_grid`)."""
    t, h, w = token_grid(grid_thw, merge_size, queries, fusion)
    return t * h * w


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
