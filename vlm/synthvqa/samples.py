"""Samples: one chat sample (scene → rendered media + user/assistant messages + meta), drawn from
a seeded ``random.Random``, and the renderers that draw its media."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from PIL import Image

from vlm.synthvqa.config import HELDOUT_RENDERERS, SynthConfig
from vlm.synthvqa.questions import draw_qtype, pick_question, question_bank, remaining_questions
from vlm.synthvqa.render import render, render_video
from vlm.synthvqa.scenes import (
    VideoScene,
    sample_multi_image_scene,
    sample_ocr_scene,
    sample_shapes_scene,
    sample_video_scene,
    sample_wide_ocr_scene,
)
from vlm.synthvqa.spec import MAX_TRIES, Q_MULTI, Q_OCR, Q_VIDEO, QTYPES_V2, SHAPE_QTYPES


class Renderer(NamedTuple):
    """What draws a sample's media: ``render`` (a shapes / ocr / ocr_wide scene → PIL RGB image)
    and ``render_video`` (a video scene → its frames)."""

    render: Callable[[Any], Image.Image]
    render_video: Callable[[VideoScene], list[Image.Image]]


#: ``render.py``: PIL ``ImageDraw``, what the train split is always drawn with.
PIL_RENDERER = Renderer(render, render_video)


def get_renderer(name: str) -> Renderer:
    """The renderer called ``name`` (``SynthConfig.heldout_renderer``: ``"pil"`` or ``"raster"``)."""
    if name == "pil":
        return PIL_RENDERER
    if name == "raster":
        from vlm.synthvqa.render_raster import render as render_r  # imports torch
        from vlm.synthvqa.render_raster import render_video as render_video_r

        return Renderer(render_r, render_video_r)
    raise ValueError(f"unknown synthvqa renderer {name!r}; known: {HELDOUT_RENDERERS}")


def _chat(with_image: bool, question: str, image_position: str = "first") -> dict:
    image = [{"type": "image", "media": 0}] if with_image else []
    text = [{"type": "text", "text": question}]
    return {"role": "user", "content": image + text if image_position == "first" else text + image}


def _answer(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def make_sample(rng: random.Random, cfg: SynthConfig, renderer: Renderer | str = PIL_RENDERER) -> dict:
    """One sample: ``{"image": PIL RGB, "messages": [...], "meta": {"family", "qtypes"}, "scene": ...}``.

    ``scene`` (a ``ShapesScene`` or ``OcrScene``) is the ground truth the answers were computed
    from; it is not written to shards. ``renderer`` (a ``Renderer`` or its name) draws the media;
    the random draws, and so the scene and the messages, do not depend on it.
    """
    if isinstance(renderer, str):
        renderer = get_renderer(renderer)
    weights = cfg.weights
    qtype = draw_qtype(rng, weights, cfg.qtypes)
    assert qtype is not None
    if qtype in QTYPES_V2:
        return _make_v2_sample(rng, cfg, qtype, renderer)
    if qtype == "ocr":
        scene = sample_ocr_scene(rng, cfg)
        messages = [_chat(True, Q_OCR, cfg.image_position), _answer(scene.text)]
        return {
            "image": renderer.render(scene),
            "messages": messages,
            "meta": {"family": "ocr", "qtypes": ["ocr"]},
            "scene": scene,
        }

    for _ in range(MAX_TRIES):
        scene = sample_shapes_scene(rng, cfg)
        bank = question_bank(scene)
        if any(remaining_questions(bank, qtype, set())):
            break
    else:
        raise RuntimeError(f"could not draw a scene valid for {qtype!r}")
    asked: set[str] = set()
    messages: list[dict] = []
    qtypes: list[str] = []
    while qtype is not None and len(qtypes) < cfg.turns:
        qa = pick_question(rng, bank, qtype, asked)
        assert qa is not None
        asked.add(qa[0])
        messages += [_chat(not messages, qa[0], cfg.image_position), _answer(qa[1])]
        qtypes.append(qtype)
        if qtype == "describe" and cfg.describe_alone:
            break
        if len(qtypes) < cfg.turns:
            open_q = [q for q in SHAPE_QTYPES if any(remaining_questions(bank, q, asked))]
            if cfg.describe_alone:
                open_q = [q for q in open_q if q != "describe"]
            qtype = draw_qtype(rng, weights, open_q)
    return {
        "image": renderer.render(scene),
        "messages": messages,
        "meta": {"family": "shapes", "qtypes": qtypes},
        "scene": scene,
    }


def _chat_media(items: list[dict], question: str, image_position: str = "first") -> dict:
    text = [{"type": "text", "text": question}]
    return {"role": "user", "content": items + text if image_position == "first" else text + items}


def _make_v2_sample(rng: random.Random, cfg: SynthConfig, qtype: str, renderer: Renderer = PIL_RENDERER) -> dict:
    """A v2 sample. Besides the v1 keys it has ``media``: one entry per media index, a PIL image
    or (video) a list of PIL frames."""
    meta = {"family": qtype, "qtypes": [qtype]}
    if qtype == "ocr_wide":
        scene = sample_wide_ocr_scene(rng, cfg)
        img = renderer.render(scene)
        messages = [_chat_media([{"type": "image", "media": 0}], Q_OCR, cfg.image_position), _answer(scene.text)]
        return {"image": img, "media": [img], "messages": messages, "meta": meta, "scene": scene}
    if qtype == "multi_image":
        scene = sample_multi_image_scene(rng, cfg)
        images = [renderer.render(s) for s in scene.scenes]
        items = [{"type": "image", "media": 0}, {"type": "image", "media": 1}]
        messages = [_chat_media(items, Q_MULTI, cfg.image_position), _answer(scene.answer)]
        return {"media": images, "messages": messages, "meta": meta, "scene": scene}
    if qtype == "video":
        scene = sample_video_scene(rng, cfg)
        s0 = scene.frames[0]
        q = Q_VIDEO.format(color=s0.color, shape=s0.shape)
        messages = [_chat_media([{"type": "video", "media": 0}], q, cfg.image_position), _answer(scene.direction)]
        return {"media": [renderer.render_video(scene)], "messages": messages, "meta": meta, "scene": scene}
    raise ValueError(f"not a v2 qtype: {qtype!r}")


def sample_texts(messages: list[dict]) -> Iterator[str]:
    """All text items of a chat sample, in order."""
    for m in messages:
        for item in m["content"]:
            if item.get("type") == "text":
                yield item["text"]
