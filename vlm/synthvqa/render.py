"""Rendering: a scene → PIL RGB image(s). Shapes are drawn without anti-aliasing, so every
shape's exact RGB is present in the image."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw

from vlm.synthvqa.fonts import get_font
from vlm.synthvqa.scenes import OcrScene, Shape, ShapesScene, VideoScene, WideOcrScene
from vlm.synthvqa.spec import COLORS


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
    """Fill shape ``s`` with ``fill`` on ``draw``."""
    if s.shape == "circle":
        draw.ellipse([s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r], fill=fill)
    else:
        draw.polygon(s.points(), fill=fill)
