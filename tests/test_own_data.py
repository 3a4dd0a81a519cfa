"""Training on your own shards: `python train.py data=shards …` is one plain run (no recipe, no
tower warm-up, nothing frozen) unless a recipe is named; the default `data=shards` settings admit
a video; `python -m vlm.cli.train_tokenizer` makes a tokenizer from the shards' text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import CONF, ROOT, TINY
from tests.test_hostile_data import synth_samples, write_tar

VIDEO_CHAT = {
    "messages": [
        {"role": "user", "content": [{"type": "video", "media": 0}, {"type": "text", "text": "What moves?"}]},
        {"role": "assistant", "content": "a red circle"},
    ]
}


def video_sample(key: str) -> list[tuple[str, bytes]]:
    """A 9-frame 80x48 mp4 at 3 fps (what a converter writes for a short clip) with its chat."""
    from PIL import Image

    from vlm.data.video import encode_video

    frames = [Image.new("RGB", (80, 48), (40 * i % 256, 30, 200)) for i in range(9)]
    return [(f"{key}.json", json.dumps(VIDEO_CHAT).encode()), (f"{key}.0.mp4", encode_video(frames, fps=3.0))]


@pytest.fixture(scope="module")
def own_shards(synth_dir, tmp_path_factory) -> Path:
    """Two train shards and a val shard of chat samples with images (and one video), as a user's
    converter would write them; the same folder holds a tokenizer.json for them."""
    root = tmp_path_factory.mktemp("own")
    samples = synth_samples(synth_dir, 12)
    write_tar(root / "train" / "own-000000.tar", [m for s in samples[:6] for m in s] + video_sample("clip0"))
    write_tar(root / "train" / "own-000001.tar", [m for s in samples[6:10] for m in s])
    write_tar(root / "val" / "own-000000.tar", [m for s in samples[10:] for m in s])
    return root


def compose_shards(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=["data=shards", *overrides])


def test_own_data_composes_a_plain_run_unless_a_recipe_is_named():
    base = ["data.train_shards=s", "data.val_shards=v", "data.tokenizer=t.json"]
    for data in (["data=shards", *base], ["data=mix"]):
        cfg = compose_shards(data)
        assert cfg.get("pipeline") is None and "recipe" not in cfg
        assert not any(cfg.model.freeze.values())
    # a recipe named on the command line applies to any data
    assert compose_shards([*base, "pipeline=warmup_train"]).pipeline.name == "warmup_train"
    named = compose_shards([*base, "experiment=synthvqa_default"])
    assert named.pipeline.name == "warmup_train" and named.recipe.freeze_tower is True
    # synthvqa keeps its recipe as the default
    cfg = compose_shards(["data=synthvqa"])
    assert cfg.pipeline.name == "warmup_train" and cfg.model.decoder.qk_norm is True


def test_default_shards_settings_admit_a_short_video(own_shards, synth_dir):
    """A short clip under the default data=shards settings is trained, not skipped as too_long."""
    from vlm.data.sample import SampleTransform
    from vlm.training.datamodule import build_datamodule

    cfg = compose_shards(
        [
            f"data.train_shards={own_shards / 'train'}",
            f"data.val_shards={own_shards / 'val'}",
            f"data.tokenizer={synth_dir / 'synthvqa' / 'tokenizer.json'}",
        ]
    )
    dm = build_datamodule(cfg)
    dm.setup("fit")
    raw = {"__key__": "clip0", **{name.split(".", 1)[1]: data for name, data in video_sample("clip0")}}
    sample = SampleTransform(dm.media_processor, dm.template, mode="train")(raw)
    assert sample.kinds == ["video"] and sample.grids[0][0] >= 2  # more than one frame
    assert len(sample.input_ids) <= cfg.data.template.max_length <= cfg.model.decoder.max_seq_len


def test_train_on_own_shards_is_one_plain_run(own_shards, synth_dir, tmp_path):
    """`python train.py data=shards …` with no recipe named: no warm-up stage, the encoder trains."""
    out = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith(("data.synthetic.", "trainer.max_steps", "pipeline="))]
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "data=shards",
        f"data.train_shards={own_shards / 'train'}",
        f"data.val_shards={own_shards / 'val'}",
        f"data.tokenizer={synth_dir / 'synthvqa' / 'tokenizer.json'}",
        *tiny,
        "trainer.max_steps=2",
        "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint.monitor=null",
        "logger=none",
        "threads=1",
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "stage 1/" not in log and "tower warm-up" not in log and "too_long" not in log, log[-4000:]
    assert (out / "export" / "model.safetensors").is_file() and not (out / "01-warmup").exists()
    ck = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ck["global_step"] == 2
    trained = {g["name"].removesuffix("_no_decay") for g in ck["optimizer_states"][0]["param_groups"]}
    assert {"encoder", "projector", "decoder"} <= trained  # nothing frozen


def test_train_tokenizer_on_own_shards(own_shards, tmp_path, capsys):
    """`python -m vlm.cli.train_tokenizer shards=… out=…`: chat, document and caption text is read,
    a broken shard and a malformed sample are counted and passed over, and the tokenizer it writes
    is what data.tokenizer takes (the model's vocabulary follows it)."""
    from vlm.cli.train_tokenizer import main
    from vlm.tokenizer import TextTokenizer

    extra = tmp_path / "extra"
    doc = {"document": [{"type": "text", "text": "An interleaved page about zebras."}, {"type": "image", "media": 0}]}
    write_tar(
        extra / "more-000000.tar",
        [
            ("doc0.json", json.dumps(doc).encode()),
            ("cap0.jpg", b"not decoded"),
            ("cap0.txt", b"a quokka smiling at the camera"),
            ("bad0.json", b"{not json"),
        ],
    )
    (extra / "more-000001.tar").write_bytes(b"\x00garbage, not a tar" * 50)
    out = tmp_path / "tok" / "tokenizer.json"
    args = [f"shards={own_shards / 'train'}", f"shards={extra}", f"out={out}", "vocab_size=600"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "bad_json 1" in printed and "tar_error 1" in printed, printed
    tok = TextTokenizer.from_file(out)
    assert 300 < tok.vocab_size <= 600
    for word in ("quokka", "zebras"):  # caption and document text were trained in
        assert tok.decode(tok.encode(word)) == word
    assert len(tok.encode(" quokka")) < len(" quokka")

    cfg = compose_shards(
        [f"data.train_shards={own_shards / 'train'}", f"data.val_shards={own_shards / 'val'}", f"data.tokenizer={out}"]
    )
    from vlm.training.datamodule import build_datamodule

    dm = build_datamodule(cfg)
    dm.setup("fit")
    assert dm.tokenizer.vocab_size == tok.vocab_size


def test_train_tokenizer_refuses_with_one_line(tmp_path, capsys):
    from vlm.cli.train_tokenizer import main

    assert main([f"shards={tmp_path / 'none'}", f"out={tmp_path / 't.json'}"]) == 2
    assert main([f"out={tmp_path / 't.json'}"]) == 2  # shards= missing
    err = capsys.readouterr().err
    assert err.count("error:") == 2 and "shards=" in err and "Traceback" not in err
    assert not (tmp_path / "t.json").exists()
