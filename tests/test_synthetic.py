"""synthvqa v1: answers are right for the rendered scene, captions are canonical, shards are
deterministic and resumable, and `ensure_synthvqa` writes readable shards and a tokenizer."""

from __future__ import annotations

import io
import json
import os
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vlm.synthvqa import (
    COLORS,
    QTYPES,
    SHAPES,
    OcrScene,
    Shape,
    ShapesScene,
    SynthConfig,
    describe,
    draw_shape,
    ensure_synthvqa,
    get_font,
    make_sample,
    render,
    sample_texts,
    write_split,
)

COUNT = {"one": 1, "two": 2, "three": 3, "four": 4}


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def _mask(s: Shape, canvas: int) -> np.ndarray:
    m = Image.new("L", (canvas, canvas), 0)
    draw_shape(ImageDraw.Draw(m), s, 1)
    return np.asarray(m, dtype=np.int32)


def _parse_caption(caption: str) -> list[tuple[int, str, str]]:
    parts = re.split(r", | and ", caption)
    out = []
    for p in parts:
        word, color, shape = p.split(" ")
        n = COUNT[word]
        kind = shape[:-1] if n > 1 else shape
        assert kind in SHAPES and shape == kind + ("s" if n > 1 else "") and color in COLORS
        out.append((n, color, kind))
    return out


def _check_turn(qtype: str, q: str, a: str, scene, img: np.ndarray) -> None:
    c = scene.canvas
    if qtype == "ocr":
        assert isinstance(scene, OcrScene) and q == "What does the text say?"
        assert a == scene.text and re.fullmatch(r"[A-Z0-9]{3,6}", a)
        return
    shapes = scene.shapes
    if qtype == "color":
        shape = re.fullmatch(r"What color is the (circle|square|triangle)\?", q)[1]
        same = [s for s in shapes if s.shape == shape]
        assert len(same) == 1 and a == same[0].color
        assert (img == COLORS[a]).all(-1).any()  # the answer's RGB is in the image
    elif qtype == "count_shape":
        shape = re.fullmatch(r"How many (circle|square|triangle)s are there\?", q)[1]
        assert a == str(sum(s.shape == shape for s in shapes))
    elif qtype == "count_all":
        assert q == "How many shapes are there?" and a == str(len(shapes)) and 1 <= len(shapes) <= 4
    elif qtype == "exists":
        color, shape = re.fullmatch(r"Is there a (\w+) (circle|square|triangle)\?", q).groups()
        present = any((s.color, s.shape) == (color, shape) for s in shapes)
        assert a == ("yes" if present else "no")
        assert (img == COLORS[color]).all(-1).any() or not present
    elif qtype == "left_right":
        color, shape = re.fullmatch(r"Is the (\w+) (circle|square|triangle) on the left or the right\?", q).groups()
        same = [s for s in shapes if (s.color, s.shape) == (color, shape)]
        assert len(same) == 1
        s = same[0]
        assert abs(s.cx - c / 2) >= c / 10
        assert a == ("left" if s.cx < c / 2 else "right")
        # pixel check: the colour's pixels of this shape lie on the answered side of the middle
        cols = np.nonzero(_mask(s, c).any(0))[0]
        centre = (cols.min() + cols.max() + 1) / 2
        assert (centre < c / 2) == (a == "left")
        assert (img[int(s.cy), int(s.cx)] == COLORS[color]).all()
    elif qtype == "describe":
        assert q == "Describe the image."
        groups = _parse_caption(a)
        assert Counter({(col, sh): n for n, col, sh in groups}) == Counter((s.color, s.shape) for s in shapes)
        order = [(SHAPES.index(sh), list(COLORS).index(col)) for _, col, sh in groups]
        assert order == sorted(order) and len(set(order)) == len(order)
    else:
        raise AssertionError(qtype)


def _check_scene_pixels(scene: ShapesScene, img: np.ndarray) -> None:
    c = scene.canvas
    assert img.shape == (c, c, 3) and (img.reshape(-1, 3).min(0) >= 0).all()
    assert all(225 <= v <= 255 for v in scene.background)
    total = np.zeros((c, c), np.int32)
    for s in scene.shapes:
        assert s.r - 1e-9 <= s.cx <= c - s.r and s.r <= s.cy <= c - s.r  # fully inside
        assert 0.09 * c <= s.r <= 0.15 * c
        m = _mask(s, c)
        assert m.sum() > 0
        assert (img[int(s.cy), int(s.cx)] == COLORS[s.color]).all()
        total += m
    assert total.max() <= 1, "shapes overlap"
    for name, rgb in COLORS.items():  # each colour's pixels are exactly its shapes' pixels
        want = sum(int(_mask(s, c).sum()) for s in scene.shapes if s.color == name)
        assert int((img == rgb).all(-1).sum()) == want, name


def test_answers_match_rendered_scene():
    rng = random.Random(1234)
    cfg = SynthConfig(turns=3)
    seen = Counter()
    asked: dict[str, set] = {}
    said: dict[str, set] = {}
    for _ in range(400):
        s = make_sample(rng, cfg)
        img = _pixels(s["image"])
        msgs, meta = s["messages"], s["meta"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * len(meta["qtypes"])
        assert msgs[0]["content"][0] == {"type": "image", "media": 0} and msgs[0]["content"][1]["type"] == "text"
        assert all(item["type"] == "text" for m in msgs[1:] for item in m["content"])  # later turns: text only
        questions = [m["content"][-1]["text"] for m in msgs[0::2]]
        answers = [m["content"][0]["text"] for m in msgs[1::2]]
        assert len(set(questions)) == len(questions), "questions must be distinct"
        if meta["family"] == "ocr":
            assert meta["qtypes"] == ["ocr"]
        else:
            assert meta["family"] == "shapes" and 1 <= len(meta["qtypes"]) <= 3 and "ocr" not in meta["qtypes"]
            _check_scene_pixels(s["scene"], img)
        for qt, q, a in zip(meta["qtypes"], questions, answers):
            _check_turn(qt, q, a, s["scene"], img)
            seen[qt] += 1
            asked.setdefault(qt, set()).add(q)
            said.setdefault(qt, set()).add(a)
    assert set(seen) == set(QTYPES)
    # every template, shape, colour and answer value turns up
    assert len(asked["count_shape"]) == 3 and said["count_shape"] >= {"0", "1", "2", "3"}
    assert said["count_all"] == {"1", "2", "3", "4"} and len(asked["color"]) == 3
    assert said["color"] == set(COLORS) and said["exists"] == {"yes", "no"} and said["left_right"] == {"left", "right"}
    assert len(asked["exists"]) > 15 and len(asked["left_right"]) > 15
    assert json.loads(json.dumps({"messages": msgs, "meta": meta})) == {"messages": msgs, "meta": meta}


def test_documented_vocabulary():
    assert QTYPES == ("color", "count_shape", "count_all", "exists", "left_right", "describe", "ocr")
    assert SHAPES == ("circle", "square", "triangle")
    # the RGB values documented in data/README.md
    assert COLORS == {
        "red": (220, 30, 30),
        "green": (30, 160, 50),
        "blue": (30, 70, 220),
        "yellow": (235, 200, 0),
        "purple": (140, 50, 190),
        "orange": (255, 130, 0),
    }


def test_caption_order_and_wording():
    def sh(kind, color):
        return Shape(kind, color, 10.0, 10.0, 5.0)

    assert describe([sh("circle", "red")]) == "one red circle"
    assert (
        describe([sh("square", "blue"), sh("circle", "red"), sh("square", "blue")])
        == "one red circle and two blue squares"
    )
    assert (
        describe([sh("triangle", "purple"), sh("square", "blue"), sh("circle", "orange"), sh("circle", "green")])
        == "one green circle, one orange circle, one blue square and one purple triangle"
    )
    assert (
        describe([sh("triangle", "yellow")] * 3 + [sh("circle", "red")]) == "one red circle and three yellow triangles"
    )
    assert describe([sh("square", "orange")] * 4) == "four orange squares"
    assert describe([sh("triangle", "red"), sh("square", "red"), sh("square", "yellow")]) == (
        "one red square, one yellow square and one red triangle"
    )


def test_exists_is_balanced_and_weights_select_qtypes():
    rng = random.Random(7)
    answers = Counter(
        make_sample(rng, SynthConfig(qtype_weights={"exists": 1}))["messages"][1]["content"][0]["text"]
        for _ in range(2000)
    )
    assert set(answers) == {"yes", "no"} and 0.46 < answers["yes"] / 2000 < 0.54
    for qt in QTYPES:
        cfg = SynthConfig(qtype_weights={qt: 1.0})
        assert all(make_sample(rng, cfg)["meta"]["qtypes"] == [qt] for _ in range(30))
    # with turns, later questions only use qtypes that have weight
    cfg = SynthConfig(turns=4, qtype_weights={"count_shape": 1, "exists": 1})
    for _ in range(50):
        assert set(make_sample(rng, cfg)["meta"]["qtypes"]) <= {"count_shape", "exists"}
    with pytest.raises(ValueError):
        SynthConfig(qtype_weights={"colour": 1})
    with pytest.raises(ValueError):
        SynthConfig(qtype_weights={"ocr": 0})


def test_describe_alone_keeps_captions_out_of_dialogues():
    """With describe_alone a caption is never a turn of a dialogue (it would give the later answers
    away); without it, it is; the option is recorded only when on."""
    rng = random.Random(3)
    on, off = SynthConfig(turns=3, describe_alone=True), SynthConfig(turns=3)
    samples = [make_sample(rng, on)["meta"]["qtypes"] for _ in range(600)]
    assert any(q == ["describe"] for q in samples)
    assert all(q == ["describe"] for q in samples if "describe" in q)
    assert sum(len(q) == 3 for q in samples) > 300  # the other samples still have three turns
    assert any("describe" in q and len(q) > 1 for q in (make_sample(rng, off)["meta"]["qtypes"] for _ in range(300)))
    assert on.to_dict()["describe_alone"] is True and "describe_alone" not in off.to_dict()


def test_ocr_text_fits_the_canvas():
    cfg = SynthConfig()
    size = cfg.font_px
    assert size >= 0.15 * cfg.canvas  # legible: not far below 0.2 x canvas
    font = get_font(size)
    for ch in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789":
        left, top, right, bottom = font.getbbox(ch * 6)
        assert right - left <= cfg.canvas - 2 and bottom - top <= cfg.canvas - 2, ch
    rng = random.Random(3)
    pad = 32
    for text in ["WWWWWW", "MMMMMM", "000000", "QJ7W9M"] + [None] * 60:
        s = make_sample(rng, SynthConfig(qtype_weights={"ocr": 1}))["scene"]
        if text is not None:  # worst cases at the position extremes
            s = OcrScene(s.canvas, s.background, text, (1 - font.getbbox(text)[0], 1 - font.getbbox(text)[1]), size, 0)
        c = s.canvas
        x0, y0, x1, y1 = s.bbox
        assert x0 >= 0 and y0 >= 0 and x1 <= c and y1 <= c
        # draw on a larger canvas: every bit of ink lands inside the real canvas (nothing clipped)
        big = Image.new("L", (c + 2 * pad, c + 2 * pad), 255)
        ImageDraw.Draw(big).text((s.xy[0] + pad, s.xy[1] + pad), s.text, fill=0, font=font)
        ink = np.argwhere(np.asarray(big) < 255)
        assert len(ink) > 0
        assert ink.min() >= pad and ink.max() < pad + c
        img = _pixels(render(s))
        assert (img.min(-1) < 150).sum() > 5 * len(s.text)  # dark text is visible
        assert (img.max(-1) >= 225).mean() > 0.5  # on a light background


def _shard_bytes(paths):
    return [Path(p).read_bytes() for p in paths]


def test_shards_deterministic_across_workers_and_resumable(tmp_path):
    cfg = SynthConfig(turns=2)
    a = write_split(tmp_path / "a", "train", 40, seed=5, cfg=cfg, shard_size=16, workers=1)
    b = write_split(tmp_path / "b", "train", 40, seed=5, cfg=cfg, shard_size=16, workers=2)
    assert [Path(p).name for p in a] == [f"synthvqa-train-{i:06d}.tar" for i in range(3)]
    assert _shard_bytes(a) == _shard_bytes(b)
    firsts = [_read([p])[0] for p in a]  # each shard has its own random stream
    assert len({f["0.png"] for f in firsts}) == 3 and len({f["json"] for f in firsts}) == 3
    c = write_split(tmp_path / "c", "train", 40, seed=6, cfg=cfg, shard_size=16, workers=1)
    assert _shard_bytes(c)[0] != _shard_bytes(a)[0]
    # a larger split keeps the same first shards (shard i depends only on seed, split, i)
    d = write_split(tmp_path / "d", "train", 64, seed=5, cfg=cfg, shard_size=16, workers=1)
    assert _shard_bytes(d)[:2] == _shard_bytes(a)[:2]

    # resume: a missing shard is rewritten identically, complete shards are not touched
    ref = _shard_bytes(a)
    os.utime(a[0], (1, 1))
    os.remove(a[1])
    Path(a[1] + ".tmp").write_bytes(b"half a shard")  # an interrupted write
    again = write_split(tmp_path / "a", "train", 40, seed=5, cfg=cfg, shard_size=16, workers=1)
    assert again == a and os.stat(a[0]).st_mtime == 1
    assert _shard_bytes(a) == ref and not Path(a[1] + ".tmp").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthvqa")
    cfg = SynthConfig(turns=3)
    out = ensure_synthvqa(root, train_samples=40, heldout_samples=20, cfg=cfg, workers=2, shard_size=16)
    return out, cfg


def _read(urls):
    import webdataset as wds

    return list(wds.WebDataset([str(u) for u in urls], shardshuffle=False))


def test_ensure_synthvqa_writes_readable_shards(tiny):
    root, cfg = tiny
    info = json.loads((root / "dataset.json").read_text())
    assert info["options"]["cfg"] == cfg.to_dict() and info["options"]["train_samples"] == 40
    for split, n in (("train", 40), ("heldout", 20)):
        meta = info["splits"][split]
        assert meta["samples"] == n and len(meta["shards"]) == -(-n // 16)
        assert meta["bytes"] == sum((root / p).stat().st_size for p in meta["shards"])
        samples = _read(root / p for p in meta["shards"])
        assert len(samples) == n
        qtypes = Counter()
        for i, s in enumerate(samples):
            assert re.fullmatch(rf"{split}-\d{{6}}-\d{{6}}", s["__key__"])
            assert s["__key__"] == f"{split}-{i // 16:06d}-{i % 16:06d}"
            assert set(s) >= {"json", "0.png"} and not any(k.endswith(".jpg") for k in s)
            doc = json.loads(s["json"])
            assert set(doc) == {"messages", "meta"}
            assert len(doc["messages"]) == 2 * len(doc["meta"]["qtypes"])
            assert doc["messages"][0]["content"][0] == {"type": "image", "media": 0}
            img = Image.open(io.BytesIO(s["0.png"]))
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (cfg.canvas, cfg.canvas)
            qtypes.update(doc["meta"]["qtypes"])
            if split == "heldout":
                assert len(doc["meta"]["qtypes"]) == 1
        assert dict(qtypes) == meta["qtypes"]
    assert info["splits"]["train"]["turns"] > 40  # train has multi-turn samples (turns=3)
    assert info["splits"]["heldout"]["cfg"]["turns"] == 1 and info["splits"]["heldout"]["cfg"]["qtype_weights"] is None


def test_tokenizer_round_trips_every_text(tiny):
    from vlm.tokenizer import TextTokenizer

    root, _ = tiny
    tok = TextTokenizer.from_file(root / "tokenizer.json")
    info = json.loads((root / "dataset.json").read_text())
    texts, ocr = [], []
    for split in ("train", "heldout"):
        for s in _read(root / p for p in info["splits"][split]["shards"]):
            doc = json.loads(s["json"])
            texts += list(sample_texts(doc["messages"]))
            if doc["meta"]["family"] == "ocr":
                ocr.append(doc["messages"][1]["content"][0]["text"])
    assert ocr
    for t in texts:
        assert tok.decode(tok.encode(t)) == t
    for t in ocr + ["A0B1C2", "ZZZZZZ", "999"]:
        ids = tok.encode(t)
        assert len(ids) == len(t) and [tok.decode([i]) for i in ids] == list(t)
    # every word the generator can say is a single token or a short piece sequence, never unknown
    rng = random.Random(0)
    for _ in range(200):
        for t in sample_texts(make_sample(rng, SynthConfig(turns=3))["messages"]):
            assert tok.decode(tok.encode(t)) == t


def test_ensure_synthvqa_resumes_and_rebuilds(tiny, tmp_path, capsys):
    root, cfg = tiny
    files = sorted(p for p in root.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    ensure_synthvqa(root, train_samples=40, heldout_samples=20, cfg=cfg, workers=2, shard_size=16)
    assert "up to date" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in sorted(p for p in root.rglob("*") if p.is_file())} == stamps

    # an interrupted run (no dataset.json, one shard missing) finishes without redoing the rest
    work = tmp_path / "w"
    kw = {"train_samples": 20, "heldout_samples": 10, "cfg": SynthConfig(), "workers": 1, "shard_size": 8}
    ensure_synthvqa(work, **kw)
    first = {p: p.read_bytes() for p in work.rglob("*.tar")}
    (work / "dataset.json").unlink()
    (work / "train" / "synthvqa-train-000001.tar").unlink()
    keep = work / "train" / "synthvqa-train-000000.tar"
    os.utime(keep, (1, 1))
    ensure_synthvqa(work, **kw)
    assert keep.stat().st_mtime == 1 and (work / "dataset.json").is_file()
    assert {p: p.read_bytes() for p in work.rglob("*.tar")} == first
    # other options: the old shards are replaced
    ensure_synthvqa(work, **{**kw, "train_samples": 9})
    assert sorted(p.name for p in (work / "train").glob("*.tar")) == [
        "synthvqa-train-000000.tar",
        "synthvqa-train-000001.tar",
    ]
    assert json.loads((work / "dataset.json").read_text())["splits"]["train"]["samples"] == 9
