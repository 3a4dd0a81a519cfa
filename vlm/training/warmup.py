"""Tower warm-up: teach a from-scratch vision encoder to see before the VLM stage.

A recipe stage with `objective: tower_warmup` (vlm/training/warmup_stage.py; the default `python train.py`
has one) trains `model.encoder` alone on a supervised task whose labels are free, through a
linear head that is thrown away afterwards; the next stage starts from that tower. Tasks (several
take turns, one batch each: `glyphs+shapes`):

- `glyphs` (default): synthvqa OCR strings of 1..`max_len` characters (and, with `wide > 0`,
  synthvqa v2 `ocr_wide` strips). Every visual token predicts, for the left and the right half of
  its patch, the character whose ink centre lies there (or none), whether it is the first of its
  string, and the character that follows it (or END). The last two make reading in order a
  one-hop lookup for the decoder: find the glyph that matches the character just written, copy
  its "next" (see docs/results/default_recipe.md).
- `shapes`: synthvqa shapes scenes; every visual token names the (shape, colour) whose centre
  lies in it, or none.
- `char`: name the one character drawn anywhere on the canvas (max-pool over tokens + linear).

Why: a from-scratch tower does not learn glyphs through the language-model loss within a CPU
budget (`bench/ocr_tower.py`, OCR only, default model, held-out exact match on whole strings):

- 1-character OCR, `char` warm-up: 96.6% after 1000 VLM steps, against 0% from scratch.
- 3–6-character OCR (synthvqa's `ocr`), 1500 VLM steps: 0% from scratch, 0% after `char`, 0% after
  `glyphs` without the first / next targets (loss 2.63 nats), **67.9%** after `glyphs` (loss 0.19).

A pretrained tower (`model/encoder=siglip`) makes this stage unnecessary; the stage stands in for
one. Images are rendered in-process (no shards) and go through the same `ImageProcessor` geometry
and normalisation as training, repeated in time for encoders with `temporal_patch > 1`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("vlm.training.warmup")


TASKS = ("glyphs", "shapes", "char")


@dataclass
class WarmupConfig:
    steps: int = 0  # 0: no warm-up
    batch_size: int = 32
    lr: float = 1e-3
    canvas: int = 64  # px of the rendered images (resized by the processor like training images)
    seed: int = 123
    task: str = "glyphs"  # glyphs | shapes | char, or several taking turns: glyphs+shapes
    max_len: int = 6  # glyphs: strings of 1..max_len characters in synthvqa's OCR font for that length
    wide: float = 0.0  # glyphs: share of synthvqa v2 `ocr_wide` strips (12-20 characters, 8:1) in a batch
    context: str = "next"  # glyphs: beside each character, next = (first?, next char); prev_next = (prev, next char)
    wide_options: dict = field(
        default_factory=dict
    )  # synthvqa `ocr_wide_*` settings of the strips (train.py: the run's data)

    def __post_init__(self):
        parts = str(self.task).split("+")
        if any(p not in TASKS for p in parts) or len(set(parts)) != len(parts):
            raise ValueError(
                f"tower_warmup.task must be one of {list(TASKS)} or several joined by '+' "
                f"(e.g. glyphs+shapes), got {self.task!r}"
            )
        for name in ("steps", "batch_size", "canvas", "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "steps" else 1):
                raise ValueError(
                    f"tower_warmup.{name} must be a {'non-negative' if name == 'steps' else 'positive'} integer, got {v!r}"
                )
        if isinstance(self.wide, bool) or not isinstance(self.wide, (int, float)) or not 0.0 <= self.wide <= 1.0:
            raise ValueError(f"tower_warmup.wide must be in [0, 1], got {self.wide!r}")
        if self.context not in ("next", "prev_next"):
            raise ValueError(f"tower_warmup.context must be 'next' or 'prev_next', got {self.context!r}")
        bad = [k for k in self.wide_options if not str(k).startswith("ocr_wide_")]
        if bad:
            raise ValueError(f"tower_warmup.wide_options takes synthvqa ocr_wide_* settings only, got {bad}")
        if not self.lr > 0:
            raise ValueError(f"tower_warmup.lr must be > 0, got {self.lr!r}")


def with_data_strips(warm: dict, synthetic: dict | None) -> dict:
    """`warm` with `wide_options` filled from the run's synthvqa settings (`ocr_wide_*`), so that
    the warm-up's strips have the data's lengths and font; an explicit `wide_options` wins."""
    if not warm.get("wide") or "wide_options" in warm or not synthetic:
        return warm
    return {**warm, "wide_options": {k: v for k, v in dict(synthetic).items() if str(k).startswith("ocr_wide_")}}


def _char_batch(rng, syn, processor, T, device, cfg):
    """A batch of `char` samples: one character anywhere; label = its index in OCR_CHARSET [B]."""
    from vlm.synthvqa import OCR_CHARSET, render, sample_ocr_scene

    scenes = [sample_ocr_scene(rng, syn) for _ in range(cfg.batch_size)]
    patches, grids = _encode_inputs([render(s) for s in scenes], processor, T, device)
    return patches, grids, torch.tensor([OCR_CHARSET.index(s.text) for s in scenes], device=device), scenes


def _patch_at(x: float, y: float, width: int, height: int, h: int, w: int) -> tuple[int, float]:
    """Row and (fractional) column, in patches of an `h x w` grid, of canvas pixel `(x, y)` of a
    `width x height` image (the processor may have resized it: positions scale with the grid)."""
    return min(max(int(y / height * h), 0), h - 1), min(max(x / width * w, 0.0), w - 1e-6)


def _glyph_batch(rng, syn, processor, T, device, cfg):
    """A batch of `glyphs` samples: synthvqa `ocr` strings of 1..cfg.max_len characters, and with
    probability cfg.wide `ocr_wide` strips. Labels `[N_tokens, 2, 4]`: for every patch, in its left
    and its right half, (character, its index in the string, the next character or END, the previous
    character or START) of the character whose ink centre lies there; (NONE, -1, -1, -1) where none
    does (END = START = NONE = len(OCR_CHARSET)). Half-patch slots because glyphs are ~7 px apart
    at patch 8: two can share a patch, never a half (except "II")."""
    from vlm.synthvqa import (
        OCR_CHARSET,
        char_centers,
        render,
        sample_ocr_scene,
        sample_wide_ocr_scene,
    )

    scenes = [
        sample_wide_ocr_scene(rng, syn) if rng.random() < cfg.wide else sample_ocr_scene(rng, syn)
        for _ in range(cfg.batch_size)
    ]
    patches, grids = _encode_inputs([render(s) for s in scenes], processor, T, device)
    none = len(OCR_CHARSET)
    labels = []
    for s, (t, h, w) in zip(scenes, grids.tolist()):
        width, height = (s.width, s.height) if s.family == "ocr_wide" else (s.canvas, s.canvas)
        lab = torch.full((h, w, 2, 4), -1, dtype=torch.long)
        lab[..., 0] = none
        for i, (ch, (cx, cy)) in enumerate(zip(s.text, char_centers(s.text, s.xy, s.font_size))):
            row, fx = _patch_at(cx, cy, width, height, h, w)
            nxt = OCR_CHARSET.index(s.text[i + 1]) if i + 1 < len(s.text) else none
            prev = OCR_CHARSET.index(s.text[i - 1]) if i > 0 else none
            lab[row, int(fx), int(fx % 1 >= 0.5)] = torch.tensor([OCR_CHARSET.index(ch), i, nxt, prev])
        labels.append(lab.reshape(h * w, 2, 4).repeat(int(t), 1, 1))
    return patches, grids, torch.cat(labels).to(device), scenes


def _shapes_batch(rng, syn, processor, T, device, cfg):
    """A batch of synthvqa `shapes` scenes (1–4 shapes). Labels `[N_tokens]`: for every patch, the
    (shape, colour) class of the shape whose centre lies in it, else NONE (shapes are ≥ 14 px apart
    at canvas 64, so no two centres share a patch)."""
    from vlm.synthvqa import COLOR_NAMES, SHAPES, render, sample_shapes_scene

    scenes = [sample_shapes_scene(rng, syn) for _ in range(cfg.batch_size)]
    patches, grids = _encode_inputs([render(s) for s in scenes], processor, T, device)
    labels = []
    for s, (t, h, w) in zip(scenes, grids.tolist()):
        lab = torch.full((h, w), len(SHAPES) * len(COLOR_NAMES), dtype=torch.long)
        for sh in s.shapes:
            row, fx = _patch_at(sh.cx, sh.cy, s.canvas, s.canvas, h, w)
            lab[row, int(fx)] = SHAPES.index(sh.shape) * len(COLOR_NAMES) + COLOR_NAMES.index(sh.color)
        labels.append(lab.reshape(h * w).repeat(int(t)))
    return patches, grids, torch.cat(labels).to(device), scenes


def _centre_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits `[N, C + 1]`, labels `[N]` with C = NONE: the few labelled tokens and the many empty
    ones weigh the same. Returns (loss, accuracy over the labelled tokens)."""
    none = logits.shape[1] - 1
    is_obj = labels < none
    loss = F.cross_entropy(logits[is_obj], labels[is_obj]) + F.cross_entropy(logits[~is_obj], labels[~is_obj])
    return loss, (logits[is_obj].argmax(1) == labels[is_obj]).float().mean()


def _context_width(n_cls: int, context: str) -> int:
    """Logits of the context target: first-of-string yes/no (`next`) or previous character + START."""
    return 2 if context == "next" else n_cls + 1


def _glyph_head_width(n_cls: int, context: str) -> int:
    """Head outputs per token: two half-patch slots of (character + NONE, context, next + END)."""
    return 2 * ((n_cls + 1) + _context_width(n_cls, context) + (n_cls + 1))


def _glyph_loss(
    out: torch.Tensor, labels: torch.Tensor, n_cls: int, context: str = "next"
) -> tuple[torch.Tensor, torch.Tensor]:
    """out: `[N, _glyph_head_width(n_cls, context)]` head outputs per token; labels: `[N, 2, 4]`
    from `_glyph_batch`. Beside the character: `next` = is it the first of its string, and the
    next character; `prev_next` = the previous character (START for the first) and the next one.
    Returns (loss, character accuracy over the slots that hold one)."""
    out = out.reshape(2 * out.shape[0], -1)
    char_logits, ctx_logits, next_logits = out.split([n_cls + 1, _context_width(n_cls, context), n_cls + 1], dim=1)
    char, index, nxt, prev = labels.reshape(-1, 4).unbind(1)
    is_char = char < n_cls
    ctx = (index[is_char] == 0).long() if context == "next" else prev[is_char]
    loss, acc = _centre_loss(char_logits, char)
    loss = loss + F.cross_entropy(ctx_logits[is_char], ctx) + F.cross_entropy(next_logits[is_char], nxt[is_char])
    return loss, acc


def _encode_inputs(images, processor, T, device):
    from vlm.data.video import repeat_temporal

    items = [processor(im) for im in images]
    patches = torch.cat([it.patches if T == 1 else repeat_temporal(it.patches, T) for it in items]).to(device)
    return patches, torch.tensor([list(it.grid) for it in items], device=device)


def warm_up_tower(
    encoder: nn.Module, processor, cfg: WarmupConfig | dict, precision: str | None = "bf16-mixed"
) -> dict:
    """Train `encoder` in place on `cfg.task` for `cfg.steps` steps. `processor`: the run's
    `ImageProcessor` (its patch size, resolution and mean/std). Returns {accuracy: of the first
    task over its last 100 batches (for `glyphs` / `shapes`, over the tokens that hold a
    character / a shape centre), accuracy_by_task, seconds, steps}."""
    cfg = cfg if isinstance(cfg, WarmupConfig) else WarmupConfig(**dict(cfg or {}))
    if cfg.steps == 0:
        return {"steps": 0, "accuracy": None, "seconds": 0.0}
    tasks = cfg.task.split("+")
    device = next(encoder.parameters()).device
    spec = {name: _task(name, cfg) for name in tasks}  # name -> (synth config, batch fn, head width)
    heads = nn.ModuleDict({name: nn.Linear(encoder.out_dim, width) for name, (_, _, width) in spec.items()}).to(device)
    rng = random.Random(cfg.seed)
    T = int(getattr(encoder, "temporal_patch", 1))
    params = [p for p in encoder.parameters() if p.requires_grad] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=str(precision).startswith("bf16"))
    was_training = encoder.training
    encoder.train()
    accs, t0 = {name: [] for name in tasks}, time.time()
    for step in range(cfg.steps):
        name = tasks[step % len(tasks)]  # the tasks take turns, one batch each
        syn, make_batch, _ = spec[name]
        patches, grids, y, _ = make_batch(rng, syn, processor, T, device, cfg)
        with autocast:
            feats = encoder(patches, grids).float()
        loss, acc = _task_loss(name, heads[name], feats, grids, y, cfg.context)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        accs[name].append(float(acc))
        if (step + 1) % 200 == 0 or step + 1 == cfg.steps:
            log.info(
                "tower warm-up (%s) %d/%d: loss %.3f, accuracy (last 100 of each task) %s",
                cfg.task,
                step + 1,
                cfg.steps,
                float(loss.detach()),
                ", ".join(f"{k} {v:.2f}" for k, v in _recent(accs).items()),
            )
    encoder.train(was_training)
    for p in encoder.parameters():
        p.grad = None
    last = _recent(accs)
    return {"steps": cfg.steps, "accuracy": last[tasks[0]], "accuracy_by_task": last, "seconds": time.time() - t0}


def _recent(accs: dict[str, list[float]]) -> dict[str, float]:
    """Mean accuracy of each task over its last 100 batches."""
    return {k: sum(v[-100:]) / len(v[-100:]) for k, v in accs.items() if v}


def _task(name: str, cfg: WarmupConfig):
    """(SynthConfig, batch function, head width) of one warm-up task."""
    from vlm.synthvqa import COLOR_NAMES, OCR_CHARSET, SHAPES, SynthConfig

    n_cls = len(OCR_CHARSET)
    if name == "char":
        return SynthConfig(canvas=cfg.canvas, ocr_min_len=1, ocr_max_len=1), _char_batch, n_cls
    if name == "shapes":
        return SynthConfig(canvas=cfg.canvas), _shapes_batch, len(SHAPES) * len(COLOR_NAMES) + 1
    # glyphs: the synthvqa OCR font (sized for max_len characters), strings of 1..max_len
    syn = SynthConfig(
        canvas=cfg.canvas,
        ocr_min_len=1,
        ocr_max_len=cfg.max_len,
        families=["shapes", "ocr", "ocr_wide"] if cfg.wide else ["shapes", "ocr"],
        **(cfg.wide_options if cfg.wide else {}),
    )
    try:
        _ = syn.font_px, syn.wide_font_px  # derived on access: raises when the strings do not fit
    except ValueError as e:
        raise ValueError(
            f"tower_warmup.max_len={cfg.max_len} characters do not fit tower_warmup.canvas={cfg.canvas}: {e}"
        ) from None
    return syn, _glyph_batch, _glyph_head_width(n_cls, cfg.context)


def _task_loss(
    name: str, head: nn.Module, feats: torch.Tensor, grids: torch.Tensor, y: torch.Tensor, context: str = "next"
):
    from vlm.synthvqa import OCR_CHARSET

    if name == "char":  # max over each image's tokens: the character may be anywhere
        sizes = [int(t * h * w) for t, h, w in grids.tolist()]
        logits = head(torch.stack([f.max(0).values for f in feats.split(sizes)]))
        return F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()
    if name == "shapes":
        return _centre_loss(head(feats), y)
    return _glyph_loss(head(feats), y, len(OCR_CHARSET), context)
