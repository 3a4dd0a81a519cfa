"""An independent renderer of synthvqa scenes: the same scene → image contract as
:mod:`vlm.synthvqa.render`, drawn by other code, so that the held-out images are not a property of
one drawing routine (``SynthConfig.heldout_renderer="raster"``; training always uses ``render.py``).

How it differs from ``render.py`` (PIL ``ImageDraw``, no anti-aliasing):

- Shapes are rasterised with torch by analytic inside-tests at ``SUPERSAMPLE x SUPERSAMPLE``
  sample points per pixel: a circle is the points within ``r`` of the centre, a square or a
  triangle is the intersection of the half-planes of its sides (a regular polygon with
  circumradius ``r``, apothem ``r·cos(π/n)``; the square axis-aligned, the triangle apex up: the
  polygon of ``Shape.points()``). Each pixel blends the shape's colour and what lies under it by
  the fraction of its samples inside, so edges are anti-aliased, and the shape is its exact
  geometry (PIL fills every pixel its outline touches, so its shapes come out up to about half a
  pixel larger). A pixel fully inside a shape keeps the shape's exact RGB (with the default
  radii at canvas >= 32, the pixel holding each shape's centre).
- Text: each character's coverage mask comes from the same font (``font.getmask2``), is placed at
  the layout's advance (``font.getlength(text[:i])``; the BASIC layout has no kerning) plus the
  glyph's own offset, and alpha-composited onto the background here, one glyph at a time. Same
  string, same place, same ink box; the pixels differ from PIL's only by rounding and where two
  glyphs' masks overlap, since both start from the same FreeType coverage.

Pixel ``(i, j)`` is the unit square ``[i, i + 1) x [j, j + 1)`` of scene coordinates, which puts
the shapes where PIL puts them (same centroid).
"""

from __future__ import annotations

import functools
import math

import torch
from PIL import Image

from vlm.synthvqa.fonts import get_font
from vlm.synthvqa.scenes import OcrScene, Shape, ShapesScene, VideoScene, WideOcrScene
from vlm.synthvqa.spec import COLORS

SUPERSAMPLE = 4  # sample points per pixel along each axis

# Regular polygons: number of sides and the angle (radians, y pointing down) of one side's
# outward normal. Square: axis-aligned; triangle: apex up, so its base's normal points down.
_POLYGONS = {"square": (4, 0.0), "triangle": (3, math.pi / 2)}


def render(scene: ShapesScene | OcrScene | WideOcrScene) -> Image.Image:
    """Draw a scene as a PIL RGB image (without ``ImageDraw``)."""
    if isinstance(scene, WideOcrScene):
        canvas = _blank(scene.width, scene.height, scene.background)
        _draw_text(canvas, scene.text, scene.xy, scene.font_size, scene.grey)
        return _to_image(canvas)
    canvas = _blank(scene.canvas, scene.canvas, scene.background)
    if isinstance(scene, OcrScene):
        _draw_text(canvas, scene.text, scene.xy, scene.font_size, scene.grey)
        return _to_image(canvas)
    for s in scene.shapes:
        _draw_shape(canvas, s)
    return _to_image(canvas)


def render_video(scene: VideoScene) -> list[Image.Image]:
    """The frames of a video scene (PIL RGB, canvas x canvas)."""
    return [render(ShapesScene(scene.canvas, scene.background, (s,))) for s in scene.frames]


def _blank(width: int, height: int, background: tuple[int, int, int]) -> torch.Tensor:
    """A ``height x width x 3`` float canvas filled with ``background``."""
    return torch.tensor(background, dtype=torch.float32).expand(height, width, 3).clone()


def _to_image(canvas: torch.Tensor) -> Image.Image:
    h, w, _ = canvas.shape
    buf = bytearray(h * w * 3)
    # round half up (+0.5, then the cast truncates); torch's round/floor kernels fan small tensors out
    # to every intra-op thread, which costs milliseconds per image on a busy machine
    pixels = (canvas + 0.5).clamp_(0, 255).to(torch.uint8)
    torch.frombuffer(buf, dtype=torch.uint8).copy_(pixels.reshape(-1))
    return Image.frombytes("RGB", (w, h), bytes(buf))


def _samples(lo: int, hi: int) -> torch.Tensor:
    """Sample coordinates of pixels ``lo .. hi-1`` along one axis (``SUPERSAMPLE`` per pixel,
    evenly spread over each pixel's interval ``[i, i + 1)``)."""
    k = torch.arange(lo * SUPERSAMPLE, hi * SUPERSAMPLE, dtype=torch.float64)
    return (k + 0.5) / SUPERSAMPLE


def coverage(s: Shape, x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    """Fraction (0..1) of each pixel of the box ``[x0, x1) x [y0, y1)`` inside shape ``s``,
    shape ``(y1 - y0, x1 - x0)``."""
    dx = _samples(x0, x1)[None, :] - s.cx
    dy = _samples(y0, y1)[:, None] - s.cy
    if s.shape == "circle":
        inside = dx * dx + dy * dy <= s.r * s.r
    elif s.shape in _POLYGONS:
        n, a0 = _POLYGONS[s.shape]
        apothem = s.r * math.cos(math.pi / n)
        inside = torch.ones(dy.shape[0], dx.shape[1], dtype=torch.bool)
        for k in range(n):
            a = a0 + 2 * math.pi * k / n
            inside &= dx * math.cos(a) + dy * math.sin(a) <= apothem
    else:
        raise ValueError(f"unknown shape {s.shape!r}")
    h, w = y1 - y0, x1 - x0
    return inside.to(torch.float32).reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(dim=(1, 3))


def _draw_shape(canvas: torch.Tensor, s: Shape) -> None:
    """Blend shape ``s`` onto ``canvas`` (in place) by its per-pixel coverage."""
    h, w, _ = canvas.shape
    x0, x1 = max(0, math.floor(s.cx - s.r)), min(w, math.ceil(s.cx + s.r))  # the pixels the shape can touch
    y0, y1 = max(0, math.floor(s.cy - s.r)), min(h, math.ceil(s.cy + s.r))
    if x0 >= x1 or y0 >= y1:
        return
    cov = coverage(s, x0, y0, x1, y1)[..., None]
    color = torch.tensor(COLORS[s.color], dtype=torch.float32)
    region = canvas[y0:y1, x0:x1]
    region.mul_(1 - cov).add_(color * cov)


@functools.lru_cache(maxsize=4096)
def glyph_mask(ch: str, font_size: int, frac_x: float = 0.0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Coverage (0..1, ``h x w``) of character ``ch`` in the OCR font and its offset from the
    pen position; ``frac_x`` is the pen's sub-pixel x position (0 for the fonts synthvqa uses).
    Cached: the tensor is shared, read it only."""
    mask, offset = get_font(font_size).getmask2(ch, "L", start=(frac_x, 0.0))
    w, h = mask.size
    if w == 0 or h == 0:
        return torch.zeros(0, 0), offset
    data = Image.Image()._new(mask).tobytes()  # the ImagingCore getmask2 returns, as an L image
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(h, w).float() / 255, offset


def _draw_text(canvas: torch.Tensor, text: str, xy: tuple[int, int], font_size: int, grey: int) -> None:
    """Alpha-composite ``text`` in ``(grey, grey, grey)`` onto ``canvas`` (in place), one glyph at
    a time, the pen at ``xy`` (PIL's text origin)."""
    font = get_font(font_size)
    h, w, _ = canvas.shape
    for i, ch in enumerate(text):
        pen = xy[0] + font.getlength(text[:i])
        px = math.floor(pen)
        alpha, (ox, oy) = glyph_mask(ch, font_size, pen - px)
        gx, gy = px + ox, xy[1] + oy
        # the part of the glyph that falls on the canvas
        cx0, cy0 = max(0, gx), max(0, gy)
        cx1, cy1 = min(w, gx + alpha.shape[1]), min(h, gy + alpha.shape[0])
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        a = alpha[cy0 - gy : cy1 - gy, cx0 - gx : cx1 - gx, None]
        region = canvas[cy0:cy1, cx0:cx1]
        region.mul_(1 - a).add_(float(grey) * a)
