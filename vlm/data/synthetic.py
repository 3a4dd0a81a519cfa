"""synthvqa v1: the built-in synthetic visual-question-answering benchmark and its shard writer.

Every image is a square canvas (``SynthConfig.canvas`` px, default 64) on a light background
(a random per-image grey/tint, every channel in 225..255). Two families:

``shapes``
    1–4 non-overlapping shapes from ``SHAPES`` (circle, square, triangle) in ``COLORS``. A shape's
    bounding radius (its circumradius: circle radius, half the square's diagonal, the equilateral
    triangle's circumradius) is 0.09–0.15 of the canvas side; positions are rejection-sampled so
    shapes stay fully inside and their bounding circles keep a small gap. Shapes are drawn without
    anti-aliasing, so every shape's exact RGB is present in the image. Squares are axis-aligned and
    triangles point up. Question types (``qtype``) and their exact wording:

    =============  ================================================  ==========================
    qtype          question                                          answer
    =============  ================================================  ==========================
    color          ``What color is the {shape}?``                    the colour name (only when
                                                                     exactly one {shape} is
                                                                     present)
    count_shape    ``How many {shape}s are there?``                  ``0`` … ``4``
    count_all      ``How many shapes are there?``                    ``1`` … ``4``
    exists         ``Is there a {color} {shape}?``                   ``yes`` / ``no`` (50/50)
    left_right     ``Is the {color} {shape} on the left or the       ``left`` / ``right`` (only
                   right?``                                          when that colour+shape is
                                                                     unique and its centre is at
                                                                     least canvas/10 from the
                                                                     middle)
    describe       ``Describe the image.``                           the canonical caption
    =============  ================================================  ==========================

    Canonical caption: the shapes are grouped by (colour, shape); each group is written
    ``{count word} {color} {shape}`` with a plural ``s`` when the count is above one (count words
    ``one`` … ``four``); groups are ordered by shape (circle, square, triangle), then by colour
    (red, green, blue, yellow, purple, orange); they are joined as ``A``, ``A and B``,
    ``A, B and C``, ``A, B, C and D``. E.g. ``one red circle and two blue squares``.

``ocr``
    3–6 characters from A–Z and 0–9 in dark grey (grey level 0..80) at a random position fully
    inside the canvas, rendered with Pillow's bundled font ``ImageFont.load_default(size=...)``
    and the BASIC layout engine (no system fonts, no raqm: identical on every machine).
    ``What does the text say?`` → the string exactly (the only answer that is not lower-case).

synthvqa v2 families (off by default; enable with ``SynthConfig.families``, e.g.
``["shapes", "ocr", "ocr_wide", "multi_image", "video"]`` or the aliases ``["v1", "v2"]``; with the
default ``families`` the generator, its shards and ``SynthConfig.to_dict()`` are exactly v1's):

``ocr_wide``
    12–20 characters (``ocr_wide_min_len`` … ``ocr_wide_max_len``) from the OCR charset on a canvas
    ``ocr_wide_aspect`` (8) times wider than tall (512×64 at canvas 64), same font, colours and
    background rules as ``ocr``. The font size is the largest ≤ ``ocr_wide_font_frac · canvas`` at
    which ``ocr_wide_max_len`` of the widest character fit the width less the margin (and the
    height). ``What does the text say?`` → the string. Squashing this image into a square
    compresses the text 8× horizontally; keeping the aspect ratio does not.
``multi_image``
    Two ``shapes`` images with different shape counts (the second is redrawn until they differ).
    User content: image 0, image 1, then ``Which image has more shapes, the first or the second?``
    (or the question first with ``image_position="last"``) → ``first`` / ``second``; by symmetry
    each answer is drawn half of the time.
``video``
    ``video_min_frames`` … ``video_max_frames`` (4–8) frames of one shape (size as in ``shapes``)
    moving in a straight line at constant speed: ``left`` / ``right`` / ``up`` / ``down`` (``up`` is
    towards the top of the image), a total displacement of at least ``video_min_shift · canvas`` px
    (and at most what fits; fully inside every frame). Stored as ONE media member,
    ``KEY.0.mp4`` (``video_format="mp4"``: H.264 via PyAV's ``libx264rgb`` at ``qp=0``, bit-exact
    RGB, at ``video_fps`` frames per second) or ``KEY.0.apng`` (``video_format="apng"``: an
    animated PNG, lossless, no PyAV needed to write it); both decode with
    :func:`vlm.data.video.decode_video`. User content: ``{"type": "video", "media": 0}`` and
    ``Which way is the {color} {shape} moving?`` → the direction. Reversing the frames reverses the
    answer, so it needs temporal order.

v2 samples have one turn. Their qtype is the family name.

Sampling: the qtype is drawn first by ``qtype_weights``, then images are drawn until one is valid
for it. With ``turns > 1`` a shapes sample gets up to ``turns`` distinct questions about the same
image (the first of the drawn qtype, the rest drawn by the weights among the qtypes that still
have an unasked question for that image); an ocr sample always has one turn.

Everything is a pure function of ``(seed, split, shard index)``: each shard has its own
``random.Random``, so shard ``i`` is byte-identical whatever the number of worker processes.

Shards follow the contract in DESIGN.md: ``KEY.json`` + ``KEY.0.png``, KEY like
``train-000003-000042`` (split, shard, index in shard; never a dot). See ``data/README.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

NAME = "synthvqa"
VERSION = 1

QTYPES = ("color", "count_shape", "count_all", "exists", "left_right", "describe", "ocr")
SHAPE_QTYPES = QTYPES[:-1]
#: synthvqa v2 qtypes (one per v2 family); only drawn when their family is in ``SynthConfig.families``.
QTYPES_V2 = ("ocr_wide", "multi_image", "video")
QTYPES_ALL = QTYPES + QTYPES_V2
V1_FAMILIES = ("shapes", "ocr")
V2_FAMILIES = ("ocr_wide", "multi_image", "video")
FAMILIES = V1_FAMILIES + V2_FAMILIES
FAMILY_ALIASES = {"v1": V1_FAMILIES, "v2": V2_FAMILIES, "all": FAMILIES}
QTYPE_FAMILY = {**{q: "shapes" for q in SHAPE_QTYPES}, "ocr": "ocr", **{q: q for q in QTYPES_V2}}
DIRECTIONS = ("left", "right", "up", "down")
VIDEO_FORMATS = {"mp4": "mp4", "apng": "apng"}  # video_format -> shard member extension
SHAPES = ("circle", "square", "triangle")
#: Colour name → RGB. Saturated and far apart, and every one has a channel far below the
#: background's 225..255, so no shape can vanish into the background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 50, 190),
    "orange": (255, 130, 0),
}
COLOR_NAMES = tuple(COLORS)
COUNT_WORDS = ("zero", "one", "two", "three", "four")
OCR_CHARSET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

Q_COLOR = "What color is the {shape}?"
Q_COUNT_SHAPE = "How many {shape}s are there?"
Q_COUNT_ALL = "How many shapes are there?"
Q_EXISTS = "Is there a {color} {shape}?"
Q_LEFT_RIGHT = "Is the {color} {shape} on the left or the right?"
Q_DESCRIBE = "Describe the image."
Q_OCR = "What does the text say?"
Q_MULTI = "Which image has more shapes, the first or the second?"
Q_VIDEO = "Which way is the {color} {shape} moving?"

_MAX_TRIES = 10_000  # rejection-sampling bound; reaching it means the config cannot be satisfied


# --------------------------------------------------------------------------------------- config
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
    # --- synthvqa v2 (see the module docstring). Left out of to_dict() while at their defaults,
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

    def __post_init__(self) -> None:
        self.families = _normalize_families(self.families)
        if "ocr_wide" in self.families:
            if not 1 <= self.ocr_wide_min_len <= self.ocr_wide_max_len:
                raise ValueError(f"need 1 <= ocr_wide_min_len <= ocr_wide_max_len, got {self.ocr_wide_min_len}, {self.ocr_wide_max_len}")
            if self.ocr_wide_aspect < 1:
                raise ValueError(f"ocr_wide_aspect must be >= 1, got {self.ocr_wide_aspect}")
        if "multi_image" in self.families and self.min_shapes == self.max_shapes:
            raise ValueError("multi_image needs min_shapes < max_shapes (the two images must differ in count)")
        if "video" in self.families:
            if not 2 <= self.video_min_frames <= self.video_max_frames:
                raise ValueError(f"need 2 <= video_min_frames <= video_max_frames, got {self.video_min_frames}, {self.video_max_frames}")
            if not 0 < self.video_min_shift < 1 or not self.video_fps > 0:
                raise ValueError(f"need 0 < video_min_shift < 1 and video_fps > 0, got {self.video_min_shift}, {self.video_fps}")
            if self.video_format not in VIDEO_FORMATS:
                raise ValueError(f"video_format must be one of {tuple(VIDEO_FORMATS)}, got {self.video_format!r}")
        if self.qtype_weights is not None:
            self.qtype_weights = {str(k): float(v) for k, v in dict(self.qtype_weights).items()}
            unknown = sorted(set(self.qtype_weights) - set(QTYPES_ALL))
            if unknown:
                raise ValueError(f"unknown qtypes {unknown} in qtype_weights; known: {QTYPES_ALL}")
            off = sorted(q for q, w in self.qtype_weights.items() if w > 0 and QTYPE_FAMILY[q] not in self.families)
            if off:
                raise ValueError(f"qtype_weights gives weight to {off}, whose families are not in families={list(self.families)}")
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
        """The ``ocr_wide`` font size (derived, see the module docstring)."""
        return _wide_font_px(*self.wide_size, self.ocr_wide_max_len, self.ocr_wide_font_frac)

    @property
    def font_px(self) -> int:
        """The OCR font size actually used (derived when ``font_size`` is None)."""
        return _font_px(self.canvas, self.ocr_max_len, self.font_size, self.font_frac)

    def to_dict(self) -> dict[str, Any]:
        d = json.loads(json.dumps(dataclasses.asdict(self)))
        for k, default in _v2_defaults().items():  # v2 options only when they differ (v1 records unchanged)
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


_V2_FIELDS = ("families", "ocr_wide_min_len", "ocr_wide_max_len", "ocr_wide_aspect", "ocr_wide_font_frac",
              "video_min_frames", "video_max_frames", "video_min_shift", "video_fps", "video_format")


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


# ----------------------------------------------------------------------------------------- font
@functools.cache
def get_font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` px, with the BASIC layout engine (same everywhere)."""
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("synthvqa needs Pillow built with FreeType (ImageFont.load_default(size=...))")
    return font.font_variant(layout_engine=ImageFont.Layout.BASIC)


def ocr_margin(canvas: int) -> int:
    return max(1, canvas // 64)


def _widest(font: ImageFont.FreeTypeFont, n: int) -> tuple[int, int]:
    """Width and height of the largest ink box of ``n`` repeats of one OCR character."""
    w = h = 0
    for c in OCR_CHARSET:
        left, top, right, bottom = font.getbbox(c * n)
        w, h = max(w, right - left), max(h, bottom - top)
    return w, h


@functools.cache
def _font_px(canvas: int, max_len: int, font_size: int | None, font_frac: float) -> int:
    room = canvas - 2 * ocr_margin(canvas)
    if font_size is not None:
        w, h = _widest(get_font(font_size), max_len)
        if w > room or h > room:
            raise ValueError(
                f"font_size={font_size} does not fit {max_len} characters in a {canvas}px canvas "
                f"(needs {w}x{h}px, room {room}px)"
            )
        return font_size
    for size in range(max(6, round(font_frac * canvas)), 5, -1):
        w, h = _widest(get_font(size), max_len)
        if w <= room and h <= room:
            return size
    raise ValueError(f"no font size >= 6 fits {max_len} characters in a {canvas}px canvas")


@functools.cache
def _wide_font_px(width: int, height: int, max_len: int, font_frac: float) -> int:
    m = ocr_margin(height)
    for size in range(max(6, round(font_frac * height)), 5, -1):
        w, h = _widest(get_font(size), max_len)
        if w <= width - 2 * m and h <= height - 2 * m:
            return size
    raise ValueError(f"no font size >= 6 fits {max_len} characters in a {width}x{height}px canvas")


# ---------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Shape:
    shape: str  # one of SHAPES
    color: str  # one of COLORS
    cx: float  # centre, pixels
    cy: float
    r: float  # bounding (circum-) radius, pixels

    def points(self) -> list[tuple[float, float]]:
        """Polygon vertices (square, triangle)."""
        if self.shape == "square":
            h = self.r / math.sqrt(2)
            return [(self.cx - h, self.cy - h), (self.cx + h, self.cy - h), (self.cx + h, self.cy + h), (self.cx - h, self.cy + h)]
        if self.shape == "triangle":
            return [(self.cx + self.r * math.cos(a), self.cy + self.r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        raise ValueError(f"{self.shape} is not a polygon")


@dataclass(frozen=True)
class ShapesScene:
    canvas: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]
    family: str = "shapes"


@dataclass(frozen=True)
class OcrScene:
    canvas: int
    background: tuple[int, int, int]
    text: str
    xy: tuple[int, int]  # where the text is drawn (PIL text origin)
    font_size: int
    grey: int  # text colour (grey, grey, grey)
    family: str = "ocr"

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Ink box of the text on the canvas (left, top, right, bottom), right/bottom exclusive."""
        left, top, right, bottom = get_font(self.font_size).getbbox(self.text)
        return (self.xy[0] + left, self.xy[1] + top, self.xy[0] + right, self.xy[1] + bottom)


@dataclass(frozen=True)
class WideOcrScene:
    """``ocr_wide``: text on a ``width x height`` canvas (``width = ocr_wide_aspect * height``)."""

    width: int
    height: int
    background: tuple[int, int, int]
    text: str
    xy: tuple[int, int]
    font_size: int
    grey: int
    family: str = "ocr_wide"

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        left, top, right, bottom = get_font(self.font_size).getbbox(self.text)
        return (self.xy[0] + left, self.xy[1] + top, self.xy[0] + right, self.xy[1] + bottom)


def char_centers(text: str, xy: tuple[int, int], font_size: int) -> list[tuple[float, float]]:
    """Ink-box centre ``(x, y)`` in canvas pixels of each character of ``text`` drawn at ``xy``
    (the BASIC layout engine has no kerning, so each character starts at the advance of the ones
    before it). The labels of the tower warm-up's per-patch glyph task (vlm/warmup.py)."""
    font = get_font(font_size)
    out = []
    for i, ch in enumerate(text):
        left, top, right, bottom = font.getbbox(ch)
        adv = font.getlength(text[:i])
        out.append((xy[0] + adv + (left + right) / 2, xy[1] + (top + bottom) / 2))
    return out


@dataclass(frozen=True)
class MultiImageScene:
    """``multi_image``: two shapes scenes; ``answer`` is ``first`` or ``second`` (more shapes)."""

    scenes: tuple[ShapesScene, ShapesScene]
    family: str = "multi_image"

    @property
    def answer(self) -> str:
        a, b = (len(s.shapes) for s in self.scenes)
        return "first" if a > b else "second"


@dataclass(frozen=True)
class VideoScene:
    """``video``: ``frames[k]`` is the moving shape in frame k; ``direction`` its motion."""

    canvas: int
    background: tuple[int, int, int]
    frames: tuple[Shape, ...]
    direction: str
    family: str = "video"


def _background(rng: random.Random) -> tuple[int, int, int]:
    base = rng.randint(230, 255)
    return tuple(min(255, max(225, base + rng.randint(-8, 8))) for _ in range(3))  # type: ignore[return-value]


def sample_shapes_scene(rng: random.Random, cfg: SynthConfig) -> ShapesScene:
    """1–4 shapes, fully inside the canvas, bounding circles at least ``gap`` apart."""
    c = cfg.canvas
    gap = max(2.0, 0.03 * c)
    for _ in range(_MAX_TRIES):
        n = rng.randint(cfg.min_shapes, cfg.max_shapes)
        shapes: list[Shape] = []
        for _ in range(n):
            kind, color = rng.choice(SHAPES), rng.choice(COLOR_NAMES)
            for _ in range(200):
                r = rng.uniform(cfg.radius_min, cfg.radius_max) * c
                cx, cy = rng.uniform(r + 1, c - 1 - r), rng.uniform(r + 1, c - 1 - r)
                if all(math.hypot(cx - s.cx, cy - s.cy) >= r + s.r + gap for s in shapes):
                    shapes.append(Shape(kind, color, cx, cy, r))
                    break
            else:
                break  # could not place it: start the scene again
        if len(shapes) == n:
            return ShapesScene(c, _background(rng), tuple(shapes))
    raise RuntimeError(f"could not place {cfg.max_shapes} shapes on a {c}px canvas")


def sample_ocr_scene(rng: random.Random, cfg: SynthConfig) -> OcrScene:
    c, size, m = cfg.canvas, cfg.font_px, ocr_margin(cfg.canvas)
    text = "".join(rng.choice(OCR_CHARSET) for _ in range(rng.randint(cfg.ocr_min_len, cfg.ocr_max_len)))
    left, top, right, bottom = get_font(size).getbbox(text)
    x = rng.randint(m - left, c - m - right)
    y = rng.randint(m - top, c - m - bottom)
    return OcrScene(c, _background(rng), text, (x, y), size, rng.randint(0, 80))


def sample_wide_ocr_scene(rng: random.Random, cfg: SynthConfig) -> WideOcrScene:
    (W, H), size, m = cfg.wide_size, cfg.wide_font_px, ocr_margin(cfg.canvas)
    n = rng.randint(cfg.ocr_wide_min_len, cfg.ocr_wide_max_len)
    text = "".join(rng.choice(OCR_CHARSET) for _ in range(n))
    left, top, right, bottom = get_font(size).getbbox(text)
    x = rng.randint(m - left, W - m - right)
    y = rng.randint(m - top, H - m - bottom)
    return WideOcrScene(W, H, _background(rng), text, (x, y), size, rng.randint(0, 80))


def sample_multi_image_scene(rng: random.Random, cfg: SynthConfig) -> MultiImageScene:
    first = sample_shapes_scene(rng, cfg)
    for _ in range(_MAX_TRIES):
        second = sample_shapes_scene(rng, cfg)
        if len(second.shapes) != len(first.shapes):
            return MultiImageScene((first, second))
    raise RuntimeError("could not draw two scenes with different shape counts")


def sample_video_scene(rng: random.Random, cfg: SynthConfig) -> VideoScene:
    """One shape moving at constant speed; every frame fully inside the canvas."""
    c = cfg.canvas
    n = rng.randint(cfg.video_min_frames, cfg.video_max_frames)
    kind, color, direction = rng.choice(SHAPES), rng.choice(COLOR_NAMES), rng.choice(DIRECTIONS)
    r = rng.uniform(cfg.radius_min, cfg.radius_max) * c
    lo, hi = r + 1, c - 1 - r
    span = hi - lo
    dist = rng.uniform(min(cfg.video_min_shift * c, span), span)
    forward = direction in ("right", "down")  # increasing x or y
    a0 = rng.uniform(lo, hi - dist) if forward else rng.uniform(lo + dist, hi)
    a1 = a0 + dist if forward else a0 - dist
    other = rng.uniform(lo, hi)
    frames = []
    for k in range(n):
        a = a0 + (a1 - a0) * k / (n - 1)
        cx, cy = (a, other) if direction in ("left", "right") else (other, a)
        frames.append(Shape(kind, color, cx, cy, r))
    return VideoScene(c, _background(rng), tuple(frames), direction)


def render_video(scene: VideoScene) -> list[Image.Image]:
    """The frames of a video scene (PIL RGB, canvas x canvas)."""
    return [render(ShapesScene(scene.canvas, scene.background, (s,))) for s in scene.frames]


def render(scene: ShapesScene | OcrScene | WideOcrScene) -> Image.Image:
    """Draw a scene as a PIL RGB image."""
    if isinstance(scene, WideOcrScene):
        img = Image.new("RGB", (scene.width, scene.height), scene.background)
        ImageDraw.Draw(img).text(scene.xy, scene.text, fill=(scene.grey,) * 3, font=get_font(scene.font_size))
        return img
    img = Image.new("RGB", (scene.canvas, scene.canvas), scene.background)
    draw = ImageDraw.Draw(img)
    if isinstance(scene, OcrScene):
        draw.text(scene.xy, scene.text, fill=(scene.grey,) * 3, font=get_font(scene.font_size))
        return img
    for s in scene.shapes:
        draw_shape(draw, s, COLORS[s.color])
    return img


def draw_shape(draw: ImageDraw.ImageDraw, s: Shape, fill: Any) -> None:
    if s.shape == "circle":
        draw.ellipse([s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r], fill=fill)
    else:
        draw.polygon(s.points(), fill=fill)


# ------------------------------------------------------------------------------------- questions
def describe(shapes: Iterable[Shape]) -> str:
    """The canonical caption (see the module docstring for the order and wording)."""
    counts = Counter((s.shape, s.color) for s in shapes)
    groups = sorted(counts, key=lambda sc: (SHAPES.index(sc[0]), COLOR_NAMES.index(sc[1])))
    parts = [f"{COUNT_WORDS[counts[g]]} {g[1]} {g[0]}{'s' if counts[g] > 1 else ''}" for g in groups]
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def side(s: Shape, canvas: int) -> str | None:
    """``left``/``right`` when the centre is at least canvas/10 from the middle, else None."""
    d = s.cx - canvas / 2
    if abs(d) < canvas / 10:
        return None
    return "left" if d < 0 else "right"


def question_bank(scene: ShapesScene) -> dict[str, list[tuple[str, str]]]:
    """Every valid (question, answer) for a shapes scene, by qtype. ``exists`` is split into
    ``exists_yes`` and ``exists_no`` so the two answers can be drawn 50/50."""
    kinds = Counter(s.shape for s in scene.shapes)
    combos = Counter((s.color, s.shape) for s in scene.shapes)
    bank: dict[str, list[tuple[str, str]]] = {
        "color": [(Q_COLOR.format(shape=s.shape), s.color) for k in SHAPES for s in scene.shapes if s.shape == k and kinds[k] == 1],
        "count_shape": [(Q_COUNT_SHAPE.format(shape=k), str(kinds[k])) for k in SHAPES],
        "count_all": [(Q_COUNT_ALL, str(len(scene.shapes)))],
        "exists_yes": [],
        "exists_no": [],
        "left_right": [],
        "describe": [(Q_DESCRIBE, describe(scene.shapes))],
    }
    for k in SHAPES:
        for col in COLOR_NAMES:
            bank["exists_yes" if combos[(col, k)] else "exists_no"].append((Q_EXISTS.format(color=col, shape=k), "yes" if combos[(col, k)] else "no"))
            if combos[(col, k)] == 1:
                s = next(s for s in scene.shapes if (s.color, s.shape) == (col, k))
                answer = side(s, scene.canvas)
                if answer is not None:
                    bank["left_right"].append((Q_LEFT_RIGHT.format(color=col, shape=k), answer))
    return bank


def _remaining(bank: dict[str, list[tuple[str, str]]], qtype: str, asked: set[str]) -> list[list[tuple[str, str]]]:
    keys = ("exists_yes", "exists_no") if qtype == "exists" else (qtype,)
    return [[qa for qa in bank[k] if qa[0] not in asked] for k in keys]


def _pick(rng: random.Random, bank: dict[str, list[tuple[str, str]]], qtype: str, asked: set[str]) -> tuple[str, str] | None:
    pools = [p for p in _remaining(bank, qtype, asked) if p]
    if not pools:
        return None
    # exists: yes/no by a fair coin (while both still have an unasked question)
    pool = pools[0] if len(pools) == 1 else pools[rng.random() >= 0.5]
    return rng.choice(pool)


def _draw_qtype(rng: random.Random, weights: dict[str, float], allowed: Iterable[str]) -> str | None:
    cands = [q for q in allowed if weights[q] > 0]
    if not cands:
        return None
    return rng.choices(cands, weights=[weights[q] for q in cands])[0]


def _chat(with_image: bool, question: str, image_position: str = "first") -> dict:
    image = [{"type": "image", "media": 0}] if with_image else []
    text = [{"type": "text", "text": question}]
    return {"role": "user", "content": image + text if image_position == "first" else text + image}


def _answer(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def make_sample(rng: random.Random, cfg: SynthConfig) -> dict:
    """One sample: ``{"image": PIL RGB, "messages": [...], "meta": {"family", "qtypes"}, "scene": ...}``.

    ``scene`` (a ``ShapesScene`` or ``OcrScene``) is the ground truth the answers were computed
    from; it is not written to shards.
    """
    weights = cfg.weights
    qtype = _draw_qtype(rng, weights, cfg.qtypes)
    assert qtype is not None
    if qtype in QTYPES_V2:
        return _make_v2_sample(rng, cfg, qtype)
    if qtype == "ocr":
        scene = sample_ocr_scene(rng, cfg)
        messages = [_chat(True, Q_OCR, cfg.image_position), _answer(scene.text)]
        return {"image": render(scene), "messages": messages, "meta": {"family": "ocr", "qtypes": ["ocr"]}, "scene": scene}

    for _ in range(_MAX_TRIES):
        scene = sample_shapes_scene(rng, cfg)
        bank = question_bank(scene)
        if any(_remaining(bank, qtype, set())):
            break
    else:
        raise RuntimeError(f"could not draw a scene valid for {qtype!r}")
    asked: set[str] = set()
    messages: list[dict] = []
    qtypes: list[str] = []
    while qtype is not None and len(qtypes) < cfg.turns:
        qa = _pick(rng, bank, qtype, asked)
        assert qa is not None
        asked.add(qa[0])
        messages += [_chat(not messages, qa[0], cfg.image_position), _answer(qa[1])]
        qtypes.append(qtype)
        if len(qtypes) < cfg.turns:
            open_q = [q for q in SHAPE_QTYPES if any(_remaining(bank, q, asked))]
            qtype = _draw_qtype(rng, weights, open_q)
    return {"image": render(scene), "messages": messages, "meta": {"family": "shapes", "qtypes": qtypes}, "scene": scene}


def _chat_media(items: list[dict], question: str, image_position: str = "first") -> dict:
    text = [{"type": "text", "text": question}]
    return {"role": "user", "content": items + text if image_position == "first" else text + items}


def _make_v2_sample(rng: random.Random, cfg: SynthConfig, qtype: str) -> dict:
    """A v2 sample. Besides the v1 keys it has ``media``: one entry per media index, a PIL image
    or (video) a list of PIL frames."""
    meta = {"family": qtype, "qtypes": [qtype]}
    if qtype == "ocr_wide":
        scene = sample_wide_ocr_scene(rng, cfg)
        img = render(scene)
        messages = [_chat_media([{"type": "image", "media": 0}], Q_OCR, cfg.image_position), _answer(scene.text)]
        return {"image": img, "media": [img], "messages": messages, "meta": meta, "scene": scene}
    if qtype == "multi_image":
        scene = sample_multi_image_scene(rng, cfg)
        images = [render(s) for s in scene.scenes]
        items = [{"type": "image", "media": 0}, {"type": "image", "media": 1}]
        messages = [_chat_media(items, Q_MULTI, cfg.image_position), _answer(scene.answer)]
        return {"media": images, "messages": messages, "meta": meta, "scene": scene}
    if qtype == "video":
        scene = sample_video_scene(rng, cfg)
        s0 = scene.frames[0]
        q = Q_VIDEO.format(color=s0.color, shape=s0.shape)
        messages = [_chat_media([{"type": "video", "media": 0}], q, cfg.image_position), _answer(scene.direction)]
        return {"media": [render_video(scene)], "messages": messages, "meta": meta, "scene": scene}
    raise ValueError(f"not a v2 qtype: {qtype!r}")


def sample_texts(messages: list[dict]) -> Iterator[str]:
    """All text items of a chat sample, in order."""
    for m in messages:
        for item in m["content"]:
            if item.get("type") == "text":
                yield item["text"]


def vocabulary_texts(cfg: SynthConfig | Mapping | None = None) -> list[str]:
    """Every question and every answer word the generator can produce (for the tokenizer).
    The v2 texts are added only when ``cfg`` enables a v2 family (v1 output is unchanged)."""
    out = [Q_COUNT_ALL, Q_DESCRIBE, Q_OCR, "yes", "no", "left", "right", *COLOR_NAMES]
    out += [str(i) for i in range(len(COUNT_WORDS))] + list(OCR_CHARSET)
    for k in SHAPES:
        out += [Q_COLOR.format(shape=k), Q_COUNT_SHAPE.format(shape=k)]
        for col in COLOR_NAMES:
            out += [Q_EXISTS.format(color=col, shape=k), Q_LEFT_RIGHT.format(color=col, shape=k)]
            out += [f"{COUNT_WORDS[n]} {col} {k}{'s' if n > 1 else ''}" for n in range(1, len(COUNT_WORDS))]
    out.append("one red circle, two green squares, three blue triangles and four yellow circles")
    families = SynthConfig.from_any(cfg).families if cfg is not None else V1_FAMILIES
    if "multi_image" in families:
        out += [Q_MULTI, "first", "second"]
    if "video" in families:
        out += [*DIRECTIONS] + [Q_VIDEO.format(color=col, shape=k) for k in SHAPES for col in COLOR_NAMES]
    return out


# ---------------------------------------------------------------------------------------- shards
def shard_name(split: str, index: int) -> str:
    return f"{NAME}-{split}-{index:06d}.tar"


def shard_rng(seed: int, split: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"{NAME}-v{VERSION}/{seed}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _v2_members(key: str, doc: dict, media: list, cfg: SynthConfig) -> dict:
    sample = {"__key__": key, "json": json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")}
    for j, m in enumerate(media):
        if isinstance(m, Image.Image):
            sample[f"{j}.png"] = encode_png(m)
        else:  # a video: one member holding all frames
            from vlm.data.video import encode_video  # v1 never needs PyAV or torch

            sample[f"{j}.{VIDEO_FORMATS[cfg.video_format]}"] = encode_video(m, cfg.video_fps, cfg.video_format)
    return sample


def _write_shard(task: tuple) -> str:
    """Write one shard (a pool task). Writes ``*.tar.tmp`` then renames: a complete ``.tar`` is
    never partial. Returns the path."""
    path, split, index, count, seed, cfg = task
    from webdataset import TarWriter

    tmp = path + ".tmp"
    rng = shard_rng(seed, split, index)
    with open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=0, user=NAME, group=NAME, mode=0o444) as sink:
        for i in range(count):
            s = make_sample(rng, cfg)
            doc = {"messages": s["messages"], "meta": s["meta"]}
            if "media" in s:  # v2 samples: any number of images / videos
                sink.write(_v2_members(f"{split}-{index:06d}-{i:06d}", doc, s["media"], cfg))
                continue
            sink.write(
                {
                    "__key__": f"{split}-{index:06d}-{i:06d}",
                    "json": json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
                    "0.png": encode_png(s["image"]),
                }
            )
    os.replace(tmp, path)
    return path


def write_split(
    out_dir: str | Path,
    split: str,
    n_samples: int,
    seed: int,
    cfg: SynthConfig | Mapping | None = None,
    shard_size: int = 5000,
    workers: int = 1,
) -> list[str]:
    """Write ``out_dir/split/synthvqa-{split}-%06d.tar`` (``ceil(n_samples / shard_size)`` shards,
    one pool task each) and return their paths in order. Shards that already exist are kept
    (they were renamed into place only once complete), so an interrupted run resumes."""
    if "." in split or "/" in split:
        raise ValueError(f"split name must not contain '.' or '/': {split!r}")
    if shard_size < 1 or n_samples < 0:
        raise ValueError(f"need shard_size >= 1 and n_samples >= 0, got {shard_size}, {n_samples}")
    cfg = SynthConfig.from_any(cfg)
    if cfg.weights.get("ocr", 0) > 0:
        _ = cfg.font_px  # fail here, not in a worker, when the font cannot fit
    if cfg.weights.get("ocr_wide", 0) > 0:
        _ = cfg.wide_font_px
    if cfg.weights.get("video", 0) > 0 and cfg.video_format == "mp4":
        try:
            import av  # noqa: F401
        except ImportError as e:
            raise RuntimeError("synthvqa video_format=mp4 needs PyAV (pip install av), or use video_format=apng") from e
    d = Path(out_dir) / split
    d.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(n_samples / shard_size)
    paths = [str(d / shard_name(split, i)) for i in range(n_shards)]
    tasks = [
        (paths[i], split, i, min(shard_size, n_samples - i * shard_size), seed, cfg)
        for i in range(n_shards)
        if not os.path.exists(paths[i])
    ]
    if len(tasks) < n_shards:
        print(f"[{NAME}] {split}: {n_shards - len(tasks)}/{n_shards} shards already complete", flush=True)
    t0 = time.perf_counter()
    done = 0
    if workers <= 1 or len(tasks) <= 1:
        results: Iterable[str] = map(_write_shard, tasks)
        pool = None
    else:
        # fork, not spawn: spawn re-runs the caller's main script in every worker, which loops
        # forever when that script (unguarded) is what asked for the data. Workers only use PIL.
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        pool = ctx.Pool(min(workers, len(tasks)))
        results = pool.imap_unordered(_write_shard, tasks)
    try:
        for _ in results:
            done += 1
            print(f"[{NAME}] {split}: shard {done}/{len(tasks)} written ({time.perf_counter() - t0:.1f}s)", flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return paths


def scan_shard(path: str | Path) -> dict:
    """Read a shard's JSON members back: sample count, qtype counts, turns, and all texts."""
    n, turns, qtypes, families, texts = 0, 0, Counter(), Counter(), []
    with tarfile.open(path) as tf:
        for member in tf:
            if not member.name.endswith(".json"):
                continue
            doc = json.loads(tf.extractfile(member).read())  # type: ignore[union-attr]
            n += 1
            turns += len(doc["meta"]["qtypes"])
            qtypes.update(doc["meta"]["qtypes"])
            families[doc["meta"]["family"]] += 1
            texts.extend(sample_texts(doc["messages"]))
    return {"samples": n, "turns": turns, "qtypes": qtypes, "families": families, "texts": texts}


def _ordered(counts: Counter, order: Iterable[str]) -> dict[str, int]:
    return {k: counts[k] for k in order if counts[k]}


from vlm.tokenizer import TOKENIZER_REVISION  # noqa: E402


def _options(train_samples, heldout_samples, cfg, seed, heldout_seed, vocab_size, shard_size) -> dict:
    return {
        "name": NAME,
        "version": VERSION,
        "train_samples": int(train_samples),
        "heldout_samples": int(heldout_samples),
        "seed": int(seed),
        "heldout_seed": int(heldout_seed),
        "shard_size": int(shard_size),
        "vocab_size": int(vocab_size),
        "tokenizer_revision": TOKENIZER_REVISION,
        "cfg": cfg.to_dict(),
    }


def _complete(root: Path, options: dict) -> bool:
    try:
        info = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    if info.get("options") != options or not (root / info.get("tokenizer", "tokenizer.json")).is_file():
        return False
    return all((root / p).is_file() for s in info.get("splits", {}).values() for p in s.get("shards", []))


def _clear(root: Path) -> None:
    """Remove what a previous run with other options wrote (only files this module writes)."""
    for name in ("dataset.json", "tokenizer.json", "options.json"):
        (root / name).unlink(missing_ok=True)
    for split in ("train", "heldout"):
        for p in (root / split).glob(f"{NAME}-{split}-*.tar*"):
            p.unlink()


def ensure_synthvqa(
    root: str | Path,
    train_samples: int = 60000,
    heldout_samples: int = 1400,
    cfg: SynthConfig | Mapping | None = None,
    seed: int = 0,
    heldout_seed: int = 1_000_003,
    workers: int = 2,
    vocab_size: int = 512,
    shard_size: int = 5000,
) -> Path:
    """Make synthvqa v1 under ``root`` unless ``root/dataset.json`` already records these options.

    Writes ``root/train/`` (``cfg`` as given), ``root/heldout/`` (``cfg`` with one turn and uniform
    qtype weights, seeded by ``heldout_seed``), ``root/tokenizer.json`` (BPE trained on the train
    split's texts plus every word the generator can produce) and, last, ``root/dataset.json``.
    Interrupted runs resume (``root/options.json`` marks which options the partial files belong
    to; files from other options are removed first). Returns ``root``.
    """
    from vlm.tokenizer import train_tokenizer

    root = Path(root)
    cfg = SynthConfig.from_any(cfg)
    options = _options(train_samples, heldout_samples, cfg, seed, heldout_seed, vocab_size, shard_size)
    if _complete(root, options):
        print(f"[{NAME}] {root} is up to date", flush=True)
        return root
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "options.json"
    try:
        previous = json.loads(marker.read_text())
    except (OSError, ValueError):
        previous = None
    if previous != options:
        _clear(root)
        marker.write_text(json.dumps(options, indent=1))
    (root / "dataset.json").unlink(missing_ok=True)

    t0 = time.perf_counter()
    heldout_cfg = dataclasses.replace(cfg, turns=1, qtype_weights=None)
    plan = {"train": (train_samples, seed, cfg), "heldout": (heldout_samples, heldout_seed, heldout_cfg)}
    splits: dict[str, dict] = {}
    texts: list[str] = []
    for split, (n, s, c) in plan.items():
        print(f"[{NAME}] writing {split}: {n} samples, canvas {c.canvas}, turns {c.turns} -> {root / split}", flush=True)
        paths = write_split(root, split, n, s, c, shard_size=shard_size, workers=workers)
        stats = [scan_shard(p) for p in paths]
        if split == "train":
            texts = [t for st in stats for t in st["texts"]]
        splits[split] = {
            "samples": sum(st["samples"] for st in stats),
            "turns": sum(st["turns"] for st in stats),
            "families": _ordered(sum((st["families"] for st in stats), Counter()), FAMILIES),
            "qtypes": _ordered(sum((st["qtypes"] for st in stats), Counter()), QTYPES_ALL),
            "shards": [os.path.relpath(p, root) for p in paths],
            "bytes": sum(os.path.getsize(p) for p in paths),
            "cfg": c.to_dict(),
        }
        if splits[split]["samples"] != n:
            raise RuntimeError(f"{split}: expected {n} samples in the shards, found {splits[split]['samples']}")
    print(f"[{NAME}] training the tokenizer on {len(texts)} texts (vocab {vocab_size})", flush=True)
    tok = train_tokenizer(texts + vocabulary_texts(cfg), vocab_size=vocab_size)
    tok.save(root / "tokenizer.json")
    info = {
        "options": options,
        "font_size": cfg.font_px if cfg.weights.get("ocr", 0) > 0 or heldout_samples else None,
        "colors": {k: list(v) for k, v in COLORS.items()},
        "splits": splits,
        "tokenizer": "tokenizer.json",
        "tokenizer_vocab_size": tok.vocab_size,
        "bytes": sum(s["bytes"] for s in splits.values()) + (root / "tokenizer.json").stat().st_size,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    tmp = root / "dataset.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, root / "dataset.json")
    print(f"[{NAME}] done in {info['seconds']}s, {info['bytes'] / 1e6:.1f} MB -> {root}", flush=True)
    return root


__all__ = [
    "COLORS",
    "DIRECTIONS",
    "FAMILIES",
    "QTYPES",
    "QTYPES_ALL",
    "QTYPES_V2",
    "SHAPES",
    "MultiImageScene",
    "OcrScene",
    "Shape",
    "ShapesScene",
    "SynthConfig",
    "VideoScene",
    "WideOcrScene",
    "describe",
    "ensure_synthvqa",
    "get_font",
    "make_sample",
    "question_bank",
    "render",
    "render_video",
    "scan_shard",
    "vocabulary_texts",
    "write_split",
]
