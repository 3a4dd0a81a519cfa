"""Shared fixtures: the real Hydra config composed and shrunk, and a tiny synthvqa on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

# A model small enough to train a few steps in seconds; same code path as the default.
TINY = [
    "model.encoder.dim=32",
    "model.encoder.n_layers=1",
    "model.encoder.n_heads=2",
    "model.encoder.conv_channels=8",
    "model.decoder.dim=32",
    "model.decoder.n_layers=1",
    "model.decoder.n_heads=2",
    "model.decoder.n_kv_heads=1",
    "data.synthetic.train_samples=64",
    "data.synthetic.heldout_samples=40",
    "data.synthetic.workers=1",
    "data.batch_size=4",
    "data.val_batch_size=16",
    "data.num_workers=0",
    "data.val_num_workers=0",
    "data.shuffle_buffer=16",
    "trainer.max_steps=4",
    "trainer.log_every_n_steps=1",
    "~callbacks.progress_bar",
    "trainer.enable_progress_bar=false",
    "scheduler.warmup_steps=2",
    "val_max_new_tokens=6",
    "trainer.precision=32-true",
    "pipeline=none",  # one plain training run, not the default recipe's stages
]


def compose_train(overrides: list[str], tmp: Path, data_dir: Path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tmp}", f"paths.data_dir={data_dir}", *TINY, *overrides])


def compose_infer(overrides: list[str], tmp: Path, data_dir: Path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("infer", overrides=[f"paths.output_dir={tmp}", f"paths.data_dir={data_dir}", *overrides])


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A tiny synthvqa (train + heldout + tokenizer), made once per test session."""
    from vlm.synthvqa import SynthConfig, ensure_synthvqa

    root = tmp_path_factory.mktemp("data") / "synthvqa"
    ensure_synthvqa(root, train_samples=64, heldout_samples=40, cfg=SynthConfig(canvas=64, turns=3), workers=1)
    return root.parent


def free_port() -> int:
    """A loopback port nothing listens on now (for a test server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
