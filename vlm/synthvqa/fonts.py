"""The OCR font: Pillow's bundled font with the BASIC layout engine (no system fonts, no raqm, so
identical on every machine) and the font sizes that fit a canvas."""

from __future__ import annotations

import functools

from PIL import ImageFont

from vlm.synthvqa.spec import OCR_CHARSET


@functools.cache
def get_font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` px, with the BASIC layout engine (same everywhere)."""
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("synthvqa needs Pillow built with FreeType (ImageFont.load_default(size=...))")
    return font.font_variant(layout_engine=ImageFont.Layout.BASIC)


def ocr_margin(canvas: int) -> int:
    """Blank border (px) the text keeps from every edge of a canvas of side ``canvas``."""
    return max(1, canvas // 64)


def _widest(font: ImageFont.FreeTypeFont, n: int) -> tuple[int, int]:
    """Width and height of the largest ink box of ``n`` repeats of one OCR character."""
    w = h = 0
    for c in OCR_CHARSET:
        left, top, right, bottom = font.getbbox(c * n)
        w, h = max(w, right - left), max(h, bottom - top)
    return w, h


@functools.cache
def ocr_font_px(canvas: int, max_len: int, font_size: int | None, font_frac: float) -> int:
    """The ``ocr`` font size: ``font_size`` checked to fit, or (None) the largest size
    ≤ ``font_frac · canvas`` at which ``max_len`` of the widest character fit the canvas less the
    margin (``SynthConfig.font_px``)."""
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
def wide_ocr_font_px(width: int, height: int, max_len: int, font_frac: float) -> int:
    """The ``ocr_wide`` font size: the largest ≤ ``font_frac · height`` at which ``max_len`` of the
    widest character fit a ``width x height`` canvas less the margin (``SynthConfig.wide_font_px``)."""
    m = ocr_margin(height)
    for size in range(max(6, round(font_frac * height)), 5, -1):
        w, h = _widest(get_font(size), max_len)
        if w <= width - 2 * m and h <= height - 2 * m:
            return size
    raise ValueError(f"no font size >= 6 fits {max_len} characters in a {width}x{height}px canvas")
