"""Tower warm-up: teach a from-scratch vision encoder to see before the VLM stage.

`python train.py tower_warmup.steps=1000` first trains `model.encoder` alone on a supervised task
whose labels are free: name the single character drawn on a synthvqa OCR canvas (36 classes,
random position, background and ink; `vlm.data.synthetic`), through a max-pool + linear head that
is thrown away afterwards. Then the usual training starts from that tower.

Why: a from-scratch tower does not learn glyphs through the language-model loss within a CPU
budget. With a warmed-up tower, the default VLM learns 1-character OCR to 96.6% in 1000 steps,
against 0% from scratch (`bench/ocr_tower.py`). On the whole default recipe, two warm-up runs
(1000 steps, ~1.5–2.5 min on the 2-core CPU) gave 42.0% and 49.7% held-out at the same 3000 VLM
steps, against 38.5–39.8% without. That is suggestive, not settled: the colour family alone swings
from 14% to 69% between runs (docs/recipe.md). A pretrained tower (`model/encoder=siglip`) makes
this stage unnecessary; the stage stands in for one.

Images are rendered in-process (no shards) and go through the same `ImageProcessor` geometry and
normalisation as training, repeated in time for encoders with `temporal_patch > 1`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("vlm.warmup")


@dataclass
class WarmupConfig:
    steps: int = 0            # 0: no warm-up
    batch_size: int = 32
    lr: float = 1e-3
    canvas: int = 64          # px of the rendered images (resized by the processor like training images)
    seed: int = 123

    def __post_init__(self):
        for name in ("steps", "batch_size", "canvas"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "steps" else 1):
                raise ValueError(f"tower_warmup.{name} must be a {'non-negative' if name == 'steps' else 'positive'} integer, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"tower_warmup.lr must be > 0, got {self.lr!r}")


def warm_up_tower(encoder: nn.Module, processor, cfg: WarmupConfig | dict, precision: str | None = "bf16-mixed") -> dict:
    """Train `encoder` in place on character naming for `cfg.steps` steps. `processor`: the run's
    `ImageProcessor` (its patch size, resolution and mean/std). Returns {accuracy (last 100
    steps), seconds, steps}."""
    from vlm.data.synthetic import OCR_CHARSET, SynthConfig, render, sample_ocr_scene
    from vlm.data.video import repeat_temporal

    cfg = cfg if isinstance(cfg, WarmupConfig) else WarmupConfig(**dict(cfg or {}))
    if cfg.steps == 0:
        return {"steps": 0, "accuracy": None, "seconds": 0.0}
    syn = SynthConfig(canvas=cfg.canvas, ocr_min_len=1, ocr_max_len=1)
    rng = random.Random(cfg.seed)
    T = int(getattr(encoder, "temporal_patch", 1))
    device = next(encoder.parameters()).device
    head = nn.Linear(encoder.out_dim, len(OCR_CHARSET), device=device)
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=str(precision).startswith("bf16"))
    was_training = encoder.training
    encoder.train()
    accs, t0 = [], time.time()
    for step in range(cfg.steps):
        scenes = [sample_ocr_scene(rng, syn) for _ in range(cfg.batch_size)]
        items = [processor(render(s)) for s in scenes]
        patches = torch.cat([it.patches if T == 1 else repeat_temporal(it.patches, T) for it in items]).to(device)
        grids = torch.tensor([list(it.grid) for it in items], device=device)
        y = torch.tensor([OCR_CHARSET.index(s.text) for s in scenes], device=device)
        with autocast:
            feats = encoder(patches, grids).float()
        # max over each image's tokens: the character may be anywhere
        sizes = [int(t * h * w) for t, h, w in grids.tolist()]
        pooled = torch.stack([f.max(0).values for f in feats.split(sizes)])
        logits = head(pooled)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        accs.append(float((logits.argmax(1) == y).float().mean()))
        if (step + 1) % 200 == 0 or step + 1 == cfg.steps:
            log.info("tower warm-up %d/%d: loss %.3f, accuracy (last 100) %.2f", step + 1, cfg.steps,
                     float(loss), sum(accs[-100:]) / len(accs[-100:]))
    encoder.train(was_training)
    for p in encoder.parameters():
        p.grad = None
    return {"steps": cfg.steps, "accuracy": sum(accs[-100:]) / len(accs[-100:]), "seconds": time.time() - t0}
