"""Training callbacks: throughput and model-FLOP utilisation (MFU), and the W&B example table.

`Throughput` logs per optimizer step, over all ranks:

    train/samples_s, train/image_tok_s, train/text_tok_s   (padding excluded; image tokens are the
                                                            visual tokens the decoder sees)
    train/tflops        achieved model TFLOP/s per device
    train/mfu           train/tflops / the device's peak

Model FLOPs are counted analytically from the step's token counts (the LightningModule sums them
over micro-batches and ranks, `VLMModule.gradient_step.last`), for each component by its own tokens:

    vision tower   per patch: 2·N_linear + the conv stem; attention 4·d·n² per layer per item of n patches
    projector      per visual token: 2·N
    decoder        per real text+image token: 2·N_blocks; attention 2·d·L(L+1) per layer per sample of
                   L real tokens (causal: half of the square); LM head 2·d·V per label token
                   (logits are only computed where there is a label)

and a forward is multiplied by 3 for a trainable component (forward + activation gradients + weight
gradients: the usual 6·N per token), by 2 for a frozen component that gradients must still pass
through to a trainable one before it (a frozen decoder under a trainable projector), and by 1 for
a frozen component with nothing trainable before it (the usual 2·N). Padding, recomputation from
activation checkpointing and the work of attention over padding are not model FLOPs.

Peaks: dense bf16 tensor-core numbers from a table keyed by the CUDA device name (`PEAK_TFLOPS`);
on a CPU, or an unknown device, `peak_tflops` if given, else measured at start-up by a short GEMM
in the training dtype on this process's threads.
"""

from __future__ import annotations

import copy
import logging
import time

import lightning as L
import torch
from torch import nn

from vlm.build.model import build_model
from vlm.checkpoint.load import export_folder
from vlm.training.optim import adapted_components
from vlm.training.parallel import full_state_dict, is_sharded

log = logging.getLogger("vlm.training.callbacks")

# Dense (no sparsity) peak TFLOP/s per device: (bf16/fp16 tensor core, tf32/fp32).
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "GB200": (2500.0, 1250.0),
    "B200": (2250.0, 1100.0),
    "H200": (989.0, 494.0),
    "GH200": (989.0, 494.0),
    "H100 NVL": (835.0, 418.0),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.0, 494.0),  # SXM
    "H800": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "A800": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "L40": (181.0, 90.5),
    "L4": (121.0, 60.0),
    "A10G": (70.0, 35.0),
    "A10": (125.0, 62.5),
    "RTX 6000 Ada": (364.0, 182.0),
    "RTX 4090": (165.0, 82.6),
    "RTX 3090": (71.0, 35.6),
    "V100": (125.0, 15.7),  # fp16 (no bf16)
    "T4": (65.0, 8.1),  # fp16 (no bf16)
}


def device_peak_tflops(device: torch.device, low_precision: bool = True) -> float | None:
    """Table peak for a CUDA device (longest matching name first), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key][0 if low_precision else 1]
    return None


def measure_gemm_tflops(
    dtype: torch.dtype = torch.bfloat16, n: int = 1024, seconds: float = 0.5, device: str | torch.device = "cpu"
) -> float:
    """Achieved TFLOP/s of an n×n×n matmul in `dtype`, best of repeated timed batches."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best, t_end = 0.0, time.perf_counter() + seconds
    reps = 4
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best / 1e12


def _numel(module: nn.Module | None, *, only: tuple[type, ...] | None = None) -> int:
    if module is None:
        return 0
    if only is None:
        return sum(p.numel() for p in module.parameters())
    return sum(p.numel() for m in module.modules() if isinstance(m, only) for p in m.parameters(recurse=False))


class FlopModel:
    """Analytic model FLOPs of one training step from its token counts (see the module docstring)."""

    def __init__(self, model: nn.Module, freeze: dict | None = None):
        freeze = freeze or {}
        enc, proj, dec = model.encoder, model.projector, model.decoder
        # vision: per-patch linear work (blocks, patch projection, final norm) + conv stem per patch
        self.enc_per_patch = 2 * (_numel(enc.blocks) + _numel(enc.patch_embed.proj) + _numel(enc.norm))
        stem = getattr(enc.patch_embed, "conv", None)
        if stem is not None:
            P = enc.patch_embed.patch_size
            convs = [m for m in stem if isinstance(m, nn.Conv2d)]
            side = P
            for c in convs:
                side = (side + 2 * c.padding[0] - c.kernel_size[0]) // c.stride[0] + 1
                self.enc_per_patch += 2 * c.weight.numel() * side * side
        self.enc_attn = 4 * enc.dim * len(enc.blocks)  # × n² per item
        self.proj_per_token = 2 * _numel(proj)
        self.dec_per_token = 2 * (_numel(dec.layers) + _numel(dec.norm))
        self.dec_attn = 2 * dec.n_heads * dec.head_dim * dec.n_layers  # × L(L+1) per sample
        self.head_per_label = 2 * dec.lm_head.weight.numel()
        # fusion=cross_attn: the gated blocks run on every text token (keys/values on visual tokens:
        # counted as if on text, a small over-estimate for the tiny marker-only sequences)
        self.xattn_per_token = 2 * _numel(getattr(model, "cross_attn", None))
        order = ["encoder", "projector", "decoder", "cross_attn"]
        self.mult = {}
        upstream_trainable = False
        adapted = adapted_components(model)  # low-rank adapters: no weight gradient for the rest
        for comp in order:
            trainable = not freeze.get(comp, False) and comp not in adapted
            self.mult[comp] = 3 if trainable else (2 if upstream_trainable or comp in adapted else 1)
            upstream_trainable |= trainable or comp in adapted

    def __call__(self, st: dict) -> dict[str, float]:
        vision = self.enc_per_patch * st.get("patches", 0) + self.enc_attn * st.get("patch_sq", 0)
        projector = self.proj_per_token * st.get("image_tokens", 0)
        tokens = st.get("text_tokens", 0) + st.get("image_tokens", 0)
        decoder = (
            self.dec_per_token * tokens
            + self.dec_attn * st.get("seq_sq", 0)
            + self.head_per_label * st.get("label_tokens", 0)
        )
        out = {
            "vision": vision * self.mult["encoder"],
            "projector": projector * self.mult["projector"],
            "decoder": decoder * self.mult["decoder"],
        }
        if self.xattn_per_token:
            out["cross_attn"] = self.xattn_per_token * tokens * self.mult["cross_attn"]
        out["total"] = sum(out.values())
        return out


class Throughput(L.Callback):
    """Per-step throughput, achieved model FLOP/s and MFU (see the module docstring).

    peak_tflops: the device's peak per process; null = the table (CUDA) or a GEMM measured at
    start-up (CPU / unknown GPU). window: steps averaged for the logged rates (1 = per step).
    """

    def __init__(self, peak_tflops: float | None = None, measure_seconds: float = 0.25, window: int = 1):
        self.peak_tflops = peak_tflops
        self.measure_seconds, self.window = measure_seconds, max(1, int(window))
        self.flops: FlopModel | None = None
        self.history: list[dict[str, float]] = []
        self._t0: float | None = None
        self._last_step = -1
        self._recent: list[tuple[float, dict]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self.flops = FlopModel(pl_module.model, getattr(pl_module, "freeze_spec", {}))
        if self.peak_tflops is None:
            low = "bf16" in str(trainer.precision) or "16" in str(trainer.precision)
            dev = trainer.strategy.root_device
            self.peak_tflops = device_peak_tflops(dev, low)
            if self.peak_tflops is None:
                dtype = (
                    torch.bfloat16
                    if "bf16" in str(trainer.precision)
                    else (torch.float16 if "16" in str(trainer.precision) else torch.float32)
                )
                self.peak_tflops = measure_gemm_tflops(dtype, seconds=self.measure_seconds, device=dev)
                self.peak_source = f"measured {dtype} GEMM"
            else:
                self.peak_source = "table"
            log.info(
                "throughput: peak %.3f TFLOP/s per process (%s)", self.peak_tflops, getattr(self, "peak_source", "set")
            )

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._t0 = None  # validation time is not training time

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step or self._t0 is None:
            return  # inside an accumulation window
        self._last_step = trainer.global_step
        now = time.perf_counter()
        dt, self._t0 = now - self._t0, now
        last = getattr(getattr(pl_module, "gradient_step", None), "last", None)
        st = dict(last.stats) if last is not None else {}
        if not st or self.flops is None:
            return
        self._recent = (self._recent + [(dt, st)])[-self.window :]
        T = sum(d for d, _ in self._recent)
        tot = {k: sum(s.get(k, 0.0) for _, s in self._recent) for k in ("samples", "image_tokens", "text_tokens")}
        flops = sum(self.flops(s)["total"] for _, s in self._recent)
        world = max(1, trainer.world_size)
        tflops = flops / T / world / 1e12
        row = {
            "train/samples_s": tot["samples"] / T,
            "train/image_tok_s": tot["image_tokens"] / T,
            "train/text_tok_s": tot["text_tokens"] / T,
            "train/tflops": tflops,
            "train/mfu": tflops / self.peak_tflops if self.peak_tflops else float("nan"),
            "train/step_s": dt,
        }
        cap = sum(s.get("capacity", 0.0) for _, s in self._recent)
        if cap:  # share of the batch tensors that is padding (sequence packing drives it down)
            row["train/padding"] = 1.0 - (tot["image_tokens"] + tot["text_tokens"]) / cap
        self.history.append({"step": trainer.global_step, **row, "model_flops": self.flops(st)["total"]})
        pl_module.log_dict(row, on_step=True, on_epoch=False)


class ExampleTable(L.Callback):
    """`val/examples`: a W&B table of the first `n` validation samples of each validation epoch
    (image, question type, question, prediction, answer, correct), from what `validation_step`
    returns (`vlm.evaluation.evaluate.Scored`, or None for a batch with nothing scored). Only with a
    `WandbLogger`, and not for the sanity check."""

    def __init__(self, n: int = 8):
        self.n = int(n)
        self.rows: list[
            tuple
        ] = []  # this validation epoch's examples: (image or None, qtype, prompt, prediction, answer)

    @staticmethod
    def _wandb_loggers(trainer) -> list:
        from lightning.pytorch.loggers import WandbLogger

        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.rows = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is None or len(self.rows) >= self.n or trainer.sanity_checking or not self._wandb_loggers(trainer):
            return
        grids = batch["grid_thw"].tolist() if batch.get("grid_thw") is not None else []  # [M, 3]
        offsets, o = [], 0  # first patch row of each media item in pixel_patches [N, C·P·P]
        for t, h, w in grids:
            offsets.append(o)
            o += t * h * w
        item = 0
        for b, m in enumerate(batch["media_per_sample"].tolist()):
            if len(self.rows) >= self.n:
                break
            image = None
            if m:  # the sample's first media item
                t, h, w = grids[item]
                image = (batch["pixel_patches"][offsets[item] : offsets[item] + t * h * w].detach().cpu(), (t, h, w))
            item += m
            self.rows.append((image, outputs.qtypes[b], outputs.prompts[b], outputs.predictions[b], outputs.answers[b]))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        loggers = self._wandb_loggers(trainer)
        if not loggers or not self.rows or trainer.sanity_checking:
            return
        import wandb

        from vlm.build.model import build_processor, geometry_of
        from vlm.evaluation.metrics import normalize_answer

        hp = pl_module.hparams
        proc = build_processor(hp["processor"], geometry=geometry_of(hp["model"]))
        rows = [
            [
                wandb.Image(proc.to_pil(*image)) if image is not None else None,
                qtype,
                prompt,
                pred,
                ans,
                normalize_answer(pred) == normalize_answer(ans),
            ]
            for image, qtype, prompt, pred, ans in self.rows
        ]
        columns = ["image", "qtype", "question", "prediction", "answer", "correct"]
        for lg in loggers:  # straight to the run: Lightning's log_table stringifies media cells
            lg.experiment.log(
                {"val/examples": wandb.Table(columns=columns, data=rows), "trainer/global_step": trainer.global_step}
            )
        self.rows = []


class ExportCallback(L.Callback):
    """Write the export folder at the end of training (rank 0).

    A sharded (FSDP2) model is gathered first: every rank takes part in the collective, rank 0
    rebuilds an unsharded model from the full weights and writes the folder, then all ranks meet."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        model = pl_module.model
        if is_sharded(model):
            state = full_state_dict(model)  # collective: every rank calls it
            if trainer.is_global_zero:
                model = build_model(pl_module.hparams["model"], pl_module.tokenizer)
                model.load_state_dict(state, strict=False)
        if trainer.is_global_zero:
            config = dict(pl_module.hparams)
            if getattr(model, "lora", None) is not None:  # adapters folded into the exported weights
                from vlm.model.lora import merge_lora

                model = merge_lora(copy.deepcopy(model) if model is pl_module.model else model)
                config["model"] = model.spec.to_dict()
            out = export_folder(model, pl_module.tokenizer, config, self.out_dir)
            log.info("exported model to %s", out)
            print(f"exported model to {out}")
        if trainer.world_size > 1:
            trainer.strategy.barrier("export")
