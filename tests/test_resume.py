"""Exact resume (torchtitan style): a run stopped at step 3 and resumed with `ckpt_path=` logs the
same per-step losses, bit for bit, as an uninterrupted 6-step run — real config, real shards,
real Trainer, with the data read in the main process and by a DataLoader worker, and from a
checkpoint in the layout written before the datamodule kept the data position."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import compose_train


def _losses(out: Path) -> dict[int, str]:
    """step -> logged train/loss (as written: exact decimal text) from every CSV version in `out`."""
    losses = {}
    for f in sorted(out.rglob("metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("train/loss"):
                losses[int(row["step"])] = row["train/loss"]
    return losses


def _run(out: Path, synth_dir: Path, steps: int, workers: int, resume: Path | None = None) -> dict[int, str]:
    from vlm.training.train import run

    overrides = [
        "logger=csv",
        f"trainer.max_steps={steps}",
        "scheduler.total_steps=6",
        f"data.num_workers={workers}",
        "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1",
        "+callbacks.model_checkpoint.every_n_train_steps=3",
        "~callbacks.export",
    ]
    if resume is not None:
        overrides.append(f"ckpt_path={resume}")
    run(compose_train(overrides, out, synth_dir))
    return _losses(out)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, synth_dir) -> dict[int, str]:
    """The losses of an uninterrupted 6-step run."""
    losses = _run(tmp_path_factory.mktemp("straight"), synth_dir, 6, 0)
    assert sorted(losses) == [0, 1, 2, 3, 4, 5]
    return losses


def test_resume_is_bit_identical(tmp_path, synth_dir, straight):
    for workers in (0, 1):
        first = _run(tmp_path / f"first{workers}", synth_dir, 3, workers)
        ckpt = tmp_path / f"first{workers}" / "checkpoints" / "step000003.ckpt"
        assert ckpt.is_file()
        second = _run(tmp_path / f"second{workers}", synth_dir, 6, workers, ckpt)
        assert sorted(second) == [3, 4, 5], second
        assert {**first, **second} == straight, (workers, first, second, straight)


def to_old_layout(ckpt: dict) -> dict:
    """A checkpoint as written before the datamodule saved its own state (`VLMDataModule` entry)
    and the gradient step its counters: each rank's stream positions were `data` and the skip
    count `skipped_steps` in that rank's entry of the module's `vlm_resume`."""
    ckpt = dict(ckpt)
    positions = ckpt.pop("VLMDataModule")
    assert positions["world_size"] == ckpt["vlm_resume"]["world_size"]
    for rank, data in zip(ckpt["vlm_resume"]["ranks"], positions["ranks"]):
        rank["data"] = data
        rank["skipped_steps"] = rank.pop("gradient_step")["skipped_steps"]
    return ckpt


def test_resume_from_a_checkpoint_in_the_old_layout(tmp_path, synth_dir, straight):
    """Checkpoints written before the data position moved to the datamodule still resume
    exactly: the positions are taken from the module's entry."""
    first = _run(tmp_path / "first", synth_dir, 3, 1)
    ckpt = torch.load(tmp_path / "first" / "checkpoints" / "step000003.ckpt", weights_only=True)
    (mine,) = ckpt["VLMDataModule"]["ranks"]
    assert ckpt["VLMDataModule"]["step"] == 3 and any(any(p) for p in mine["points"])  # a real position
    old = tmp_path / "old.ckpt"
    torch.save(to_old_layout(ckpt), old)
    assert "VLMDataModule" not in torch.load(old, weights_only=True)
    second = _run(tmp_path / "second", synth_dir, 6, 1, old)
    assert sorted(second) == [3, 4, 5] and {**first, **second} == straight, (first, second, straight)


def test_stream_resume_across_blocks_and_workers(tmp_path, synth_dir):
    """Dataset level: positions taken from what was consumed (not what workers prefetched)
    continue every worker's stream exactly, also across stream blocks."""
    from vlm.build.model import build_processor, build_template, geometry_of
    from vlm.data.collate import Collator
    from vlm.data.sample import SampleTransform
    from vlm.data.webdataset import ShardDataset, StreamTracker
    from vlm.tokenizer import TextTokenizer

    cfg = compose_train([], tmp_path, synth_dir)
    tok = TextTokenizer.from_file(synth_dir / "synthvqa" / "tokenizer.json")
    geo = geometry_of(cfg.model)
    proc = SampleTransform(
        build_processor(dict(cfg.data.processor), geometry=geo),
        build_template(dict(cfg.data.template), tok, geometry=geo),
    )

    def loader(resume=None):
        ds = ShardDataset(
            str(synth_dir / "synthvqa" / "train"), proc, train=True, shuffle_buffer=4, block_samples=7, resume=resume
        )
        return DataLoader(ds, batch_size=3, num_workers=2, collate_fn=Collator(tok.pad_id), prefetch_factor=2)

    straight = [b["keys"] for _, b in zip(range(10), loader())]
    assert len({k for keys in straight for k in keys}) > 7  # blocks do not cut shards short
    dl, tracker = loader(), StreamTracker()
    it = iter(dl)
    for _ in range(5):  # an odd count: the workers have delivered different numbers of batches
        tracker.on_batch(dl, len(next(it)["keys"]))
    state = tracker.state(dl)
    del it
    resumed = [b["keys"] for _, b in zip(range(5), loader({"state": state, "step": 5}))]
    assert resumed == straight[5:]
    # a different worker count cannot continue the streams: reseeded, and says so
    ds = ShardDataset(
        str(synth_dir / "synthvqa" / "train"),
        proc,
        train=True,
        shuffle_buffer=4,
        block_samples=7,
        resume={"state": state, "step": 5},
    )
    assert ds._start(0, 3)[2] == "r5"
