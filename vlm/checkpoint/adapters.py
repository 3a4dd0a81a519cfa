"""Adapters on their own: peft's adapter folder, written from our model and merged into a base.

`python -m vlm.cli.export ckpt=… out=… format=peft_adapter` writes what `peft` saves
(`adapter_config.json` + `adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`
/ `lora_B.weight` / `lora_magnitude_vector`) with the module names of the transformers model of
the base's family, so `PeftModel.from_pretrained(<that model from our hf_qwen2vl / hf_llava export
of the base>, folder)` computes what our adapted model does:

* `qwen2vl` (the spec passes `format=hf_qwen2vl`'s checks): `model.language_model.layers.{i}.…`,
  `model.visual.blocks.{i}.attn.qkv` / `attn.proj` / `mlp.fc1|fc2`, `model.visual.merger.mlp.0|2`;
* `llava`: `model.language_model.…`, `model.vision_tower.encoder.layers.{i}.self_attn.…|mlp.…`,
  `model.multi_modal_projector.linear_1|2`;
* `vlm` (any other architecture): our own module names (`decoder.layers.0.self_attn.q_proj`).

The names come from the same key tables as the weight export (`vlm.model.hf.keys`). Where
transformers fuses what we keep apart (Qwen2-VL's vision `qkv`), the three adapters become one of
rank 3r: `A = [A_q; A_k; A_v]`, `B = diag(B_q, B_k, B_v)`, the alpha scaled so `alpha / r` is
unchanged (`rank_pattern` / `alpha_pattern`), which is the same update exactly.

`merge_adapter(model, folder)` reads such a folder (any of the layouts, from us or from peft) and
folds it into a plain model's weights (`infer.py ckpt=BASE adapter=FOLDER`): `W += scale·B·A` per
layer (DoRA: then each row rescaled to its magnitude). The folder is untrusted input: the JSON and
the safetensors header are read with the checkpoint readers' caps and checks, every setting,
module name and shape is checked before any weight changes, and every refusal is one
`CheckpointError` line naming the folder.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlm.checkpoint.files import CheckpointError, one_line, read_capped, read_safetensors_header
from vlm.model.config import LoraConfig, ModelSpec
from vlm.model.hf import LLAMA_LAYER, QWEN2VL_BLOCK, QWEN2VL_MERGER, SIGLIP_LAYER, expand
from vlm.model.hf.keys import LLAVA_PROJECTOR
from vlm.model.lora import ADAPTER, adapted_modules, merge_lora

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MAX_ADAPTER_CONFIG_BYTES = 1 << 20
PREFIX = "base_model.model."
LAYOUTS = ("qwen2vl", "llava", "vlm")
_TENSORS = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)")
# adapter_config.json settings a plain LoRA merge cannot honour, with the value it needs
_UNSUPPORTED = {
    "fan_in_fan_out": False,
    "lora_bias": False,
    "modules_to_save": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "alora_invocation_tokens": None,  # activated only after these tokens: not a weight merge
    "arrow_config": None,
}


# ---- module names ---------------------------------------------------------------------------------
def _modules(table: dict[str, str], hf_prefix: str, ours_prefix: str) -> dict[str, str]:
    """{our module: HF module} from a weight-key table (HF -> ours), weights of Linear layers only."""
    return {
        ours_prefix + v.removesuffix(".weight"): hf_prefix + k.removesuffix(".weight")
        for k, v in table.items()
        if k.endswith(".weight") and "norm" not in v
    }


def layout_names(spec: ModelSpec, layout: str) -> dict[str, tuple[str, int | None]]:
    """{our module: (its name in `layout`, which of [q, k, v] it is in a fused projection, or None)}."""
    if layout == "vlm":  # our own names
        return {}
    dec = expand(LLAMA_LAYER, spec.decoder.n_layers, {})
    n_enc = spec.encoder.built_layers
    out: dict[str, tuple[str, int | None]] = {}
    text = _modules({k.removeprefix("model."): v for k, v in dec.items()}, "model.language_model.", "decoder.")
    out.update({k: (v, None) for k, v in text.items()})
    if layout == "qwen2vl":
        vis = _modules(expand(QWEN2VL_BLOCK, n_enc, {}), "model.visual.", "encoder.")
        out.update({k: (v, None) for k, v in vis.items()})
        for i in range(n_enc):
            for slot, p in enumerate("qkv"):
                out[f"encoder.blocks.{i}.attn.{p}_proj"] = (f"model.visual.blocks.{i}.attn.qkv", slot)
        out.update({k: (v, None) for k, v in _modules(QWEN2VL_MERGER, "model.visual.", "projector.").items()})
    elif layout == "llava":
        vis = expand(SIGLIP_LAYER, n_enc, {})
        vis = _modules({k.removeprefix("vision_model."): v for k, v in vis.items()}, "model.vision_tower.", "encoder.")
        out.update({k: (v, None) for k, v in vis.items()})
        out.update({k: (v, None) for k, v in _modules(LLAVA_PROJECTOR, "model.", "projector.").items()})
    return out


def family(spec: ModelSpec) -> str:
    """The layout an adapter of this model is written in: the HF family its architecture is, or `vlm`."""
    from vlm.checkpoint.hf_export import ExportError, check_spec

    for layout, fmt in (("qwen2vl", "hf_qwen2vl"), ("llava", "hf_llava")):
        try:
            check_spec(spec, fmt)
            return layout
        except ExportError:
            continue
    return "vlm"


def _scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / (math.sqrt(r) if rslora else r)


# ---- export ---------------------------------------------------------------------------------------
def without_adapters(loaded: Any, merge: bool = True) -> Any:
    """`loaded` (a LoadedVLM) with its adapters folded into the weights (`merge`) or dropped (the
    base as trained), its config's model spec updated: a plain model, for every other format."""
    model = loaded.model
    if model.lora is None:
        return loaded
    if merge:
        merge_lora(model)
    else:
        for name, layer in adapted_modules(model).items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.get_base_layer())
        model.lora = None
    loaded.config = {**loaded.config, "model": model.spec.to_dict()}
    return loaded


def adapter_state(model: torch.nn.Module, layout: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(peft's adapter tensors under `layout`'s names, rank_pattern, alpha_pattern) of an adapted model."""
    cfg: LoraConfig = model.lora
    names = layout_names(model.spec, layout)
    fused: dict[str, dict[int, tuple]] = {}
    state: dict[str, torch.Tensor] = {}

    def put(hf: str, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor | None) -> None:
        state[f"{PREFIX}{hf}.lora_A.weight"] = a.contiguous()
        state[f"{PREFIX}{hf}.lora_B.weight"] = b.contiguous()
        if m is not None:
            state[f"{PREFIX}{hf}.lora_magnitude_vector"] = m.contiguous()

    for name, layer in adapted_modules(model).items():
        a = layer.lora_A[ADAPTER].weight.detach().float().cpu()
        b = layer.lora_B[ADAPTER].weight.detach().float().cpu()
        m = layer.lora_magnitude_vector[ADAPTER].weight.detach().float().cpu() if cfg.use_dora else None
        hf, slot = names.get(name, (name, None))
        if slot is None:
            put(hf, a, b, m)
        else:
            fused.setdefault(hf, {})[slot] = (a, b, m)
    rank_pattern, alpha_pattern = {}, {}
    for hf, parts in fused.items():
        if sorted(parts) != [0, 1, 2]:
            raise CheckpointError(f"{hf} is one fused layer in this layout: adapt q, k and v together (encoder.attn)")
        a, b, m = zip(*(parts[i] for i in range(3)))
        put(hf, torch.cat(a), torch.block_diag(*b), torch.cat(m) if cfg.use_dora else None)
        rank_pattern[hf] = 3 * cfg.r
        alpha_pattern[hf] = cfg.alpha * (math.sqrt(3) if cfg.use_rslora else 3)
    return state, rank_pattern, alpha_pattern


def export_adapter(loaded: Any, out: str | Path, layout: str = "auto") -> Path:
    """Write the adapters of `loaded` (a LoadedVLM with `model.lora`) as peft's adapter folder."""
    from vlm.model.lora import peft_config

    model = loaded.model
    if model.lora is None:
        raise CheckpointError("format=peft_adapter: the checkpoint has no adapters (train with model.lora.r=16 …)")
    layout = family(model.spec) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise CheckpointError(f"adapter layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    state, rank_pattern, alpha_pattern = adapter_state(model, layout)
    modules = sorted({k.removeprefix(PREFIX).split(".lora_")[0] for k in state})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pcfg = peft_config(model.lora, modules, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    pcfg.inference_mode = True
    pcfg.save_pretrained(str(out))
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "vlm_layout": layout})
    return out


def for_inference(loaded: Any, adapter: str | Path | None = None) -> Any:
    """`loaded` ready to generate: a checkpoint's own adapters merged (plain Linear layers, which
    inference-only rewrites such as fused projections expect) and the adapter folder `adapter`, if
    given, merged on top (`merge_adapter`)."""
    loaded = without_adapters(loaded, merge=True)
    if adapter:
        merge_adapter(loaded.model, adapter)
    return loaded


# ---- load: merge a folder into a plain model -------------------------------------------------------
def _fail(folder: Path, why: str) -> CheckpointError:
    return CheckpointError(f"adapter {folder}: {why}")


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json, checked: a LoRA adapter this merge can apply exactly."""
    f = folder / CONFIG
    if not f.exists():
        raise _fail(folder, f"not an adapter folder ({CONFIG} is missing)")
    try:
        cfg = json.loads(read_capped(f, MAX_ADAPTER_CONFIG_BYTES, CONFIG))
    except ValueError as e:
        raise _fail(folder, f"{CONFIG} is not JSON ({one_line(e, 120)})") from None
    if not isinstance(cfg, dict):
        raise _fail(folder, f"{CONFIG} is not a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise _fail(folder, f"peft_type={cfg.get('peft_type')!r}: only LORA adapters are supported")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise _fail(folder, f"r={r!r} is not a positive integer")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise _fail(folder, f"lora_alpha={alpha!r} is not a positive number")
    for key, want in _UNSUPPORTED.items():
        if cfg.get(key) not in (None, [], {}, False):
            raise _fail(folder, f"{key}={one_line(repr(cfg.get(key)), 80)} is not supported (needs {want!r})")
    if cfg.get("bias", "none") != "none":
        raise _fail(folder, f"bias={cfg.get('bias')!r} is not supported (needs 'none')")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise _fail(folder, f"{key} is not a mapping")
    return cfg


def _pattern(patterns: dict, name: str, default: Any) -> Any:
    """peft's rule: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(adapter_config, {module: {"A", "B", "m"?}}) of an adapter folder, names and dtypes checked."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    w = folder / WEIGHTS
    if not w.exists():
        raise _fail(folder, f"{WEIGHTS} is missing")
    header = read_safetensors_header(w)
    mods: dict[str, dict[str, str]] = {}
    for key in header:
        m = _TENSORS.fullmatch(key)
        if not key.startswith(PREFIX) or m is None:
            raise _fail(
                folder,
                f"{WEIGHTS} holds {one_line(key, 120)!r}, not a LoRA tensor (base_model.model.<module>.lora_A.weight …)",
            )
        mods.setdefault(m.group(1).removeprefix(PREFIX), {})[m.group(2)[:6]] = key
    if not mods:
        raise _fail(folder, f"{WEIGHTS} holds no tensors")
    out: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(w), "pt") as f:
        for mod, keys in mods.items():
            if "lora_A" not in keys or "lora_B" not in keys:
                raise _fail(folder, f"{mod} has {', '.join(sorted(keys))} but needs lora_A and lora_B")
            if ("lora_m" in keys) != bool(cfg.get("use_dora")):
                raise _fail(
                    folder,
                    f"{mod}: use_dora={cfg.get('use_dora')!r} but the magnitude vector is {'there' if 'lora_m' in keys else 'missing'}",
                )
            out[mod] = {"A": f.get_tensor(keys["lora_A"]), "B": f.get_tensor(keys["lora_B"])}
            if "lora_m" in keys:
                out[mod]["m"] = f.get_tensor(keys["lora_m"])
    return cfg, out


def merge_adapter(model: torch.nn.Module, folder: str | Path) -> dict[str, int]:
    """Fold the adapter folder into `model`'s weights in place (a model with adapters of its own
    gets them merged first); {layout: name of the layout it was in, modules: how many layers}."""
    folder = Path(folder)
    cfg, tensors = read_adapter(folder)
    if getattr(model, "lora", None) is not None:
        merge_lora(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # layout -> {its module name: [(slot in a fused projection or None, our module)]}
    reverse: dict[str, dict[str, list]] = {"vlm": {n: [(None, n)] for n in linears}}
    for layout in ("qwen2vl", "llava"):
        reverse[layout] = {}
        for ours, (hf, slot) in layout_names(model.spec, layout).items():
            if ours in linears:
                reverse[layout].setdefault(hf, []).append((slot, ours))
    fits = [lay for lay in ("qwen2vl", "llava", "vlm") if all(reverse[lay].get(m) for m in tensors)]
    if not fits:
        unknown = sorted(m for m in tensors if not any(reverse[lay].get(m) for lay in LAYOUTS))
        bad = unknown[0] if unknown else sorted(tensors)[0]
        raise _fail(
            folder, f"module {bad!r} is not a Linear layer of the base model (in its vlm, Qwen2-VL or LLaVA names)"
        )
    layout = fits[0]
    r0, alpha0, rs = cfg["r"], cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora"))
    updates: list[tuple[torch.nn.Linear, torch.Tensor]] = []
    for mod, t in sorted(tensors.items()):
        targets = sorted(reverse[layout][mod], key=lambda x: -1 if x[0] is None else x[0])
        r = _pattern(cfg.get("rank_pattern") or {}, mod, r0)
        alpha = _pattern(cfg.get("alpha_pattern") or {}, mod, alpha0)
        outs = [linears[n].out_features for _, n in targets]
        ins = linears[targets[0][1]].in_features
        a, b = t["A"], t["B"]
        if a.dim() != 2 or a.shape[0] != r:
            raise _fail(folder, f"{mod}.lora_A is {list(a.shape)} but {CONFIG} says r={r}")
        want_a, want_b = [r, ins], [sum(outs), r]
        if list(a.shape) != want_a or list(b.shape) != want_b:
            raise _fail(
                folder,
                f"{mod}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the layer (need {want_a} / {want_b})",
            )
        if "m" in t and list(t["m"].shape) != [sum(outs)]:
            raise _fail(folder, f"{mod}.lora_magnitude_vector is {list(t['m'].shape)}, the layer has {sum(outs)} rows")
        delta = _scale(float(alpha), int(r), rs) * (b.double() @ a.double())
        mags = t["m"].double().split(outs) if "m" in t else [None] * len(outs)
        for (_, name), d, mag in zip(targets, delta.split(outs), mags):
            lin = linears[name]
            w = lin.weight.detach().double() + d
            if mag is not None:
                w = w * (mag / w.norm(dim=1))[:, None]
            updates.append((lin, w))
    with torch.no_grad():  # every check passed: change the weights
        for lin, w in updates:
            lin.weight.copy_(w.to(lin.weight.dtype))
    return {"layout": layout, "modules": len(tensors)}
