"""Freezing, the optimizer and its parameter groups, and learning-rate schedules."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

log = logging.getLogger("vlm.training.optim")

COMPONENTS = ("encoder", "projector", "decoder", "cross_attn")  # cross_attn: only with fusion=cross_attn


def _is_adapter(name: str) -> bool:
    return ".lora_" in name  # peft's adapter parameters (`vlm.model.lora`)


def adapted_components(model: nn.Module) -> set[str]:
    """The components that hold low-rank adapters (`model.lora.targets`)."""
    return {n.split(".", 1)[0] for n, _ in model.named_parameters() if _is_adapter(n)}


def apply_freeze(model: nn.Module, freeze: dict) -> None:
    """`model.freeze`: {component: bool}; a frozen component's parameters get no gradient.

    With adapters (`model.lora`), a component that holds one is frozen whatever `freeze` says and
    only its adapters train; the other components follow `freeze`."""
    unknown = set(freeze) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"model.freeze has unknown components {sorted(unknown)}; use {COMPONENTS}")
    adapted = adapted_components(model)
    for comp in COMPONENTS:
        frozen = bool(freeze.get(comp, False)) or comp in adapted
        part = getattr(model, comp, None)
        for name, p in part.named_parameters() if part is not None else ():
            p.requires_grad_(_is_adapter(name) or not frozen)


def frozen_parts(model: nn.Module, freeze: dict) -> list[nn.Module]:
    """The frozen components the model has (kept in eval mode while training: no dropout or
    norm-statistics drift). A component with adapters trains them, so it stays in train mode
    (the adapters' dropout)."""
    adapted = adapted_components(model)
    return [
        getattr(model, c)
        for c in COMPONENTS
        if freeze.get(c) and c not in adapted and getattr(model, c, None) is not None
    ]


def build_optimizer(
    model: nn.Module, factory: partial, component_lr: dict | None = None, loss_scaling: bool = False
) -> torch.optim.Optimizer:
    """`factory(param_groups(...))`, the groups' lr and weight decay from the factory's keywords.

    loss_scaling (fp16 `16-mixed`): a fused optimizer would unscale the gradients inside its step,
    after the gradient step's normalisation, guard and clipping had seen scaled ones, so the
    unfused one is built instead."""
    kw = factory.keywords
    groups = param_groups(model, kw.get("lr", 1e-3), kw.get("weight_decay", 0.0), component_lr)
    if kw.get("fused") and loss_scaling:
        log.info("optimizer.fused=true is not used with fp16 loss scaling (trainer.precision=16-mixed): unfused AdamW")
        factory = partial(factory.func, *factory.args, **{**kw, "fused": False})
    return factory(groups)


def param_groups(model: nn.Module, base_lr: float, weight_decay: float, component_lr: dict | None = None) -> list[dict]:
    """AdamW groups: one per (component, decay?) with a per-component learning rate.

    No weight decay on norms, biases, embeddings/position tables (anything not a 2D+ matrix of a
    Linear/Conv, by the usual rule `p.dim() < 2`, plus embeddings by name). Frozen parameters are
    left out, so the optimizer holds no state for them.
    """
    component_lr = component_lr or {}
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        comp = name.split(".", 1)[0]
        decay = p.dim() >= 2 and "embed" not in name
        lr = component_lr.get(comp) or base_lr
        g = groups.setdefault(
            (comp, decay),
            {
                "params": [],
                "lr": lr,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{comp}{'' if decay else '_no_decay'}",
            },
        )
        g["params"].append(p)
    if not groups:
        raise ValueError("no trainable parameters: every component is frozen")
    return list(groups.values())


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to each group's lr, then cosine decay to `min_lr_ratio` of it at `total_steps`."""
    if total_steps <= 0:
        raise ValueError(f"warmup_cosine needs total_steps > 0 (set trainer.max_steps), got {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def constant(optimizer: torch.optim.Optimizer, warmup_steps: int = 0, **_: object) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
