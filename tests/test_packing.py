"""Sequence packing: the packers, forward parity with the unpacked batch (block-diagonal attention,
positions restarting per sample, media per item), exact stream resume with packed rows, and the
padding it saves."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import compose_train
from vlm.data.collate import Collator, collate
from vlm.data.packing import best_fit_decreasing, greedy, pack, padding_fraction
from vlm.data.template import IGNORE


@pytest.mark.parametrize("packer", [best_fit_decreasing, greedy])
def test_packers_place_every_item_once_within_capacity(packer):
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 60))]
        bins = packer(lengths, 128)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 128 for b in bins) and all(b == sorted(b) for b in bins)
    lengths = [rng.choice([10, 20, 30, 200, 380]) for _ in range(400)]  # long-tailed
    assert len(best_fit_decreasing(lengths, 384)) <= len(greedy(lengths, 384))
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing([10, 500], 384)


def _setup(tmp_path, synth_dir, overrides=()):
    from vlm.training.datamodule import build_datamodule

    cfg = compose_train(list(overrides), tmp_path, synth_dir)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    from vlm.build.model import build_model

    torch.manual_seed(0)
    model = build_model(dict(cfg.model), dm.tokenizer).eval()
    return cfg, dm, model


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.decoder.rope=mrope", "model.image_attention=bidirectional"],
        ["model.packed_attention=flex", "model.image_attention=bidirectional"],
    ],
    ids=["rope-causal", "mrope-bidirectional", "flex-bidirectional"],
)
def test_packed_forward_equals_unpacked(tmp_path, synth_dir, overrides):
    """Every sample's logits in a packed row equal its logits alone in an unpacked batch, and the
    loss sums and label counts agree."""
    from vlm.data.sample import SampleTransform
    from vlm.data.webdataset import ShardDataset

    _, dm, model = _setup(tmp_path, synth_dir, ["model.decoder.n_layers=2", *overrides])
    proc = SampleTransform(dm.media_processor, dm.template, mode="train")
    ds = ShardDataset(str(synth_dir / "synthvqa" / "train"), proc, train=False)
    samples = [s for _, s in zip(range(9), ds)]
    rows = pack(samples, 3 * max(s.input_ids.numel() for s in samples), "best_fit")
    assert len(rows) < len(samples) and sum(len(r.seq_lens) for r in rows) == len(samples)
    flat = collate(samples, dm.tokenizer.pad_id)
    packed = collate(rows, dm.tokenizer.pad_id)
    assert packed["seq_ids"].max() > 1 and packed["media_per_sample"].sum() == flat["media_per_sample"].sum()

    def fwd(b):
        with torch.no_grad():
            h = model(
                b["input_ids"],
                b["position_ids"],
                b["attention_mask"],
                b["pixel_patches"],
                b["grid_thw"],
                b["media_per_sample"],
                b["keys"],
                seq_ids=b.get("seq_ids"),
            )
            return model.logits(h)

    lf, lp = fwd(flat), fwd(packed)
    by_key = {s.key: i for i, s in enumerate(samples)}
    for r, row in enumerate(rows):
        start = 0
        for key, n in zip(row.key.split("+"), row.seq_lens):
            i = by_key[key]
            torch.testing.assert_close(lp[r, start : start + n], lf[i, :n], atol=2e-5, rtol=1e-4)
            start += n

    def loss(b, logits):
        lab = b["labels"][:, 1:]
        sel = lab != IGNORE
        # packed: a label right after a sample boundary would be a cross-sample target; the first
        # token of every sample is <|im_start|> (never a label), so there is none
        return torch.nn.functional.cross_entropy(logits[:, :-1][sel], lab[sel], reduction="sum"), int(sel.sum())

    (a, na), (b, nb) = loss(flat, lf), loss(packed, lp)
    assert na == nb and abs(float(a) - float(b)) < 1e-3 * max(1.0, float(a))


def test_packed_stream_resumes_exactly(tmp_path, synth_dir):
    """Packed rows from a DataLoader with 2 workers: stopping after k batches and resuming from the
    tracker's state continues with exactly the rows an uninterrupted stream gives."""
    from vlm.data.sample import SampleTransform
    from vlm.data.webdataset import ShardDataset, StreamTracker

    _, dm, _ = _setup(tmp_path, synth_dir)
    proc = SampleTransform(dm.media_processor, dm.template, mode="train")
    packing = {"length": 256, "method": "best_fit", "window": 10}

    def loader(resume=None):
        ds = ShardDataset(
            str(synth_dir / "synthvqa" / "train"),
            proc,
            train=True,
            shuffle_buffer=4,
            block_samples=13,
            packing=packing,
            resume=resume,
        )
        return DataLoader(ds, batch_size=2, num_workers=2, collate_fn=Collator(dm.tokenizer.pad_id), prefetch_factor=2)

    straight = [b["keys"] for _, b in zip(range(12), loader())]
    keys = [k for ks in straight for k in ks]
    assert sum("+" in k for k in keys) > len(keys) // 2  # most rows hold several samples
    dl, tracker = loader(), StreamTracker()
    it = iter(dl)
    for _ in range(7):
        b = next(it)
        tracker.on_batch(dl, len(b["keys"]))
        assert b["seq_ids"].shape == b["input_ids"].shape and int(b["attention_mask"].sum(-1).max()) <= 256
    state = tracker.state(dl)
    del it
    resumed = [b["keys"] for _, b in zip(range(5), loader({"state": state, "step": 7}))]
    assert resumed == straight[7:]


def test_packing_cuts_padding(tmp_path, synth_dir):
    """Unpacked batches of a long-tailed length mix waste a large share on padding; best-fit
    packing keeps it under 5% (the same numbers `bench/packing.py` prints)."""
    rng = random.Random(0)
    lengths = [min(384, int(rng.paretovariate(1.2) * 24)) for _ in range(4096)]
    unpacked = padding_fraction([[n] for n in lengths], 16)
    rows = [
        [lengths[w + i] for i in b]
        for w in range(0, len(lengths), 256)
        for b in best_fit_decreasing(lengths[w : w + 256], 384)
    ]
    packed = padding_fraction(rows, 4)
    assert unpacked > 0.5 and packed < 0.05, (unpacked, packed)


def test_packing_trains_through_the_real_trainer(tmp_path, synth_dir):
    from vlm.training.train import run

    metrics = run(
        compose_train(
            [
                "logger=csv",
                "data.packing=true",
                "data.pack_window=16",
                "data.batch_size=2",
                "trainer.limit_val_batches=0",
                "callbacks.model_checkpoint.monitor=null",
            ],
            tmp_path,
            synth_dir,
        )
    )
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert 0.0 <= metrics["train/padding"] < 0.5
    with pytest.raises(Exception, match="shorter than data.template.max_length"):
        from hydra.utils import instantiate

        instantiate(
            compose_train(["data.packing=true", "data.pack_length=32"], tmp_path, synth_dir).data, _convert_="all"
        )
