"""One optimizer step's gradient: global loss normalisation, the non-finite guard, clipping.

Loss normalisation (exact across gradient accumulation and ranks). Each micro-batch returns the
*sum* of its token cross-entropies. Lightning divides it by `accumulate_grad_batches` (A) and
DDP / FSDP average gradients over the W ranks, so after the window the gradient is
`Σ_{rank, micro} ∇sum / (A·W)`. Before the optimizer step (and before clipping) the label-token
counts of the window are summed over ranks (one all-reduce) and every gradient is multiplied by
`A·W / N_step`: the update is exactly that of the mean over all N_step label tokens of the step,
as if the whole step were one batch — not the mean of per micro-batch means, which over-weights
short answers. No lookahead is needed because the scale is applied to the accumulated gradient,
not to each micro-batch's loss. The reported loss is the same global per-token mean.

Numerics guard: a non-finite loss (any micro-batch, any rank) or gradient norm is detected on
every rank (the flag rides on the same all-reduce; the gradient norm is global already), and then
either the update is skipped (`on_nonfinite=skip`: gradients are dropped, so the optimizer leaves
every parameter and its state untouched; the LR schedule still advances one step) or training
stops with `NonFiniteError` (`halt`, or more than `max_consecutive_skips` skips in a row).

Clipping by norm reuses the norm the guard computed (global over ranks, after normalisation):
one norm pass per step, and the same update as `clip_grad_norm_`. It is done here rather than by
Lightning's precision plugin, which refuses fused optimizers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from vlm.errors import NonFiniteError

log = logging.getLogger("vlm.training.gradient_step")

NONFINITE_MODES = ("skip", "halt")
# per micro-batch counts summed over the optimizer step and all ranks (one all-reduce)
STAT_KEYS = (
    "label_tokens",
    "loss_sum",
    "nonfinite_loss",
    "samples",
    "text_tokens",
    "image_tokens",
    "seq_sq",
    "patches",
    "patch_sq",
    "media",
    "capacity",
)


def batch_stats(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Token counts of one micro-batch for throughput and FLOPs, as tensors (no device sync).

    samples, text_tokens and image_tokens exclude padding; seq_sq is Σ L(L+1) over the attended
    sequences of L tokens (the packed samples of a packed row); patches and patch_sq count the
    vision tower's patches per media item; capacity is the batch tensor's B·L."""
    am = batch["attention_mask"]  # [B, L]
    lengths = am.sum(-1).double()
    n_img = model.is_media(batch["input_ids"]).sum().double()
    st = {
        "samples": torch.tensor(float(am.shape[0])),
        "text_tokens": lengths.sum() - n_img,
        "image_tokens": n_img,
        "seq_sq": (lengths * (lengths + 1)).sum(),
        "capacity": torch.tensor(float(am.numel())),
    }
    per = batch.get("sample_lengths")
    if per is not None:  # packed rows: attention is per sample, samples are the packed ones
        per = per.double()
        st.update(samples=torch.tensor(float(per.numel())), seq_sq=(per * (per + 1)).sum())
    grid = batch.get("grid_thw")  # [M, 3]
    if grid is not None and grid.numel():
        n = grid.prod(-1).double()
        st.update(patches=n.sum(), patch_sq=(n * n).sum(), media=torch.tensor(float(grid.shape[0])))
    return st


@dataclass
class StepReport:
    """What one optimizer step's gradient looked like (global over micro-batches and ranks)."""

    stats: dict[str, float]  # STAT_KEYS, summed over the step's micro-batches and all ranks
    loss: float  # mean cross-entropy over the step's label tokens
    grad_norm: torch.Tensor  # [] global gradient norm after normalisation, before clipping
    nonfinite_loss: bool
    nonfinite_grad: bool
    skipped_steps: int  # non-finite steps skipped so far in the run

    def metrics(self) -> dict[str, float | torch.Tensor]:
        out = {
            "train/loss": self.loss,
            "train/label_tokens": self.stats["label_tokens"],
            "train/grad_norm": self.grad_norm.float(),
        }
        if self.nonfinite_loss or self.nonfinite_grad:
            out.update(
                {
                    "train/nonfinite_loss": float(self.nonfinite_loss),
                    "train/nonfinite_grad": float(self.nonfinite_grad),
                    "train/skipped_steps": float(self.skipped_steps),
                }
            )
        return out


class GradientStep:
    """The gradient of one optimizer step, from its micro-batches to what the optimizer sees.

    Per micro-batch `add`; once per optimizer step `finish` (normalise, norm, guard) then `clip`.
    Its counters are part of the checkpoint (`state_dict`): `skipped_steps` and
    `consecutive_skips` (non-finite steps over the run, and in a row) and `grad_norm` (the last
    step's, which `clip` uses). `last` is the last finished step's report."""

    def __init__(self, on_nonfinite: str = "skip", max_consecutive_skips: int = 20):
        if on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"numerics: on_nonfinite must be one of {NONFINITE_MODES} (got {on_nonfinite!r})")
        self.on_nonfinite, self.max_consecutive_skips = on_nonfinite, int(max_consecutive_skips)
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.grad_norm: torch.Tensor | None = None
        self.last: StepReport | None = None
        self._window = dict.fromkeys(STAT_KEYS, 0.0)  # sums over the current step's micro-batches

    @classmethod
    def from_config(cls, numerics: dict | None) -> GradientStep:
        """From the `numerics` config group (`on_nonfinite`, `max_consecutive_skips`)."""
        numerics = dict(numerics or {})
        kw = {k: numerics.pop(k) for k in ("on_nonfinite", "max_consecutive_skips") if k in numerics}
        if numerics:
            raise ValueError(f"numerics: unknown keys {sorted(numerics)}; known: on_nonfinite, max_consecutive_skips")
        return cls(**kw)

    def add(self, loss_sum: torch.Tensor, n_label: int, stats: dict[str, torch.Tensor]) -> None:
        """One micro-batch: its summed loss `[]` (detached), label tokens and `batch_stats`."""
        w = self._window
        w["label_tokens"] += n_label
        # kept as tensors: no device sync per micro-batch
        w["loss_sum"] = w["loss_sum"] + loss_sum.double()
        w["nonfinite_loss"] = w["nonfinite_loss"] + (~torch.isfinite(loss_sum)).double()
        for k, v in stats.items():
            w[k] = w[k] + v

    def _reduce(self, device: torch.device) -> dict[str, float]:
        vec = torch.stack([torch.as_tensor(self._window[k], dtype=torch.float64, device=device) for k in STAT_KEYS])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
        self._window = dict.fromkeys(STAT_KEYS, 0.0)
        return dict(zip(STAT_KEYS, vec.tolist()))

    def finish(
        self,
        params: Iterable[nn.Parameter],
        averaged_over: int,
        device: torch.device,
        step: int,
        loss_scaling: bool = False,
    ) -> StepReport:
        """Before the optimizer step: normalise the accumulated gradients by the step's global
        label-token count, take their global norm and guard against non-finite values.

        averaged_over: A·W, the factor Lightning and DDP/FSDP divided the summed gradient by.
        loss_scaling: fp16 loss scaling is on; its scaler skips steps with inf gradients itself,
        so only the loss is checked. A skipped step leaves every `param.grad` None; a halt raises
        `NonFiniteError`."""
        params = list(params)
        st = self._reduce(device)
        n_tokens = st["label_tokens"]
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, averaged_over / max(n_tokens, 1.0))
        norm = _full(torch.nn.utils.get_total_norm(grads)) if grads else torch.zeros(())
        loss = st["loss_sum"] / max(n_tokens, 1.0)
        bad_loss = st["nonfinite_loss"] > 0
        bad_grad = not loss_scaling and not bool(torch.isfinite(norm))
        if bad_loss or bad_grad:
            self._nonfinite(params, step, bad_loss, bad_grad, loss, float(norm), int(st["nonfinite_loss"]))
        else:
            self.consecutive_skips = 0
        self.grad_norm = norm
        self.last = StepReport(st, loss, norm, bad_loss, bad_grad, self.skipped_steps)
        return self.last

    def _nonfinite(
        self, params: list, step: int, bad_loss: bool, bad_grad: bool, loss: float, norm: float, bad_micro: int
    ) -> None:
        what = " and ".join(w for w, bad in (("loss", bad_loss), ("gradient norm", bad_grad)) if bad)
        msg = (
            f"step {step}: non-finite {what} (loss {loss:.4g}, grad norm {norm:.4g}, "
            f"{bad_micro} bad micro-batch(es) over all ranks)"
        )
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.on_nonfinite == "halt" or self.consecutive_skips > self.max_consecutive_skips:
            why = (
                "numerics.on_nonfinite=halt"
                if self.on_nonfinite == "halt"
                else f"{self.consecutive_skips} non-finite steps in a row > numerics.max_consecutive_skips"
            )
            raise NonFiniteError(
                f"{msg}; stopping before the optimizer update ({why}). "
                "Resume from the last checkpoint with a lower learning rate, or check the data of this step."
            )
        log.warning("%s; skipping the update (numerics.on_nonfinite=skip)", msg)
        for p in params:  # the optimizer skips parameters without a gradient
            p.grad = None

    def clip(self, params: Iterable[nn.Parameter], max_value: float | None, algorithm: str | None = None) -> None:
        """Clip the gradients `finish` left: by the global norm it took (`algorithm` None or
        "norm"), or elementwise to ±max_value ("value"). Nothing to do after a skipped step."""
        params = list(params)
        grads = [p.grad for p in params if p.grad is not None]
        if not max_value or not grads:
            return
        if algorithm not in (None, "norm"):
            torch.nn.utils.clip_grad_value_(params, max_value)
            return
        coef = float(max_value) / (float(self.grad_norm) + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)

    def state_dict(self) -> dict:
        return {
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "grad_norm": None if self.grad_norm is None else float(self.grad_norm),
        }

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        norm = state.get("grad_norm")
        self.grad_norm = None if norm is None else torch.tensor(float(norm))


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (sharded gradient norm) as a plain tensor; plain tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
