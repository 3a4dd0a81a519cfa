"""The independent rasteriser (vlm/synthvqa/render_raster.py) draws the same scenes as render.py:
the same colours at the shapes' centres, the same background away from them, differences only in
a thin band along the outlines, the same text in the same place; and ensure_synthvqa draws the
held-out split with it when asked, leaving the train split and every answer unchanged."""

from __future__ import annotations

import ast
import inspect
import io
import json
import math
import multiprocessing
import os
import random
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm.synthvqa import (
    COLORS,
    OcrScene,
    Shape,
    ShapesScene,
    SynthConfig,
    ensure_synthvqa,
    make_sample,
    render,
    render_video,
    sample_multi_image_scene,
    sample_ocr_scene,
    sample_shapes_scene,
    sample_video_scene,
    sample_wide_ocr_scene,
    write_split,
)
from vlm.synthvqa import render_raster as raster
from vlm.synthvqa.samples import get_renderer

ALL = SynthConfig(families="all", video_format="apng")


def _px(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img, dtype=np.int16)


def _segment_distance(x, y, a, b) -> np.ndarray:
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(x - (ax + t * dx), y - (ay + t * dy))


def _outline_distance(s: Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance from the points (x, y) to the outline of ``s``: its circle, or the polygon of
    ``Shape.points()`` (the geometry render.py draws)."""
    if s.shape == "circle":
        return np.abs(np.hypot(x - s.cx, y - s.cy) - s.r)
    p = s.points()
    return np.min([_segment_distance(x, y, p[i], p[(i + 1) % len(p)]) for i in range(len(p))], axis=0)


def _area_perimeter(s: Shape) -> tuple[float, float]:
    if s.shape == "circle":
        return math.pi * s.r**2, 2 * math.pi * s.r
    p = s.points()
    n = len(p)
    area = 0.5 * abs(sum(p[i][0] * p[(i + 1) % n][1] - p[(i + 1) % n][0] * p[i][1] for i in range(n)))
    return area, sum(math.dist(p[i], p[(i + 1) % n]) for i in range(n))


def _check_shapes(scene: ShapesScene, pil: np.ndarray, ras: np.ndarray) -> None:
    c, bg = scene.canvas, np.array(scene.background)
    assert pil.shape == ras.shape == (c, c, 3)
    ys, xs = np.mgrid[0:c, 0:c] + 0.5  # pixel centres
    near = np.full((c, c), np.inf)  # distance to the nearest outline
    far = np.ones((c, c), bool)  # pixels well away from every shape
    for s in scene.shapes:
        rgb = COLORS[s.color]
        centre = (int(s.cy), int(s.cx))
        assert tuple(ras[centre]) == tuple(pil[centre]) == rgb  # the shape's exact colour at its centre
        near = np.minimum(near, _outline_distance(s, xs, ys))
        far &= np.hypot(xs - s.cx, ys - s.cy) > s.r + 2
        # the raster's own coverage of this shape: its area and centroid are the shape's
        ch = int(np.argmax(np.abs(bg - np.array(rgb))))
        mine = np.hypot(xs - s.cx, ys - s.cy) <= s.r + 1
        cov = np.where(mine, (bg[ch] - ras[..., ch]) / (bg[ch] - rgb[ch]), 0.0)
        assert cov.min() >= -0.01 and cov.max() <= 1.01
        area, perimeter = _area_perimeter(s)
        assert abs(cov.sum() - area) <= 0.15 * perimeter, (s, cov.sum(), area)  # 4x4 samples: edges within 1/8 px
        cx, cy = (cov * xs).sum() / cov.sum(), (cov * ys).sum() / cov.sum()
        assert math.hypot(cx - s.cx, cy - s.cy) < 0.25, (s, cx, cy)
    assert (ras[far] == bg).all() and (pil[far] == bg).all()  # background away from the shapes
    diff = np.abs(ras - pil).max(-1)
    assert (near[diff > 2] <= 1.5).all(), "the two renderers disagree away from an outline"
    assert (diff > 0).mean() <= (0.08 if c >= 64 else 0.15)


@pytest.mark.parametrize("canvas", [32, 64])
def test_shapes_agree_with_pil(canvas):
    cfg = SynthConfig(canvas=canvas, families="all")
    rng = random.Random(canvas)
    scenes = [sample_shapes_scene(rng, cfg) for _ in range(40)]
    scenes += [s for _ in range(5) for s in sample_multi_image_scene(rng, cfg).scenes]
    # every kind in every colour, at sub-pixel offsets
    for i, (kind, color) in enumerate((k, c) for k in ("circle", "square", "triangle") for c in COLORS):
        f = (i * 0.37) % 1
        scenes.append(
            ShapesScene(canvas, (240, 236, 250), (Shape(kind, color, canvas / 2 + f, canvas / 2 - f, 0.12 * canvas),))
        )
    for scene in scenes:
        _check_shapes(scene, _px(render(scene)), _px(raster.render(scene)))


def test_video_frames_agree_with_pil():
    rng = random.Random(3)
    for _ in range(6):
        scene = sample_video_scene(rng, ALL)
        pil, ras = render_video(scene), raster.render_video(scene)
        assert len(ras) == len(pil) == len(scene.frames)
        for s, a, b in zip(scene.frames, pil, ras):
            _check_shapes(ShapesScene(scene.canvas, scene.background, (s,)), _px(a), _px(b))


def _ink_box(img: np.ndarray, background) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero((img != np.array(background)).any(-1))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("canvas", [48, 64])
def test_text_same_string_same_place(canvas):
    cfg = SynthConfig(canvas=canvas, families="all")
    rng = random.Random(canvas)
    for sample in (sample_ocr_scene, sample_wide_ocr_scene):
        for _ in range(25):
            scene = sample(rng, cfg)
            pil, ras = _px(render(scene)), _px(raster.render(scene))
            assert pil.shape == ras.shape
            a, b = _ink_box(pil, scene.background), _ink_box(ras, scene.background)
            assert all(abs(u - v) <= 1 for u, v in zip(a, b)), (scene.text, a, b)
            left, top, right, bottom = scene.bbox  # the ink lies in the layout's box
            assert left <= b[0] and top <= b[1] and b[2] <= right and b[3] <= bottom
            assert np.abs(pil - ras).mean() < 0.5
            assert abs(int(ras.min()) - int(pil.min())) <= 1  # as dark: the same grey, the same coverage


def test_glyph_placement_is_by_advance():
    """Each character lands at the layout's advance: drawing a string equals drawing its
    characters one by one at ``getlength(text[:i])``."""
    from vlm.synthvqa import get_font

    font = get_font(13)
    text = "A1WM0"
    whole = _px(raster.render(OcrScene(64, (250, 250, 250), text, (3, 20), 13, 0)))
    parts = np.full_like(whole, 250)
    for i, ch in enumerate(text):
        x = 3 + round(font.getlength(text[:i]))
        part = _px(raster.render(OcrScene(64, (250, 250, 250), ch, (x, 20), 13, 0)))
        parts = np.minimum(parts, part)
    assert np.abs(whole - parts).max() <= 64  # only where neighbouring glyphs overlap
    assert (np.abs(whole - parts) > 0).mean() < 0.01


def test_rasteriser_does_not_use_imagedraw():
    tree = ast.parse(inspect.getsource(raster))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names]
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert "ImageDraw" not in names and not any("ImageDraw" in (m or "") for m in modules)


def test_make_sample_answers_do_not_depend_on_the_renderer():
    for seed in range(40):
        a = make_sample(random.Random(seed), ALL)
        b = make_sample(random.Random(seed), ALL, renderer="raster")
        assert a["messages"] == b["messages"] and a["meta"] == b["meta"] and a["scene"] == b["scene"]
        media_a = a.get("media", [a.get("image")])
        media_b = b.get("media", [b.get("image")])
        assert len(media_a) == len(media_b)


def test_renderer_option_recorded_only_when_not_default():
    assert "heldout_renderer" not in SynthConfig().to_dict()  # existing datasets keep their options
    assert "heldout_renderer" not in SynthConfig(heldout_renderer="pil").to_dict()
    cfg = SynthConfig(heldout_renderer="raster")
    assert cfg.to_dict()["heldout_renderer"] == "raster"
    assert SynthConfig.from_any(cfg.to_dict()) == cfg


def test_unknown_renderer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="heldout_renderer must be one of .*'cairo'"):
        SynthConfig(heldout_renderer="cairo")
    with pytest.raises(ValueError, match="heldout_renderer"):
        ensure_synthvqa(tmp_path / "x", train_samples=2, heldout_samples=2, cfg={"heldout_renderer": "Raster"})
    with pytest.raises(ValueError, match="unknown synthvqa renderer 'cairo'"):
        get_renderer("cairo")
    with pytest.raises(ValueError, match="unknown synthvqa renderer"):
        write_split(tmp_path / "y", "heldout", 2, 0, SynthConfig(), renderer="cairo")
    with pytest.raises(ValueError, match="unknown synthvqa renderer"):
        make_sample(random.Random(0), SynthConfig(), renderer="cairo")
    assert not (tmp_path / "x" / "dataset.json").exists() and not (tmp_path / "y").exists()


def _write_in_own_process_group(out, cfg) -> None:
    os.setpgrp()  # so that the test can stop the pool workers too
    write_split(out, "heldout", 12, 7, cfg, shard_size=4, workers=2, renderer="raster")


def test_forked_workers_rasterise_after_the_parent_used_torch(tmp_path):
    """A training process has run torch on its OpenMP threads before it makes the data; the shard
    writers it forks must still rasterise, and write what one process writes."""
    import torch

    torch.ones(1024, 1024).sum()  # big enough to run on the intra-op thread pool
    cfg = SynthConfig(families="all", qtype_weights={"ocr_wide": 1.0})  # 512x64 canvases: threaded copies
    one = write_split(tmp_path / "one", "heldout", 12, 7, cfg, shard_size=4, workers=1, renderer="raster")
    p = multiprocessing.get_context("fork").Process(target=_write_in_own_process_group, args=(tmp_path / "two", cfg))
    p.start()
    p.join(60)
    if p.exitcode is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.join()
        pytest.fail("the forked shard writers hung")
    assert p.exitcode == 0
    two = sorted((tmp_path / "two" / "heldout").glob("*.tar"))
    assert [Path(f).read_bytes() for f in one] == [f.read_bytes() for f in two]


def _members(root, split) -> dict[str, bytes]:
    info = json.loads((root / "dataset.json").read_text())
    out = {}
    for p in info["splits"][split]["shards"]:
        with tarfile.open(root / p) as tf:
            for m in tf:
                out[m.name] = tf.extractfile(m).read()
    return out


def test_ensure_synthvqa_raster_heldout(tmp_path):
    opts = dict(train_samples=12, heldout_samples=30, workers=1, shard_size=16, vocab_size=300)
    pil_root = ensure_synthvqa(tmp_path / "pil", cfg=ALL, **opts)
    ras_root = ensure_synthvqa(tmp_path / "raster", cfg={**ALL.to_dict(), "heldout_renderer": "raster"}, **opts)

    pil_info = json.loads((pil_root / "dataset.json").read_text())
    ras_info = json.loads((ras_root / "dataset.json").read_text())
    assert "heldout_renderer" not in pil_info["options"]["cfg"]
    assert ras_info["options"]["cfg"]["heldout_renderer"] == "raster"
    assert ras_info["splits"]["heldout"]["cfg"]["heldout_renderer"] == "raster"

    assert _members(pil_root, "train") == _members(ras_root, "train")  # train: always render.py
    assert (pil_root / "tokenizer.json").read_bytes() == (ras_root / "tokenizer.json").read_bytes()

    a, b = _members(pil_root, "heldout"), _members(ras_root, "heldout")
    assert sorted(a) == sorted(b) and len([k for k in a if k.endswith(".json")]) == 30
    families = set()
    for name in a:
        if name.endswith(".json"):
            assert a[name] == b[name]  # the same questions and answers
            continue
        key = name.split(".")[0]
        family = json.loads(a[f"{key}.json"])["meta"]["family"]
        families.add(family)
        if family in ("shapes", "multi_image", "video"):  # anti-aliased outlines
            assert a[name] != b[name], name
        if name.endswith(".png"):
            pa, pb = (
                _px(Image.open(io.BytesIO(a[name])).convert("RGB")),
                _px(Image.open(io.BytesIO(b[name])).convert("RGB")),
            )
            assert pa.shape == pb.shape
            assert (np.abs(pa - pb).max(-1) > 2).mean() < 0.15
    assert {"shapes", "ocr"} <= families

    # the recorded options decide: a second call with the same ones does nothing
    again = ensure_synthvqa(tmp_path / "raster", cfg={**ALL.to_dict(), "heldout_renderer": "raster"}, **opts)
    assert json.loads((again / "dataset.json").read_text()) == ras_info
