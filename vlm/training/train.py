"""`python train.py …`: compose the objects from the Hydra config and fit."""

from __future__ import annotations

import logging
import os

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vlm.build.model import geometry_of
from vlm.checkpoint.load import CheckpointError, check_resume_checkpoint, load_checkpoint, weight_mismatch
from vlm.model.lora import merge_lora, with_fresh_adapters
from vlm.training.datamodule import build_datamodule
from vlm.training.module import VLMModule
from vlm.training.parallel import ParallelConfig, is_sharded_strategy

log = logging.getLogger("vlm.training.train")


def build_callbacks(cfg: DictConfig, has_logger: bool = True) -> list[L.Callback]:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
    if not has_logger:  # an LR monitor with nothing to log to is an error in Lightning
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    return callbacks


def build_logger(cfg: DictConfig):
    lg = cfg.get("logger")
    if not lg or "_target_" not in lg:
        return False
    if "WandbLogger" in lg["_target_"]:
        os.makedirs(lg.get("save_dir") or ".", exist_ok=True)
    return instantiate(lg)


def build_module(cfg: DictConfig, datamodule, meta_init: bool = False) -> VLMModule:
    return VLMModule(
        meta_init=meta_init,
        model=OmegaConf.to_container(cfg.model, resolve=True),
        tokenizer_json=datamodule.tokenizer.to_str(),
        processor=datamodule.media_processor.to_config(geometry=False),  # the model's geometry supplies the rest
        template=datamodule.template_cfg,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        component_lr=OmegaConf.to_container(cfg.component_lr, resolve=True) if cfg.get("component_lr") else None,
        val_max_new_tokens=cfg.val_max_new_tokens,
        val_qtypes=datamodule.qtypes,
        parallel=OmegaConf.to_container(cfg.parallel, resolve=True) if cfg.get("parallel") else None,
        numerics=OmegaConf.to_container(cfg.numerics, resolve=True) if cfg.get("numerics") else None,
    )


VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight", "lm_head.bias")  # weights indexed by token id


def _token_rows(src: dict[str, int], dst: dict[str, int]) -> tuple[list[int], list[int]]:
    """(dst ids, src ids) of every token string that both vocabularies (token -> id) hold."""
    pairs = sorted((i, src[t]) for t, i in dst.items() if t in src)
    return [d for d, _ in pairs], [s for _, s in pairs]


def init_weights(module: VLMModule, path: str) -> None:
    """`init_from=PATH`: this model's weights from a .ckpt or export folder (a previous stage),
    with a fresh optimizer and schedule. Every key must fit; a mismatch names the keys.

    The one mismatch it bridges is the vocabulary: when the previous stage's tokenizer differs (each
    synthvqa data folder trains its own), the embedding and LM-head rows are copied by token
    string, so a token keeps its row whatever its id, and tokens new to this run keep their
    fresh initialisation. Without this, ids would silently point at other tokens' rows."""
    loaded = load_checkpoint(path)
    if loaded.model.lora is not None and module.model.lora is None:  # adapters folded into the base
        merge_lora(loaded.model)
    src = loaded.model.state_dict()
    dst = module.model.state_dict()
    if module.model.lora is not None and loaded.model.lora is None:  # base weights; adapters start fresh
        src = with_fresh_adapters(src, dst)
    src_vocab, dst_vocab = (t.tok.get_vocab(with_added_tokens=True) for t in (loaded.tokenizer, module.tokenizer))
    remap = src_vocab != dst_vocab
    vocab_keys = {k for k in set(src) & set(dst) if k.endswith(VOCAB_ROWS)} if remap else set()
    problem = weight_mismatch(
        {k: tuple(v.shape) for k, v in dst.items()}, {k: tuple(v.shape) for k, v in src.items()}, rows=vocab_keys
    )
    if problem:
        raise CheckpointError(f"init_from={path}: the weights do not fit this model: {problem}")
    if vocab_keys:
        d_ids, s_ids = _token_rows(src_vocab, dst_vocab)
        for k in vocab_keys:
            rows = dst[k].clone()  # this run's fresh initialisation for tokens the previous stage lacked
            rows[d_ids] = src[k][s_ids].to(rows.dtype)
            src[k] = rows
        log.info(
            "init_from: the tokenizer differs from %s's; embedding and LM-head rows copied by token string "
            "for %d of this run's %d tokens (%d new tokens keep their initialisation)",
            path,
            len(d_ids),
            module.tokenizer.vocab_size,
            module.tokenizer.vocab_size - len(d_ids),
        )
    module.model.load_state_dict(src)
    log.info("initialised weights from %s", path)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train. Returns the final logged metrics (floats)."""
    if (cfg.get("tower_warmup") or {}).get("steps"):
        from vlm.errors import PipelineError

        raise PipelineError(
            "tower_warmup.steps trains the tower alone, which is a recipe stage (objective: tower_warmup), "
            "not part of one training run: python train.py recipe.warmup_steps=N (the synthvqa default recipe), "
            "or pipeline=warmup_train with other data or another experiment (docs/recipes.md)"
        )
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:  # one clear line for a file that is not a checkpoint, before any work
        check_resume_checkpoint(ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    # The model's media geometry, derived once from its config: the data side follows it.
    geometry = geometry_of(cfg.model)
    datamodule = build_datamodule(cfg, geometry)
    datamodule.setup("fit")
    logger = build_logger(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg, bool(logger)), logger=logger)
    # FSDP with parallel.init=rank0: only rank 0 reads weights; the others build a meta skeleton
    # and receive their shards in configure_model (vlm.training.parallel.load_from_rank0).
    parallel = ParallelConfig.from_dict(
        OmegaConf.to_container(cfg.parallel, resolve=True) if cfg.get("parallel") else None
    )
    meta_init = (
        is_sharded_strategy(trainer.strategy)
        and trainer.world_size > 1
        and trainer.global_rank != 0
        and parallel.init == "rank0"
    )
    module = build_module(cfg, datamodule, meta_init=meta_init)
    if cfg.get("init_from") and not meta_init:  # rank 0's weights reach the others by broadcast
        init_weights(module, cfg.init_from)
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    n_params = sum(p.numel() for p in module.parameters())
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    log.info("model: %.2fM parameters (%.2fM trainable)", n_params / 1e6, n_train / 1e6)
    # weights_only=True: explicit, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn it off
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    _print_wandb_hint(logger)
    return metrics


def _print_wandb_hint(logger) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        try:
            run_dir = os.path.dirname(logger.experiment.dir)
        except Exception:  # disabled mode has no directory
            return
        if os.environ.get("WANDB_MODE") != "disabled":
            print(f"W&B run saved offline in {run_dir}\n  upload it with: wandb sync {run_dir}")
