"""Scenes: the ground truth of one image (or one pair of images, or one video) and the seeded
samplers that draw them. A scene holds everything the answers are computed from; rendering it is
:mod:`vlm.synthvqa.render`'s job."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from vlm.synthvqa.config import SynthConfig
from vlm.synthvqa.fonts import get_font, ocr_margin
from vlm.synthvqa.spec import COLOR_NAMES, DIRECTIONS, MAX_TRIES, OCR_CHARSET, SHAPES


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
            return [
                (self.cx - h, self.cy - h),
                (self.cx + h, self.cy - h),
                (self.cx + h, self.cy + h),
                (self.cx - h, self.cy + h),
            ]
        if self.shape == "triangle":
            return [
                (self.cx + self.r * math.cos(a), self.cy + self.r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            ]
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
    before it). The labels of the tower warm-up's per-patch glyph task (vlm/training/warmup.py)."""
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
    for _ in range(MAX_TRIES):
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
    for _ in range(MAX_TRIES):
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
