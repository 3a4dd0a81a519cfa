"""``SynthConfig``: the generator's options, their validation, and the family list parser."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vlm.synthvqa.fonts import ocr_font_px, wide_ocr_font_px
from vlm.synthvqa.spec import (
    COUNT_WORDS,
    FAMILIES,
    FAMILY_ALIASES,
    QTYPE_FAMILY,
    QTYPES_ALL,
    V1_FAMILIES,
    VIDEO_FORMATS,
)


@dataclass
class SynthConfig:
    """Options of the generator. JSON-able (``dataclasses.asdict``); recorded in ``dataset.json``.

    ``qtype_weights``: qtype → weight for the first question of a sample; ``None`` is uniform over
    ``QTYPES``; qtypes missing from a given dict get weight 0. ``font_size=None`` derives the OCR
    font size from the canvas: the largest size ≤ ``font_frac · canvas`` at which ``ocr_max_len``
    of the widest character fit inside the canvas less a margin of ``max(1, canvas // 64)`` px (11 px at the default 64 px canvas).
    """

    canvas: int = 64
    turns: int = 1
    qtype_weights: dict[str, float] | None = None
    ocr_min_len: int = 3
    ocr_max_len: int = 6
    font_size: int | None = None
    font_frac: float = 0.2
    min_shapes: int = 1
    max_shapes: int = 4
    radius_min: float = 0.09  # bounding radius, as a fraction of the canvas side
    radius_max: float = 0.15
    # Where the image goes in the first user turn: "first" (before the question, the LLaVA
    # convention) or "last" (after it, so in a causal decoder the visual tokens can already see
    # what is asked).
    image_position: str = "first"
    # --- synthvqa v2 (see the package docstring). Left out of to_dict() while at their defaults,
    # so a v1 config records exactly what it always did.
    families: tuple[str, ...] | list[str] | str = V1_FAMILIES
    ocr_wide_min_len: int = 12
    ocr_wide_max_len: int = 20
    ocr_wide_aspect: int = 8
    ocr_wide_font_frac: float = 0.5
    video_min_frames: int = 4
    video_max_frames: int = 8
    video_min_shift: float = 0.3  # total displacement, fraction of the canvas side
    video_fps: float = 2.0
    video_format: str = "mp4"
    # What draws the held-out split: "pil" (render.py, as the train split) or "raster" (the
    # independent rasteriser of render_raster.py). Left out of to_dict() while "pil", like the v2
    # options, so existing datasets keep their recorded options.
    heldout_renderer: str = "pil"
    # True: "Describe the image." is asked only as the one question of its sample. In a dialogue
    # the caption gives away every later answer (is there a red circle, how many squares), so the
    # later turns teach reading the caption's text instead of the image. Recorded only when on.
    describe_alone: bool = False

    def __post_init__(self) -> None:
        self.families = _normalize_families(self.families)
        if self.heldout_renderer not in HELDOUT_RENDERERS:
            raise ValueError(
                f"heldout_renderer must be one of {HELDOUT_RENDERERS}, got {self.heldout_renderer!r} "
                "(pil: render.py, as the train split; raster: render_raster.py)"
            )
        if "ocr_wide" in self.families:
            if not 1 <= self.ocr_wide_min_len <= self.ocr_wide_max_len:
                raise ValueError(
                    f"need 1 <= ocr_wide_min_len <= ocr_wide_max_len, got {self.ocr_wide_min_len}, {self.ocr_wide_max_len}"
                )
            if self.ocr_wide_aspect < 1:
                raise ValueError(f"ocr_wide_aspect must be >= 1, got {self.ocr_wide_aspect}")
        if "multi_image" in self.families and self.min_shapes == self.max_shapes:
            raise ValueError("multi_image needs min_shapes < max_shapes (the two images must differ in count)")
        if "video" in self.families:
            if not 2 <= self.video_min_frames <= self.video_max_frames:
                raise ValueError(
                    f"need 2 <= video_min_frames <= video_max_frames, got {self.video_min_frames}, {self.video_max_frames}"
                )
            if not 0 < self.video_min_shift < 1 or not self.video_fps > 0:
                raise ValueError(
                    f"need 0 < video_min_shift < 1 and video_fps > 0, got {self.video_min_shift}, {self.video_fps}"
                )
            if self.video_format not in VIDEO_FORMATS:
                raise ValueError(f"video_format must be one of {tuple(VIDEO_FORMATS)}, got {self.video_format!r}")
        if self.qtype_weights is not None:
            self.qtype_weights = {str(k): float(v) for k, v in dict(self.qtype_weights).items()}
            unknown = sorted(set(self.qtype_weights) - set(QTYPES_ALL))
            if unknown:
                raise ValueError(f"unknown qtypes {unknown} in qtype_weights; known: {QTYPES_ALL}")
            off = sorted(q for q, w in self.qtype_weights.items() if w > 0 and QTYPE_FAMILY[q] not in self.families)
            if off:
                raise ValueError(
                    f"qtype_weights gives weight to {off}, whose families are not in families={list(self.families)}"
                )
            if any(w < 0 for w in self.qtype_weights.values()) or sum(self.qtype_weights.values()) <= 0:
                raise ValueError(f"qtype_weights must be non-negative with a positive sum: {self.qtype_weights}")
        if self.image_position not in ("first", "last"):
            raise ValueError(f"image_position must be 'first' or 'last', got {self.image_position!r}")
        if self.canvas < 16:
            raise ValueError(f"canvas must be at least 16 px, got {self.canvas}")
        if self.turns < 1:
            raise ValueError(f"turns must be >= 1, got {self.turns}")
        if not 1 <= self.ocr_min_len <= self.ocr_max_len:
            raise ValueError(f"need 1 <= ocr_min_len <= ocr_max_len, got {self.ocr_min_len}, {self.ocr_max_len}")
        if not 1 <= self.min_shapes <= self.max_shapes <= len(COUNT_WORDS) - 1:
            raise ValueError(f"need 1 <= min_shapes <= max_shapes <= 4, got {self.min_shapes}, {self.max_shapes}")
        if not 0 < self.radius_min <= self.radius_max < 0.5:
            raise ValueError(f"need 0 < radius_min <= radius_max < 0.5, got {self.radius_min}, {self.radius_max}")

    @property
    def qtypes(self) -> tuple[str, ...]:
        """The qtypes of the enabled families, in ``QTYPES_ALL`` order (``QTYPES`` for v1)."""
        return tuple(q for q in QTYPES_ALL if QTYPE_FAMILY[q] in self.families)

    @property
    def weights(self) -> dict[str, float]:
        """The weight of every enabled qtype (uniform when ``qtype_weights`` is None)."""
        if self.qtype_weights is None:
            return {q: 1.0 for q in self.qtypes}
        return {q: self.qtype_weights.get(q, 0.0) for q in self.qtypes}

    @property
    def wide_size(self) -> tuple[int, int]:
        """``(width, height)`` of an ``ocr_wide`` image."""
        return self.canvas * self.ocr_wide_aspect, self.canvas

    @property
    def wide_font_px(self) -> int:
        """The ``ocr_wide`` font size (derived, see the package docstring)."""
        return wide_ocr_font_px(*self.wide_size, self.ocr_wide_max_len, self.ocr_wide_font_frac)

    @property
    def font_px(self) -> int:
        """The OCR font size actually used (derived when ``font_size`` is None)."""
        return ocr_font_px(self.canvas, self.ocr_max_len, self.font_size, self.font_frac)

    def to_dict(self) -> dict[str, Any]:
        d = json.loads(json.dumps(dataclasses.asdict(self)))
        for k, default in _v2_defaults().items():  # v2 and later options only when they differ (v1 records unchanged)
            if d[k] == default:
                del d[k]
        return d

    @classmethod
    def from_any(cls, cfg: SynthConfig | Mapping | None) -> SynthConfig:
        """Accept a SynthConfig, a mapping (e.g. a Hydra DictConfig) or None (defaults)."""
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        return cls(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dict(cfg).items()})


_V2_FIELDS = (
    "families",
    "ocr_wide_min_len",
    "ocr_wide_max_len",
    "ocr_wide_aspect",
    "ocr_wide_font_frac",
    "video_min_frames",
    "video_max_frames",
    "video_min_shift",
    "video_fps",
    "video_format",
    "heldout_renderer",  # not v2, but recorded the same way: only when it is not the default
    "describe_alone",
)

#: ``SynthConfig.heldout_renderer`` values: ``render.py`` (PIL ``ImageDraw``) or ``render_raster.py``.
HELDOUT_RENDERERS = ("pil", "raster")


@functools.cache
def _v2_defaults() -> dict[str, Any]:
    fields = {f.name: f.default for f in dataclasses.fields(SynthConfig)}
    return json.loads(json.dumps({k: fields[k] for k in _V2_FIELDS}))


def _normalize_families(families: Any) -> tuple[str, ...]:
    """A family list (names or the aliases v1 / v2 / all, or one comma-separated string) → the
    enabled families in ``FAMILIES`` order."""
    if isinstance(families, str):
        families = [f.strip() for f in families.split(",") if f.strip()]
    names: set[str] = set()
    for f in families:
        f = str(f)
        if f in FAMILY_ALIASES:
            names.update(FAMILY_ALIASES[f])
        elif f in FAMILIES:
            names.add(f)
        else:
            raise ValueError(f"unknown synthvqa family {f!r}; known: {FAMILIES} or aliases {tuple(FAMILY_ALIASES)}")
    if not names:
        raise ValueError("families must name at least one family")
    return tuple(f for f in FAMILIES if f in names)
