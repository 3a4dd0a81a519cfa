"""`data=mix`: weighted sources with task templates — chat shards, our caption shards, raw
img2dataset-style caption shards (KEY.jpg + KEY.txt) — through the real loader and Trainer, with
the per-source counts the trainer logs."""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest
import torch
import webdataset as wds
from PIL import Image

from tests.conftest import compose_train


def _jpeg(color) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (48, 40), color).save(b, "JPEG", quality=90)
    return b.getvalue()


def img2dataset_shard(path, n=20, bad=()):
    """LAION / img2dataset layout: KEY.jpg, KEY.txt and a metadata KEY.json that is not ours."""
    with wds.TarWriter(str(path)) as w:
        for i in range(n):
            s = {
                "__key__": f"{i:06d}",
                "jpg": _jpeg((10 * i % 255, 80, 160)),
                "txt": b"a red square",
                "json": json.dumps({"url": "http://example.com", "width": 48}).encode(),
            }
            if i in bad:
                s["txt"] = b"   "  # an empty caption: skipped and counted
            w.write(s)


def our_caption_shard(tmp_path, n=12):
    from vlm.convert import convert_captions

    folder = tmp_path / "caps"
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / f"im{i}.png")
        (folder / f"im{i}.txt").write_text("a red square")
    convert_captions(folder, tmp_path / "caps_shards", maxcount=6, workers=1, verbose=False)
    return tmp_path / "caps_shards"


def test_caption_task_builds_chat_samples(tmp_path):
    from vlm.data.mixture import CaptionTask
    from vlm.data.sample import SampleError

    task = CaptionTask(["Describe it.", "What is this?"], seed=0)
    raw = {"__key__": "k1", "jpg": _jpeg((1, 2, 3)), "txt": b" a cat ", "json": b'{"url": "x"}'}
    out = task(raw)
    msg = json.loads(out["json"])["messages"]
    assert msg[0]["content"][1]["text"] in ("Describe it.", "What is this?") and msg[1]["content"][0]["text"] == "a cat"
    assert set(out) == {"__key__", "json", "0.jpg"}
    assert task(raw) == out  # the prompt is seeded by the key
    for bad, reason in (
        ({"__key__": "k", "jpg": b"x"}, "no_caption"),
        ({"__key__": "k", "txt": b"cat"}, "bad_media_index"),
        ({"__key__": "k", "jpg": b"x", "txt": b"  "}, "empty_caption"),
        ({"__key__": "k", "jpg": b"x", "txt": b"\xff\xfe"}, "bad_text"),
    ):
        with pytest.raises(SampleError) as e:
            task(bad)
        assert e.value.reason == reason
    with pytest.raises(ValueError, match="prompt strings"):
        CaptionTask([""])


def test_weighted_mixture_through_the_loader(tmp_path, synth_dir):
    from vlm.training.datamodule import build_datamodule

    img2dataset_shard(tmp_path / "laion-000000.tar", bad=(3,))
    caps = our_caption_shard(tmp_path)
    sources = [
        {"name": "synth", "shards": str(synth_dir / "synthvqa" / "train"), "weight": 3.0, "task": "chat"},
        {
            "name": "laion",
            "shards": str(tmp_path / "laion-000000.tar"),
            "weight": 1.0,
            "task": "caption",
            "prompts": ["Describe the image."],
        },
        {
            "name": "caps",
            "shards": str(caps),
            "weight": 1.0,
            "task": "caption",
            "prompts": ["What is in this picture?"],
        },
    ]
    cfg = compose_train(["data.batch_size=16", "data.num_workers=1"], tmp_path, synth_dir)
    cfg.data.sources = sources
    cfg.data.train_shards = None
    dm = build_datamodule(cfg)
    dm.setup("fit")
    counts, skipped, prompts = Counter(), Counter(), Counter()
    tok = dm.tokenizer
    for _, b in zip(range(40), dm.train_dataloader()):
        counts.update(b["sources"])
        skipped.update(b["skipped"])
        for ids, _src in zip(b["input_ids"], b["keys"]):
            text = tok.decode(ids.tolist())
            for p in ("Describe the image.", "What is in this picture?"):
                prompts[p] += p in text
    n = sum(counts.values())
    assert n == 640 and set(counts) == {"synth", "laion", "caps"}
    assert abs(counts["synth"] / n - 0.6) < 0.07 and abs(counts["laion"] / n - 0.2) < 0.06, counts
    assert prompts["Describe the image."] > 0 and prompts["What is in this picture?"] > 0
    assert skipped["empty_caption"] >= 1  # the blank caption in the img2dataset shard


def test_mixture_trains_and_logs_per_source_counts(tmp_path, synth_dir):
    from vlm.training.train import run

    img2dataset_shard(tmp_path / "laion-000000.tar")
    cfg = compose_train(
        [
            "logger=csv",
            "trainer.limit_val_batches=0",
            "callbacks.model_checkpoint.monitor=null",
            "data.packing=true",
            "data.pack_window=8",
            "data.batch_size=2",
        ],
        tmp_path,
        synth_dir,
    )
    cfg.data.sources = [
        {"name": "synth", "shards": str(synth_dir / "synthvqa" / "train"), "weight": 1.0, "task": "chat"},
        {"name": "laion", "shards": str(tmp_path / "laion-000000.tar"), "weight": 1.0, "task": "caption"},
    ]
    metrics = run(cfg)
    assert metrics["data/source_synth"] > 0 and metrics["data/source_laion"] > 0
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_mixture_config_errors(tmp_path, synth_dir):
    from vlm.data.mixture import MixtureDataset
    from vlm.training.datamodule import build_datamodule

    base = str(synth_dir / "synthvqa" / "train")
    for sources, match in (
        ([], "empty"),
        ([{"name": "a", "shards": base}, {"name": "a", "shards": base}], "distinct"),
        ([{"name": "a", "shards": base, "weight": -1}], "weight"),
        ([{"name": "a", "shards": base, "weight": 0}], "at least one weight"),
        ([{"name": "a", "shards": base, "task": "vqa"}], "task must be one of"),
    ):
        with pytest.raises(ValueError, match=match):
            MixtureDataset(sources, processor=None)
    cfg = compose_train([], tmp_path, synth_dir)
    cfg.data.sources = [{"name": "gone", "shards": str(tmp_path / "missing-{000000..000001}.tar")}]
    dm = build_datamodule(cfg)
    with pytest.raises(FileNotFoundError, match=r"data.sources\[gone\].shards"):
        dm.setup("fit")
