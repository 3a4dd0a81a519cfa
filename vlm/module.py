"""The LightningModule: loss, optimisation, logging and generation-based validation.

Everything needed to rebuild the model for inference (model config, tokenizer, image processor
and template configs) is stored in `hparams`, so a `.ckpt` is self-contained.

Loss normalisation (exact across gradient accumulation and ranks). Each micro-batch returns the
*sum* of its token cross-entropies. Lightning divides it by `accumulate_grad_batches` (A) and
DDP / FSDP average gradients over the W ranks, so after the window the gradient is
`Σ_{rank, micro} ∇sum / (A·W)`. Before the optimizer step (`on_before_optimizer_step`, i.e.
before clipping) the label-token counts of the window are summed over ranks (one all-reduce) and
every gradient is multiplied by `A·W / N_step`: the update is exactly that of the mean over all
N_step label tokens of the step, as if the whole step were one batch — not the mean of per
micro-batch means, which over-weights short answers. No lookahead is needed because the scale is
applied to the accumulated gradient, not to each micro-batch's loss. The logged `train/loss` is
the same global per-token mean.

Numerics guard: in the same hook a non-finite loss (any micro-batch, any rank) or gradient norm
is detected on every rank (the flag rides on the same all-reduce; the gradient norm is global
already), logged (`train/nonfinite_loss`, `train/nonfinite_grad`), and then either the update is
skipped (`numerics.on_nonfinite=skip`: gradients are dropped, so the optimizer leaves every
parameter and its state untouched; the LR schedule still advances one step) or the run stops with
`NonFiniteError` (`halt`).

Exact resume: besides what Lightning stores (weights, optimizer, scheduler, loop counters), the
checkpoint holds each rank's RNG states and the position of each DataLoader worker in its
training stream (`vlm.data.webdataset.StreamTracker`); see `on_save_checkpoint`.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from functools import partial

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlm.build import build_model, self_contained_config, stop_ids
from vlm.data.sample import format_skips
from vlm.data.template import IGNORE
from vlm.data.webdataset import (
    ShardDataset,
    StreamTracker,
    clear_resume_state,
    set_resume_state,
)
from vlm.evaluate import Evaluator
from vlm.metrics import normalize_answer
from vlm.optim import COMPONENTS, param_groups
from vlm.tokenizer import TextTokenizer

log = logging.getLogger("vlm.module")

NONFINITE_MODES = ("skip", "halt")
# per micro-batch counts summed over the optimizer step and all ranks (one all-reduce)
STAT_KEYS = ("label_tokens", "loss_sum", "nonfinite_loss", "samples", "text_tokens", "image_tokens",
             "seq_sq", "patches", "patch_sq", "media", "capacity")


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (numerics.on_nonfinite=halt)."""


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
        parallel: dict | None = None,
        numerics: dict | None = None,
        meta_init: bool = False,
    ):
        """meta_init: build the model on the meta device (no weights read or allocated) and take
        rank 0's in `configure_model` — set by `vlm.train` on ranks other than 0 under a sharded
        strategy with `parallel.init=rank0`; rank 0 passes False and keeps its full weights until
        they are broadcast."""
        super().__init__()
        # Only plain, rebuildable data goes into the checkpoint (loadable with weights_only=True).
        self.save_hyperparameters(
            {"model": model, "tokenizer_json": tokenizer_json, "processor": processor, "template": template,
             "val_qtypes": val_qtypes}
        )
        self.tokenizer = TextTokenizer.from_str(tokenizer_json)
        if meta_init:
            from vlm.model.hf import skeleton

            with torch.device("meta"), skeleton():
                self.model = build_model(model, self.tokenizer)
            log.info("model built on the meta device (parallel.init=rank0): its shards come from rank 0")
        else:
            self.model = build_model(model, self.tokenizer)
        # pretrained parts (vlm.model.hf) -> their native classes: the checkpoint needs no model folders
        self.hparams["model"] = self_contained_config(model, self.model)
        self.freeze_spec = dict(model.get("freeze") or {})
        self._apply_freeze()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.component_lr = dict(component_lr or {})
        self.val_max_new_tokens, self.log_examples = val_max_new_tokens, log_examples
        tok = self.tokenizer
        self.eos_ids = stop_ids(tok, template)
        self.evaluator = Evaluator(tok, val_qtypes, self.eos_ids, val_max_new_tokens)
        self.skipped_total: Counter = Counter()
        self.source_total: Counter = Counter()
        self._examples: list = []
        self.parallel_cfg = dict(parallel or {})
        numerics = dict(numerics or {})
        self.on_nonfinite = numerics.pop("on_nonfinite", "skip")
        self.max_consecutive_skips = int(numerics.pop("max_consecutive_skips", 20))
        if numerics or self.on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"numerics: on_nonfinite must be one of {NONFINITE_MODES} (got {self.on_nonfinite!r}); "
                             f"unknown keys {sorted(numerics)}")
        self._parallelized = self._compiled = False
        self._acc = self._new_acc()
        self.last_step_stats: dict[str, float] = {}  # global counts of the last optimizer step (read by callbacks)
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self._tracker = StreamTracker()
        self._rng_to_restore: dict | None = None

    # ---- freezing -----------------------------------------------------------------------------
    def _apply_freeze(self) -> None:
        unknown = set(self.freeze_spec) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"model.freeze has unknown components {sorted(unknown)}; use {COMPONENTS}")
        for comp in COMPONENTS:
            frozen = bool(self.freeze_spec.get(comp, False))
            part = getattr(self.model, comp, None)
            for p in part.parameters() if part is not None else ():
                p.requires_grad_(not frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        for comp in COMPONENTS:  # frozen parts stay in eval mode (no dropout / norm-stat drift)
            if self.freeze_spec.get(comp) and getattr(self.model, comp, None) is not None:
                getattr(self.model, comp).eval()
        return self

    # ---- training -----------------------------------------------------------------------------
    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(
            batch["input_ids"], batch["position_ids"], batch.get("attention_mask"),
            batch.get("pixel_patches"), batch.get("grid_thw"), batch.get("media_per_sample"), batch.get("keys"),
            seq_ids=batch.get("seq_ids"),
        )

    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Sum of token cross-entropies over the label tokens, and their number.

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

    def loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Mean token cross-entropy of one batch and its number of label tokens."""
        total, n = self.loss_sum(batch)
        return total / max(n, 1), n

    @staticmethod
    def _new_acc() -> dict:
        return {k: 0.0 for k in STAT_KEYS}

    def _batch_stats(self, batch: dict) -> dict[str, torch.Tensor]:
        """Token counts for normalisation, throughput and FLOPs, as device tensors (no sync)."""
        am = batch["attention_mask"]
        lengths = am.sum(-1).double()
        n_img = self.model.is_media(batch["input_ids"]).sum().double()
        st = {"samples": torch.tensor(float(am.shape[0])), "text_tokens": lengths.sum() - n_img, "image_tokens": n_img,
              "seq_sq": (lengths * (lengths + 1)).sum(), "capacity": torch.tensor(float(am.numel()))}
        per = batch.get("sample_lengths")
        if per is not None:  # packed rows: attention is per sample, samples are the packed ones
            per = per.double()
            st.update(samples=torch.tensor(float(per.numel())), seq_sq=(per * (per + 1)).sum())
        grid = batch.get("grid_thw")
        if grid is not None and grid.numel():
            n = grid.prod(-1).double()
            st.update(patches=n.sum(), patch_sq=(n * n).sum(), media=torch.tensor(float(grid.shape[0])))
        return st

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss_sum, n_label = self.loss_sum(batch)
        B = batch["input_ids"].shape[0]
        acc = self._acc
        acc["label_tokens"] += n_label
        loss_d = loss_sum.detach()
        # kept as tensors: no device sync per micro-batch
        acc["loss_sum"] = acc["loss_sum"] + loss_d.double()
        acc["nonfinite_loss"] = acc["nonfinite_loss"] + (~torch.isfinite(loss_d)).double()
        for k, v in self._batch_stats(batch).items():
            acc[k] = acc[k] + v
        self._tracker.on_batch(self.trainer.train_dataloader, B)
        self.skipped_total.update(batch.get("skipped") or {})
        if batch.get("sources"):  # data=mix: the mix actually seen, cumulative per source
            self.source_total.update(batch["sources"])
            for name, c in self.source_total.items():
                self.log(f"data/source_{name}", float(c), on_step=True, batch_size=B)
        if self.skipped_total:
            self.log("data/skipped", float(sum(self.skipped_total.values())), on_step=True, batch_size=B)
            for reason, c in self.skipped_total.items():
                self.log(f"data/skipped_{reason}", float(c), on_step=True, batch_size=B)
        # The sum, not the mean: the gradient is normalised by the step's global label-token
        # count in `on_before_optimizer_step` (see the module docstring).
        return loss_sum

    def _reduce_step_stats(self) -> dict[str, float]:
        vec = torch.stack([torch.as_tensor(self._acc[k], dtype=torch.float64, device=self.device) for k in STAT_KEYS])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
        self._acc = self._new_acc()
        return dict(zip(STAT_KEYS, vec.tolist()))

    def on_before_optimizer_step(self, optimizer) -> None:
        """Normalise the step's gradient by its global label-token count, log, guard numerics."""
        st = self._reduce_step_stats()
        n_tokens = st["label_tokens"]
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / max(n_tokens, 1.0)
        if grads:
            torch._foreach_mul_(grads, scale)
        norm = _full(torch.nn.utils.get_total_norm(grads)) if grads else torch.zeros(())
        self._grad_norm = norm  # reused by `configure_gradient_clipping`: one norm pass per step
        loss = st["loss_sum"] / max(n_tokens, 1.0)
        self.last_step_stats = st
        self.log("train/loss", loss, prog_bar=True, on_step=True)
        self.log("train/label_tokens", n_tokens, on_step=True)
        self.log("train/grad_norm", norm.float(), on_step=True)
        bad_loss = st["nonfinite_loss"] > 0
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        bad_grad = scaler is None and not bool(torch.isfinite(norm))  # fp16 loss scaling skips inf grads itself
        if not (bad_loss or bad_grad):
            self._consecutive_skips = 0
            return
        what = " and ".join(w for w, bad in (("loss", bad_loss), ("gradient norm", bad_grad)) if bad)
        self.log("train/nonfinite_loss", float(bad_loss), on_step=True)
        self.log("train/nonfinite_grad", float(bad_grad), on_step=True)
        msg = (f"step {self.global_step}: non-finite {what} (loss {loss:.4g}, grad norm {float(norm):.4g}, "
               f"{int(st['nonfinite_loss'])} bad micro-batch(es) over all ranks)")
        self.skipped_steps += 1
        self._consecutive_skips += 1
        if self.on_nonfinite == "halt" or self._consecutive_skips > self.max_consecutive_skips:
            why = ("numerics.on_nonfinite=halt" if self.on_nonfinite == "halt"
                   else f"{self._consecutive_skips} non-finite steps in a row > numerics.max_consecutive_skips")
            raise NonFiniteError(f"{msg}; stopping before the optimizer update ({why}). "
                                 "Resume from the last checkpoint with a lower learning rate, or check the data of this step.")
        log.warning("%s; skipping the update (numerics.on_nonfinite=skip)", msg)
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
        for p in self.parameters():  # the optimizer skips parameters without a gradient
            p.grad = None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """`trainer.gradient_clip_val` by norm, with the norm `on_before_optimizer_step` already
        computed (global over ranks, after loss normalisation) — the same update as
        `clip_grad_norm_`. Done here rather than by Lightning's precision plugin, which refuses
        fused optimizers (`optimizer.fused=true`: AdamW 3.5x faster per step on CPU)."""
        if not gradient_clip_val:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:  # a skipped (non-finite) step dropped them
            return
        if gradient_clip_algorithm not in (None, "norm"):
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
            return
        coef = float(gradient_clip_val) / (float(self._grad_norm) + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise RuntimeError("VLMModule was built without an optimizer (inference-only)")
        groups = param_groups(self.model, self.optimizer_factory.keywords.get("lr", 1e-3),
                              self.optimizer_factory.keywords.get("weight_decay", 0.0), self.component_lr)
        factory = self.optimizer_factory
        if factory.keywords.get("fused") and getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            # fp16 loss scaling: a fused optimizer unscales inside its step, after our gradient
            # normalisation, guard and clipping would have seen scaled gradients.
            log.info("optimizer.fused=true is not used with fp16 loss scaling (trainer.precision=16-mixed): unfused AdamW")
            factory = partial(factory.func, *factory.args, **{**factory.keywords, "fused": False})
        opt = factory(groups)
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    def configure_model(self) -> None:
        """`vlm.parallel.parallelize`: under a model-parallel strategy (`trainer=fsdp`) activation
        checkpointing, compile and FSDP2 (per block / vision tower / projector / root); under
        other strategies only checkpointing and compile, when `parallel.ac` / `parallel.compile` ask."""
        from vlm.parallel import ParallelConfig, parallelize

        if self._parallelized or self._compiled:
            return
        cfg = ParallelConfig.from_dict(self.parallel_cfg)
        precision = str(getattr(self.trainer, "precision", "")) if self._trainer is not None else None
        if self.device_mesh is not None:
            # parallel.init=rank0: rank 0 holds the full weights (taken before sharding), the other
            # ranks a meta skeleton; broadcast them into every rank's shards.
            rank0_init = cfg.init == "rank0" and dist.get_world_size() > 1
            full = self.model.state_dict() if rank0_init and dist.get_rank() == 0 else None
            parallelize(self.model, cfg, self.device_mesh["data_parallel"], precision)
            if rank0_init:
                from vlm.parallel import load_from_rank0

                load_from_rank0(self.model, full, self.device)
                del full
            elif any(p.is_meta for p in self.model.parameters()):
                raise RuntimeError("the model was built on the meta device but parallel.init is not rank0")
            self._parallelized = True
        elif cfg.ac != "none" or cfg.compile:  # single device / DDP: checkpointing and compile only
            parallelize(self.model, cfg, None, precision)
            self._compiled = True

    def configure_callbacks(self):
        """A sharded model needs a collective to export: swap in the sharding-aware export callback."""
        from vlm.parallel import is_sharded_strategy

        if self._trainer is None or not is_sharded_strategy(self.trainer.strategy):
            return []
        from vlm.checkpoint import ExportCallback
        from vlm.export import ShardedExportCallback

        return [ShardedExportCallback(c.out_dir) for c in self.trainer.callbacks
                if isinstance(c, ExportCallback) and not isinstance(c, ShardedExportCallback)]

    # ---- exact resume: RNG states and data position -------------------------------------------
    def _train_dataset(self):
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        ds = getattr(loader, "dataset", None)
        return loader if isinstance(ds, ShardDataset) and ds.train else None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        loader = self._train_dataset()
        mine = {"rng": _rng_state(), "data": self._tracker.state(loader) if loader is not None else None,
                "skipped_samples": dict(self.skipped_total), "skipped_steps": self.skipped_steps}
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        ranks = [None] * world
        if world > 1:
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        checkpoint["vlm_resume"] = {"world_size": world, "ranks": ranks}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        res = checkpoint.get("vlm_resume")
        if res is None or self._trainer is None or self.trainer.state.fn != "fit":
            return
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        step = int(checkpoint.get("global_step", 0))
        if res["world_size"] == world:
            mine = res["ranks"][rank]
            self._rng_to_restore = mine["rng"]
            self.skipped_total = Counter(mine.get("skipped_samples") or {})
            self.skipped_steps = int(mine.get("skipped_steps", 0))
            set_resume_state(mine["data"], step)
        else:
            log.warning("checkpoint was saved with %d ranks, resuming on %d: RNG states are not restored and the "
                        "training streams are reseeded from step %d (not bit-identical to an uninterrupted run)",
                        res["world_size"], world, step)
            set_resume_state(None, step)

    def teardown(self, stage: str) -> None:
        clear_resume_state()  # a resume state no training dataset took must not leak into a later run

    def on_train_start(self) -> None:
        # After the train DataLoader has started (its start draws from the RNG in both runs).
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    # ---- validation: generate and score ------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()
        self.evaluator.to(self.device)
        self._examples = []
        self._val_model = None
        if self._parallelized:
            # Ranks hold different numbers of validation batches and stop generating at different
            # steps, so a sharded forward (an all-gather per unit) would deadlock: generate with
            # one unsharded copy per rank instead (freed at the end of validation).
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
            model = build_model(self.hparams["model"], self.tokenizer).to(self.device)
            model.load_state_dict(state, strict=False)
            self._val_model = model.eval()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        scored = self.evaluator.step(getattr(self, "_val_model", None) or self.model, batch)
        if scored is not None and len(self._examples) < self.log_examples:
            self._collect_examples(batch, scored.predictions)

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
        self._val_model = None
        res = self.evaluator.compute()
        for k, v in res["metrics"].items():
            name = "val/accuracy" if k == "mean" else f"val/acc_{k}"
            self.log(name, v, prog_bar=k == "mean", sync_dist=False)
        for k, v in res["cer"].items():  # character error rate: partial reading shows here
            self.log(f"val/cer_{k}", v, sync_dist=False)
        self._log_example_table()
        for reason, c in res["skipped"].items():
            self.log(f"val/skipped_{reason}", float(c), sync_dist=False)
        if res["skipped"] and not self.trainer.sanity_checking:
            print(format_skips(res["skipped"], "validation"))

    def on_train_end(self) -> None:
        # Whatever the logger (none at all included), the console gets the per-reason skip counts.
        if self.trainer.is_global_zero:
            what = "training" if self.trainer.world_size == 1 else "training (rank 0's share)"
            print(format_skips(self.skipped_total, what))

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
        columns = ["image", "qtype", "question", "prediction", "answer", "correct"]
        for lg in loggers:  # straight to the run: Lightning's log_table stringifies media cells
            lg.experiment.log({"val/examples": wandb.Table(columns=columns, data=rows), "trainer/global_step": self.global_step})


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (sharded gradient norm) as a plain tensor; plain tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
