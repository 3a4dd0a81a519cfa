"""Pretrained parts from Hugging Face-layout folders (`config.json` + `*.safetensors`).

    model/decoder=llama model.decoder.pretrained=/models/SmolLM2-135M      # also Mistral-style
    model/decoder=qwen2 model.decoder.pretrained=/models/Qwen2.5-0.5B       # q/k/v biases

`pretrained_decoder(path)` builds our `Decoder` from the folder's `config.json` and loads its
weights through an explicit key map: one table per family, `{}` standing for the layer index.
Every key is accounted for — a missing or unexpected key, or a shape mismatch, is an error naming
it (`PretrainedError`). Tensors are read one at a time from memory-mapped safetensors files
(single file or sharded with `model.safetensors.index.json`), so loading a 7B decoder does not
need twice its size in memory; `device="meta"` builds the module without allocating anything
(the key-map tests at full size use it).

Not supported (a clear error, not a silent difference): rope scaling other than the default
(Llama 3.1 `llama3`, YaRN…), a `head_dim` different from `hidden_size / num_attention_heads`,
activations other than SiLU, sliding-window attention.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import nn

from vlm.model.decoder import Decoder


class PretrainedError(ValueError):
    """A pretrained folder that does not fit: missing files, unsupported options, key mismatches."""


# ---- key maps: HF name -> ours; "{}" = layer index ----------------------------------------------
LLAMA_LAYER = {
    "model.layers.{}.input_layernorm.weight": "layers.{}.input_layernorm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.self_attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.self_attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.self_attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.self_attn.o_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_layernorm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
}
QKV_BIAS = {
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.self_attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.self_attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.self_attn.v_proj.bias",
}
_DECODER_GLOBAL = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"}
DECODER_FAMILIES = {
    "llama": {"layer": LLAMA_LAYER, "qkv_bias": False},
    "mistral": {"layer": LLAMA_LAYER, "qkv_bias": False},
    "qwen2": {"layer": {**LLAMA_LAYER, **QKV_BIAS}, "qkv_bias": True},
}


def expand(
    layer_map: dict[str, str], n_layers: int, global_map: dict[str, str], prefix_hf: str = "", prefix_ours: str = ""
) -> dict[str, str]:
    """The full HF -> ours name table for `n_layers` layers."""
    out = {prefix_hf + k: prefix_ours + v for k, v in global_map.items()}
    for i in range(n_layers):
        out.update({prefix_hf + k.format(i): prefix_ours + v.format(i) for k, v in layer_map.items()})
    return out


# ---- reading folders ------------------------------------------------------------------------------
def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise PretrainedError(f"{folder}: no config.json (expected a Hugging Face-layout model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PretrainedError(f"{path}: not valid JSON ({e})") from None


class SafetensorsFolder:
    """Lazy, memory-mapped access to every tensor of a folder's safetensors file(s)."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                raise PretrainedError(f"{folder}: no *.safetensors weights")
        self._handles = {f: safe_open(str(folder / f), framework="pt", device="cpu") for f in files}
        self.where = {k: f for f, h in self._handles.items() for k in h.keys()}

    def keys(self) -> set[str]:
        return set(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.where[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self.where[key]].get_tensor(key)


def check_and_load(
    module: nn.Module,
    source: SafetensorsFolder | dict[str, torch.Tensor],
    mapping: dict[str, str],
    ignore: tuple[str, ...] = (),
    where: str = "",
) -> None:
    """Load `source[hf] -> module[ours]` for every pair of `mapping`; every parameter and buffer the
    module saves must be covered and every source key used (except names matching `ignore`
    suffixes), shapes must agree — otherwise one `PretrainedError` naming the keys."""
    ours = module.state_dict()
    src_keys = set(source.keys()) if isinstance(source, dict) else source.keys()
    shape = (lambda k: tuple(source[k].shape)) if isinstance(source, dict) else source.shape
    mapped_ours = set(mapping.values())
    missing_src = sorted(k for k in mapping if k not in src_keys)
    unexpected = sorted(k for k in src_keys if k not in mapping and not k.endswith(ignore))
    unmapped = sorted(k for k in ours if k not in mapped_ours and not _tied_alias(module, k, mapped_ours))
    bad_target = sorted(v for v in mapped_ours if v not in ours)
    shapes = sorted(
        f"{k} {shape(k)} -> {v} {tuple(ours[v].shape)}"
        for k, v in mapping.items()
        if k in src_keys and v in ours and shape(k) != tuple(ours[v].shape)
    )
    problems = [
        (f"missing in the checkpoint: {_few(missing_src)}" if missing_src else ""),
        (f"unexpected in the checkpoint: {_few(unexpected)}" if unexpected else ""),
        (f"not covered by the key map: {_few(unmapped)}" if unmapped else ""),
        (f"key map names unknown parameters: {_few(bad_target)}" if bad_target else ""),
        (f"shape mismatch: {_few(shapes)}" if shapes else ""),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise PretrainedError(f"{where or 'pretrained weights'}: " + "; ".join(problems))
    params = dict(module.named_parameters())
    params.update(dict(module.named_buffers()))
    meta = any(p.is_meta for p in params.values())
    if meta:
        return  # the key map and shapes are proven; nothing is allocated
    with torch.no_grad():
        for k, v in mapping.items():
            t = source[k] if isinstance(source, dict) else source.get(k)
            params[v].copy_(t.to(params[v].dtype))


def _tied_alias(module: nn.Module, key: str, mapped: set[str]) -> bool:
    """`lm_head.weight` tied to `embed_tokens.weight` needs no entry of its own."""
    if key.endswith("lm_head.weight"):
        emb = key[: -len("lm_head.weight")] + "embed_tokens.weight"
        sd = module.state_dict()
        return emb in mapped and sd[key].data_ptr() == sd[emb].data_ptr() if not sd[key].is_meta else emb in mapped
    return False


def _few(xs: list[str], n: int = 6) -> str:
    return ", ".join(xs[:n]) + (f" … (+{len(xs) - n} more)" if len(xs) > n else "")


_SKELETON = ContextVar("vlm_hf_skeleton", default=False)


@contextmanager
def skeleton():
    """Inside this block every pretrained loader builds its module on the meta device and reads no
    weights (config.json only). Ranks other than 0 build this way under FSDP with
    `parallel.init=rank0`; rank 0's weights are then broadcast into their shards
    (`vlm.parallel.load_from_rank0`)."""
    token = _SKELETON.set(True)
    try:
        yield
    finally:
        _SKELETON.reset(token)


def _skeleton(device) -> bool:
    return str(device) == "meta" or _SKELETON.get()


def _build(cls, kw: dict, device, overrides: dict | None = None):
    """`cls(**kw)` on `device` (meta: nothing allocated), with non-None `overrides` applied; the
    module remembers its native class and arguments (`vlm.build.self_contained_config`)."""
    kw = {**kw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    with torch.device("meta" if _skeleton(device) else (device or "cpu")):
        mod = cls(**kw)
    mod.native_config = {"_target_": f"{cls.__module__}.{cls.__name__}", **kw}
    return mod


def _load_patch_embed(enc, w: torch.Tensor, where: str) -> None:
    """A Conv2d / Conv3d patch weight `[D, C, (T,) P, P]` into our linear patch embedding `[D, C·(T·)P·P]`."""
    flat = w.reshape(w.shape[0], -1)
    if flat.shape != enc.patch_embed.proj.weight.shape:
        raise PretrainedError(
            f"{where}: patch embedding {tuple(w.shape)} does not fit {tuple(enc.patch_embed.proj.weight.shape)}"
        )
    with torch.no_grad():
        enc.patch_embed.proj.weight.copy_(flat)


# ---- decoders -------------------------------------------------------------------------------------
def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for kind in (params.get("rope_type"), scaling.get("rope_type"), scaling.get("type")):
        if kind not in (None, "default"):
            raise PretrainedError(f"rope scaling {kind!r} is not supported (only the default rope)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _text_config(cfg: dict) -> dict:
    if cfg.get("model_type") == "llava":
        text = dict(cfg.get("text_config") or {})
        text.setdefault("model_type", "llama")
        text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
        return text
    return _text_config_qwen(cfg)


def _text_config_qwen(cfg: dict) -> dict:
    """The language-model part of a config: Qwen2-VL nests it under `text_config` (transformers 5)
    or keeps it at the top level (transformers 4 / the hub checkpoints); its family is qwen2 with
    M-RoPE (`mrope_section` from `rope_scaling` / `rope_parameters`)."""
    if cfg.get("model_type") in ("qwen2_vl", "qwen2_vl_text"):
        text = dict(cfg.get("text_config") or cfg)
        params = {**(text.get("rope_scaling") or {}), **(text.get("rope_parameters") or {})}
        text["model_type"] = "qwen2"
        text["_mrope_section"] = params.get("mrope_section")
        text["rope_parameters"] = {"rope_theta": params.get("rope_theta", text.get("rope_theta", 1000000.0))}
        text.pop("rope_scaling", None)
        text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
        return text
    return cfg


def decoder_kwargs(cfg: dict) -> dict:
    """Our `Decoder` arguments from a HF Llama / Mistral / Qwen2 / Qwen2-VL `config.json`."""
    cfg = _text_config(cfg)
    family = cfg.get("model_type")
    if family not in DECODER_FAMILIES:
        raise PretrainedError(f"model_type {family!r} is not a supported decoder family ({sorted(DECODER_FAMILIES)})")
    dim, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if cfg.get("head_dim") not in (None, dim // heads):
        raise PretrainedError(f"head_dim {cfg['head_dim']} != hidden_size / num_attention_heads = {dim // heads}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise PretrainedError(f"hidden_act {cfg['hidden_act']!r} is not supported (SiLU only)")
    if cfg.get("use_sliding_window") or (family == "mistral" and cfg.get("sliding_window")):
        raise PretrainedError("sliding-window attention is not supported")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise PretrainedError("attention_bias / mlp_bias on a Llama-family model is not supported")
    return dict(
        vocab_size=int(cfg["vocab_size"]),
        dim=dim,
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        mlp_hidden=int(cfg["intermediate_size"]),
        rope_theta=_rope_theta(cfg),
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=DECODER_FAMILIES[family]["qkv_bias"],
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        **({"rope": "mrope", "mrope_section": list(cfg["_mrope_section"])} if cfg.get("_mrope_section") else {}),
    )


def decoder_key_map(cfg: dict, keys: set[str] | None = None) -> dict[str, str]:
    """HF -> ours for a decoder. `keys` (the checkpoint's) picks the prefix: `model.` for LLMs,
    `model.language_model.` for Qwen2-VL saved by transformers 5."""
    cfg = _text_config(cfg)
    fam = DECODER_FAMILIES[cfg["model_type"]]
    n = int(cfg["num_hidden_layers"])
    glob = dict(_DECODER_GLOBAL)
    if not cfg.get("tie_word_embeddings", False):
        glob["lm_head.weight"] = "lm_head.weight"
    table = expand(fam["layer"], n, glob)
    if keys is not None:  # "model." (LLMs), "model.language_model." (VLMs, transformers 5), "language_model.model." (4)
        body = _prefix_of([k for k in keys if "vision" not in k], "embed_tokens.weight", "decoder")
        heads = [k[: -len("lm_head.weight")] for k in keys if k.endswith("lm_head.weight")]
        head = heads[0] if heads else ""
        table = {(body + k[len("model.") :] if k.startswith("model.") else head + k): v for k, v in table.items()}
    return table


def pretrained_decoder(pretrained: str, device: str | torch.device | None = None, **overrides) -> Decoder:
    """Build our `Decoder` from a HF-layout folder and load its weights (see the module docstring).

    overrides: our `Decoder` arguments that are not in a HF config (e.g. `rope="mrope"`,
    `mrope_section`); architecture fields given here must agree with the folder's config."""
    cfg = read_config(pretrained)
    kw = decoder_kwargs(cfg)
    if kw.get("rope") == "mrope" and overrides.get("rope") == "rope":
        raise PretrainedError(f"{pretrained} uses M-RoPE (Qwen2-VL): set decoder.rope=mrope (model/decoder=qwen2vl)")
    for k, v in overrides.items():
        if k in ("rope", "mrope_section") and v is None:
            continue
        if k in kw and v is not None and v != kw[k] and k not in ("max_seq_len", "rope", "mrope_section"):
            raise PretrainedError(f"decoder.{k}={v!r} contradicts {pretrained}/config.json ({kw[k]!r})")
        if v is not None or k not in kw:
            kw[k] = v
    dec = _build(Decoder, kw, device)
    if _skeleton(device):
        return dec
    src = SafetensorsFolder(pretrained)
    mapping = decoder_key_map(cfg, src.keys())
    # a whole VLM's folder (Qwen2-VL, LLaVA): the vision tower and projector have their own loaders
    vision = {
        k
        for k in src.keys()
        if k.startswith(
            (
                "visual.",
                "model.visual.",
                "vision_tower.",
                "model.vision_tower.",
                "multi_modal_projector.",
                "model.multi_modal_projector.",
            )
        )
    }
    check_and_load(dec, _Remapped(src, drop=vision), mapping, where=str(pretrained))
    return dec


# ---- vision towers --------------------------------------------------------------------------------
SIGLIP_LAYER = {
    "vision_model.encoder.layers.{}.layer_norm1.weight": "blocks.{}.norm1.weight",
    "vision_model.encoder.layers.{}.layer_norm1.bias": "blocks.{}.norm1.bias",
    "vision_model.encoder.layers.{}.self_attn.q_proj.weight": "blocks.{}.attn.q_proj.weight",
    "vision_model.encoder.layers.{}.self_attn.q_proj.bias": "blocks.{}.attn.q_proj.bias",
    "vision_model.encoder.layers.{}.self_attn.k_proj.weight": "blocks.{}.attn.k_proj.weight",
    "vision_model.encoder.layers.{}.self_attn.k_proj.bias": "blocks.{}.attn.k_proj.bias",
    "vision_model.encoder.layers.{}.self_attn.v_proj.weight": "blocks.{}.attn.v_proj.weight",
    "vision_model.encoder.layers.{}.self_attn.v_proj.bias": "blocks.{}.attn.v_proj.bias",
    "vision_model.encoder.layers.{}.self_attn.out_proj.weight": "blocks.{}.attn.o_proj.weight",
    "vision_model.encoder.layers.{}.self_attn.out_proj.bias": "blocks.{}.attn.o_proj.bias",
    "vision_model.encoder.layers.{}.layer_norm2.weight": "blocks.{}.norm2.weight",
    "vision_model.encoder.layers.{}.layer_norm2.bias": "blocks.{}.norm2.bias",
    "vision_model.encoder.layers.{}.mlp.fc1.weight": "blocks.{}.mlp.fc1.weight",
    "vision_model.encoder.layers.{}.mlp.fc1.bias": "blocks.{}.mlp.fc1.bias",
    "vision_model.encoder.layers.{}.mlp.fc2.weight": "blocks.{}.mlp.fc2.weight",
    "vision_model.encoder.layers.{}.mlp.fc2.bias": "blocks.{}.mlp.fc2.bias",
}
_SIGLIP_GLOBAL = {
    "vision_model.embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "vision_model.post_layernorm.weight": "norm.weight",
    "vision_model.post_layernorm.bias": "norm.bias",
}
# reshaped on the way in: conv [D, C, P, P] -> linear [D, C·P·P]; table [n², D] -> [n, n, D]
_SIGLIP_RESHAPED = {
    "vision_model.embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "vision_model.embeddings.position_embedding.weight": "pos_embed",
}


VISION_FAMILIES = ("siglip", "clip")


def _prefix_of(keys, suffix: str, where) -> str:
    hits = sorted(k[: -len(suffix)] for k in keys if k.endswith(suffix))
    if not hits:
        raise PretrainedError(f"{where}: no '*{suffix}' in the checkpoint")
    return hits[0]


def _vision_config(cfg: dict) -> tuple[str, dict]:
    """(family, vision config) of a SigLIP / CLIP config (full checkpoints nest it under `vision_config`)."""
    mt = cfg.get("model_type")
    if mt == "llava":
        v = cfg.get("vision_config") or {}
        return _vision_config(v)[0] if v.get("model_type") else "clip", v
    if mt in ("siglip", "clip"):
        return mt, cfg.get("vision_config") or {}
    if mt in ("siglip_vision_model", "clip_vision_model"):
        return mt.split("_")[0], cfg
    raise PretrainedError(f"model_type {mt!r} is not a supported vision tower ({', '.join(VISION_FAMILIES)})")


def vision_kwargs(cfg: dict, feature_layer: int = -1) -> dict:
    family, v = _vision_config(cfg)
    default_act = "gelu_pytorch_tanh" if family == "siglip" else "quick_gelu"
    act = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}.get(
        v.get("hidden_act", default_act)
    )
    if act is None:
        raise PretrainedError(f"hidden_act {v.get('hidden_act')!r} is not supported")
    P, size = int(v.get("patch_size", 16 if family == "siglip" else 32)), int(v.get("image_size", 224))
    kw = dict(
        patch_size=P,
        dim=int(v.get("hidden_size", 768)),
        n_layers=int(v.get("num_hidden_layers", 12)),
        n_heads=int(v.get("num_attention_heads", 12)),
        mlp_hidden=int(v.get("intermediate_size", 3072)),
        channels=int(v.get("num_channels", 3)),
        pos_grid=size // P,
        patch_embed="linear",
        pos="learned",
        act=act,
        norm_eps=float(v.get("layer_norm_eps", 1e-6 if family == "siglip" else 1e-5)),
        feature_layer=feature_layer,
    )
    if family == "clip":  # CLS token, LayerNorm before the blocks, hidden states read as they are
        kw.update(cls_token=True, pre_norm=True, final_norm=False, patch_bias=False)
    return kw


def pretrained_vision_encoder(
    pretrained: str, feature_layer: int = -1, device: str | torch.device | None = None, **overrides
):
    """Our `VisionEncoder` from a HF SigLIP or CLIP folder (a vision-only or a full checkpoint, whose
    text tower is then ignored).

    SigLIP: the final LayerNorm is `post_layernorm`, applied to the selected layer (for the last
    layer exactly HF's `last_hidden_state`). CLIP: a CLS token and `pre_layrnorm`; features are the
    selected layer's hidden states without a final norm and without the CLS (LLaVA's
    `vision_feature_layer=-2`, `select_feature="patch"`; `feature_layer=-1` is HF's
    `last_hidden_state[:, 1:]`). Layers after `feature_layer`, the pooling head and the projection
    heads are not built: their keys are listed as deliberately unused."""
    from vlm.model.vision import VisionEncoder

    cfg = read_config(pretrained)
    family, _ = _vision_config(cfg)
    enc = _build(VisionEncoder, vision_kwargs(cfg, feature_layer), device, overrides)
    kw = enc.native_config
    if _skeleton(device):
        return enc
    src = SafetensorsFolder(pretrained)
    n_built = len(enc.blocks)
    # where the tower lives: "" (vision-only, transformers 5), "vision_model." (full SigLIP / CLIP),
    # "model.vision_tower.vision_model." / "vision_tower.vision_model." (LLaVA, transformers 5 / 4)
    pre = _prefix_of(src.keys(), "embeddings.patch_embedding.weight", pretrained)

    def re(table: dict[str, str]) -> dict[str, str]:
        return {pre + k.removeprefix("vision_model."): v for k, v in table.items()}

    glob = dict(_SIGLIP_GLOBAL)
    if family == "clip":  # no patch bias; post_layernorm only normalises the pooled CLS: unused
        glob.pop("vision_model.embeddings.patch_embedding.bias")
        glob.pop("vision_model.post_layernorm.weight")
        glob.pop("vision_model.post_layernorm.bias")
        glob.update(
            {"vision_model.pre_layrnorm.weight": "pre_norm.weight", "vision_model.pre_layrnorm.bias": "pre_norm.bias"}
        )
    mapping = expand(re(SIGLIP_LAYER), n_built, re(glob))
    unused = tuple(
        k
        for k in src.keys()
        if not k.startswith(pre)
        or k.startswith(pre + "head.")
        or k == pre + "embeddings.position_ids"
        or (family == "clip" and k.startswith(pre + "post_layernorm."))
        or any(k.startswith(f"{pre}encoder.layers.{i}.") for i in range(n_built, kw["n_layers"]))
    )
    by_hand = re(_SIGLIP_RESHAPED)
    if family == "clip":
        by_hand[pre + "embeddings.class_embedding"] = "cls"
    loaded = {}
    for k, ours in by_hand.items():
        if k not in src.keys():
            raise PretrainedError(f"{pretrained}: missing in the checkpoint: {k}")
        loaded[ours] = src.get(k)
    skip = set(loaded) | ({"cls_pos"} if family == "clip" else set())
    check_and_load(_Without(enc, skip), _Remapped(src, drop=set(unused) | set(by_hand)), mapping, where=str(pretrained))
    _load_patch_embed(enc, loaded["patch_embed.proj.weight"], str(pretrained))
    with torch.no_grad():
        table = loaded["pos_embed"]
        n = kw["pos_grid"]
        extra = 1 if family == "clip" else 0  # CLIP's table starts with the CLS position
        if table.shape != (extra + n * n, kw["dim"]):
            raise PretrainedError(
                f"{pretrained}: position table {tuple(table.shape)} is not {extra}+{n}x{n} x {kw['dim']}"
            )
        enc.pos_embed.copy_(table[extra:].view(n, n, -1))
        if family == "clip":
            enc.cls.copy_(loaded["cls"])
            enc.cls_pos.copy_(table[0])
    return enc


class _Remapped:
    """A SafetensorsFolder view without some keys (handled elsewhere or deliberately unused)."""

    def __init__(self, src: SafetensorsFolder, drop: set[str]):
        self.src, self.drop = src, drop

    def keys(self) -> set[str]:
        return self.src.keys() - self.drop

    def shape(self, key):
        return self.src.shape(key)

    def get(self, key):
        return self.src.get(key)


class _Without(nn.Module):
    """`module`'s state without some keys (loaded by hand), for `check_and_load`'s accounting."""

    def __init__(self, module: nn.Module, skip: set[str]):
        super().__init__()
        self.inner, self.skip = module, skip

    def state_dict(self, *a, **kw):
        return {k: v for k, v in self.inner.state_dict().items() if k not in self.skip}

    def named_parameters(self, *a, **kw):
        return ((k, v) for k, v in self.inner.named_parameters() if k not in self.skip)

    def named_buffers(self, *a, **kw):
        return ((k, v) for k, v in self.inner.named_buffers() if k not in self.skip)


# ---- Qwen2-VL vision tower and merger ---------------------------------------------------------------
QWEN2VL_BLOCK = {
    "blocks.{}.norm1.weight": "blocks.{}.norm1.weight",
    "blocks.{}.norm1.bias": "blocks.{}.norm1.bias",
    "blocks.{}.norm2.weight": "blocks.{}.norm2.weight",
    "blocks.{}.norm2.bias": "blocks.{}.norm2.bias",
    "blocks.{}.attn.proj.weight": "blocks.{}.attn.o_proj.weight",
    "blocks.{}.attn.proj.bias": "blocks.{}.attn.o_proj.bias",
    "blocks.{}.mlp.fc1.weight": "blocks.{}.mlp.fc1.weight",
    "blocks.{}.mlp.fc1.bias": "blocks.{}.mlp.fc1.bias",
    "blocks.{}.mlp.fc2.weight": "blocks.{}.mlp.fc2.weight",
    "blocks.{}.mlp.fc2.bias": "blocks.{}.mlp.fc2.bias",
}
# the fused projection, split in this one place: qkv rows are [q; k; v]
_QWEN2VL_FUSED = {
    "blocks.{}.attn.qkv.weight": ("blocks.{}.attn.{}_proj.weight", 0),
    "blocks.{}.attn.qkv.bias": ("blocks.{}.attn.{}_proj.bias", 0),
}
QWEN2VL_MERGER = {
    "merger.ln_q.weight": "norm.weight",
    "merger.ln_q.bias": "norm.bias",
    "merger.mlp.0.weight": "proj.0.weight",
    "merger.mlp.0.bias": "proj.0.bias",
    "merger.mlp.2.weight": "proj.2.weight",
    "merger.mlp.2.bias": "proj.2.bias",
}


class _Split:
    """A source view that exposes fused tensors as their parts: `NAME#q|k|v` = rows of NAME."""

    def __init__(self, src, fused: set[str], parts=("q", "k", "v")):
        self.src, self.fused, self.parts = src, fused, parts

    def keys(self) -> set[str]:
        ks = set(self.src.keys()) - self.fused
        return ks | {f"{k}#{p}" for k in self.fused if k in self.src.keys() for p in self.parts}

    def _part(self, key):
        base, part = key.split("#")
        return base, self.parts.index(part)

    def shape(self, key):
        if "#" not in key:
            return self.src.shape(key)
        base, i = self._part(key)
        s = list(self.src.shape(base))
        s[0] //= len(self.parts)
        return tuple(s)

    def get(self, key):
        if "#" not in key:
            return self.src.get(key)
        base, i = self._part(key)
        return self.src.get(base).chunk(len(self.parts), 0)[i]


def _qwen2vl_vision_cfg(cfg: dict) -> dict:
    if cfg.get("model_type") == "qwen2_vl":
        return cfg.get("vision_config") or {}
    if cfg.get("model_type") == "qwen2_vl_vision":
        return cfg
    raise PretrainedError(f"model_type {cfg.get('model_type')!r} is not a Qwen2-VL checkpoint")


def _qwen2vl_prefix(src: SafetensorsFolder) -> str:
    """`visual.` (transformers 4 / the hub checkpoints) or `model.visual.` (transformers 5)."""
    for pre in ("model.visual.", "visual.", ""):
        if any(k.startswith(pre + "blocks.") for k in src.keys()):
            return pre
    raise PretrainedError("no Qwen2-VL vision blocks in the checkpoint")


def pretrained_qwen2vl_vision(
    pretrained: str, feature_layer: int = -1, device: str | torch.device | None = None, **overrides
):
    """Our `VisionEncoder` from a Qwen2-VL folder: Conv3d patches (T=2, no bias) as one linear map,
    2D RoPE (the same rule as ours), QuickGELU, no final norm (the merger's `ln_q` is it).

    Qwen2-VL's processor orders each image's patches by 2×2 merge window; ours are row-major. The
    blocks only see a token's rotary position, so both orders give the same features, permuted,
    and both mergers concatenate the same 2×2 windows in the same order."""
    from vlm.model.vision import VisionEncoder

    v = _qwen2vl_vision_cfg(read_config(pretrained))
    if v.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise PretrainedError(f"hidden_act {v.get('hidden_act')!r} is not supported")
    D, heads = int(v.get("embed_dim", 1280)), int(v.get("num_heads", 16))
    kw = dict(
        patch_size=int(v.get("patch_size", 14)),
        dim=D,
        n_layers=int(v.get("depth", 32)),
        n_heads=heads,
        mlp_hidden=int(D * float(v.get("mlp_ratio", 4))),
        channels=int(v.get("in_channels", 3)),
        patch_embed="linear",
        pos="rope2d",
        temporal_patch=int(v.get("temporal_patch_size", 2)),
        act="quick_gelu",
        norm_eps=1e-6,
        final_norm=False,
        patch_bias=False,
        feature_layer=feature_layer,
        attention="frame",
        rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
    )
    enc = _build(VisionEncoder, kw, device, overrides)
    kw = enc.native_config
    if _skeleton(device):
        return enc
    raw = SafetensorsFolder(pretrained)
    pre = _qwen2vl_prefix(raw)
    n_built = len(enc.blocks)
    fused = {pre + k.format(i) for k in _QWEN2VL_FUSED for i in range(n_built)}
    src = _Split(raw, fused)
    mapping = expand({pre + k: v for k, v in QWEN2VL_BLOCK.items()}, n_built, {})
    for i in range(n_built):
        for k, (ours, _) in _QWEN2VL_FUSED.items():
            for p in ("q", "k", "v"):
                mapping[f"{pre}{k.format(i)}#{p}"] = ours.format(i, p)
    patch = pre + "patch_embed.proj.weight"
    unused = {
        k
        for k in src.keys()
        if not k.startswith(pre)
        or k.startswith(pre + "merger.")
        or any(k.startswith(f"{pre}blocks.{i}.") for i in range(n_built, kw["n_layers"]))
    }
    check_and_load(
        _Without(enc, {"patch_embed.proj.weight"}),
        _Remapped(src, drop=unused | {patch}),
        mapping,
        where=str(pretrained),
    )
    _load_patch_embed(enc, raw.get(patch), str(pretrained))  # Conv3d [D, C, T, P, P]
    return enc


def pretrained_qwen2vl_merger(pretrained: str, device: str | torch.device | None = None, **overrides):
    """Our `Projector(kind="merge")` from a Qwen2-VL folder's `merger` (LayerNorm per patch ->
    2×2 concat -> Linear -> GELU -> Linear)."""
    from vlm.model.projector import Projector

    cfg = read_config(pretrained)
    v = _qwen2vl_vision_cfg(cfg)
    m = int(v.get("spatial_merge_size", 2))
    D = int(v.get("embed_dim", 1280))
    kw = dict(
        in_dim=D, out_dim=int(v.get("hidden_size", 3584)), kind="merge", merge_size=m, hidden=D * m * m, norm_eps=1e-6
    )
    proj = _build(Projector, kw, device, overrides)
    if _skeleton(device):
        return proj
    src = SafetensorsFolder(pretrained)
    pre = _qwen2vl_prefix(src)
    mapping = {pre + k: v for k, v in QWEN2VL_MERGER.items()}
    check_and_load(
        proj,
        _Remapped(src, drop={k for k in src.keys() if not k.startswith(pre + "merger.")}),
        mapping,
        where=str(pretrained),
    )
    return proj


# ---- LLaVA-1.5 projector --------------------------------------------------------------------------
def pretrained_llava_projector(pretrained: str, device: str | torch.device | None = None, **overrides):
    """Our `Projector(kind="mlp")` from a LLaVA folder's `multi_modal_projector` (Linear -> GELU ->
    Linear, no merge)."""
    from vlm.model.projector import Projector

    cfg = read_config(pretrained)
    if cfg.get("model_type") != "llava":
        raise PretrainedError(f"{pretrained}: model_type {cfg.get('model_type')!r} is not llava")
    if cfg.get("projector_hidden_act", "gelu") != "gelu":
        raise PretrainedError(f"projector_hidden_act {cfg.get('projector_hidden_act')!r} is not supported")
    v, t = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
    kw = dict(
        in_dim=int(v.get("hidden_size", 1024)),
        out_dim=int(t.get("hidden_size", 4096)),
        kind="mlp",
        merge_size=1,
        hidden=int(t.get("hidden_size", 4096)),
    )
    proj = _build(Projector, kw, device, overrides)
    if _skeleton(device):
        return proj
    src = SafetensorsFolder(pretrained)
    pre = _prefix_of(src.keys(), "multi_modal_projector.linear_1.weight", pretrained)
    mapping = {
        f"{pre}multi_modal_projector.linear_{i}.{p}": f"proj.{j}.{p}"
        for i, j in ((1, 0), (2, 2))
        for p in ("weight", "bias")
    }
    check_and_load(
        proj,
        _Remapped(src, drop={k for k in src.keys() if "multi_modal_projector." not in k}),
        mapping,
        where=str(pretrained),
    )
    return proj
