"""synthvqa v2 families: ocr_wide, multi_image, video. Answers are right for what is rendered,
video answers flip with the frame order, shards are deterministic, and v1 is untouched by default."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vlm.synthvqa import (
    COLORS,
    DIRECTIONS,
    FAMILIES,
    QTYPES,
    QTYPES_V2,
    SynthConfig,
    get_font,
    make_sample,
    render_video,
    sample_texts,
    vocabulary_texts,
    write_split,
)

V2 = SynthConfig(families=["v1", "v2"])


def _only(qtype: str, **kw) -> SynthConfig:
    return SynthConfig(families="all", qtype_weights={qtype: 1}, **kw)


def _components(img: Image.Image) -> int:
    """Connected blobs of non-background pixels (4-neighbour flood fill)."""
    a = np.asarray(img, dtype=np.int16)
    bg = a[0, 0]
    fg = np.abs(a - bg).max(-1) > 40
    seen = np.zeros_like(fg)
    n = 0
    for y, x in zip(*np.nonzero(fg)):
        if seen[y, x]:
            continue
        n += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < fg.shape[0] and 0 <= nx < fg.shape[1] and fg[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return n


def _centroid(img: Image.Image, rgb) -> tuple[float, float]:
    ys, xs = np.nonzero((np.asarray(img) == np.array(rgb, dtype=np.uint8)).all(-1))
    assert len(xs) > 0, "shape not visible"
    return float(xs.mean()), float(ys.mean())


def _direction(frames: list[Image.Image], rgb) -> str:
    """Which way the shape of colour ``rgb`` moves, from the pixels of the first and last frames."""
    (x0, y0), (x1, y1) = _centroid(frames[0], rgb), _centroid(frames[-1], rgb)
    dx, dy = x1 - x0, y1 - y0
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _answer(s: dict) -> str:
    return s["messages"][1]["content"][0]["text"]


# ------------------------------------------------------------------------------ v1 untouched


def test_defaults_are_v1():
    cfg = SynthConfig()
    assert cfg.families == ("shapes", "ocr") and cfg.qtypes == QTYPES and set(cfg.weights) == set(QTYPES)
    assert "families" not in cfg.to_dict() and "video_fps" not in cfg.to_dict()  # dataset.json unchanged
    assert vocabulary_texts() == vocabulary_texts(SynthConfig())
    # the v1 sample stream (questions, answers, meta) is frozen: same digest as before v2 existed
    h = hashlib.sha256()
    for c in (SynthConfig(), SynthConfig(turns=3, image_position="last")):
        rng = random.Random(1234)
        for _ in range(300):
            s = make_sample(rng, c)
            h.update(json.dumps([s["messages"], s["meta"]]).encode())
    assert h.hexdigest() == "758e74ae14184a9d9cf0edc65eca25468dd3d24a5c05c135a554407a396304b7"


def test_families_config():
    assert V2.families == FAMILIES and V2.qtypes == QTYPES + QTYPES_V2
    assert SynthConfig(families="shapes,video").qtypes[-1] == "video"
    assert SynthConfig.from_any(V2.to_dict()) == V2
    with pytest.raises(ValueError, match="not in families"):
        SynthConfig(qtype_weights={"video": 1})
    with pytest.raises(ValueError, match="unknown synthvqa family"):
        SynthConfig(families=["shapes", "movies"])
    with pytest.raises(ValueError, match="min_shapes < max_shapes"):
        SynthConfig(families="all", min_shapes=2, max_shapes=2)
    texts = set(vocabulary_texts(V2))
    assert {"first", "second", "up", "down", "Which image has more shapes, the first or the second?"} <= texts
    assert "Which way is the red circle moving?" in texts


def test_mixed_families_are_drawn():
    rng = random.Random(0)
    fams = Counter(make_sample(rng, V2)["meta"]["family"] for _ in range(400))
    assert set(fams) == set(FAMILIES)


# --------------------------------------------------------------------------------- ocr_wide


def test_ocr_wide_text_fits_and_is_the_answer():
    cfg = _only("ocr_wide")
    W, H = cfg.wide_size
    assert (W, H) == (512, 64) and cfg.wide_font_px >= 0.3 * H  # legible
    font = get_font(cfg.wide_font_px)
    rng = random.Random(5)
    pad = 40
    lengths = set()
    for _ in range(40):
        s = make_sample(rng, cfg)
        scene, img = s["scene"], s["image"]
        assert (
            img.size == (512, 64)
            and s["media"] == [img]
            and s["meta"] == {"family": "ocr_wide", "qtypes": ["ocr_wide"]}
        )
        assert _answer(s) == scene.text and 12 <= len(scene.text) <= 20
        assert s["messages"][0]["content"][1]["text"] == "What does the text say?"
        lengths.add(len(scene.text))
        x0, y0, x1, y1 = scene.bbox
        assert x0 >= 0 and y0 >= 0 and x1 <= W and y1 <= H
        big = Image.new("L", (W + 2 * pad, H + 2 * pad), 255)  # no ink is clipped by the canvas
        ImageDraw.Draw(big).text((scene.xy[0] + pad, scene.xy[1] + pad), scene.text, fill=0, font=font)
        ys, xs = np.nonzero(np.asarray(big) < 255)
        assert xs.min() >= pad and xs.max() < pad + W and ys.min() >= pad and ys.max() < pad + H
        assert (np.asarray(img).min(-1) < 150).sum() > 5 * len(scene.text)
    assert min(lengths) <= 13 and max(lengths) >= 19
    for text in ["W" * 20, "M" * 20]:  # the widest strings fit too
        left, _, right, _ = font.getbbox(text)
        assert right - left <= W - 2


# ------------------------------------------------------------------------------ multi_image


def test_multi_image_answer_matches_counts():
    rng = random.Random(11)
    answers = Counter()
    for _ in range(150):
        s = make_sample(rng, _only("multi_image"))
        a, b = s["media"]
        na, nb = _components(a), _components(b)
        assert na == len(s["scene"].scenes[0].shapes) and nb == len(s["scene"].scenes[1].shapes)
        assert na != nb and _answer(s) == ("first" if na > nb else "second")
        answers[_answer(s)] += 1
        items = s["messages"][0]["content"]
        assert items == [
            {"type": "image", "media": 0},
            {"type": "image", "media": 1},
            {"type": "text", "text": "Which image has more shapes, the first or the second?"},
        ]
    assert 0.35 < answers["first"] / 150 < 0.65
    s = make_sample(rng, _only("multi_image", image_position="last"))
    assert [c["type"] for c in s["messages"][0]["content"]] == ["text", "image", "image"]


# ------------------------------------------------------------------------------------ video


def test_video_answer_and_flip():
    rng = random.Random(3)
    seen = Counter()
    for _ in range(60):
        s = make_sample(rng, _only("video"))
        (frames,) = s["media"]
        scene = s["scene"]
        assert 4 <= len(frames) <= 8 and all(f.size == (64, 64) for f in frames)
        shape = scene.frames[0]
        q = s["messages"][0]["content"]
        assert q[0] == {"type": "video", "media": 0}
        assert q[1]["text"] == f"Which way is the {shape.color} {shape.shape} moving?"
        rgb = COLORS[shape.color]
        assert _direction(frames, rgb) == _answer(s) == scene.direction
        opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[_answer(s)]
        assert _direction(frames[::-1], rgb) == opposite  # reversed frames: the answer flips
        (x0, y0), (x1, y1) = _centroid(frames[0], rgb), _centroid(frames[-1], rgb)
        assert max(abs(x1 - x0), abs(y1 - y0)) >= 0.3 * 64 - 1.5  # clearly visible motion
        for f, sh in zip(frames, scene.frames):  # the shape is whole in every frame
            assert sh.r + 1 <= sh.cx <= 63 - sh.r and sh.r + 1 <= sh.cy <= 63 - sh.r
            assert _components(f) == 1
        seen[_answer(s)] += 1
    assert set(seen) == set(DIRECTIONS)


@pytest.mark.parametrize("fmt", ["mp4", "apng"])
def test_v2_shard_round_trip(tmp_path, fmt):
    if fmt == "mp4":
        pytest.importorskip("av")
    from vlm.data.video import decode_video

    cfg = SynthConfig(families="v2", video_format=fmt)
    paths = write_split(tmp_path / "a", "train", 24, 0, cfg, shard_size=24)
    again = write_split(tmp_path / "b", "train", 24, 0, cfg, shard_size=24)
    assert Path(paths[0]).read_bytes() == Path(again[0]).read_bytes()  # deterministic bytes
    from vlm.synthvqa import shard_rng

    rng = shard_rng(0, "train", 0)
    rng_samples = [make_sample(rng, cfg) for _ in range(24)]
    with tarfile.open(paths[0]) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf}
    kinds = Counter()
    for i, s in enumerate(rng_samples):
        key = f"train-000000-{i:06d}"
        doc = json.loads(members[f"{key}.json"])
        assert doc["messages"] == s["messages"] and doc["meta"] == s["meta"]
        fam = s["meta"]["family"]
        kinds[fam] += 1
        if fam == "video":
            ext = "mp4" if fmt == "mp4" else "apng"
            assert f"{key}.0.{ext}" in members and f"{key}.1.png" not in members
            frames, fps = decode_video(members[f"{key}.0.{ext}"])
            assert fps == 2.0 and len(frames) == len(s["media"][0])
            assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, render_video(s["scene"])))
            rgb = COLORS[s["scene"].frames[0].color]
            assert _direction(frames, rgb) == doc["messages"][1]["content"][0]["text"]
        else:
            n = 2 if fam == "multi_image" else 1
            for j in range(n):
                img = Image.open(io.BytesIO(members[f"{key}.{j}.png"]))
                assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(s["media"][j]))
    assert set(kinds) == {"ocr_wide", "multi_image", "video"}
    texts = set(" ".join(vocabulary_texts(cfg)).split())
    for s in rng_samples:  # every word the v2 generator writes is in the tokenizer vocabulary texts
        for t in sample_texts(s["messages"]):
            if s["meta"]["family"] != "ocr_wide":
                assert set(t.split()) <= texts, t


def test_strips_data_config_is_one_curriculum_stage(tmp_path):
    """`data=synthvqa_strips` with a length range: its own data folder, only ocr_wide questions in
    training with answers of those lengths, and the tower warm-up's strips follow the same lengths."""
    from tests.conftest import compose_train
    from vlm.training.datamodule import build_datamodule
    from vlm.training.warmup import with_data_strips

    cfg = compose_train(
        [
            "experiment=synthvqa_v2_dynamic",
            "data=synthvqa_strips",
            "data.synthetic.ocr_wide_min_len=3",
            "data.synthetic.ocr_wide_max_len=6",
            "data.synthetic.train_samples=16",
            "data.synthetic.heldout_samples=8",
            "tower_warmup.wide=1.0",
        ],
        tmp_path,
        tmp_path / "data",
    )
    assert cfg.data.synthetic.root == str(tmp_path / "data" / "synthvqa_strips_3-6")
    assert cfg.data.processor.resolution == "dynamic" and list(cfg.data.qtypes) == ["ocr_wide"]
    warm = with_data_strips(dict(cfg.tower_warmup), dict(cfg.data.synthetic))
    assert warm["wide_options"] == {"ocr_wide_min_len": 3, "ocr_wide_max_len": 6, "ocr_wide_font_frac": 0.40625}

    dm = build_datamodule(cfg)
    dm.prepare_data()
    shards = sorted((Path(cfg.data.synthetic.root) / "train").glob("*.tar"))
    docs = []
    for shard in shards:
        with tarfile.open(shard) as tf:
            docs += [json.loads(tf.extractfile(m).read()) for m in tf if m.name.endswith(".json")]
    assert len(docs) == 16
    for doc in docs:
        assert doc["meta"]["qtypes"] == ["ocr_wide"]
        answer = doc["messages"][1]["content"][0]["text"]
        assert 3 <= len(answer) <= 6, answer
