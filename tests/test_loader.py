"""The WebDataset loader on real shards: bad samples are skipped and counted by reason, long samples
are dropped whole, too many failures in a row stop with a clear error, splitting is exact."""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from vlm.data.collate import Collator
from vlm.data.processor import ImageProcessor
from vlm.data.sample import SampleTransform
from vlm.data.template import ChatTemplate
from vlm.data.webdataset import ShardDataset, expand_urls
from vlm.model.projector import visual_token_count
from vlm.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["What color is the circle?", "red", "user\n", "assistant\n"] * 10)


def png(color=(200, 30, 30), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def chat_json(question="What color is the circle?", answer="red") -> bytes:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "media": 0}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
            "meta": {"qtypes": ["color"]},
        }
    ).encode()


def write_shard(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def processor(tok, max_length=128, mode="train"):
    template = ChatTemplate(tok, lambda g: visual_token_count(g, 2), max_length=max_length, merge_size=2)
    return SampleTransform(ImageProcessor(patch_size=8, merge_size=2, image_size=32), template, mode=mode)


def test_bad_samples_are_skipped_and_counted(tmp_path, tok):
    good = [{"__key__": f"good{i}", "json": chat_json(), "0.png": png()} for i in range(5)]
    truncated = png()[:40]
    bad = [
        {"__key__": "corrupt", "json": chat_json(), "0.png": b"\x89PNG garbage"},
        {"__key__": "truncated", "json": chat_json(), "0.png": truncated},
        {"__key__": "empty", "json": chat_json(), "0.png": b""},
        {"__key__": "badjson", "json": b"{not json", "0.png": png()},
        {"__key__": "notobject", "json": b"[1, 2]", "0.png": png()},
        {"__key__": "nomedia", "json": chat_json()},
        {"__key__": "toolong", "json": chat_json(question="What color is the circle? " * 40), "0.png": png()},
    ]
    samples = [good[0], *bad[:4], good[1], good[2], *bad[4:], good[3], good[4]]
    write_shard(tmp_path / "s-000000.tar", samples)
    ds = ShardDataset(str(tmp_path / "s-000000.tar"), processor(tok), train=False)
    out = list(ds)
    assert [s.key for s in out] == [f"good{i}" for i in range(5)]
    counts = Counter()
    for s in out:
        counts.update(s.skipped or {})
    assert counts == Counter(
        {"media_unidentified": 1, "media_corrupt": 1, "media_empty": 1, "bad_json": 2, "template": 1, "too_long": 1}
    )
    # a dropped long sample is never truncated: every kept sample's span is whole
    for s in out:
        assert int((s.input_ids == tok.image_pad_id).sum()) == visual_token_count(s.grids[0], 2)


def test_too_many_consecutive_failures_stop_with_a_clear_error(tmp_path, tok):
    write_shard(tmp_path / "bad.tar", [{"__key__": f"b{i}", "json": b"nope", "0.png": png()} for i in range(10)])
    ds = ShardDataset(str(tmp_path / "bad.tar"), processor(tok), train=False, max_consecutive_failures=5)
    with pytest.raises(RuntimeError, match="bad samples in a row"):
        list(ds)


def test_eval_split_covers_every_sample_once_across_workers(tmp_path, tok):
    for k in range(3):
        write_shard(
            tmp_path / f"e-{k:06d}.tar",
            [{"__key__": f"s{k}_{i}", "json": chat_json(), "0.png": png()} for i in range(4)],
        )
    ds = ShardDataset(str(tmp_path / "e-{000000..000002}.tar"), processor(tok, mode="eval"), train=False)
    loader = DataLoader(ds, batch_size=5, num_workers=2, collate_fn=Collator(tok.pad_id, "left"))
    keys = [k for b in loader for k in b["keys"]]
    assert sorted(keys) == sorted(f"s{k}_{i}" for k in range(3) for i in range(4))


def test_train_stream_resamples_and_batches(tmp_path, tok):
    write_shard(tmp_path / "t.tar", [{"__key__": f"t{i}", "json": chat_json(), "0.png": png()} for i in range(3)])
    ds = ShardDataset(str(tmp_path), processor(tok), train=True, shuffle_buffer=4)
    loader = DataLoader(ds, batch_size=4, collate_fn=Collator(tok.pad_id))
    batch = next(iter(loader))  # more samples than the shard holds: resampled
    assert batch["input_ids"].shape[0] == 4
    assert batch["pixel_patches"].shape == (4 * 16, 3 * 64)
    assert batch["grid_thw"].tolist() == [[1, 4, 4]] * 4
    assert torch.equal(batch["media_per_sample"], torch.ones(4, dtype=torch.long))
    # right padding: labels -100 on pads, mask zero on pads
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_shard_urls_are_untrusted(tmp_path):
    with pytest.raises(ValueError, match="only local files"):
        expand_urls("pipe:curl http://example.com/x.tar")
    with pytest.raises(ValueError, match="only local files"):
        expand_urls("http://example.com/x.tar")
    with pytest.raises(FileNotFoundError):
        expand_urls(str(tmp_path / "none-{000..003}.tar"))
