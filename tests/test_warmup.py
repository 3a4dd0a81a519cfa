"""Tower warm-up (vlm/warmup.py): the encoder trains alone on character naming before the VLM stage."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compose_train
from vlm.data.processor import ImageProcessor
from vlm.model.vision import VisionEncoder
from vlm.warmup import WarmupConfig, warm_up_tower


@pytest.mark.parametrize("temporal_patch,pos", [(1, "learned"), (2, "rope2d")])
def test_warm_up_trains_the_encoder_only(temporal_patch, pos):
    torch.manual_seed(0)
    enc = VisionEncoder(patch_size=8, dim=32, n_layers=1, n_heads=2, patch_embed="conv", conv_channels=8,
                        temporal_patch=temporal_patch, pos=pos, pre_norm=True)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    proc = ImageProcessor(patch_size=8, image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    res = warm_up_tower(enc, proc, {"steps": 6, "batch_size": 4, "canvas": 32}, precision="32-true")
    assert res["steps"] == 6 and 0.0 <= res["accuracy"] <= 1.0
    after = enc.state_dict()
    assert after.keys() == before.keys()  # the probe head is not kept
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert all(p.grad is None for p in enc.parameters())
    assert warm_up_tower(enc, proc, WarmupConfig(steps=0))["steps"] == 0


@pytest.mark.parametrize("bad", [{"steps": -1}, {"batch_size": 0}, {"lr": 0.0}, {"steps": 1.5}])
def test_bad_warmup_options_are_named(bad):
    with pytest.raises(ValueError, match="tower_warmup"):
        WarmupConfig(**bad)


def test_train_runs_the_warm_up_first_and_refuses_a_frozen_tower(tmp_path, synth_dir, caplog):
    from vlm.train import run

    cfg = compose_train(["logger=none", "tower_warmup.steps=4", "tower_warmup.batch_size=4", "trainer.max_steps=2",
                         "trainer.limit_val_batches=0", "callbacks.model_checkpoint.monitor=null"], tmp_path, synth_dir)
    with caplog.at_level("INFO", logger="vlm.train"):
        run(cfg)
    assert any("tower warm-up: 4 steps" in r.getMessage() for r in caplog.records)
    frozen = compose_train(["logger=none", "tower_warmup.steps=4", "model.freeze.encoder=true"], tmp_path / "f", synth_dir)
    with pytest.raises(ValueError, match="frozen"):
        run(frozen)
