"""The LightningModule: loss, optimisation, logging and generation-based validation.

Everything needed to rebuild the model for inference (model config, tokenizer, image processor
and template configs) is stored in `hparams`, so a `.ckpt` is self-contained.
"""

from __future__ import annotations

import time
from collections import Counter
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F

from vlm.build import build_model
from vlm.data.template import IGNORE
from vlm.generate import generate
from vlm.metrics import ExactMatchByType, normalize_answer
from vlm.optim import COMPONENTS, param_groups
from vlm.tokenizer import TextTokenizer


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
        log_examples: int = 8,
    ):
        super().__init__()
        # Only plain, rebuildable data goes into the checkpoint (loadable with weights_only=True).
        self.save_hyperparameters(
            {"model": model, "tokenizer_json": tokenizer_json, "processor": processor, "template": template,
             "val_qtypes": val_qtypes}
        )
        self.tokenizer = TextTokenizer.from_str(tokenizer_json)
        self.model = build_model(model, self.tokenizer)
        self.freeze_spec = dict(model.get("freeze") or {})
        self._apply_freeze()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.component_lr = dict(component_lr or {})
        self.val_max_new_tokens, self.log_examples = val_max_new_tokens, log_examples
        self.val_em = ExactMatchByType(list(val_qtypes or []) + ["other"])
        tok = self.tokenizer
        self.eos_ids = [tok.im_end_id, tok.eos_id]
        self.suppress_ids = [tok.pad_id, tok.im_start_id, tok.vision_start_id, tok.vision_end_id, tok.image_pad_id, tok.video_pad_id]
        self.skipped_total: Counter = Counter()
        self._t_last: float | None = None
        self._examples: list = []

    # ---- freezing -----------------------------------------------------------------------------
    def _apply_freeze(self) -> None:
        unknown = set(self.freeze_spec) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"model.freeze has unknown components {sorted(unknown)}; use {COMPONENTS}")
        for comp in COMPONENTS:
            frozen = bool(self.freeze_spec.get(comp, False))
            for p in getattr(self.model, comp).parameters():
                p.requires_grad_(not frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        for comp in COMPONENTS:  # frozen parts stay in eval mode (no dropout / norm-stat drift)
            if self.freeze_spec.get(comp):
                getattr(self.model, comp).eval()
        return self

    # ---- training -----------------------------------------------------------------------------
    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(
            batch["input_ids"], batch["position_ids"], batch.get("attention_mask"),
            batch.get("pixel_patches"), batch.get("grid_thw"), batch.get("media_per_sample"), batch.get("keys"),
        )

    def loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Sum of token cross-entropies over label tokens / number of label tokens.

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
        return F.cross_entropy(logits, targets[sel], reduction="sum") / n, n

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, n_label = self.loss(batch)
        B = batch["input_ids"].shape[0]
        n_img = int(self.model.is_media(batch["input_ids"]).sum())
        n_text = int(batch["attention_mask"].sum()) - n_img
        now = time.perf_counter()
        if self._t_last is not None:
            dt = now - self._t_last
            self.log_dict({"train/image_tok_s": n_img / dt, "train/text_tok_s": n_text / dt, "train/samples_s": B / dt}, on_step=True, batch_size=B)
        self._t_last = now
        self.skipped_total.update(batch.get("skipped") or {})
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=B)
        self.log("train/label_tokens", float(n_label), on_step=True, batch_size=B)
        if self.skipped_total:
            self.log("data/skipped", float(sum(self.skipped_total.values())), on_step=True, batch_size=B)
            for reason, c in self.skipped_total.items():
                self.log(f"data/skipped_{reason}", float(c), on_step=True, batch_size=B)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            self.log("train/grad_norm", norm, on_step=True, prog_bar=False)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("VLMModule was built without an optimizer (inference-only)")
        groups = param_groups(self.model, self.optimizer_factory.keywords.get("lr", 1e-3),
                              self.optimizer_factory.keywords.get("weight_decay", 0.0), self.component_lr)
        opt = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    def configure_model(self) -> None:
        """Hook for sharding and activation checkpointing (FSDP2 goes here; see the scale-out issue)."""

    # ---- validation: generate and score ------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.val_em.reset()
        self._examples = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = generate(self.model, batch, self.val_max_new_tokens, self.eos_ids, suppress_ids=self.suppress_ids)
        preds = [self.tokenizer.decode(o) for o in out]
        self.val_em.update(preds, batch["answers"], batch["qtypes"])
        if len(self._examples) < self.log_examples:
            self._collect_examples(batch, preds)

    def _collect_examples(self, batch: dict, preds: list[str]) -> None:
        start = 0
        grids = batch["grid_thw"].tolist() if batch.get("grid_thw") is not None else []
        per = batch["media_per_sample"].tolist()
        offsets, o = [], 0
        for g in grids:
            offsets.append(o)
            o += g[0] * g[1] * g[2]
        for b, m in enumerate(per):
            if len(self._examples) >= self.log_examples:
                break
            image = None
            if m:
                g = grids[start]
                n = g[0] * g[1] * g[2]
                image = (batch["pixel_patches"][offsets[start] : offsets[start] + n].detach().cpu(), tuple(g))
            start += m
            self._examples.append((image, batch["prompts"][b], preds[b], batch["answers"][b], batch["qtypes"][b]))

    def on_validation_epoch_end(self) -> None:
        res = self.val_em.compute()
        for k, v in res.items():
            name = "val/accuracy" if k == "mean" else f"val/acc_{k}"
            self.log(name, v, prog_bar=k == "mean", sync_dist=False)
        self._log_example_table()

    def _log_example_table(self) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in self.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not self._examples or self.trainer.sanity_checking:
            return
        import wandb

        from vlm.build import build_processor

        proc = build_processor(self.hparams["processor"])
        rows = []
        for image, prompt, pred, ans, qtype in self._examples:
            img = wandb.Image(proc.to_pil(*image)) if image is not None else None
            rows.append([img, qtype, prompt, pred, ans, normalize_answer(pred) == normalize_answer(ans)])
        for lg in loggers:
            lg.log_table(key="val/examples", columns=["image", "qtype", "question", "prediction", "answer", "correct"], data=rows, step=self.global_step)
