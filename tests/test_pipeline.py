"""Multi-stage recipes (vlm/training/pipeline.py): one command runs every stage; killed mid-stage, the same
command resumes and ends with the weights of an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
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

    from vlm.training.pipeline import PipelineError, run_pipeline

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
    up alone, then the projector and decoder train on that tower, which stays as the warm-up left it."""
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
    # the default keeps the warm tower fixed in stage 2 (recipe.freeze_tower) and trains the rest
    warm, trained = _weights(run_dir / "01-warmup" / "export"), _weights(run_dir / "02-train" / "export")
    assert warm.keys() == trained.keys()
    assert all(torch.equal(warm[k], trained[k]) for k in warm if k.startswith("encoder."))
    assert not all(torch.equal(warm[k], trained[k]) for k in warm if k.startswith(("projector.", "decoder.")))
    assert any(k.endswith("self_attn.q_norm.weight") for k in trained)  # the recipe's model.decoder.qk_norm: q/k norms
    # a plain training run still exists: one stage, no run-folder layout
    plain = tmp_path / "plain"
    r = _run([*cmd[:3], f"hydra.run.dir={plain}", *tiny, "logger=none", "pipeline=none"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (plain / "export" / "model.safetensors").is_file() and not (plain / "01-warmup").exists()


def test_the_default_recipes_qk_norm_reaches_only_the_tiny_decoder():
    """The synthvqa default recipe sets model.decoder.qk_norm itself, for the tiny decoder only (the
    decoder config reads no recipe key): a pretrained decoder or a whole pretrained VLM chosen on the
    command line never gets it, and other recipes and other data keep the plain tiny decoder."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        assert compose("train").model.decoder.qk_norm is True
        assert compose("train", overrides=["pipeline=none"]).model.decoder.qk_norm is True
        assert compose("train", overrides=["model.decoder.qk_norm=false"]).model.decoder.qk_norm is False
        for ov in (["model/decoder=qwen2", "model.decoder.pretrained=/m"], ["model=llava"]):
            assert "qk_norm" not in compose("train", overrides=ov).model.decoder
        for exp in ("llava", "synthvqa_full"):
            assert compose("train", overrides=[f"experiment={exp}"]).model.decoder.qk_norm is False
        for data in ("shards", "mix"):
            assert compose("train", overrides=[f"data={data}"]).model.decoder.qk_norm is False


def test_components_read_no_recipe_settings():
    """Model and data configs are components: a recipe sets their keys, they never read `recipe.*`."""
    conf = ROOT / "conf"
    for path in sorted([*(conf / "model").rglob("*.yaml"), *(conf / "data").rglob("*.yaml")]):
        values = [line.split("#", 1)[0] for line in path.read_text().splitlines()]  # comments may name recipes
        assert not any("recipe." in v for v in values), path


def test_under_torchrun_rank_0_warms_the_tower_up_and_every_rank_trains(synth_dir, tmp_path):
    """`torchrun --nproc_per_node=2 train.py trainer=ddp …`: every rank walks the default recipe;
    the warm-up runs once (rank 1 waits for rank 0's done.json) and both ranks train stage 2 as
    one DDP run from the warm tower."""
    run_dir = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("pipeline=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(ROOT / "train.py"), f"paths.data_dir={synth_dir}", f"hydra.run.dir={run_dir}", *tiny, "logger=none"]
    cmd += ["recipe.warmup_steps=20", "tower_warmup.batch_size=4", "trainer.val_check_interval=100"]
    cmd += ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    r = _run(cmd, tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    # rank 1 waits for the warm-up, or (on a busy machine) starts after it finished and skips it
    assert out.count("stage 1/2: warmup (tower_warmup)") == 1
    assert "waiting for rank 0 to finish stage warmup" in out or "stage 1/2: warmup finished earlier" in out
    assert out.count("stage 2/2: train (train)") == 2 and "GLOBAL_RANK: 1, MEMBER: 2/2" in out
    assert json.loads((run_dir / "01-warmup" / "done.json").read_text())["metrics"]["tower_warmup/steps"] == 20
    assert json.loads((run_dir / "02-train" / "done.json").read_text())["stage"] == "train"
    assert (run_dir / "02-train" / "export" / "model.safetensors").is_file()
    assert not list(run_dir.rglob(".done.json.*")) and not list(run_dir.rglob(".pipeline.json.*"))


def test_which_process_is_rank_zero(monkeypatch):
    from vlm.training.pipeline import is_rank_zero

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    assert is_rank_zero()
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert is_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a child of Lightning's launcher inherits SLURM_PROCID=0
    assert not is_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "8")  # torchrun: local rank 0 of the second node
    assert not is_rank_zero()


def test_a_waiting_rank_stops_when_its_launcher_is_gone(tmp_path):
    """A rank waiting for rank 0's stage must not wait forever once the launcher that started it
    has ended: it notices it was orphaned and stops with one line."""
    result = tmp_path / "result.txt"
    waiter = (
        "import sys; from pathlib import Path; from vlm.training.pipeline import PipelineError, wait_for_stage\n"
        "try:\n"
        f"    wait_for_stage(Path({str(tmp_path / 'never' / 'done.json')!r}), 'warmup', poll_s=0.1)\n"
        f"    Path({str(result)!r}).write_text('returned')\n"
        "except PipelineError as e:\n"
        f"    Path({str(result)!r}).write_text(str(e))\n"
    )
    # the launcher ends once its child has said it is waiting
    launcher = (
        "import subprocess, sys\n"
        f"child = subprocess.Popen([sys.executable, '-c', {waiter!r}], stdout=subprocess.PIPE, text=True)\n"
        "child.stdout.readline()\n"
    )
    subprocess.run([sys.executable, "-c", launcher], env=_env(), timeout=60, check=True)
    deadline = time.time() + 30
    while not result.is_file() and time.time() < deadline:
        time.sleep(0.2)
    assert result.read_text() == "stage warmup: the launcher ended while this rank waited for rank 0"
