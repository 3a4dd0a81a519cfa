"""Exact resume (torchtitan style): a run stopped at step 3 and resumed with `ckpt_path=` logs the
same per-step losses, bit for bit, as an uninterrupted 6-step run — real config, real shards,
real Trainer, with the data read in the main process and by a DataLoader worker."""

from __future__ import annotations

import csv
from pathlib import Path

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
    from vlm.train import run

    overrides = [
        "logger=csv", f"trainer.max_steps={steps}", "scheduler.total_steps=6", f"data.num_workers={workers}",
        "trainer.limit_val_batches=0", "callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.save_top_k=-1",
        "+callbacks.model_checkpoint.every_n_train_steps=3", "~callbacks.export",
    ]
    if resume is not None:
        overrides.append(f"ckpt_path={resume}")
    run(compose_train(overrides, out, synth_dir))
    return _losses(out)


def test_resume_is_bit_identical(tmp_path, synth_dir):
    straight = _run(tmp_path / "straight", synth_dir, 6, 0)
    assert sorted(straight) == [0, 1, 2, 3, 4, 5]
    for workers in (0, 1):
        first = _run(tmp_path / f"first{workers}", synth_dir, 3, workers)
        ckpt = tmp_path / f"first{workers}" / "checkpoints" / "step000003.ckpt"
        assert ckpt.is_file()
        second = _run(tmp_path / f"second{workers}", synth_dir, 6, workers, ckpt)
        assert sorted(second) == [3, 4, 5], second
        assert {**first, **second} == straight, (workers, first, second, straight)


def test_stream_resume_across_blocks_and_workers(tmp_path, synth_dir):
    """Dataset level: positions taken from what was consumed (not what workers prefetched)
    continue every worker's stream exactly, also across stream blocks."""
    from vlm.build import build_processor, build_template
    from vlm.data.collate import Collator
    from vlm.data.sample import SampleProcessor
    from vlm.data.webdataset import ShardDataset, StreamTracker, set_resume_state
    from vlm.tokenizer import TextTokenizer

    cfg = compose_train([], tmp_path, synth_dir)
    tok = TextTokenizer.from_file(synth_dir / "synthvqa" / "tokenizer.json")
    proc = SampleProcessor(build_processor(dict(cfg.data.processor)), build_template(dict(cfg.data.template), tok))

    def loader():
        ds = ShardDataset(str(synth_dir / "synthvqa" / "train"), proc, train=True, shuffle_buffer=4, block_samples=7)
        return DataLoader(ds, batch_size=3, num_workers=2, collate_fn=Collator(tok.pad_id), prefetch_factor=2)

    straight = [b["keys"] for _, b in zip(range(10), loader())]
    assert len({k for keys in straight for k in keys}) > 7  # blocks do not cut shards short
    dl, tracker = loader(), StreamTracker()
    it = iter(dl)
    for _ in range(5):  # an odd count: the workers have delivered different numbers of batches
        tracker.on_batch(dl, len(next(it)["keys"]))
    state = tracker.state(dl)
    del it
    set_resume_state(state, step=5)
    resumed = [b["keys"] for _, b in zip(range(5), loader())]
    assert resumed == straight[5:]
    # a different worker count cannot continue the streams: reseeded, and says so
    set_resume_state(state, step=5)
    ds = ShardDataset(str(synth_dir / "synthvqa" / "train"), proc, train=True, shuffle_buffer=4, block_samples=7)
    assert ds._start(0, 3)[2] == "r5"
