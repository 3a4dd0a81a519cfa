"""End to end with the real config, real shards, a real Lightning Trainer:
train -> checkpoint + export -> reload (identical logits) -> infer (stream + evaluate) -> CLI errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, compose_infer, compose_train
from vlm.checkpoint.load import CheckpointError, load_checkpoint
from vlm.data.collate import collate
from vlm.data.sample import SampleTransform
from vlm.data.webdataset import ShardDataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_dir):
    from vlm.training.train import run

    out = tmp_path_factory.mktemp("run")
    cfg = compose_train(["logger=csv"], out, synth_dir)
    metrics = run(cfg)
    return out, metrics, cfg


def test_train_writes_checkpoints_export_and_metrics(trained):
    out, metrics, _ = trained
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert {"config.yaml", "model.safetensors", "tokenizer.json"} <= {p.name for p in (out / "export").iterdir()}
    assert "train/loss" in metrics and torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert "val/accuracy" in metrics and 0.0 <= metrics["val/accuracy"] <= 1.0
    assert any(k.startswith("val/cer_") for k in metrics) and all(
        metrics[k] >= 0 for k in metrics if k.startswith("val/cer_")
    )
    # the CSV logger saw the per-step metrics
    csv = next((out / "csv").rglob("metrics.csv")).read_text()
    for name in ("train/loss", "train/grad_norm", "train/image_tok_s", "train/text_tok_s", "lr-AdamW"):
        assert name in csv.splitlines()[0], name


def _heldout_batch(loaded, synth_dir, n=6):
    proc = SampleTransform(loaded.processor, loaded.template, mode="eval")
    ds = ShardDataset(str(synth_dir / "synthvqa" / "heldout"), proc, train=False)
    samples = [s for _, s in zip(range(n), ds)]
    return collate(samples, loaded.tokenizer.pad_id, "left")


def test_reload_gives_identical_logits(trained, synth_dir):
    out, _, _ = trained
    a = load_checkpoint(out / "checkpoints" / "last.ckpt")
    b = load_checkpoint(out / "export")
    assert a.processor == b.processor
    batch = _heldout_batch(a, synth_dir)
    keys = ("input_ids", "position_ids", "attention_mask", "pixel_patches", "grid_thw", "media_per_sample", "keys")
    with torch.no_grad():
        la = a.model.logits(a.model(*(batch[k] for k in keys)))
        lb = b.model.logits(b.model(*(batch[k] for k in keys)))
    assert torch.equal(la, lb)
    # and they are the trained weights, not a fresh init
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    w = ckpt["state_dict"]["model.decoder.layers.0.mlp.up_proj.weight"]
    assert torch.equal(a.model.decoder.layers[0].mlp.up_proj.weight, w)


def test_infer_streams_an_answer(trained, synth_dir, tmp_path, capsys):
    from vlm.serve.infer import run

    out, _, _ = trained
    img = tmp_path / "img.png"
    Image.new("RGB", (80, 50), (250, 250, 250)).save(img)
    for ckpt in (out / "export", out / "checkpoints" / "last.ckpt"):
        cfg = compose_infer(
            [f"ckpt={ckpt}", f"image={img}", "prompt=What color is the circle?", "max_new_tokens=5"],
            tmp_path,
            synth_dir,
        )
        res = run(cfg)
        printed = capsys.readouterr().out
        assert printed.strip() == res["answer"].strip()
    # sampling knobs are accepted and seeded
    cfg = compose_infer(
        [
            f"ckpt={out / 'export'}",
            f"image={img}",
            "prompt=Describe the image.",
            "temperature=0.8",
            "top_p=0.9",
            "max_new_tokens=5",
        ],
        tmp_path,
        synth_dir,
    )
    first = run(cfg)["answer"]
    assert run(cfg)["answer"] == first


def test_infer_evaluates_heldout(trained, synth_dir, tmp_path, capsys):
    from vlm.serve.infer import run

    out, _, _ = trained
    preds = tmp_path / "preds.jsonl"
    cfg = compose_infer(
        [f"ckpt={out / 'export'}", "data=synthvqa_heldout", f"out={preds}", "max_new_tokens=8"], tmp_path, synth_dir
    )
    res = run(cfg)
    assert res["n"] == 40
    table = capsys.readouterr().out
    assert "| question type | n | exact match | character error rate |" in table and "mean over types" in table
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 40 and {"key", "qtype", "question", "answer", "prediction", "correct"} <= set(rows[0])
    # the CER per type is the written predictions' edits over their reference characters
    from vlm.evaluation.metrics import edit_distance, normalize_answer

    for q in {r["qtype"] for r in rows}:
        mine = [r for r in rows if r["qtype"] == q]
        edits = sum(edit_distance(normalize_answer(r["prediction"]), normalize_answer(r["answer"])) for r in mine)
        chars = sum(len(normalize_answer(r["answer"])) for r in mine)
        assert res["cer"][q] == pytest.approx(edits / chars)


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_checkpoint(junk)
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="not an export folder"):
        load_checkpoint(tmp_path / "folder")


def test_checkpoint_config_cannot_name_arbitrary_code(trained, tmp_path):
    import shutil

    out, _, _ = trained
    evil = tmp_path / "evil"
    shutil.copytree(out / "export", evil)
    text = (evil / "config.yaml").read_text().replace("vlm.model.vision.VisionEncoder", "os.system")
    (evil / "config.yaml").write_text(text)
    with pytest.raises(ValueError, match="refusing to build"):
        load_checkpoint(evil)


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "WANDB_MODE": "disabled"},
    )


def test_infer_cli_bad_inputs_give_one_clear_line(trained, tmp_path):
    out, _, _ = trained
    good = tmp_path / "ok.png"
    Image.new("RGB", (64, 64), "white").save(good)
    fake = tmp_path / "fake.png"
    fake.write_text("this is not an image")
    trunc = tmp_path / "trunc.png"
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "PNG")
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    cases = {
        "wrong checkpoint": [f"ckpt={tmp_path / 'nope.ckpt'}", f"image={good}", "prompt=hi"],
        "missing image": [f"ckpt={out / 'export'}", f"image={tmp_path / 'missing.png'}", "prompt=hi"],
        "unreadable image": [f"ckpt={out / 'export'}", f"image={fake}", "prompt=hi"],
        "truncated image": [f"ckpt={out / 'export'}", f"image={trunc}", "prompt=hi"],
    }
    for name, args in cases.items():
        r = _cli(["infer.py", *args, f"hydra.run.dir={tmp_path / 'h'}"])
        assert r.returncode == 2, (name, r.stderr[-2000:])
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, r.stderr[-2000:])
        assert "Traceback" not in r.stderr


def test_train_cli_sweep(synth_dir, tmp_path):
    """`python train.py -m optimizer.lr=a,b` runs one job per value through the real Hydra entry."""
    from tests.conftest import TINY

    args = [
        "train.py",
        "-m",
        "optimizer.lr=1e-3,3e-3",
        "logger=none",
        f"paths.data_dir={synth_dir}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        "trainer.max_steps=2",
        *TINY,
    ]
    args = [a for a in args if not a.startswith("trainer.max_steps=4")]
    r = _cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / "multirun" / job / "export" / "model.safetensors").is_file()
    lrs = sorted((tmp_path / "multirun" / j / ".hydra" / "overrides.yaml").read_text() for j in ("0", "1"))
    assert "optimizer.lr=0.001" in lrs[0] and "optimizer.lr=0.003" in lrs[1]


def test_train_cli_wrong_path_is_one_line(synth_dir, tmp_path):
    """A user's own shards path that does not exist: one `error:` line, exit 2, no traceback."""
    r = _cli(
        [
            "train.py",
            "data=shards",
            "data.train_shards=/nonexistent/shards",
            "data.val_shards=/nonexistent/heldout",
            f"data.tokenizer={synth_dir / 'synthvqa' / 'tokenizer.json'}",
            f"hydra.run.dir={tmp_path / 'h'}",
            "logger=none",
        ]
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip() and "Seed set" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "/nonexistent" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
