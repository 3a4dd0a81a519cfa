"""The `tower_warmup` objective of a recipe stage: the vision encoder alone learns a supervised
task whose labels are free (`vlm.training.warmup`), then the whole model is exported for the next stage.

    pipeline:
      stages:
        - name: warmup
          objective: tower_warmup
          overrides: [tower_warmup.steps=400, tower_warmup.task=shapes+glyphs]
        - name: train               # starts from the warm tower (init_from = the warm-up's export)

Settings live under `tower_warmup.*` (conf/train.yaml); the model, the processor geometry and
normalisation are the run's own, so the next stage sees the tower exactly as it was trained.

The warm-up trains on one device: this process's GPU when the trainer would use one, else the
CPU. Under several processes (trainer=ddp|fsdp, torchrun, SLURM) rank 0 runs it and the other
ranks wait for its `done.json` (vlm.training.pipeline).
"""

from __future__ import annotations

import logging
import os

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("vlm.training.warmup")


def warmup_device(accelerator: str) -> torch.device:
    """The device a warm-up trains on, for the trainer's `accelerator` (auto, cpu, gpu, cuda, mps):
    this process's GPU (LOCAL_RANK) when the trainer would train on one, else the CPU."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if accelerator in ("auto", "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def run_warmup_stage(cfg: DictConfig) -> dict[str, float]:
    """Build the model (from `init_from` if given), train its encoder alone on `tower_warmup.*`,
    and export the whole model to `paths.output_dir/export`. Returns the warm-up's metrics."""
    from vlm.build.model import geometry_of
    from vlm.checkpoint.load import export_folder
    from vlm.errors import PipelineError
    from vlm.training.datamodule import build_datamodule
    from vlm.training.train import build_module, init_weights
    from vlm.training.warmup import WarmupConfig, warm_up_tower, with_data_strips

    warm = OmegaConf.to_container(cfg.tower_warmup, resolve=True) if cfg.get("tower_warmup") else {}
    if not warm.get("steps"):
        raise PipelineError("a tower_warmup stage needs tower_warmup.steps > 0 in its overrides")
    if (cfg.model.get("encoder") or {}).get("pretrained"):
        raise PipelineError(
            "a tower_warmup stage teaches a from-scratch tower glyphs and shapes, but model.encoder.pretrained "
            "is set: train a pretrained tower as one plain run (pipeline=none) or with a recipe that has no "
            "warm-up stage (experiment=llava)"
        )
    if (cfg.model.get("freeze") or {}).get("encoder"):
        raise PipelineError("a tower_warmup stage trains the encoder, but it is frozen (model.freeze.encoder=true)")
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    datamodule = build_datamodule(cfg, geometry_of(cfg.model))
    datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    if cfg.get("init_from"):
        init_weights(module, cfg.init_from)
    try:
        wcfg = WarmupConfig(**with_data_strips(warm, getattr(datamodule, "synthetic", None)))
    except (TypeError, ValueError) as e:  # a misspelt or out-of-range tower_warmup.* setting
        raise PipelineError(str(e)) from None
    precision = str(cfg.trainer.get("precision") or "32-true")
    device = warmup_device(str(cfg.trainer.get("accelerator") or "auto"))
    res = warm_up_tower(module.model.encoder.to(device), datamodule.media_processor, wcfg, precision)
    module.model.encoder.cpu()
    log.info(
        "tower warm-up: %d steps in %.0f s, accuracy %s",
        res["steps"],
        res["seconds"],
        ", ".join(f"{k} {v:.2f}" for k, v in res["accuracy_by_task"].items()),
    )
    export_folder(module.model, module.tokenizer, dict(module.hparams), os.path.join(cfg.paths.output_dir, "export"))
    out = {"tower_warmup/steps": float(res["steps"]), "tower_warmup/seconds": float(res["seconds"])}
    out.update({f"tower_warmup/accuracy_{k}": float(v) for k, v in res["accuracy_by_task"].items()})
    out["tower_warmup/accuracy"] = float(res["accuracy"])
    return out
