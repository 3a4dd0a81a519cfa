"""The LightningModule: the loss, its logging, the optimizer and generation-based validation.

Everything needed to rebuild the model for inference (model config, tokenizer, image processor
and template configs) is stored in `hparams`, so a `.ckpt` is self-contained.

A training step returns the *sum* of its label tokens' cross-entropies; `vlm.training.gradient_step`
turns the step's accumulated gradient into that of the mean over all its label tokens (across
micro-batches and ranks), guards it against non-finite values and clips it.

Exact resume: besides what Lightning stores (weights, optimizer, scheduler, loop counters), the
checkpoint holds, under `vlm_resume`, each rank's RNG states, skipped-sample counts and gradient
step counters; the data position is the datamodule's (`VLMDataModule.state_dict`).
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F

from vlm.build.model import build_model, stop_ids
from vlm.data.sample import format_skips
from vlm.data.template import IGNORE
from vlm.evaluation.evaluate import Evaluator, Scored
from vlm.model.vlm import VLM
from vlm.tokenizer import TextTokenizer
from vlm.training.gradient_step import GradientStep, batch_stats
from vlm.training.optim import apply_freeze, build_optimizer, frozen_parts
from vlm.training.resume import gather_ranks, legacy_data_state, my_rank, rng_state, set_rng_state

log = logging.getLogger("vlm.training.module")


class VLMModule(L.LightningModule):
    def __init__(
        self,
        model: dict,
        tokenizer_json: str,
        processor: dict,
        template: dict,
        optimizer: partial | None = None,
        scheduler: partial | None = None,
        component_lr: dict | None = None,
        val_max_new_tokens: int = 24,
        val_qtypes: list[str] | None = None,
        parallel: dict | None = None,
        numerics: dict | None = None,
        meta_init: bool = False,
    ):
        """meta_init: build on the meta device and take rank 0's weights in `configure_model` (ranks
        other than 0 under a sharded strategy with `parallel.init=rank0`, set by `vlm.training.train`)."""
        super().__init__()
        # Only plain, rebuildable data goes into the checkpoint (loadable with weights_only=True).
        self.save_hyperparameters(
            {
                "model": model,
                "tokenizer_json": tokenizer_json,
                "processor": processor,
                "template": template,
                "val_qtypes": val_qtypes,
            }
        )
        self.tokenizer = TextTokenizer.from_str(tokenizer_json)
        if meta_init:
            from vlm.model.hf import skeleton

            with torch.device("meta"), skeleton():
                self.model = build_model(model, self.tokenizer)
            log.info("model built on the meta device (parallel.init=rank0): its shards come from rank 0")
        else:
            self.model = build_model(model, self.tokenizer)
        # the resolved spec (pretrained parts as their native configs, a grown vocabulary): the
        # checkpoint rebuilds the model without the original model folders
        self.hparams["model"] = self.model.spec.to_dict()
        self.freeze_spec = self.model.freeze.to_dict()
        apply_freeze(self.model, self.freeze_spec)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.component_lr = dict(component_lr or {})
        self.parallel_cfg = dict(parallel or {})
        self.gradient_step = GradientStep.from_config(numerics)
        self.evaluator = Evaluator(self.tokenizer, val_qtypes, stop_ids(self.tokenizer, template), val_max_new_tokens)
        self.skipped_total: Counter = Counter()  # this rank's skipped training samples per reason (checkpointed)
        self.source_total: Counter = Counter()  # data=mix: training samples per source seen by this run
        self._model_set_up = False  # `configure_model` applied parallel.*: not again
        # A checkpoint's RNG states, from `on_load_checkpoint` until `on_train_start` applies them.
        self.pending_rng: dict | None = None
        # During a validation epoch of a sharded model only: the unsharded copy generation uses.
        self.val_model: VLM | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        for part in frozen_parts(self.model, self.freeze_spec):  # no dropout / norm-stat drift
            part.eval()
        return self

    # ---- training -----------------------------------------------------------------------------
    def forward(self, batch: dict) -> torch.Tensor:
        """`[B, L, D]` decoder hidden states of a collated batch."""
        return self.model(
            batch["input_ids"],
            batch["position_ids"],
            batch.get("attention_mask"),
            batch.get("pixel_patches"),
            batch.get("grid_thw"),
            batch.get("media_per_sample"),
            batch.get("keys"),
            seq_ids=batch.get("seq_ids"),
        )

    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Sum of token cross-entropies over the label tokens `[]`, and their number.

        Logits are computed only where there is a label (the LM head is applied to those
        hidden states alone), which saves the head's cost on media and prompt positions.
        """
        hidden = self(batch)
        targets = batch["labels"][:, 1:]
        sel = targets != IGNORE
        n = int(sel.sum())
        if n == 0:
            return hidden.sum() * 0.0, 0
        logits = self.model.logits(hidden[:, :-1][sel]).float()
        return F.cross_entropy(logits, targets[sel], reduction="sum"), n

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss_sum, n_label = self.loss_sum(batch)
        self.gradient_step.add(loss_sum.detach(), n_label, batch_stats(self.model, batch))
        B = batch["input_ids"].shape[0]
        self.skipped_total.update(batch.get("skipped") or {})
        if batch.get("sources"):  # data=mix: the mix actually seen, cumulative per source
            self.source_total.update(batch["sources"])
            for name, c in self.source_total.items():
                self.log(f"data/source_{name}", float(c), on_step=True, batch_size=B)
        if self.skipped_total:
            self.log("data/skipped", float(sum(self.skipped_total.values())), on_step=True, batch_size=B)
            for reason, c in self.skipped_total.items():
                self.log(f"data/skipped_{reason}", float(c), on_step=True, batch_size=B)
        # The sum, not the mean: the step's gradient is normalised by its global label-token count.
        return loss_sum

    def on_before_optimizer_step(self, optimizer) -> None:
        loss_scaling = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        report = self.gradient_step.finish(
            self.parameters(),
            self.trainer.accumulate_grad_batches * self.trainer.world_size,
            self.device,
            self.global_step,
            loss_scaling,
        )
        for name, value in report.metrics().items():
            self.log(name, value, on_step=True, prog_bar=name == "train/loss")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """`trainer.gradient_clip_val`, by the gradient step (which also works with fused optimizers)."""
        self.gradient_step.clip(self.parameters(), gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("VLMModule was built without an optimizer (inference-only)")
        loss_scaling = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        opt = build_optimizer(self.model, self.optimizer_factory, self.component_lr, loss_scaling)
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    def configure_model(self) -> None:
        """`parallel.*` (`vlm.training.parallel.setup_model`): FSDP2 under a model-parallel strategy
        (`trainer=fsdp`), activation checkpointing and compile when asked for."""
        from vlm.training.parallel import setup_model

        if self._model_set_up:
            return
        precision = str(getattr(self.trainer, "precision", "")) if self._trainer is not None else None
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        self._model_set_up = setup_model(self.model, self.parallel_cfg, mesh, precision, self.device)

    # ---- exact resume: per-rank state ----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        mine = {
            "rng": rng_state(),
            "skipped_samples": dict(self.skipped_total),
            "gradient_step": self.gradient_step.state_dict(),
        }
        checkpoint["vlm_resume"] = gather_ranks(mine)  # a collective: every rank saves

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        res = checkpoint.get("vlm_resume")
        if res is None or self._trainer is None or self.trainer.state.fn != "fit":
            return
        step = int(checkpoint.get("global_step", 0))
        mine = my_rank(res)
        if mine is None:
            log.warning(
                "checkpoint was saved with %d ranks, resuming on %d: RNG states are not restored and the "
                "training streams are reseeded from step %d (not bit-identical to an uninterrupted run)",
                res["world_size"],
                self.trainer.world_size,
                step,
            )
        else:
            self.pending_rng = mine["rng"]
            self.skipped_total = Counter(mine.get("skipped_samples") or {})
            # checkpoints written before the gradient step had its own entry hold the skip count alone
            self.gradient_step.load_state_dict(
                mine.get("gradient_step") or {"skipped_steps": mine.get("skipped_steps", 0)}
            )
        dm = self.trainer.datamodule
        if dm is not None and type(dm).__qualname__ not in checkpoint:  # written before the datamodule had state
            dm.load_state_dict(legacy_data_state(res, step))

    def on_train_start(self) -> None:
        # After the train DataLoader has started (its start draws from the RNG in both runs).
        if self.pending_rng is not None:
            set_rng_state(self.pending_rng)
            self.pending_rng = None

    def on_train_end(self) -> None:
        # Whatever the logger (none at all included), the console gets the per-reason skip counts.
        if self.trainer.is_global_zero:
            what = "training" if self.trainer.world_size == 1 else "training (rank 0's share)"
            print(format_skips(self.skipped_total, what))

    # ---- validation: generate and score ------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        from vlm.training.parallel import is_sharded, unsharded_copy

        self.evaluator.reset()
        self.evaluator.to(self.device)
        if is_sharded(self.model):
            # generating with the sharded model would deadlock: one unsharded copy per rank
            self.val_model = unsharded_copy(
                self.model, lambda: build_model(self.hparams["model"], self.tokenizer), self.device
            )

    def validation_step(self, batch: dict, batch_idx: int) -> Scored | None:
        """Generate and score one batch; the scored batch goes to callbacks (`ExampleTable`)."""
        return self.evaluator.step(self.model if self.val_model is None else self.val_model, batch)

    def on_validation_epoch_end(self) -> None:
        self.val_model = None
        res = self.evaluator.compute()
        for name, v in self.evaluator.log_items(res).items():
            self.log(name, v, prog_bar=name == "val/accuracy", sync_dist=False)
        if res["skipped"] and not self.trainer.sanity_checking:
            print(format_skips(res["skipped"], "validation"))
