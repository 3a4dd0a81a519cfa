"""The parts the LightningModule delegates to: the gradient step's state and options, the
datamodule's resume state, and the W&B example table fed by validation outputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import compose_train
from vlm.training.datamodule import build_datamodule
from vlm.training.gradient_step import GradientStep, NonFiniteError


def _datamodule(tmp_path, synth_dir, overrides=()):
    dm = build_datamodule(compose_train(list(overrides), tmp_path, synth_dir))
    dm.setup("fit")
    return dm


def test_gradient_step_options_counters_and_clipping():
    for bad, match in (({"on_nonfinite": "ignore"}, "on_nonfinite must be one of"), ({"max_skips": 3}, "unknown keys")):
        with pytest.raises(ValueError, match=match):
            GradientStep.from_config(bad)
    p = torch.nn.Parameter(torch.ones(4))
    step = GradientStep.from_config({"on_nonfinite": "skip", "max_consecutive_skips": 1})
    # one micro-batch of 2 label tokens, its gradient the sum's: normalised to the per-token mean
    step.add(torch.tensor(6.0), 2, {})
    p.grad = torch.full((4,), 2.0)
    report = step.finish([p], averaged_over=1, device=torch.device("cpu"), step=0)
    assert torch.equal(p.grad, torch.ones(4)) and report.loss == 3.0 and float(report.grad_norm) == 2.0
    assert set(report.metrics()) == {"train/loss", "train/label_tokens", "train/grad_norm"}
    step.clip([p], 1.0)
    torch.testing.assert_close(p.grad, torch.full((4,), 0.5), rtol=1e-5, atol=0)
    # a non-finite loss: skipped (gradients dropped), counted; a second in a row is over the limit
    step.add(torch.tensor(float("nan")), 2, {})
    p.grad = torch.ones(4)
    report = step.finish([p], 1, torch.device("cpu"), step=1)
    assert p.grad is None and report.nonfinite_loss and report.metrics()["train/skipped_steps"] == 1.0
    step.clip([p], 1.0)  # nothing to clip after a skip
    saved = step.state_dict()
    assert saved["skipped_steps"] == 1 and saved["consecutive_skips"] == 1
    resumed = GradientStep.from_config({"max_consecutive_skips": 1})
    resumed.load_state_dict(saved)
    resumed.add(torch.tensor(float("inf")), 2, {})
    with pytest.raises(NonFiniteError, match="2 non-finite steps in a row"):
        resumed.finish([p], 1, torch.device("cpu"), step=2)


def test_datamodule_resume_state_is_used_once_and_reseeds_on_another_world_size(tmp_path, synth_dir):
    dm = _datamodule(tmp_path, synth_dir)
    state = {"step": 4, "world_size": 1, "ranks": [{"num_workers": 1, "fingerprint": "x", "points": [[0, 3, 0, 0, 0]]}]}
    dm.load_state_dict(state)
    assert dm.pending_resume == {"state": state["ranks"][0], "step": 4}
    dm.load_state_dict({**state, "world_size": 2, "ranks": state["ranks"] * 2})
    assert dm.pending_resume == {"state": None, "step": 4}
    ds = dm.train_dataloader().dataset
    assert ds.resume == {"state": None, "step": 4} and ds._start(0, 1)[2] == "r4"  # reseeded from step 4
    assert dm.pending_resume is None and dm.train_dataloader().dataset.resume is None


def test_example_table_logs_the_first_validation_samples(tmp_path, synth_dir, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    from vlm.evaluation.evaluate import Scored
    from vlm.training.callbacks import ExampleTable

    cfg = compose_train([], tmp_path, synth_dir)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    B = len(batch["keys"])
    scored = Scored(batch["keys"], batch["qtypes"], batch["prompts"], batch["answers"], ["x"] * B)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    logged = []
    monkeypatch.setattr(type(logger), "experiment", property(lambda self: SimpleNamespace(log=logged.append)))
    trainer = SimpleNamespace(loggers=[logger], sanity_checking=False, global_step=7)
    # what a checkpoint stores: the processor without the geometry, which the model config supplies
    hparams = {"processor": dm.media_processor.to_config(geometry=False), "model": OmegaConf.to_container(cfg.model)}
    module = SimpleNamespace(hparams=hparams)
    table = ExampleTable(n=3)
    table.on_validation_epoch_start(trainer, module)
    table.on_validation_batch_end(trainer, module, None, batch, 0)  # a batch with nothing scored
    for i in range(2):
        table.on_validation_batch_end(trainer, module, scored, batch, i)
    assert [r[2] for r in table.rows] == batch["prompts"][:3]
    image, grid = table.rows[0][0]
    assert image.shape[0] == grid[0] * grid[1] * grid[2]  # the first media item's patches
    table.on_validation_epoch_end(trainer, module)
    (row,) = logged
    assert row["trainer/global_step"] == 7 and len(row["val/examples"].data) == 3 and table.rows == []
    trainer.loggers = []  # without a W&B logger nothing is collected
    table.on_validation_batch_end(trainer, module, scored, batch, 0)
    assert table.rows == []
