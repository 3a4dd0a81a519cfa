"""Hostile data through the real entry points: shards that never yield a sample stop training with
one clear line instead of spinning; samples of any malformed shape are skipped and counted by
reason in training and in evaluation (never raised, never trained silently); tar headers that
declare huge members are refused before a byte is read; special files on the command line are
refused at once; the per-reason skip summary reaches the console whatever the logger."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import CONF, ROOT, TINY, compose_infer
from vlm.data.tar_reader import ShardErrors, read_samples

GOOD_CHAT = {
    "messages": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
}


def compose_shards(shard: Path, tmp: Path, synth_dir: Path, extra: list[str] = ()):
    """The real train config with `data=shards` over `shard` (train and validation), shrunk."""
    from hydra import compose, initialize_config_dir

    tiny = [o for o in TINY if not o.startswith("data.synthetic.")]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"paths.output_dir={tmp}",
                f"paths.data_dir={synth_dir}",
                "data=shards",
                *tiny,
                f"data.train_shards={shard}",
                f"data.val_shards={shard}",
                f"data.tokenizer={synth_dir / 'synthvqa' / 'tokenizer.json'}",
                "data.processor.image_size=64",
                *extra,
            ],
        )


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of (name, bytes) regular files, in order (duplicates allowed: tarfile does not check)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def synth_samples(synth_dir: Path, n: int) -> list[list[tuple[str, bytes]]]:
    """The first n raw samples of the synthvqa held-out shard, each as its tar members (good, with images)."""
    url = sorted((synth_dir / "synthvqa" / "heldout").glob("*.tar"))[0]
    raws = list(read_samples(str(url), ShardErrors(), 2**30, 2**30))[:n]
    return [[(f"{r['__key__']}.{ext}", data) for ext, data in r.items() if not ext.startswith("__")] for r in raws]


def js(obj) -> bytes:
    return json.dumps(obj).encode()


# key -> (json bytes, reason in training, reason in evaluation)
BAD_SAMPLES = {
    "null_messages": (js({"messages": None}), "bad_json", "bad_json"),
    "number_json": (b"5", "bad_json", "bad_json"),
    "number_messages": (js({"messages": 3}), "bad_json", "bad_json"),
    "deep_json": (b"[" * 100_000 + b"]" * 100_000, "bad_json", "bad_json"),
    "deep_content": (
        js(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
                    }
                ]
            }
        ),
        "bad_json",
        "bad_json",
    ),
    "surrogate": (
        b'{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "red"}]}',
        "bad_text",
        "bad_text",
    ),
    "empty_messages": (js({"messages": []}), "empty", "empty"),
    "no_assistant": (js({"messages": [{"role": "user", "content": "hello"}]}), "no_label", "no_reference"),
    "null_answer": (
        js({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": None}]}),
        "template",
        "no_reference",
    ),
    "meta_not_a_dict": (js({**GOOD_CHAT, "meta": [1, 2]}), None, None),  # accepted: qtype "other"
    "qtypes_a_string": (js({**GOOD_CHAT, "meta": {"qtypes": "color"}}), None, None),
    "role_number": (
        js({"messages": [{"role": 7, "content": "x"}, {"role": "assistant", "content": "y"}]}),
        "template",
        "template",
    ),
    "text_not_str": (
        js(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": {"a": 1}}]},
                    {"role": "assistant", "content": "y"},
                ]
            }
        ),
        "template",
        "template",
    ),
}


def hostile_shard(path: Path, synth_dir: Path) -> Path:
    """Good synthvqa samples interleaved with every bad kind, then the good ones again (same keys)."""
    good = synth_samples(synth_dir, 4)
    members: list[tuple[str, bytes]] = []
    for i, (key, (data, _, _)) in enumerate(BAD_SAMPLES.items()):
        members.append((f"{key}.json", data))
        if i % 3 == 0 and i // 3 < len(good):
            members += good[i // 3]
    members += [m for sample in good for m in sample]  # repeated keys: skipped as duplicate_key
    members.append(("lastgood.json", js(GOOD_CHAT)))
    return write_tar(path, members)


def expected_counts(mode: str) -> Counter:
    col = 1 if mode == "train" else 2
    c = Counter(v[col] for v in BAD_SAMPLES.values() if v[col])
    c["duplicate_key"] = 4  # the four good samples written twice
    return c


def count_train_pass(ds, n_raw: int) -> tuple[list, Counter]:
    """One pass of an unshuffled training stream over a single shard: (good samples, skip counts)."""
    good, skipped = [], Counter()
    for sample in ds:
        skipped.update(sample.skipped or {})
        good.append(sample)
        if len(good) + sum(v for k, v in skipped.items() if not k.startswith("tar_") and k != "duplicate_key") >= n_raw:
            break
    return good, skipped


def test_every_malformed_sample_is_skipped_and_counted_in_training_and_evaluation(synth_dir, tmp_path):
    from vlm.data.processor import ImageProcessor  # noqa: F401  (the synth processor config below)
    from vlm.training.datamodule import VLMDataModule

    shard = hostile_shard(tmp_path / "train" / "h-000000.tar", synth_dir)
    cfg = compose_shards(shard, tmp_path, synth_dir, ["data.shuffle_buffer=1"])
    from vlm.training.datamodule import build_datamodule

    dm: VLMDataModule = build_datamodule(cfg)
    dm.setup("fit")
    raw = list(read_samples(str(shard), ShardErrors(), 2**30, 2**30))
    n_unique = len(raw)
    good_train, skipped = count_train_pass(dm.train_dataloader().dataset, n_unique)
    expected = expected_counts("train")
    assert skipped == expected, (skipped, expected)
    assert all((s.labels >= 0).any() for s in good_train)
    assert {s.key for s in good_train} >= {"meta_not_a_dict", "qtypes_a_string", "lastgood"}

    val = [s for b in dm.val_dataloader() for s in [b]]
    val_skipped = sum((Counter(b["skipped"]) for b in val), Counter())
    assert val_skipped == expected_counts("eval"), val_skipped
    answers = [a for b in val if not b.get("empty") for a in b["answers"]]
    assert answers and all(isinstance(a, str) and a.strip() for a in answers)


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, synth_dir):
    """`vlm.training.train.run` on the hostile shard with no logger: it trains, and prints the skip summary."""
    from vlm.training.train import run

    tmp = tmp_path_factory.mktemp("hostile")
    shard = hostile_shard(tmp / "train" / "h-000000.tar", synth_dir)
    cfg = compose_shards(shard, tmp, synth_dir, ["logger=none", "callbacks.model_checkpoint.monitor=null"])
    return tmp, shard, cfg, run


def test_training_on_hostile_shard_finishes_and_prints_skip_summary(hostile_run, capsys):
    tmp, _, cfg, run = hostile_run
    metrics = run(cfg)
    out = capsys.readouterr().out
    assert "train/loss" in metrics
    line = next(ln for ln in out.splitlines() if ln.startswith("skipped ") and "training samples" in ln)
    reasons = set(re.findall(r"([a-z_]+) \d+", line.split(":", 1)[1]))
    assert reasons and reasons <= set(expected_counts("train")), line
    assert "validation samples" in out  # the validation pass counted its skips too
    assert (tmp / "export" / "model.safetensors").is_file()


def test_evaluation_on_hostile_shard_counts_every_reason(hostile_run, synth_dir, capsys):
    from vlm.serve.infer import run

    tmp, shard, _, _ = hostile_run
    export = tmp / "export"
    if not export.is_dir():
        pytest.skip("needs the training run of the test above")
    cfg = compose_infer(
        [
            f"ckpt={export}",
            "data=synthvqa_heldout",
            f"data.val_shards={shard}",
            "max_new_tokens=4",
            "data.num_workers=0",
        ],
        tmp,
        synth_dir,
    )
    res = run(cfg)
    assert Counter(res["skipped"]) == expected_counts("eval")
    assert res["n"] == 4 + 3  # the 4 good synth samples, lastgood, meta_not_a_dict, qtypes_a_string
    out = capsys.readouterr().out
    assert "evaluation samples: " in out and "no_reference" in out


def _cli(args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "WANDB_MODE": "disabled"},
        stdin=subprocess.DEVNULL,
    )


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    """Exit 2 with exactly one `error:` line and no traceback (Lightning's INFO lines may precede it)."""
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Error:" not in r.stderr.replace(lines[0], ""), r.stderr[-3000:]
    return lines[0]


def test_train_cli_on_shards_that_yield_nothing_stops_with_one_line(synth_dir, tmp_path):
    """A zero-byte shard, random bytes and a tar without KEY.EXT members: training stops at once
    (no endless resampling), naming the shards, with one DataLoader worker in between."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.tar").write_bytes(b"")
    (bad / "random.tar").write_bytes(os.urandom(20_000))
    write_tar(bad / "nokey.tar", [("README", b"hello"), ("dir/file", b"x")])
    r = _cli(
        [
            "train.py",
            "data=shards",
            f"data.train_shards={bad}",
            f"data.val_shards={synth_dir / 'synthvqa' / 'heldout'}",
            f"data.tokenizer={synth_dir / 'synthvqa' / 'tokenizer.json'}",
            "data.num_workers=1",
            "trainer.limit_val_batches=0",
            "trainer.num_sanity_val_steps=0",
            f"hydra.run.dir={tmp_path / 'h'}",
            f"paths.output_dir={tmp_path / 'o'}",
            "logger=none",
            "pipeline=none",
            "model.encoder.dim=32",
            "model.encoder.n_layers=1",
            "model.encoder.n_heads=2",
            "model.decoder.dim=32",
            "model.decoder.n_layers=1",
            "model.decoder.n_heads=2",
            "model.decoder.n_kv_heads=1",
        ]
    )
    line = _one_error_line(r)
    assert "no training shard yields a sample" in line
    for name in ("zero.tar", "random.tar", "nokey.tar"):
        assert name in line
    assert r.stderr.count("skipping shard data") <= 20  # the reader logs a few lines, not millions


def test_shards_mixing_good_and_empty_train_and_read_bad_ones_once(synth_dir, tmp_path):
    """A good shard beside unreadable ones: training goes on; each bad shard is read (and logged) once."""
    from vlm.data.sample import SampleTransform
    from vlm.data.webdataset import ShardDataset
    from vlm.training.datamodule import VLMDataModule

    bad = tmp_path / "mixed"
    bad.mkdir()
    (bad / "a-zero.tar").write_bytes(b"")
    (bad / "b-random.tar").write_bytes(os.urandom(5000))
    shutil.copy(sorted((synth_dir / "synthvqa" / "train").glob("*.tar"))[0], bad / "c-good.tar")
    dm = VLMDataModule(
        str(bad),
        str(synth_dir / "synthvqa" / "heldout"),
        str(synth_dir / "synthvqa" / "tokenizer.json"),
        {"patch_size": 8, "image_size": 64},
        {"max_length": 256},
    )
    dm.setup()
    ds = ShardDataset(str(bad), SampleTransform(dm.media_processor, dm.template), train=True, shuffle_buffer=1)
    counts: Counter = Counter()
    for _, s in zip(range(300), ds):
        counts.update(s.skipped or {})
    assert counts["tar_error"] == 2, counts  # once per bad shard, however often it is picked


def test_tar_headers_are_checked_before_reading(tmp_path):
    """Members over the size cap, links and devices, members without a key, an extension twice in
    one sample: refused from the header and counted; a GNU sparse 2 GiB member never expands."""
    tar = tmp_path / "t.tar"
    with tarfile.open(tar, "w") as t:
        for name, data in [("a.json", js(GOOD_CHAT)), ("big.json", b"x" * 5000), ("c.json", b"{}"), ("c.json", b"{}")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("d.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
        dev = tarfile.TarInfo("e.json")
        dev.type = tarfile.CHRTYPE
        t.addfile(dev)
        info = tarfile.TarInfo("noext")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    errors = ShardErrors()
    got = list(read_samples(str(tar), errors, max_member_bytes=1000, max_sample_bytes=10_000))
    assert [s["__key__"] for s in got] == ["a"]
    assert errors.counts == Counter(tar_member_too_large=1, tar_duplicate_member=1, tar_not_a_file=2, tar_no_key=1)

    if shutil.which("tar") is None:
        pytest.skip("GNU tar makes the sparse member")
    src = tmp_path / "sparse"
    src.mkdir()
    (src / "k.json").write_bytes(js(GOOD_CHAT))
    with open(src / "k.0.png", "wb") as f:
        f.truncate(2 * 2**30)  # 2 GiB of holes: a few KB in the tar
    bomb = tmp_path / "bomb.tar"
    subprocess.run(["tar", "-S", "--format=gnu", "-C", str(src), "-cf", str(bomb), "k.json", "k.0.png"], check=True)
    assert bomb.stat().st_size < 100_000
    errors = ShardErrors()
    got = list(read_samples(str(bomb), errors, max_member_bytes=128 * 2**20, max_sample_bytes=512 * 2**20))
    assert got == [] and errors.counts == Counter(tar_member_too_large=1)


def test_infer_refuses_special_files_at_once(hostile_run, tmp_path):
    """`image=/dev/zero` would read forever, `image=` a named pipe would block: both are refused."""
    tmp = hostile_run[0]
    export = tmp / "export"
    if not export.is_dir():
        pytest.skip("needs the training run above")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for image in ("/dev/zero", str(fifo)):
        r = _cli(
            ["infer.py", f"ckpt={export}", f"image={image}", "prompt=hi", f"hydra.run.dir={tmp_path / 'h'}"],
            timeout=120,
        )
        line = _one_error_line(r)
        assert "not a regular file" in line, line
    r = _cli(
        ["infer.py", f"ckpt={export}", f"video={fifo}", "prompt=hi", f"hydra.run.dir={tmp_path / 'h'}"], timeout=120
    )
    assert "not a regular file" in _one_error_line(r)
