"""Low-rank adapters on the model's Linear layers, with peft (`pip install -e .[lora]`).

`model.lora` (`vlm.model.config.LoraConfig`) names the targets; each target is a set of Linear
layers of our modules (`TARGETS`: a regular expression over the VLM's module names). peft's
`inject_adapter_in_model` replaces each of them with its LoRA layer (the original Linear becomes
`<name>.base_layer`, the adapter `<name>.lora_A.default` / `lora_B.default`), so the forward pass,
FSDP, activation checkpointing and `state_dict` all see ordinary modules.

Adapters are added when the model is built (`vlm.build.model.build_model`), from the spec: a
checkpoint's config records `model.lora`, so loading it rebuilds the same modules and its weights
(base and adapter) load by name like any others; `merge_lora` folds them back into plain Linear
layers (the merged export). `base_key` maps an adapted model's weight name to the plain model's,
so a checkpoint without adapters initialises the base weights of one with them (`init_from`).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from vlm.model.config import LoraConfig
from vlm.model.fields import SpecError

ADAPTER = "default"  # peft's name for the one adapter a model holds
EXTRA = "lora"  # the optional dependency group that installs peft
# target -> the full module names of its Linear layers in a VLM
TARGETS: dict[str, str] = {
    "decoder.attn": r"decoder\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    "decoder.mlp": r"decoder\.layers\.\d+\.mlp\.(gate|up|down)_proj",
    "encoder.attn": r"encoder\.blocks\.\d+\.attn\.(q|k|v|o)_proj",
    "encoder.mlp": r"encoder\.blocks\.\d+\.mlp\.fc(1|2)",
    "projector": r"projector\..+",
}


def require_peft() -> Any:
    """The peft module, or an ImportError naming the extra that installs it."""
    try:
        import peft
    except ImportError:
        raise ImportError(f"model.lora needs peft: pip install -e .[{EXTRA}]") from None
    return peft


def target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """The names of the Linear layers of `model` the `targets` cover, in module order."""
    pattern = re.compile("|".join(f"(?:{TARGETS[t]})" for t in targets))
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]


def peft_config(cfg: LoraConfig, modules: list[str], **extra: Any) -> Any:
    """The peft `LoraConfig` of `cfg` over the module names `modules`."""
    peft = require_peft()
    return peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        bias="none",
        **extra,
    )


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Add `cfg`'s adapters to `model` (a VLM) in place; the adapted module names. The base
    weights keep their values; an adapter starts as zero (`B = 0`), so the model's output is
    unchanged until it trains. Which parameters train is `vlm.training.optim.apply_freeze`'s."""
    peft = require_peft()
    names = target_modules(model, cfg.targets)
    missing = [t for t in cfg.targets if not target_modules(model, [t])]
    if missing:
        raise SpecError(f"model.lora.targets: {', '.join(missing)} has no Linear layer in this model")
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    peft.inject_adapter_in_model(peft_config(cfg, names), model, adapter_name=ADAPTER)
    for n, p in model.named_parameters():  # peft freezes every other parameter: put them back
        if not is_adapter_key(n):
            p.requires_grad_(grads.get(base_key(n), True))
    model.lora = cfg
    return names


def is_adapter_key(name: str) -> bool:
    """Whether a parameter / weight name is an adapter's (not a base weight)."""
    return bool(re.search(r"\.lora_(A|B|magnitude_vector|embedding_A|embedding_B)\.", name + "."))


def base_key(name: str) -> str:
    """The plain model's name of an adapted model's base weight (`x.base_layer.weight` -> `x.weight`)."""
    return name.replace(".base_layer.", ".")


def adapted_key(name: str, adapted: set[str]) -> str:
    """The adapted model's name of a plain model's weight `name` (`adapted`: the adapted module names)."""
    module, _, leaf = name.rpartition(".")
    return f"{module}.base_layer.{leaf}" if module in adapted else name


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> peft LoRA layer, for every adapted layer of `model`."""
    if getattr(model, "lora", None) is None:
        return {}
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into their base weights and put the plain Linear layers back, in place:
    the model computes the same function with the plain model's modules and weight names."""
    for name, layer in adapted_modules(model).items():
        layer.merge(safe_merge=True, adapter_names=[ADAPTER])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    model.lora = None
    return model


def with_fresh_adapters(plain: dict[str, Any], adapted: dict[str, Any]) -> dict[str, Any]:
    """A plain model's weights `plain` under an adapted model's names, with the adapted model's
    own (fresh) adapter weights from its state dict `adapted`: the base weights of a checkpoint
    without adapters for a model with them (`init_from`)."""
    wrapped = {k.split(".base_layer.")[0] for k in adapted if ".base_layer." in k}
    out = {adapted_key(k, wrapped): v for k, v in plain.items()}
    out.update({k: v for k, v in adapted.items() if is_adapter_key(k)})
    return out
