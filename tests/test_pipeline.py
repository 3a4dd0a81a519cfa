"""Multi-stage recipes (vlm/pipeline.py): one command runs every stage; killed mid-stage, the same
command resumes and ends with the weights of an uninterrupted run, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY

RECIPE = [
    "experiment=llava",
    "logger=none",
    "recipe.align_steps=2",
    "recipe.finetune_steps=16",
    # a checkpoint every 2 steps, so a kill lands between two of them
    "+callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.model_checkpoint.monitor=null",
    "trainer.val_check_interval=100",
    "trainer.num_sanity_val_steps=0",
]


def _command(data_dir: Path, run_dir: Path, extra: list[str] = ()) -> list[str]:
    shards = data_dir / "synthvqa" / "train"
    tiny = [o for o in TINY if not o.startswith(("trainer.max_steps", "pipeline="))]
    return [
        sys.executable,
        str(ROOT / "train.py"),
        f"paths.data_dir={data_dir}",
        f"pipeline.dir={run_dir}",
        f"hydra.run.dir={run_dir}/hydra",
        *tiny,
        *RECIPE,
        f"recipe.align_shards={shards}",
        f"recipe.finetune_shards={shards}",
        *extra,
    ]


def _env() -> dict:
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def _weights(export: Path) -> dict:
    return load_file(str(export / "model.safetensors"))


def test_pipeline_runs_every_stage_and_resumes_a_killed_stage_exactly(synth_dir, tmp_path):
    whole = tmp_path / "whole"
    r = _run(_command(synth_dir, whole), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("01-align", "02-finetune"):
        assert (whole / stage / "done.json").is_file()
        assert (whole / stage / "export" / "model.safetensors").is_file()
    # stage 2 started from stage 1's export; stage 1 froze the decoder, so its weights equal init's
    cfg2 = (whole / "02-finetune" / "config.yaml").read_text()
    assert f"init_from: {whole / '01-align' / 'export'}" in cfg2

    # the same recipe, killed during stage 2 (after its first checkpoint), then run again
    cut = tmp_path / "cut"
    cmd = _command(synth_dir, cut)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = cut / "02-finetune" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (ckpts / "last.ckpt").is_file():
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (cut / "01-align" / "done.json").is_file()
    assert not (cut / "02-finetune" / "done.json").is_file()
    r = _run(cmd, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage 1/2: align finished earlier" in r.stdout
    cfg2 = (cut / "02-finetune" / "config.yaml").read_text()
    assert "ckpt_path:" in cfg2 and "last.ckpt" in cfg2  # resumed, not restarted
    a, b = _weights(whole / "02-finetune" / "export"), _weights(cut / "02-finetune" / "export")
    assert a.keys() == b.keys()
    differ = [k for k in a if not (a[k] == b[k]).all()]
    assert not differ, f"resumed weights differ from the uninterrupted run's: {differ[:5]}"


def _pipeline_cfg(overrides: list[str], data_dir: Path, run_dir: Path):
    shards = data_dir / "synthvqa" / "train"
    return [
        f"paths.data_dir={data_dir}",
        f"pipeline.dir={run_dir}",
        *[o for o in TINY if not o.startswith(("trainer.max_steps", "pipeline="))],
        *RECIPE,
        f"recipe.align_shards={shards}",
        f"recipe.finetune_shards={shards}",
        *overrides,
    ]


def test_pipeline_refuses_what_it_cannot_run(synth_dir, tmp_path):
    from hydra import compose, initialize_config_dir

    from vlm.pipeline import PipelineError, run_pipeline

    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):

        def run(extra: list[str]):
            ov = _pipeline_cfg(extra, synth_dir, run_dir)
            return run_pipeline(compose("train", overrides=ov), ov)

        with pytest.raises(PipelineError, match="stage=nope: no such stage \\(stages: align, finetune\\)"):
            run(["stage=nope"])
        # a stage alone needs the previous stage's export
        with pytest.raises(PipelineError, match="01-align/export, which does not exist: run the earlier stages"):
            run(["stage=finetune"])
        # the run folder now belongs to these settings: others are refused, never mixed in
        with pytest.raises(PipelineError, match="overrides differ: recipe.finetune_steps: 16 -> 20"):
            run(["recipe.finetune_steps=20"])
        cfg = compose("train", overrides=["experiment=llava"])
        cfg.pipeline.stages = [{"name": "x", "overrides": "trainer.max_steps=3"}]
        with pytest.raises(PipelineError, match="overrides must be a list"):
            run_pipeline(cfg, [])
        cfg.pipeline.stages = [{"name": "x"}, {"name": "x"}]
        with pytest.raises(PipelineError, match="stage names repeat"):
            run_pipeline(cfg, [])


def test_the_default_command_is_the_warmup_then_train_recipe(synth_dir, tmp_path):
    """`python train.py` (here with a tiny model) runs two stages in the run folder: the tower warms
    up alone, then the VLM trains from that tower; its encoder starts where the warm-up ended."""
    import torch

    run_dir = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("pipeline=")]
    cmd = [sys.executable, str(ROOT / "train.py"), f"paths.data_dir={synth_dir}", f"hydra.run.dir={run_dir}"]
    cmd += [
        *tiny,
        "logger=none",
        "recipe.warmup_steps=2",
        "tower_warmup.batch_size=4",
        "trainer.val_check_interval=100",
    ]
    r = _run(cmd, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage 1/2: warmup (tower_warmup)" in r.stdout and "stage 2/2: train (train)" in r.stdout
    assert f"init_from: {run_dir / '01-warmup' / 'export'}" in (run_dir / "02-train" / "config.yaml").read_text()
    warm, trained = _weights(run_dir / "01-warmup" / "export"), _weights(run_dir / "02-train" / "export")
    key = next(k for k in warm if k.startswith("encoder."))
    assert warm.keys() == trained.keys() and not torch.equal(warm[key], trained[key])
    # a plain training run still exists: one stage, no run-folder layout
    plain = tmp_path / "plain"
    r = _run([*cmd[:3], f"hydra.run.dir={plain}", *tiny, "logger=none", "pipeline=none"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (plain / "export" / "model.safetensors").is_file() and not (plain / "01-warmup").exists()
