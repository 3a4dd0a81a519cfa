"""Pretrained parts: the native module built from the folder's spec, then filled with its weights.

    model/decoder=llama model.decoder.pretrained=/models/SmolLM2-135M      # also Mistral-style
    model/decoder=qwen2 model.decoder.pretrained=/models/Qwen2.5-0.5B       # q/k/v biases

Each `Loader` pairs a spec reader (`vlm.model.hf.specs`: `config.json` -> our native config) with
a weight loader for the module that spec builds. Every key is accounted for — a missing or
unexpected key, or a shape mismatch, is an error naming it (`PretrainedError`). `device="meta"`
(or the `skeleton()` block) builds the module without reading or allocating any weight.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import vlm.model.hf.keys as keys
import vlm.model.hf.specs as specs
from vlm.model.decoder import Decoder
from vlm.model.fields import Fields
from vlm.model.hf.folder import (
    PretrainedError,
    Remapped,
    SafetensorsFolder,
    Split,
    Without,
    check_and_load,
    prefix_of,
    read_config,
)
from vlm.model.projector import Projector
from vlm.model.vision import VisionEncoder

_SKELETON = ContextVar("vlm_hf_skeleton", default=False)


@contextmanager
def skeleton():
    """Inside this block every pretrained loader builds its module on the meta device and reads no
    weights (config.json only). Ranks other than 0 build this way under FSDP with
    `parallel.init=rank0`; rank 0's weights are then broadcast into their shards
    (`vlm.training.parallel.load_from_rank0`)."""
    token = _SKELETON.set(True)
    try:
        yield
    finally:
        _SKELETON.reset(token)


def reads_no_weights(device: Any = None) -> bool:
    return str(device) == "meta" or _SKELETON.get()


@dataclass(frozen=True)
class Loader:
    """One kind of pretrained part: its native class, how its spec is read from `config.json`,
    and how its weights are loaded into the module that spec builds."""

    part: str
    native: type[nn.Module]
    read_spec: Callable[..., Fields]  # (config.json, where, **overrides) -> native config
    load_weights: Callable[[nn.Module, str, dict], None]  # (module, folder, config.json)

    def spec(self, folder: str, **overrides) -> Fields:
        """The native config of the folder's part, overrides applied (None = the folder's)."""
        return self.read_spec(read_config(folder), str(folder), **overrides)

    def build(self, folder: str, spec: Fields, device: Any = None) -> nn.Module:
        """`spec`'s native module on `device`, filled with the folder's weights (none read on meta)."""
        with torch.device("meta" if reads_no_weights(device) else (device or "cpu")):
            module = self.native(spec)
        if not reads_no_weights(device):
            self.load_weights(module, str(folder), read_config(folder))
        return module

    def __call__(self, pretrained: str, device: Any = None, **overrides) -> nn.Module:
        return self.build(pretrained, self.spec(pretrained, **overrides), device)


def _load_patch_embed(enc: VisionEncoder, w: torch.Tensor, where: str) -> None:
    """A Conv2d / Conv3d patch weight `[D, C, (T,) P, P]` into our linear patch embedding `[D, C·(T·)P·P]`."""
    flat = w.reshape(w.shape[0], -1)
    if flat.shape != enc.patch_embed.proj.weight.shape:
        raise PretrainedError(
            f"{where}: patch embedding {tuple(w.shape)} does not fit {tuple(enc.patch_embed.proj.weight.shape)}"
        )
    with torch.no_grad():
        enc.patch_embed.proj.weight.copy_(flat)


# ---- decoders -------------------------------------------------------------------------------------
def load_decoder(dec: Decoder, folder: str, cfg: dict) -> None:
    """A Llama / Mistral / Qwen2 decoder's weights, alone or inside a whole VLM's folder."""
    src = SafetensorsFolder(folder)
    mapping = keys.decoder_key_map(cfg, src.keys())
    vision = {k for k in src.keys() if k.startswith(keys.VISION_PREFIXES)}
    check_and_load(dec, Remapped(src, drop=vision), mapping, where=folder)


# ---- SigLIP / CLIP vision towers --------------------------------------------------------------------
def load_vision(enc: VisionEncoder, folder: str, cfg: dict) -> None:
    """SigLIP: the final LayerNorm is `post_layernorm`, applied to the selected layer (for the last
    layer exactly HF's `last_hidden_state`). CLIP: a CLS token and `pre_layrnorm`; features are the
    selected layer's hidden states without a final norm and without the CLS (LLaVA's
    `vision_feature_layer=-2`, `select_feature="patch"`). Layers after the feature layer, the
    pooling head and the projection heads are not built: their keys are deliberately unused."""
    family, _ = specs.vision_family(cfg)
    c = enc.config
    src = SafetensorsFolder(folder)
    n_built = len(enc.blocks)
    # where the tower lives: "" (vision-only, transformers 5), "vision_model." (full SigLIP / CLIP),
    # "model.vision_tower.vision_model." / "vision_tower.vision_model." (LLaVA, transformers 5 / 4)
    pre = prefix_of(src.keys(), "embeddings.patch_embedding.weight", folder)

    def re(table: dict[str, str]) -> dict[str, str]:
        return {pre + k.removeprefix("vision_model."): v for k, v in table.items()}

    glob = dict(keys.SIGLIP_GLOBAL)
    if family == "clip":  # no patch bias; post_layernorm only normalises the pooled CLS: unused
        glob.pop("vision_model.embeddings.patch_embedding.bias")
        glob.pop("vision_model.post_layernorm.weight")
        glob.pop("vision_model.post_layernorm.bias")
        glob.update(
            {"vision_model.pre_layrnorm.weight": "pre_norm.weight", "vision_model.pre_layrnorm.bias": "pre_norm.bias"}
        )
    mapping = keys.expand(re(keys.SIGLIP_LAYER), n_built, re(glob))
    unused = tuple(
        k
        for k in src.keys()
        if not k.startswith(pre)
        or k.startswith(pre + "head.")
        or k == pre + "embeddings.position_ids"
        or (family == "clip" and k.startswith(pre + "post_layernorm."))
        or any(k.startswith(f"{pre}encoder.layers.{i}.") for i in range(n_built, c.n_layers))
    )
    by_hand = re(keys.SIGLIP_RESHAPED)
    if family == "clip":
        by_hand[pre + "embeddings.class_embedding"] = "cls"
    loaded = {}
    for k, ours in by_hand.items():
        if k not in src.keys():
            raise PretrainedError(f"{folder}: missing in the checkpoint: {k}")
        loaded[ours] = src.get(k)
    skip = set(loaded) | ({"cls_pos"} if family == "clip" else set())
    check_and_load(Without(enc, skip), Remapped(src, drop=set(unused) | set(by_hand)), mapping, where=folder)
    _load_patch_embed(enc, loaded["patch_embed.proj.weight"], folder)
    with torch.no_grad():
        table = loaded["pos_embed"]
        n = c.pos_grid
        extra = 1 if family == "clip" else 0  # CLIP's table starts with the CLS position
        if table.shape != (extra + n * n, c.dim):
            raise PretrainedError(f"{folder}: position table {tuple(table.shape)} is not {extra}+{n}x{n} x {c.dim}")
        enc.pos_embed.copy_(table[extra:].view(n, n, -1))
        if family == "clip":
            enc.cls.copy_(loaded["cls"])
            enc.cls_pos.copy_(table[0])


# ---- Qwen2-VL vision tower and merger ---------------------------------------------------------------
def _qwen2vl_prefix(src: SafetensorsFolder) -> str:
    """`visual.` (transformers 4 / the hub checkpoints) or `model.visual.` (transformers 5)."""
    for pre in ("model.visual.", "visual.", ""):
        if any(k.startswith(pre + "blocks.") for k in src.keys()):
            return pre
    raise PretrainedError("no Qwen2-VL vision blocks in the checkpoint")


def load_qwen2vl_vision(enc: VisionEncoder, folder: str, cfg: dict) -> None:
    """Qwen2-VL's processor orders each image's patches by 2×2 merge window; ours are row-major.
    The blocks only see a token's rotary position, so both orders give the same features,
    permuted, and both mergers concatenate the same 2×2 windows in the same order."""
    raw = SafetensorsFolder(folder)
    pre = _qwen2vl_prefix(raw)
    n_built = len(enc.blocks)
    fused = {pre + k.format(i) for k in keys.QWEN2VL_FUSED for i in range(n_built)}
    src = Split(raw, fused)
    mapping = keys.expand({pre + k: v for k, v in keys.QWEN2VL_BLOCK.items()}, n_built, {})
    for i in range(n_built):
        for k, (ours, _) in keys.QWEN2VL_FUSED.items():
            for p in ("q", "k", "v"):
                mapping[f"{pre}{k.format(i)}#{p}"] = ours.format(i, p)
    patch = pre + "patch_embed.proj.weight"
    unused = {
        k
        for k in src.keys()
        if not k.startswith(pre)
        or k.startswith(pre + "merger.")
        or any(k.startswith(f"{pre}blocks.{i}.") for i in range(n_built, enc.config.n_layers))
    }
    check_and_load(
        Without(enc, {"patch_embed.proj.weight"}), Remapped(src, drop=unused | {patch}), mapping, where=folder
    )
    _load_patch_embed(enc, raw.get(patch), folder)  # Conv3d [D, C, T, P, P]


def load_qwen2vl_merger(proj: Projector, folder: str, cfg: dict) -> None:
    src = SafetensorsFolder(folder)
    pre = _qwen2vl_prefix(src)
    mapping = {pre + k: v for k, v in keys.QWEN2VL_MERGER.items()}
    drop = {k for k in src.keys() if not k.startswith(pre + "merger.")}
    check_and_load(proj, Remapped(src, drop=drop), mapping, where=folder)


# ---- LLaVA-1.5 projector --------------------------------------------------------------------------
def load_llava_projector(proj: Projector, folder: str, cfg: dict) -> None:
    src = SafetensorsFolder(folder)
    pre = prefix_of(src.keys(), "multi_modal_projector.linear_1.weight", folder)
    mapping = {pre + k: v for k, v in keys.LLAVA_PROJECTOR.items()}
    drop = {k for k in src.keys() if "multi_modal_projector." not in k}
    check_and_load(proj, Remapped(src, drop=drop), mapping, where=folder)


# What a training config's `_target_: vlm.model.hf.<name>` names.
LOADERS: dict[str, Loader] = {
    "pretrained_vision_encoder": Loader("encoder", VisionEncoder, specs.vision_spec, load_vision),
    "pretrained_qwen2vl_vision": Loader("encoder", VisionEncoder, specs.qwen2vl_vision_spec, load_qwen2vl_vision),
    "pretrained_qwen2vl_merger": Loader("projector", Projector, specs.qwen2vl_merger_spec, load_qwen2vl_merger),
    "pretrained_llava_projector": Loader("projector", Projector, specs.llava_projector_spec, load_llava_projector),
    "pretrained_decoder": Loader("decoder", Decoder, specs.decoder_spec, load_decoder),
}


def pretrained_vision_encoder(pretrained: str, device: Any = None, **overrides) -> VisionEncoder:
    """Our `VisionEncoder` from a HF SigLIP or CLIP folder (`load_vision`); overrides: our fields
    (`feature_layer=-2`, …)."""
    return LOADERS["pretrained_vision_encoder"](pretrained, device, **overrides)


def pretrained_qwen2vl_vision(pretrained: str, device: Any = None, **overrides) -> VisionEncoder:
    """Our `VisionEncoder` from a Qwen2-VL folder (`specs.qwen2vl_vision_spec`, `load_qwen2vl_vision`)."""
    return LOADERS["pretrained_qwen2vl_vision"](pretrained, device, **overrides)


def pretrained_qwen2vl_merger(pretrained: str, device: Any = None, **overrides) -> Projector:
    """Our `Projector(kind="merge")` from a Qwen2-VL folder's `merger`."""
    return LOADERS["pretrained_qwen2vl_merger"](pretrained, device, **overrides)


def pretrained_llava_projector(pretrained: str, device: Any = None, **overrides) -> Projector:
    """Our `Projector(kind="mlp")` from a LLaVA folder's `multi_modal_projector`."""
    return LOADERS["pretrained_llava_projector"](pretrained, device, **overrides)


def pretrained_decoder(pretrained: str, device: Any = None, **overrides) -> Decoder:
    """Our `Decoder` from a HF Llama / Mistral / Qwen2 / Qwen2-VL folder. overrides: our fields
    that a HF config does not fix (`rope="mrope"`, `mrope_section`, `max_seq_len`); architecture
    fields given here must agree with the folder's config."""
    return LOADERS["pretrained_decoder"](pretrained, device, **overrides)
