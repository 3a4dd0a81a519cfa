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
    task: str = "glyphs"      # glyphs: read every character of a string in place; char: name one character
    max_len: int = 6          # glyphs: strings of 1..max_len characters in synthvqa's OCR font for that length
    wide: float = 0.0         # glyphs: share of synthvqa v2 `ocr_wide` strips (12-20 characters, 8:1) in a batch

    def __post_init__(self):
        if self.task not in ("glyphs", "char"):
            raise ValueError(f"tower_warmup.task must be glyphs or char, got {self.task!r}")
        for name in ("steps", "batch_size", "canvas", "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "steps" else 1):
                raise ValueError(f"tower_warmup.{name} must be a {'non-negative' if name == 'steps' else 'positive'} integer, got {v!r}")
        if not 0.0 <= self.wide <= 1.0:
            raise ValueError(f"tower_warmup.wide must be in [0, 1], got {self.wide!r}")
        if not self.lr > 0:
            raise ValueError(f"tower_warmup.lr must be > 0, got {self.lr!r}")


def _char_batch(rng, syn, processor, T, device, cfg):
    """A batch of `char` samples: one character anywhere; label = its index in OCR_CHARSET [B]."""
    from vlm.data.synthetic import OCR_CHARSET, render, sample_ocr_scene

    scenes = [sample_ocr_scene(rng, syn) for _ in range(cfg.batch_size)]
    patches, grids = _encode_inputs([render(s) for s in scenes], processor, T, device)
    return patches, grids, torch.tensor([OCR_CHARSET.index(s.text) for s in scenes], device=device), scenes


def _glyph_batch(rng, syn, processor, T, device, cfg):
    """A batch of `glyphs` samples: synthvqa `ocr` strings of 1..cfg.max_len characters, and with
    probability cfg.wide `ocr_wide` strips. Labels `[N_tokens, 2, 3]`: for every patch, in its left
    and its right half, (character, its index in the string, the next character or END) of the
    character whose ink centre lies there; (NONE, -1, -1) where none does. Half-patch slots because
    glyphs are ~7 px apart at patch 8: two can share a patch, never a half (except "II")."""
    from vlm.data.synthetic import OCR_CHARSET, char_centers, render, sample_ocr_scene, sample_wide_ocr_scene

    scenes = [sample_wide_ocr_scene(rng, syn) if rng.random() < cfg.wide else sample_ocr_scene(rng, syn)
              for _ in range(cfg.batch_size)]
    patches, grids = _encode_inputs([render(s) for s in scenes], processor, T, device)
    none = len(OCR_CHARSET)
    labels = []
    for s, (t, h, w) in zip(scenes, grids.tolist()):
        width, height = (s.width, s.height) if s.family == "ocr_wide" else (s.canvas, s.canvas)
        lab = torch.full((h, w, 2, 3), -1, dtype=torch.long)
        lab[..., 0] = none
        for i, (ch, (cx, cy)) in enumerate(zip(s.text, char_centers(s.text, s.xy, s.font_size))):
            fx = min(max(cx / width * w, 0.0), w - 1e-6)  # in patches of the processed image
            row = min(max(int(cy / height * h), 0), h - 1)
            nxt = OCR_CHARSET.index(s.text[i + 1]) if i + 1 < len(s.text) else none
            lab[row, int(fx), int(fx % 1 >= 0.5)] = torch.tensor([OCR_CHARSET.index(ch), i, nxt])
        labels.append(lab.reshape(h * w, 2, 3).repeat(int(t), 1, 1))
    return patches, grids, torch.cat(labels).to(device), scenes


def _encode_inputs(images, processor, T, device):
    from vlm.data.video import repeat_temporal

    items = [processor(im) for im in images]
    patches = torch.cat([it.patches if T == 1 else repeat_temporal(it.patches, T) for it in items]).to(device)
    return patches, torch.tensor([list(it.grid) for it in items], device=device)


def warm_up_tower(encoder: nn.Module, processor, cfg: WarmupConfig | dict, precision: str | None = "bf16-mixed") -> dict:
    """Train `encoder` in place on `cfg.task` for `cfg.steps` steps. `processor`: the run's
    `ImageProcessor` (its patch size, resolution and mean/std). Returns {accuracy (last 100
    steps; for `glyphs`, over the slots that hold a character), seconds, steps}."""
    from vlm.data.synthetic import OCR_CHARSET, SynthConfig

    cfg = cfg if isinstance(cfg, WarmupConfig) else WarmupConfig(**dict(cfg or {}))
    if cfg.steps == 0:
        return {"steps": 0, "accuracy": None, "seconds": 0.0}
    n_cls = len(OCR_CHARSET)
    if cfg.task == "char":
        syn, make_batch, head_out = SynthConfig(canvas=cfg.canvas, ocr_min_len=1, ocr_max_len=1), _char_batch, n_cls
    else:  # the synthvqa OCR font (sized for max_len characters), strings of 1..max_len
        syn = SynthConfig(canvas=cfg.canvas, ocr_min_len=1, ocr_max_len=cfg.max_len,
                          families=["shapes", "ocr", "ocr_wide"] if cfg.wide else ["shapes", "ocr"])
        make_batch = _glyph_batch
        try:
            syn.font_px, syn.wide_font_px
        except ValueError as e:
            raise ValueError(f"tower_warmup.max_len={cfg.max_len} characters do not fit tower_warmup.canvas={cfg.canvas}: {e}") from None
        head_out = 2 * (n_cls + 1 + 2 + n_cls + 1)
    rng = random.Random(cfg.seed)
    T = int(getattr(encoder, "temporal_patch", 1))
    device = next(encoder.parameters()).device
    head = nn.Linear(encoder.out_dim, head_out, device=device)
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=str(precision).startswith("bf16"))
    was_training = encoder.training
    encoder.train()
    accs, t0 = [], time.time()
    for step in range(cfg.steps):
        patches, grids, y, _ = make_batch(rng, syn, processor, T, device, cfg)
        with autocast:
            feats = encoder(patches, grids).float()
        if cfg.task == "char":
            # max over each image's tokens: the character may be anywhere
            sizes = [int(t * h * w) for t, h, w in grids.tolist()]
            logits = head(torch.stack([f.max(0).values for f in feats.split(sizes)]))
            loss = F.cross_entropy(logits, y)
            acc = (logits.argmax(1) == y).float().mean()
        else:
            out = head(feats).view(-1, 2 * n_cls + 4)
            logits, first_logits, next_logits = out.split([n_cls + 1, 2, n_cls + 1], dim=1)
            y, idx, nxt = y.view(-1, 3).unbind(1)
            is_char = y < n_cls
            # the few character slots and the many empty ones weigh the same; the index (which
            # character of the string this is) gives the decoder a key to read them in order
            loss = (F.cross_entropy(logits[is_char], y[is_char]) + F.cross_entropy(logits[~is_char], y[~is_char])
                    + F.cross_entropy(first_logits[is_char], (idx[is_char] == 0).long())
                    + F.cross_entropy(next_logits[is_char], nxt[is_char]))
            acc = (logits[is_char].argmax(1) == y[is_char]).float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        accs.append(float(acc))
        if (step + 1) % 200 == 0 or step + 1 == cfg.steps:
            log.info("tower warm-up (%s) %d/%d: loss %.3f, accuracy (last 100) %.2f", cfg.task, step + 1, cfg.steps,
                     float(loss.detach()), sum(accs[-100:]) / len(accs[-100:]))
    encoder.train(was_training)
    for p in encoder.parameters():
        p.grad = None
    return {"steps": cfg.steps, "accuracy": sum(accs[-100:]) / len(accs[-100:]), "seconds": time.time() - t0}
