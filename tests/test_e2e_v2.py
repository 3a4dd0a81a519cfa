"""synthvqa v2 end to end with the real config (experiment=synthvqa_v2_dynamic: dynamic resolution,
M-RoPE, rope2d + 2-frame temporal patches), shrunk: generate -> train -> checkpoint + export (the
video processor config travels with it) -> reload -> infer with several images and a video ->
evaluate per v2 qtype."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.conftest import compose_infer, compose_train
from vlm.checkpoint.load import load_checkpoint
from vlm.data.collate import collate
from vlm.data.sample import SampleTransform
from vlm.data.video import encode_video
from vlm.data.webdataset import ShardDataset
from vlm.synthvqa import QTYPES_V2

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def trained_v2(tmp_path_factory):
    from vlm.training.train import run

    out = tmp_path_factory.mktemp("run_v2")
    data = tmp_path_factory.mktemp("data_v2")
    cfg = compose_train(["experiment=synthvqa_v2_dynamic", "logger=csv"], out, data)
    metrics = run(cfg)
    return out, data, metrics


def test_v2_train_export_and_config(trained_v2):
    out, data, metrics = trained_v2
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert "val/accuracy" in metrics and any(f"val/acc_{q}" in metrics for q in QTYPES_V2)
    info = json.loads((data / "synthvqa_v2" / "dataset.json").read_text())
    assert set(QTYPES_V2) <= set(info["splits"]["heldout"]["qtypes"])
    exp = load_checkpoint(out / "export")
    ckpt = load_checkpoint(out / "checkpoints" / "last.ckpt")
    for loaded in (exp, ckpt):
        assert loaded.processor.resolution == "dynamic" and loaded.processor.temporal_patch == 2
        assert loaded.processor.video.max_video_tokens == 256
        assert loaded.model.encoder.pos == "rope2d" and loaded.model.decoder.rope == "mrope"
        assert loaded.template.rope == "mrope"
        assert set(QTYPES_V2) <= set(loaded.config["val_qtypes"])
    assert exp.processor == ckpt.processor
    # the same heldout batch (images, multi-image, videos) gives identical logits from both
    proc = SampleTransform(exp.processor, exp.template, mode="eval")
    ds = ShardDataset(str(data / "synthvqa_v2" / "heldout"), proc, train=False)
    samples = list(ds)
    kinds = {tuple(s.kinds) for s in samples}
    assert ("video",) in kinds and ("image", "image") in kinds
    batch = collate(samples[:12], exp.tokenizer.pad_id, "left")
    keys = ("input_ids", "position_ids", "attention_mask", "pixel_patches", "grid_thw", "media_per_sample", "keys")
    with torch.no_grad():
        la = exp.model.logits(exp.model(*(batch[k] for k in keys)))
        lb = ckpt.model.logits(ckpt.model(*(batch[k] for k in keys)))
    assert torch.equal(la, lb)


def test_v2_infer_images_and_video(trained_v2, tmp_path, capsys):
    from vlm.serve.infer import run

    out, data, _ = trained_v2
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (64, 64), (240, 240, 240)).save(a)
    Image.new("RGB", (96, 40), (30, 70, 220)).save(b)
    frames = [Image.new("RGB", (64, 64), (240, 240, 240)) for _ in range(4)]
    for i, f in enumerate(frames):
        f.paste((220, 30, 30), (4 + 10 * i, 20, 16 + 10 * i, 32))
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(encode_video(frames, 2.0))
    fdir = tmp_path / "frames"
    fdir.mkdir()
    for i, f in enumerate(frames):
        f.save(fdir / f"{i:03d}.png")
    runs = {
        "two images": [f"image=[{a},{b}]", "prompt='Which image has more shapes, the first or the second?'"],
        "video": [f"video={clip}", "prompt=Which way is the red square moving?"],
        "frame folder": [f"video={fdir}", "prompt=Which way is the red square moving?"],
        "images + video": [f"image=[{a},{b}]", f"video={clip}", "prompt=Describe the image."],
    }
    for name, args in runs.items():
        cfg = compose_infer([f"ckpt={out / 'export'}", "max_new_tokens=4", *args], tmp_path, data)
        res = run(cfg)
        printed = capsys.readouterr().out
        assert printed.strip() == res["answer"].strip(), name
    # evaluation on the v2 heldout: a row per v2 qtype
    cfg = compose_infer(
        [f"ckpt={out / 'export'}", "data=synthvqa_v2_heldout", f"out={tmp_path / 'p.jsonl'}", "max_new_tokens=4"],
        tmp_path,
        data,
    )
    res = run(cfg)
    assert res["n"] == 40
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert {r["qtype"] for r in rows} & set(QTYPES_V2)
