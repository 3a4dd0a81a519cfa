"""Parquet / Arrow converter (vlm.convert.parquet): the three column layouts and a save_to_disk
folder written here with pyarrow, broken rows counted by exact reason, whole-file problems as one
error line, the shards loaded back and trained on, and a run killed mid-way resumed to the same
shards."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_convert import TOKENS_PER_IMAGE, image_bytes, label_text, load, members
from vlm import convert as C
from vlm.convert.parquet import parse_column_map

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
ipc = pytest.importorskip("pyarrow.ipc")

ROOT = Path(__file__).resolve().parents[1]
RED, BLUE = image_bytes("JPEG"), image_bytes("PNG", (30, 70, 220))
TRUNCATED = RED[:200]

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the `datasets` Image feature
SHAREGPT = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))


def turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


def qa(q="<image>\nWhat is it?", a="A square."):
    return turns(("human", q), ("gpt", a))


def sharegpt_table(rows) -> pa.Table:
    schema = pa.schema([("id", pa.string()), ("image", IMAGE), ("conversations", SHAREGPT)])
    return pa.Table.from_pylist(rows, schema=schema)


def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    (root / "blue.png").write_bytes(BLUE)
    (tmp_path / "outside.png").write_bytes(BLUE)
    return root


def sharegpt_rows():
    """(rows, expected skip counts): every rule of the ShareGPT layout once."""
    rows = [
        {"id": "bytes", "image": {"bytes": RED, "path": "red.jpg"}, "conversations": qa()},
        {
            "id": "text",
            "image": None,
            "conversations": turns(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello.")),
        },
        {"id": "path", "image": {"bytes": None, "path": "blue.png"}, "conversations": qa("Colour? <image>", "Blue.")},
        {"id": "missing", "image": None, "conversations": qa()},
        {"id": "nullstruct", "image": {"bytes": None, "path": None}, "conversations": qa()},
        {"id": "truncated", "image": {"bytes": TRUNCATED, "path": None}, "conversations": qa()},
        {"id": "junk", "image": {"bytes": b"not an image", "path": None}, "conversations": qa()},
        {"id": "empty", "image": {"bytes": RED, "path": None}, "conversations": []},
        {"id": "null", "image": {"bytes": RED, "path": None}, "conversations": None},
        {"id": "blank", "image": None, "conversations": turns(("human", " "), ("gpt", ""))},
        {"id": "nomarker", "image": {"bytes": RED, "path": None}, "conversations": qa("What is it?")},
        {"id": "nofile", "image": {"bytes": None, "path": "nope.jpg"}, "conversations": qa()},
        {"id": "escape", "image": {"bytes": None, "path": "../outside.png"}, "conversations": qa()},
        {"id": "roles", "image": None, "conversations": turns(("gpt", "x"), ("human", "y"))},
    ]
    skipped = {
        "bad_roles": 1,
        "empty_conversation": 3,
        "image_marker_mismatch": 1,
        "media_corrupt": 1,
        "media_missing": 1,
        "media_unidentified": 1,
        "missing_image": 2,
        "path_escape": 1,
    }
    return rows, skipped


# ---------------------------------------------------------------------------------- layouts


def test_sharegpt_folder_counts_round_trip_and_wrong_column_type(tmp_path):
    root = image_root(tmp_path)
    src = tmp_path / "ds"
    src.mkdir()
    rows, skipped = sharegpt_rows()
    pq.write_table(sharegpt_table(rows), src / "train-00000-of-00002.parquet", row_group_size=3)
    # A file that lies about its schema: `conversations` is a string column (JSON text), 5 rows.
    liar = pa.table(
        {
            "id": [f"s{i}" for i in range(5)],
            "image": pa.array([{"bytes": RED, "path": None}] * 5, IMAGE),
            "conversations": [json.dumps(qa())] * 5,
        }
    )
    pq.write_table(liar, src / "train-00001-of-00002.parquet")

    rep = C.convert_parquet(src, tmp_path / "out", image_root=root, maxcount=4, workers=2, verbose=False)
    assert rep["records"] == len(rows) + 5 and rep["samples"] == 3 and rep["images"] == 2
    assert rep["skipped"] == {**skipped, "wrong_column_type": 5}
    assert rep["options"]["columns"] == {
        "layout": "conversations",
        "turns": "conversations",
        "image": "image",
        "id": "id",
    }
    assert "column 'conversations' is string" in rep["examples"]["wrong_column_type"][0]
    assert rep["shards"] == ["parquet-000000.tar"]  # 5 chunks of 4; only the first holds good rows

    m = members(tmp_path / "out")
    assert m["parquet-000000-000000.0.jpg"] == RED and m["parquet-000000-000002.0.png"] == BLUE
    assert set(m) == {
        "parquet-000000-000000.json",
        "parquet-000000-000000.0.jpg",
        "parquet-000000-000001.json",
        "parquet-000000-000002.json",
        "parquet-000000-000002.0.png",
    }
    doc = json.loads(m["parquet-000000-000002.json"])
    assert doc["messages"][0]["content"] == [{"type": "text", "text": "Colour?"}, {"type": "image", "media": 0}]
    assert doc["meta"] == {"source": "parquet", "id": "path"}

    tok, got = load(tmp_path / "out", ["What is it?", "A square.", "Be brief.", "Hi", "Hello.", "Colour?", "Blue."])
    a, b, c = (got[f"parquet-000000-00000{i}"] for i in range(3))
    assert label_text(tok, a) == "A square." and (a.input_ids == tok.image_pad_id).sum() == TOKENS_PER_IMAGE
    assert label_text(tok, b) == "Hello." and b.grids == [] and "Be brief." in tok.decode(b.input_ids.tolist())
    assert label_text(tok, c) == "Blue." and len(c.grids) == 1


def test_messages_layout_with_image_items_and_string_content(tmp_path):
    item = pa.struct([("type", pa.string()), ("text", pa.string())])
    schema = pa.schema(
        [
            ("images", pa.list_(IMAGE)),
            ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(item))]))),
        ]
    )

    def msg(n_images, images):
        user = [{"type": "image", "text": None}] * n_images + [{"type": "text", "text": "Which is red?"}]
        return {
            "images": images,
            "messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": [{"type": "text", "text": "The first."}]},
            ],
        }

    two = [{"bytes": RED, "path": None}, {"bytes": BLUE, "path": None}]
    rows = [
        msg(2, two),
        msg(2, [two[0], None]),  # a null element: missing_image
        msg(1, two),  # one image item, two images
        msg(2, [two[0], {"bytes": TRUNCATED, "path": None}]),
        {"images": None, "messages": None},
    ]
    src = tmp_path / "messages.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), src)
    rep = C.convert_parquet(src, tmp_path / "out", maxcount=10, workers=1, verbose=False)
    assert rep["samples"] == 1 and rep["images"] == 2
    assert rep["skipped"] == {
        "empty_conversation": 1,
        "image_marker_mismatch": 1,
        "media_corrupt": 1,
        "missing_image": 1,
    }
    doc = json.loads(members(tmp_path / "out")["parquet-000000-000000.json"])
    assert doc["messages"][0]["content"] == [
        {"type": "image", "media": 0},
        {"type": "image", "media": 1},
        {"type": "text", "text": "Which is red?"},
    ]

    # String content with <image> markers, raw binary images, an `images` column of the wrong type.
    rows = [
        {
            "images": RED,
            "messages": [{"role": "user", "content": "<image> Colour?"}, {"role": "assistant", "content": "Red."}],
        },
        {
            "images": None,
            "messages": [{"role": "user", "content": "<image> Colour?"}, {"role": "assistant", "content": "Red."}],
        },
    ]
    src2 = tmp_path / "messages_str.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src2)
    rep = C.convert_parquet(src2, tmp_path / "out2", maxcount=10, workers=1, verbose=False)
    assert rep["samples"] == 1 and rep["skipped"] == {"missing_image": 1}
    ints = pa.table({"images": [1, 2, 3], "messages": pa.array([rows[0]["messages"]] * 3)})
    pq.write_table(ints, tmp_path / "ints.parquet")
    rep = C.convert_parquet(tmp_path / "ints.parquet", tmp_path / "out3", workers=1, verbose=False)
    assert rep["samples"] == 0 and rep["skipped"] == {"wrong_column_type": 3}
    assert "column 'images' is int64" in rep["examples"]["wrong_column_type"][0]


def cauldron_table(rows) -> pa.Table:
    texts = pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]))
    return pa.Table.from_pylist(rows, schema=pa.schema([("images", pa.list_(IMAGE)), ("texts", texts)]))


def cauldron_rows():
    ex = lambda u, a: {"user": u, "assistant": a, "source": "synthetic"}  # noqa: E731
    red, blue = {"bytes": RED, "path": None}, {"bytes": BLUE, "path": None}
    rows = [
        {"images": [red], "texts": [ex("Colour?", "Red."), ex("Shape?", "A square.")]},
        {"images": [red, blue], "texts": [ex("Same colour?", "No.")]},
        {"images": [red], "texts": []},
        {"images": [{"bytes": TRUNCATED, "path": None}], "texts": [ex("Colour?", "Red.")]},
        {"images": [None], "texts": [ex("Colour?", "Red.")]},
        {"images": [red], "texts": [ex("Colour?", None)]},
    ]
    return rows, {"empty_conversation": 1, "empty_turn": 1, "media_corrupt": 1, "missing_image": 1}


def test_cauldron_layout_images_before_the_first_question(tmp_path):
    rows, skipped = cauldron_rows()
    src = tmp_path / "cauldron.parquet"
    pq.write_table(cauldron_table(rows), src, row_group_size=2)
    rep = C.convert_parquet(src, tmp_path / "out", maxcount=3, workers=2, verbose=False)
    assert rep["samples"] == 2 and rep["images"] == 3 and rep["skipped"] == skipped, rep["examples"]
    m = members(tmp_path / "out")
    doc = json.loads(m["parquet-000000-000001.json"])
    assert [msg["role"] for msg in doc["messages"]] == ["user", "assistant"]
    assert doc["messages"][0]["content"] == [
        {"type": "image", "media": 0},
        {"type": "image", "media": 1},
        {"type": "text", "text": "Same colour?"},
    ]
    assert m["parquet-000000-000001.0.jpg"] == RED and m["parquet-000000-000001.1.png"] == BLUE
    doc = json.loads(m["parquet-000000-000000.json"])
    assert [msg["role"] for msg in doc["messages"]] == ["user", "assistant", "user", "assistant"]


def write_save_to_disk(folder: Path, tables: list[pa.Table]) -> Path:
    """What `datasets.Dataset.save_to_disk` writes: Arrow IPC *stream* files + state/info JSON."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(tables):05d}.arrow" for i in range(len(tables))]
    for name, t in zip(names, tables):
        with pa.OSFile(str(folder / name), "wb") as sink, ipc.new_stream(sink, t.schema) as w:
            for batch in t.to_batches(max_chunksize=2):
                w.write_batch(batch)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names], "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


def test_arrow_save_to_disk_folder_and_ipc_file(tmp_path):
    rows, skipped = cauldron_rows()
    t = cauldron_table(rows)
    folder = write_save_to_disk(tmp_path / "saved" / "train", [t.slice(0, 4), t.slice(4)])
    rep = C.convert_parquet(folder, tmp_path / "out", maxcount=4, workers=1, verbose=False)
    assert rep["records"] == 6 and rep["samples"] == 2 and rep["skipped"] == skipped
    assert rep["options"]["input"]["files"] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    from_parquet = tmp_path / "p.parquet"
    pq.write_table(t, from_parquet)
    ref = C.convert_parquet(from_parquet, tmp_path / "ref", maxcount=4, workers=1, verbose=False)
    assert members(tmp_path / "out") == members(tmp_path / "ref") and ref["skipped"] == rep["skipped"]

    # The IPC *file* format (pyarrow.feather / ipc.new_file) is read too.
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, ipc.new_file(sink, t.schema) as w:
        w.write_table(t, max_chunksize=4)
    rep = C.convert_parquet(tmp_path / "f.arrow", tmp_path / "out_f", maxcount=4, workers=1, verbose=False)
    assert members(tmp_path / "out_f") == members(tmp_path / "ref")

    # A DatasetDict folder: name the split.
    (tmp_path / "saved" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(C.ConvertError, match="DatasetDict.*train"):
        C.convert_parquet(tmp_path / "saved", tmp_path / "out_d", workers=1, verbose=False)


# --------------------------------------------------------------------- columns and bad files


def test_missing_column_and_column_map(tmp_path):
    rows, _ = sharegpt_rows()
    t = sharegpt_table(rows[:3]).rename_columns(["uid", "picture", "dialog"])
    src = tmp_path / "renamed.parquet"
    pq.write_table(t, src)
    with pytest.raises(C.ConvertError) as e:
        C.convert_parquet(src, tmp_path / "o", workers=1, verbose=False)
    assert "no conversation column" in str(e.value) and "columns found: uid, picture, dialog" in str(e.value)
    with pytest.raises(C.ConvertError, match="no image column.*columns found: uid, picture, dialog"):
        C.convert_parquet(src, tmp_path / "o", column_map={"conversations": "dialog"}, workers=1, verbose=False)
    with pytest.raises(C.ConvertError, match="no column 'pic'.*columns found"):
        C.convert_parquet(src, tmp_path / "o", column_map={"conversations": "dialog", "image": "pic"}, verbose=False)

    cmap = parse_column_map(["conversations=dialog", "image=picture,id=uid"])
    root = image_root(tmp_path)
    rep = C.convert_parquet(src, tmp_path / "o", image_root=root, column_map=cmap, workers=1, verbose=False)
    assert rep["samples"] == 3 and rep["skipped"] == {}
    assert json.loads(members(tmp_path / "o")["parquet-000000-000002.json"])["meta"]["id"] == "path"
    # Text-only rows: no image column at all.
    rep = C.convert_parquet(
        src, tmp_path / "o2", column_map={"conversations": "dialog", "image": ""}, workers=1, verbose=False
    )
    assert rep["samples"] == 1 and rep["skipped"] == {"missing_image": 2}  # the two with <image> markers
    for bad in (["conversation=x"], ["image"], ["messages=a,texts=b"]):
        with pytest.raises(C.ConvertError, match="--map"):
            parse_column_map(bad)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlm.cli.convert_parquet", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


def test_truncated_files_and_missing_column_are_one_error_line(tmp_path):
    rows, _ = sharegpt_rows()
    good = tmp_path / "good.parquet"
    pq.write_table(sharegpt_table(rows), good)
    data = good.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) // 2])
    line = one_error_line(run_cli(str(cut), "--out", str(tmp_path / "o")))
    assert "cut.parquet" in line and "not a readable Parquet file" in line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written

    # An Arrow stream cut inside its record batches: the reader stops there, naming the file.
    folder = write_save_to_disk(tmp_path / "saved", [sharegpt_table(rows)])
    arrow = folder / "data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size * 2 // 3])
    line = one_error_line(run_cli(str(folder), "--out", str(tmp_path / "o2"), "--maxcount", "2"))
    assert "data-00000-of-00001.arrow: read error" in line

    line = one_error_line(run_cli(str(good), "--out", str(tmp_path / "o3"), "--map", "messages=msgs"))
    assert "no column 'msgs'" in line and "columns found: id, image, conversations" in line
    assert "--map" in one_error_line(run_cli(str(good), "--out", str(tmp_path / "o3"), "--map", "nonsense"))

    r = run_cli(str(good), "--out", str(tmp_path / "o4"), "--image-root", str(image_root(tmp_path)), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"3 samples written of {len(rows)} records" in r.stdout and "missing_image=2" in r.stdout


def test_without_pyarrow_one_line_naming_the_extra(tmp_path, monkeypatch):
    for mod in ("pyarrow", "pyarrow.parquet", "pyarrow.ipc"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import pyarrow` raises ImportError
    with pytest.raises(C.ConvertError, match=r"pip install -e '\.\[parquet\]'"):
        C.convert_parquet(tmp_path, tmp_path / "o", verbose=False)


# ------------------------------------------------------------------------------------- resume


KILLER = """
import os, signal, sys
from vlm import convert as C
real = C.BUILDERS["parquet"]
def killer(rec, key, ctx):
    if rec.get("id") == sys.argv[3]:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception: as the OOM killer would
    return real(rec, key, ctx)
C.BUILDERS["parquet"] = killer
C.convert_parquet(sys.argv[1], sys.argv[2], maxcount=4, workers=1, verbose=False)
"""


def test_killed_run_resumes_to_the_same_shards_and_counts(tmp_path):
    rows, skipped = sharegpt_rows()
    many = [{**r, "id": f"{r['id']}-{k}"} for k in range(3) for r in rows]  # 42 rows, 11 chunks of 4
    src = tmp_path / "many.parquet"
    pq.write_table(sharegpt_table(many), src, row_group_size=5)
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-c", KILLER, str(src), str(out), "path-1"],  # row 16: the first of chunk 4
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.json")) == [f"parquet-00000{i}.json" for i in range(4)]
    assert (out / "parquet-000004.tar.tmp").exists() and not (out / "dataset.json").exists()

    resumed = C.convert_parquet(src, out, maxcount=4, workers=2, verbose=False)
    assert resumed["run"]["shards_reused"] == 4 and resumed["run"]["shards_written"] == 7
    assert not list(out.glob("*.tmp"))
    clean = C.convert_parquet(src, tmp_path / "clean", maxcount=4, workers=2, verbose=False)
    strip = lambda d: {k: v for k, v in d.items() if k != "run"}  # noqa: E731
    assert strip(resumed) == strip(clean)
    assert members(out) == members(tmp_path / "clean")
    # image_root defaults to the input's folder, which holds no blue.png: "path" rows count as missing too
    assert resumed["skipped"] == {**{k: 3 * v for k, v in skipped.items()}, "media_missing": 6}


# ---------------------------------------------------------------------------------- training


def test_converted_shards_train(tmp_path, capsys):
    """The real train config with `data=shards` on converted Parquet rows: a few optimizer steps."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF, TINY
    from vlm.tokenizer import train_tokenizer
    from vlm.training.train import run

    rows, _ = cauldron_rows()
    good = rows[:2] * 8
    src = tmp_path / "train.parquet"
    pq.write_table(cauldron_table(good), src)
    shards = tmp_path / "shards"
    rep = C.convert_parquet(src, shards, maxcount=8, workers=1, verbose=False)
    assert rep["samples"] == 16 and len(rep["shards"]) == 2
    texts = ["Colour?", "Red.", "Shape?", "A square.", "Same colour?", "No."]
    tok = train_tokenizer(texts * 5 + ["user\n", "assistant\n", "system\n"] * 3)
    tok.save(tmp_path / "tokenizer.json")
    tiny = [o for o in TINY if not o.startswith("data.synthetic.")]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.output_dir={tmp_path / 'run'}",
                f"paths.data_dir={tmp_path}",
                "data=shards",
                *tiny,
                f"data.train_shards={shards}",
                f"data.val_shards={shards}",
                f"data.tokenizer={tmp_path / 'tokenizer.json'}",
                "data.processor.image_size=32",
                "trainer.max_steps=3",
                "trainer.limit_val_batches=1",
                "logger=none",
                "callbacks.model_checkpoint.monitor=null",
            ],
        )
    metrics = run(cfg)
    assert "skipped no training samples" in capsys.readouterr().out  # every converted sample was usable
    loss = float(metrics["train/loss"])
    assert math.isfinite(loss) and loss > 0
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
    assert os.path.getsize(tmp_path / "run" / "export" / "model.safetensors") > 0
