"""Multi-stage training: a recipe of ordered stages, run and resumed by one command.

An experiment config that holds a `pipeline` block is a recipe:

    # @package _global_            (conf/experiment/NAME.yaml)
    pipeline:
      name: llava                   # the run folder: outputs/pipelines/<name>-seed<seed>
      stages:
        - name: align
          overrides: [model.freeze.encoder=true, model.freeze.decoder=true, trainer.max_steps=300]
        - name: finetune
          overrides: [model.freeze.decoder=false, optimizer.lr=2e-4, trainer.max_steps=1000]

The `pipeline` config group (conf/pipeline/NAME.yaml) holds recipes of stages that fit any
experiment or data (`pipeline=warmup_train`); `pipeline=none` turns a recipe's stages off, leaving
one plain run of its settings. Without either, only data=synthvqa has a default recipe
(conf/experiment/synthvqa_default.yaml); other data trains one plain run.

`python train.py experiment=NAME [overrides]` composes each stage's config as
`train.yaml + experiment=NAME + your overrides + the stage's overrides` (later ones win) and
trains it in order. Stage k > 1 starts from stage k-1's export (`init_from`: weights only, a new
optimizer; a vocabulary that differs is mapped by token string). Each stage writes its own
folder under the run folder (`NN-name/`: `checkpoints/`, `export/`, `config.yaml`, and
`done.json` once it has finished), and its W&B run is grouped under the recipe's run.

Running the same command again skips the finished stages and resumes the interrupted one exactly
from its `checkpoints/last.ckpt` (model, optimizer, schedule, data position). `stage=NAME` runs
one stage alone (it starts from the previous stage's export, which must exist).

A stage's `objective` is `train` (the default: a `python train.py` run) or `tower_warmup`: the
vision encoder alone learns to read (`vlm.training.warmup`, settings under `tower_warmup.*`), and the
whole model is exported for the next stage.

Several processes (trainer=ddp|fsdp, torchrun, SLURM) each walk the recipe: train stages run in
all of them (Lightning joins them into one run); a warm-up stage runs on rank 0 while the other
ranks wait for its `done.json`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlm.errors import PipelineError

OBJECTIVES = ("train", "tower_warmup")


def _is_stage_override(override: str) -> bool:
    """False for the overrides that steer the pipeline or Hydra itself (`stage=`, `pipeline.*`, `hydra.*`)."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key != "stage" and not key.startswith(("pipeline.", "hydra."))


@dataclass
class Stage:
    name: str
    overrides: list[str] = field(default_factory=list)
    objective: str = "train"

    def folder(self, run_dir: Path, index: int) -> Path:
        return run_dir / f"{index + 1:02d}-{self.name}"


def read_stages(cfg: DictConfig) -> list[Stage]:
    """The recipe's stages from `cfg.pipeline.stages`, each checked (names unique, overrides strings)."""
    raw = OmegaConf.to_container(cfg.pipeline.stages, resolve=False) if cfg.pipeline.get("stages") else None
    if not isinstance(raw, list) or not raw:
        raise PipelineError("pipeline.stages must be a non-empty list of {name, overrides, objective}")
    stages: list[Stage] = []
    for i, s in enumerate(raw):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not s["name"]:
            raise PipelineError(f"pipeline.stages[{i}] needs a name")
        unknown = set(s) - {"name", "overrides", "objective"}
        if unknown:
            raise PipelineError(f"pipeline.stages[{i}] ({s['name']}): unknown keys {sorted(unknown)}")
        ov = s.get("overrides") or []
        if not isinstance(ov, list) or not all(isinstance(o, str) for o in ov):
            raise PipelineError(f"pipeline.stages[{i}] ({s['name']}): overrides must be a list of 'key=value' strings")
        objective = s.get("objective") or "train"
        if objective not in OBJECTIVES:
            raise PipelineError(
                f"pipeline.stages[{i}] ({s['name']}): objective {objective!r} is not one of {OBJECTIVES}"
            )
        stages.append(Stage(s["name"], list(ov), objective))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise PipelineError(f"pipeline.stages: stage names repeat: {names}")
    return stages


def run_dir(cfg: DictConfig) -> Path:
    """Where the recipe's stages live: `pipeline.dir`, else outputs/pipelines/<name>-seed<seed>."""
    if cfg.pipeline.get("dir"):
        return Path(str(cfg.pipeline.dir))
    name = cfg.pipeline.get("name") or "pipeline"
    return Path(str(cfg.paths.root_dir)) / "outputs" / "pipelines" / f"{name}-seed{cfg.seed}"


def _check_recipe(folder: Path, record: dict) -> None:
    """The run folder belongs to this recipe (same stages, same overrides), or is new."""
    path = folder / "pipeline.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != record:
            was, now = old.get("overrides") or {}, record["overrides"]
            diff = [f"{k}: {was.get(k, '(unset)')} -> {now.get(k, '(unset)')}" for k in sorted(set(was) | set(now))]
            diff = [d for d in diff if d.split(": ", 1)[1].split(" -> ")[0] != d.split(" -> ")[1]]
            what = f"overrides differ: {', '.join(diff)}" if diff else "its stages differ"
            raise PipelineError(
                f"{folder} holds a run of this recipe with other settings ({what}); run the same command to "
                "resume it, or pass pipeline.dir=NEW_FOLDER to start a new run"
            )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        _write_whole(path, record)


def _write_whole(path: Path, record: dict) -> None:
    """Write JSON to a file of this process, then rename it into place: the other ranks of a run
    read the old file or the whole new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def _is_wandb(cfg: DictConfig) -> bool:
    lg = cfg.get("logger")
    return bool(lg) and "WandbLogger" in str(lg.get("_target_", ""))


def resume_point(checkpoints: Path) -> Path | None:
    """The checkpoint an interrupted stage resumes from: `last.ckpt`, else the newest other one;
    one that a kill left half-written (it does not load) is passed over for the one before."""
    from vlm.checkpoint.load import CheckpointError, check_resume_checkpoint

    found = sorted(checkpoints.glob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime), reverse=True)
    for path in found:
        try:
            check_resume_checkpoint(path)
            return path
        except (CheckpointError, OSError, ValueError) as e:
            print(f"not resuming from {path}: {e}", flush=True)
    return None


def stage_config(base_overrides: list[str], stage: Stage, folder: Path, init_from: Path | None, group: str):
    """Compose one stage's training config (Hydra's compose API: the app is already initialised)."""
    from hydra import compose

    overrides = [*base_overrides, *stage.overrides, f"paths.output_dir={folder}"]
    if stage.objective == "train":  # tower_warmup.* belong to warm-up stages (a training run refuses them)
        overrides.append("tower_warmup.steps=0")
    if init_from is not None:
        overrides.append(f"init_from={init_from}")
    last = resume_point(folder / "checkpoints") if stage.objective == "train" else None
    if last is not None:
        overrides.append(f"ckpt_path={last}")
    cfg = compose(config_name="train", overrides=overrides)
    if _is_wandb(cfg):
        cfg = compose(
            config_name="train", overrides=[*overrides, f"+logger.group={group}", f"logger.name={stage.name}"]
        )
    return cfg


def run_pipeline(cfg: DictConfig, cli_overrides: list[str]) -> dict[str, Any]:
    """Run (or resume) every stage of the recipe in `cfg.pipeline`; returns the last stage's metrics.

    cli_overrides: the command line's overrides (they apply to every stage; `stage=NAME` and
    `pipeline.*` steer the pipeline itself)."""
    stages = read_stages(cfg)
    only = cfg.get("stage")
    if only is not None and only not in [s.name for s in stages]:
        raise PipelineError(f"stage={only}: no such stage (stages: {', '.join(s.name for s in stages)})")
    base = [o for o in cli_overrides if _is_stage_override(o)]
    folder = run_dir(cfg)
    settings = {o.split("=", 1)[0]: o.split("=", 1)[1] if "=" in o else "" for o in base}  # the last one wins
    _check_recipe(folder, {"stages": [vars(s) for s in stages], "overrides": settings})
    group = f"{cfg.pipeline.get('name') or 'pipeline'}-seed{cfg.seed}"
    metrics: dict[str, Any] = {}
    prev_export: Path | None = None
    for i, stage in enumerate(stages):
        sdir = stage.folder(folder, i)
        done = sdir / "done.json"
        if only is not None and stage.name != only:
            prev_export = sdir / "export"
            continue
        if done.is_file() and only is None:
            print(f"stage {i + 1}/{len(stages)}: {stage.name} finished earlier ({done}), skipped", flush=True)
            metrics = json.loads(done.read_text()).get("metrics", {})
            prev_export = sdir / "export"
            continue
        if prev_export is not None and not (prev_export / "config.yaml").is_file():
            raise PipelineError(
                f"stage {stage.name} starts from {prev_export}, which does not exist: run the earlier stages"
            )
        if stage.objective == "tower_warmup" and not is_rank_zero():  # one process trains the tower
            wait_for_stage(done, stage.name)
            metrics = json.loads(done.read_text()).get("metrics", {})
            prev_export = sdir / "export"
            continue
        sdir.mkdir(parents=True, exist_ok=True)
        scfg = stage_config(base, stage, sdir, prev_export, group)
        (sdir / "config.yaml").write_text(OmegaConf.to_yaml(scfg, resolve=False))
        print(f"stage {i + 1}/{len(stages)}: {stage.name} ({stage.objective}) -> {sdir}", flush=True)
        metrics = run_stage(scfg, stage)
        if is_rank_zero():
            _write_whole(done, {"stage": stage.name, "metrics": metrics})
        prev_export = sdir / "export"
    return metrics


def is_rank_zero() -> bool:
    """True in the first (or only) process a launcher started: torchrun's RANK and LOCAL_RANK,
    SLURM's SLURM_PROCID, and Lightning's own launcher's NODE_RANK and LOCAL_RANK are 0 or unset."""
    keys = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return not any(os.environ.get(k, "").isdigit() and int(os.environ[k]) > 0 for k in keys)


def wait_for_stage(done: Path, name: str, poll_s: float = 1.0) -> None:
    """Block a rank > 0 until rank 0 writes `done` (a stage that runs on one process). Stops with a
    PipelineError if the process that started this one is gone (the launcher ended the run)."""
    parent = os.getppid()
    print(f"waiting for rank 0 to finish stage {name} ({done})", flush=True)
    while not done.is_file():
        if os.getppid() != parent:
            raise PipelineError(f"stage {name}: the launcher ended while this rank waited for rank 0")
        time.sleep(poll_s)


def run_stage(cfg: DictConfig, stage: Stage) -> dict[str, Any]:
    if stage.objective == "tower_warmup":
        from vlm.training.warmup_stage import run_warmup_stage

        return run_warmup_stage(cfg)
    from vlm.training.train import run

    return run(cfg)
