"""Converters (vlm.convert): broken rows counted by exact reason, shards loaded back with the real
loader (tokens + labels), resume rewrites only what is missing, and the JSON reader streams."""

from __future__ import annotations

import io
import json
import os
import runpy
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from vlm import convert as C
from vlm.data.processor import ImageProcessor
from vlm.data.sample import SampleTransform
from vlm.data.template import IGNORE, ChatTemplate
from vlm.data.webdataset import ShardDataset
from vlm.model.projector import visual_token_count
from vlm.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENS_PER_IMAGE = 16  # ImageProcessor(patch_size=8, image_size=32): a 4x4 grid, merge 1


# ------------------------------------------------------------------------------ fixtures


def image_bytes(fmt: str, color=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_images(root: Path) -> Path:
    """Good, lying, corrupt images under root/img and one good image outside the root."""
    (root / "img" / "sub").mkdir(parents=True)
    (root / "img" / "red.jpg").write_bytes(image_bytes("JPEG"))
    (root / "img" / "blue.png").write_bytes(image_bytes("PNG", (30, 70, 220)))
    (root / "img" / "lies.jpg").write_bytes(image_bytes("PNG", (30, 160, 50)))  # a PNG named .jpg
    (root / "img" / "sub" / "green.jpg").write_bytes(image_bytes("JPEG", (30, 160, 50)))
    (root / "img" / "broken.jpg").write_bytes(image_bytes("JPEG")[:200])  # truncated
    (root / "secret.jpg").write_bytes(image_bytes("JPEG"))  # outside the image root, valid
    return root / "img"


def loader_parts(texts: list[str]):
    tok = train_tokenizer(texts * 3 + ["user\n", "assistant\n", "system\n"] * 3)
    template = ChatTemplate(tok, lambda g: visual_token_count(g, 1))
    proc = SampleTransform(ImageProcessor(patch_size=8, image_size=32), template, mode="train")
    return tok, proc


def load(out_dir: Path, texts: list[str]):
    tok, proc = loader_parts(texts)
    samples = {s.key: s for s in ShardDataset(str(out_dir), proc, train=False)}
    return tok, samples


def label_text(tok, s) -> str:
    return tok.decode(s.labels[s.labels != IGNORE].tolist())


def members(out_dir: Path) -> dict[str, bytes]:
    out = {}
    for tar in sorted(out_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                out[m.name] = tf.extractfile(m).read()
    return out


# ----------------------------------------------------------------------------------- llava


def test_llava_counts_and_round_trip(tmp_path):
    root = make_images(tmp_path)
    recs = [
        {
            "id": "a",
            "image": "red.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat color is it?"},
                {"from": "gpt", "value": "It is red."},
                {"from": "human", "value": "Are you sure?"},
                {"from": "gpt", "value": "Yes."},
            ],
        },
        {
            "id": "b",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hello there"},
                {"from": "gpt", "value": "Hi."},
            ],
        },
        {
            "id": "c",
            "image": ["sub/green.jpg", "lies.jpg"],
            "conversations": [
                {"from": "human", "value": "Compare <image> with <image> please."},
                {"from": "gpt", "value": "Both are green."},
            ],
        },
        {
            "id": "missing",
            "image": "nope.jpg",
            "conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}],
        },
        {
            "id": "corrupt",
            "image": "broken.jpg",
            "conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}],
        },
        {
            "id": "nomarker",
            "image": "red.jpg",
            "conversations": [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "y"}],
        },
        {
            "id": "twomarkers",
            "image": "red.jpg",
            "conversations": [{"from": "human", "value": "<image><image> x"}, {"from": "gpt", "value": "y"}],
        },
        {
            "id": "escape",
            "image": "../secret.jpg",
            "conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}],
        },
        {
            "id": "abs",
            "image": str(tmp_path / "secret.jpg"),
            "conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}],
        },
        {
            "id": "url",
            "image": "http://example.com/a.jpg",
            "conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}],
        },
        {"id": "roles", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
        42,
    ]
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(recs, indent=1))
    out = tmp_path / "out"
    rep = C.convert_llava(src, root, out, maxcount=5, workers=2, verbose=False)

    assert rep["records"] == 12 and rep["samples"] == 3 and rep["images"] == 3
    assert rep["skipped"] == {
        "bad_record": 1,
        "bad_roles": 1,
        "image_marker_mismatch": 2,
        "media_corrupt": 1,
        "media_missing": 1,
        "path_escape": 2,
        "url_not_allowed": 1,
    }
    assert rep["shards"] == ["llava-000000.tar"]  # shards 1 and 2 had nothing good: reports only
    assert json.loads((out / "dataset.json").read_text())["samples"] == 3
    assert [json.loads((out / f"llava-00000{i}.json").read_text())["records"] for i in range(3)] == [5, 5, 2]

    m = members(out)
    assert set(m) == {
        "llava-000000-000000.json",
        "llava-000000-000000.0.jpg",
        "llava-000000-000001.json",
        "llava-000000-000002.json",
        "llava-000000-000002.0.jpg",
        "llava-000000-000002.1.png",
    }
    assert m["llava-000000-000002.1.png"] == (root / "lies.jpg").read_bytes()  # original bytes, true extension
    doc = json.loads(m["llava-000000-000002.json"])
    assert doc["messages"][0]["content"] == [
        {"type": "text", "text": "Compare"},
        {"type": "image", "media": 0},
        {"type": "text", "text": "with"},
        {"type": "image", "media": 1},
        {"type": "text", "text": "please."},
    ]
    assert doc["meta"] == {"source": "llava", "id": "c"}

    texts = [
        "What color is it?",
        "It is red.",
        "Are you sure?",
        "Yes.",
        "Be brief.",
        "Hello there",
        "Hi.",
        "Compare",
        "with",
        "please.",
        "Both are green.",
    ]
    tok, got = load(out, texts)
    assert sorted(got) == ["llava-000000-000000", "llava-000000-000001", "llava-000000-000002"]
    a, b, c = (got[f"llava-000000-00000{i}"] for i in range(3))
    assert "What color is it?" in tok.decode(a.input_ids.tolist()) and "Are you sure?" in tok.decode(
        a.input_ids.tolist()
    )
    assert label_text(tok, a) == "It is red.Yes."
    assert len(a.grids) == 1 and (a.input_ids == tok.image_pad_id).sum() == TOKENS_PER_IMAGE
    assert "Be brief." in tok.decode(b.input_ids.tolist()) and label_text(tok, b) == "Hi." and b.grids == []
    assert label_text(tok, c) == "Both are green." and len(c.grids) == 2
    assert (c.input_ids == tok.image_pad_id).sum() == 2 * TOKENS_PER_IMAGE


def test_llava_jsonl_bad_line_and_cli(tmp_path, capsys):
    root = make_images(tmp_path)
    good = {
        "id": 7,
        "image": "blue.png",
        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "Blue."}],
    }
    src = tmp_path / "llava.jsonl"
    src.write_text(json.dumps(good) + "\n{broken\n\n" + json.dumps({**good, "conversations": []}) + "\n")
    cli = runpy.run_path(str(ROOT / "data" / "convert_llava.py"), run_name="cli")
    assert (
        cli["main"]([str(src), "--image-root", str(root), "--out", str(tmp_path / "o"), "--workers", "1", "--quiet"])
        == 0
    )
    assert "1 samples written of 3 records" in capsys.readouterr().out
    info = json.loads((tmp_path / "o" / "dataset.json").read_text())
    assert info["skipped"] == {"bad_json": 1, "bad_roles": 1}
    assert info["options"]["converter"] == "llava" and info["options"]["maxcount"] == 1000
    # A missing image root is a clear error, not a traceback.
    assert cli["main"]([str(src), "--image-root", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2


# -------------------------------------------------------------------------------- captions


def test_captions_folder_counts_and_round_trip(tmp_path):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    (d / "a.jpg").write_bytes(image_bytes("JPEG"))
    (d / "a.txt").write_text("A red square.\n")
    (d / "b.png").write_bytes(image_bytes("PNG", (30, 70, 220)))
    (d / "b.txt").write_text("A blue square.")
    (d / "c.jpg").write_bytes(image_bytes("JPEG"))  # no caption file
    (d / "d.jpg").write_bytes(image_bytes("JPEG"))
    (d / "d.txt").write_text("   \n")  # blank caption
    (d / "e.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "e.txt").write_text("Broken.")
    (d / "sub" / "f.webp").write_bytes(image_bytes("WEBP", (30, 160, 50)))
    (d / "sub" / "f.txt").write_text("A green square.")
    (d / "notes.md").write_text("not an image")
    out = tmp_path / "out"
    prompts = ["Describe the image.", "What is in this picture?"]
    rep = C.convert_captions(d, out, maxcount=4, workers=2, prompts=prompts, verbose=False)
    assert (rep["records"], rep["samples"], rep["images"]) == (6, 3, 3)
    assert rep["skipped"] == {"empty_caption": 2, "media_corrupt": 1}

    tok, got = load(out, ["A red square.", "A blue square.", "A green square.", *prompts])
    assert len(got) == 3
    caps = sorted(label_text(tok, s) for s in got.values())
    assert caps == ["A blue square.", "A green square.", "A red square."]
    for s in got.values():
        text = tok.decode(s.input_ids.tolist())
        assert any(p in text for p in prompts) and len(s.grids) == 1
    assert any(name.endswith(".0.webp") for name in members(out))


def test_captions_jsonl_and_csv(tmp_path):
    root = make_images(tmp_path)
    rows = [
        {"image": "red.jpg", "caption": "A red rectangle."},
        {"image": "http://example.com/x.jpg", "caption": "url"},
        {"image": "../secret.jpg", "caption": "escape"},
        {"image": "gone.jpg", "caption": "missing"},
        {"image": "blue.png", "caption": ""},
        {"image": "blue.png"},
        {"image": "sub/green.jpg", "caption": "A green rectangle."},
        {"image": "red.jpg", "caption": "lone surrogate \ud800"},
        {"image": "red.jpg", "caption": 5},
        {"image": "sub", "caption": "a directory"},
    ]
    src = root / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    rep = C.convert_captions(src, tmp_path / "o1", maxcount=3, workers=1, verbose=False)
    assert rep["samples"] == 2
    assert rep["skipped"] == {
        "bad_json": 1,
        "bad_record": 1,
        "bad_text": 1,
        "empty_caption": 2,
        "media_missing": 1,
        "media_unreadable": 1,
        "path_escape": 1,
        "url_not_allowed": 1,
    }
    # A header claiming more pixels than allowed is refused before decoding (40x30 > 1000).
    rep = C.convert_captions(src, tmp_path / "o3", max_pixels=1000, workers=1, verbose=False)
    assert rep["samples"] == 0 and rep["skipped"]["media_too_many_pixels"] == 3 and rep["shards"] == []

    csv_src = tmp_path / "pairs.csv"
    csv_src.write_text('path,caption\nred.jpg,"A red, small rectangle."\nblue.png,A blue one.\nlies.jpg\n')
    rep = C.convert_captions(csv_src, tmp_path / "o2", image_root=root, workers=1, verbose=False)
    assert rep["samples"] == 2 and rep["skipped"] == {"bad_record": 1}
    tok, got = load(tmp_path / "o2", ["A red, small rectangle.", "A blue one.", *C.DEFAULT_CAPTION_PROMPTS])
    assert sorted(label_text(tok, s) for s in got.values()) == ["A blue one.", "A red, small rectangle."]


def test_captions_deterministic_whatever_the_workers(tmp_path):
    root = make_images(tmp_path)
    src = root / "pairs.jsonl"
    src.write_text("\n".join(json.dumps({"image": "red.jpg", "caption": f"Caption {i}."}) for i in range(9)))
    C.convert_captions(src, tmp_path / "w1", maxcount=2, workers=1, verbose=False)
    C.convert_captions(src, tmp_path / "w2", maxcount=2, workers=2, verbose=False)
    assert members(tmp_path / "w1") == members(tmp_path / "w2")
    prompts = {
        json.loads(v)["messages"][0]["content"][1]["text"]
        for k, v in members(tmp_path / "w1").items()
        if k.endswith(".json")
    }
    assert prompts <= set(C.DEFAULT_CAPTION_PROMPTS) and len(prompts) > 1


# ----------------------------------------------------------------------------- interleaved


def test_interleaved_drops_bad_images_not_documents(tmp_path):
    root = make_images(tmp_path)
    docs = [
        {
            "id": "obelics",
            "texts": ["Intro.", None, "After the image.", None],
            "images": [None, "red.jpg", None, "broken.jpg"],
        },
        {
            "id": "items",
            "items": [
                {"type": "text", "text": "A photo of"},
                {"type": "image", "path": "blue.png"},
                {"type": "text", "text": "a blue box."},
                {"type": "image", "path": "http://x.org/y.jpg"},
                {"type": "image", "path": "../secret.jpg"},
            ],
        },
        {
            "id": "joined",
            "items": [
                {"type": "text", "text": "One."},
                {"type": "image", "path": "gone.jpg"},
                {"type": "text", "text": "Two."},
            ],
        },
        {
            "id": "mmc4",
            "text_list": ["First sentence.", "Second sentence."],
            "image_info": [{"image_name": "sub/green.jpg", "matched_text_index": 1}],
        },
        {"id": "notext", "texts": [None, None], "images": ["red.jpg", "gone.jpg"]},
        {"id": "blank", "items": [{"type": "text", "text": "  "}, {"type": "image", "path": "red.jpg"}]},
        {"id": "ragged", "texts": ["a"], "images": [None, None]},
        {"what": 1},
    ]
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps(d) for d in docs) + "\n[1,\n")
    out = tmp_path / "out"
    rep = C.convert_interleaved(src, root, out, maxcount=3, workers=2, verbose=False)
    assert (rep["records"], rep["samples"], rep["images"]) == (9, 4, 3)
    assert rep["skipped"] == {"bad_json": 1, "bad_record": 2, "no_text": 2}
    assert rep["dropped_images"] == {"media_corrupt": 1, "media_missing": 1, "path_escape": 1, "url_not_allowed": 1}

    m = members(out)
    joined = json.loads(m["interleaved-000000-000002.json"])
    assert joined["document"] == [{"type": "text", "text": "One.\n\nTwo."}]
    assert joined["meta"]["dropped_images"] == {"media_missing": 1}
    mmc4 = json.loads(m["interleaved-000001-000000.json"])["document"]
    assert [it["type"] for it in mmc4] == ["text", "image", "text"]

    texts = [
        "Intro.",
        "After the image.",
        "A photo of",
        "a blue box.",
        "One.\n\nTwo.",
        "First sentence.",
        "Second sentence.",
    ]
    tok, got = load(out, texts)
    assert sorted(got) == [
        "interleaved-000000-000000",
        "interleaved-000000-000001",
        "interleaved-000000-000002",
        "interleaved-000001-000000",
    ]
    s = got["interleaved-000000-000000"]
    assert label_text(tok, s) == "Intro.After the image." and len(s.grids) == 1
    assert label_text(tok, got["interleaved-000000-000001"]) == "A photo ofa blue box."
    assert (
        label_text(tok, got["interleaved-000000-000002"]) == "One.\n\nTwo."
        and got["interleaved-000000-000002"].grids == []
    )
    s = got["interleaved-000001-000000"]
    assert label_text(tok, s) == "First sentence.Second sentence."
    assert (s.input_ids == tok.image_pad_id).sum() == TOKENS_PER_IMAGE


# ---------------------------------------------------------------------------------- resume


def test_resume_rewrites_only_missing_shards(tmp_path):
    root = make_images(tmp_path)
    src = root / "pairs.jsonl"
    src.write_text("\n".join(json.dumps({"image": "red.jpg", "caption": f"Number {i}."}) for i in range(10)))
    out = tmp_path / "out"
    first = C.convert_captions(src, out, maxcount=3, workers=2, verbose=False)
    assert first["shards"] == [f"captions-00000{i}.tar" for i in range(4)] and first["shard_samples"] == [3, 3, 3, 1]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    content = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    (out / "captions-000001.tar").unlink()
    (out / "captions-000001.json").unlink()
    (out / "captions-000001.tar.tmp").write_bytes(b"left by an interrupted run")  # replaced, not appended to
    os.utime(out / "captions-000000.tar", ns=(1, 1))  # a reused shard keeps even an odd mtime

    second = C.convert_captions(src, out, maxcount=3, workers=2, verbose=False)
    assert second["run"]["shards_written"] == 1 and second["run"]["shards_reused"] == 3
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert not (out / "captions-000001.tar.tmp").exists()
    assert after["captions-000000.tar"] == 1
    for name in ("captions-000002.tar", "captions-000003.tar", "captions-000002.json", "captions-000003.json"):
        assert after[name] == before[name]
    assert after["captions-000001.tar"] > before["captions-000001.tar"]
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == content
    strip = lambda d: {k: v for k, v in d.items() if k != "run"}  # noqa: E731
    assert strip(second) == strip(first)
    assert strip(json.loads((out / "dataset.json").read_text())) == strip(first)

    # Other options into the same folder: refused, unless overwrite.
    with pytest.raises(C.ConvertError, match="other options"):
        C.convert_captions(src, out, maxcount=3, workers=1, seed=1, verbose=False)
    third = C.convert_captions(src, out, maxcount=5, workers=1, overwrite=True, verbose=False)
    assert third["shards"] == ["captions-000000.tar", "captions-000001.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == third["shards"]


# -------------------------------------------------------------------------------- readers


def test_resolve_image_path(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    assert C.resolve_image_path(root, "a/b.jpg") == root / "a" / "b.jpg"
    assert C.resolve_image_path(root, str(root / "x.jpg")) == root / "x.jpg"
    for bad, reason in [
        ("../x.jpg", "path_escape"),
        ("a/../../x.jpg", "path_escape"),
        ("a\\..\\x.jpg", "path_escape"),
        ("/etc/passwd", "path_escape"),
        (str(tmp_path / "rootx" / "a.jpg"), "path_escape"),
        ("https://x.org/a.jpg", "url_not_allowed"),
        ("s3://bucket/a.jpg", "url_not_allowed"),
        ("file:///etc/passwd", "url_not_allowed"),
        ("data:image/png;base64,AAAA", "url_not_allowed"),
        ("", "bad_path"),
        (None, "bad_path"),
        (3, "bad_path"),
        ("a\x00.jpg", "bad_path"),
    ]:
        with pytest.raises(C.Skip) as e:
            C.resolve_image_path(root, bad)
        assert e.value.reason == reason, bad


def test_json_array_reader_edges():
    recs = [{"a": 1, "s": 'x]y,z["{}', "u": "é😀"}, 12345678901234567890, [1, [2, 3]], "str", None, 1.5e-3, {}]
    text = json.dumps(recs, ensure_ascii=False, indent=2)
    for bufsize in (1, 3, 7, 64, 1 << 16):
        assert list(C.iter_json_array(io.StringIO(text), bufsize=bufsize)) == recs
    assert list(C.iter_json_array(io.StringIO(" [ ] "))) == []
    for broken in ('[{"a": 1}, {"b": ', '[{"a": 1} {"b": 2}]', '{"a": 1}', '[{"a": 1},'):
        with pytest.raises(C.ConvertError):
            list(C.iter_json_array(io.StringIO(broken), bufsize=4))


def test_json_array_streams_with_bounded_memory(tmp_path):
    path = tmp_path / "big.json"
    n = 20000
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(n):
            f.write(
                ("," if i else "")
                + json.dumps(
                    {
                        "id": i,
                        "image": f"img/{i}.jpg",
                        "conversations": [
                            {"from": "human", "value": "<image>\n" + "question " * 10},
                            {"from": "gpt", "value": "answer " * 10},
                        ],
                    }
                )
                + "\n"
            )
        f.write("]\n")
    size = path.stat().st_size
    assert size > 4_000_000
    tracemalloc.start()
    try:
        count = 0
        for i, rec in enumerate(C.iter_records(path)):
            assert rec["id"] == i
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    # One record plus a 64K-character read buffer (and its copies), whatever the file size (~5.8 MB).
    assert peak < 1_000_000 < size / 5, f"peak {peak} bytes while reading a {size}-byte file"


def test_interrupted_or_crashed_run_resumes(tmp_path, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    root = make_images(tmp_path)
    src = root / "pairs.jsonl"
    src.write_text("\n".join(json.dumps({"image": "red.jpg", "caption": f"Number {i}."}) for i in range(10)))
    out = tmp_path / "out"
    real = C.BUILDERS["captions"]

    def interrupt_at_7(rec, key, ctx):
        if rec["caption"] == "Number 7.":
            raise KeyboardInterrupt
        return real(rec, key, ctx)

    monkeypatch.setitem(C.BUILDERS, "captions", interrupt_at_7)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the middle of shard 2 (in-process writer)
        C.convert_captions(src, out, maxcount=3, workers=1, verbose=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["captions-000000.tar", "captions-000001.tar"]
    assert not (out / "dataset.json").exists()

    def writer_dies(rec, key, ctx):  # a writer process killed (OOM killer, segfault): no hang
        os._exit(1)

    monkeypatch.setitem(C.BUILDERS, "captions", writer_dies)
    with pytest.raises(BrokenProcessPool):
        C.convert_captions(src, out, maxcount=3, workers=2, verbose=False)

    monkeypatch.setitem(C.BUILDERS, "captions", real)
    rep = C.convert_captions(src, out, maxcount=3, workers=2, verbose=False)
    assert rep["run"]["shards_reused"] == 2 and rep["run"]["shards_written"] == 2 and rep["samples"] == 10
