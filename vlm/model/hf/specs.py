"""A Hugging Face folder's `config.json` -> our native component configs (no weights read).

Each `*_spec(cfg, where, **overrides)` (`where`: the folder, for messages) returns the `EncoderConfig` / `ProjectorConfig` /
`DecoderConfig` that builds our module with exactly the folder's architecture; the loaders
(`vlm.model.hf.loaders`) then fill it with the folder's weights. Overrides are our own fields
(`feature_layer`, `rope="mrope"`, …); `None` means "the folder's".

Not supported (a clear error, not a silent difference): rope scaling other than the default
(Llama 3.1 `llama3`, YaRN…), a `head_dim` different from `hidden_size / num_attention_heads`,
activations other than SiLU in the decoder, sliding-window attention.
"""

from __future__ import annotations

from typing import Any

from vlm.model.config import DecoderConfig, EncoderConfig, ProjectorConfig
from vlm.model.hf.folder import PretrainedError

DECODER_FAMILIES = {"llama": False, "mistral": False, "qwen2": True}  # family -> q/k/v biases
VISION_FAMILIES = ("siglip", "clip")
# decoder fields a folder's config.json does not fix: ours to choose
DECODER_OWN = ("max_seq_len", "rope", "mrope_section")


def _given(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if v is not None}


# ---- decoders -------------------------------------------------------------------------------------
def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for kind in (params.get("rope_type"), scaling.get("rope_type"), scaling.get("type")):
        if kind not in (None, "default"):
            raise PretrainedError(f"rope scaling {kind!r} is not supported (only the default rope)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def text_config(cfg: dict) -> dict:
    """The language-model part of a config: LLaVA's `text_config` (Llama unless it says), Qwen2-VL's
    (nested under `text_config` in transformers 5, at the top level in 4 / the hub checkpoints;
    family qwen2 with M-RoPE, `mrope_section` from `rope_scaling` / `rope_parameters`), or the
    config itself."""
    if cfg.get("model_type") == "llava":
        text = dict(cfg.get("text_config") or {})
        text.setdefault("model_type", "llama")
        text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
        return text
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


def decoder_fields(cfg: dict) -> dict[str, Any]:
    """Our `DecoderConfig` fields from a HF Llama / Mistral / Qwen2 / Qwen2-VL `config.json`."""
    cfg = text_config(cfg)
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
        qkv_bias=DECODER_FAMILIES[family],
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        **({"rope": "mrope", "mrope_section": list(cfg["_mrope_section"])} if cfg.get("_mrope_section") else {}),
    )


def decoder_spec(cfg: dict, where: str = "", **overrides) -> DecoderConfig:
    """The folder's decoder. Overrides of the architecture must agree with the folder's config
    (an error naming both otherwise); `max_seq_len`, `rope` and `mrope_section` are ours."""
    kw = decoder_fields(cfg)
    if kw.get("rope") == "mrope" and overrides.get("rope") == "rope":
        raise PretrainedError(f"{where} uses M-RoPE (Qwen2-VL): set decoder.rope=mrope (model/decoder=qwen2vl)")
    for k, v in overrides.items():
        if k in ("rope", "mrope_section") and v is None:
            continue
        if k in kw and v is not None and v != kw[k] and k not in DECODER_OWN:
            raise PretrainedError(f"decoder.{k}={v!r} contradicts {where}/config.json ({kw[k]!r})")
        if v is not None:
            kw[k] = v
    return DecoderConfig(**kw)


# ---- SigLIP / CLIP vision towers --------------------------------------------------------------------
def vision_family(cfg: dict) -> tuple[str, dict]:
    """(family, vision config) of a SigLIP / CLIP config (full checkpoints nest it under `vision_config`)."""
    mt = cfg.get("model_type")
    if mt == "llava":
        v = cfg.get("vision_config") or {}
        return vision_family(v)[0] if v.get("model_type") else "clip", v
    if mt in ("siglip", "clip"):
        return mt, cfg.get("vision_config") or {}
    if mt in ("siglip_vision_model", "clip_vision_model"):
        return mt.split("_")[0], cfg
    raise PretrainedError(f"model_type {mt!r} is not a supported vision tower ({', '.join(VISION_FAMILIES)})")


def vision_spec(cfg: dict, where: str = "", **overrides) -> EncoderConfig:
    """A SigLIP or CLIP tower (a vision-only or a full checkpoint, LLaVA's included). CLIP: a CLS
    token and a LayerNorm before the blocks; hidden states read as they are (no final norm)."""
    family, v = vision_family(cfg)
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
    )
    if family == "clip":
        kw.update(cls_token=True, pre_norm=True, final_norm=False, patch_bias=False)
    return EncoderConfig(**{**kw, **_given(overrides)})


# ---- Qwen2-VL vision tower and merger ---------------------------------------------------------------
def qwen2vl_vision_config(cfg: dict) -> dict:
    if cfg.get("model_type") == "qwen2_vl":
        return cfg.get("vision_config") or {}
    if cfg.get("model_type") == "qwen2_vl_vision":
        return cfg
    raise PretrainedError(f"model_type {cfg.get('model_type')!r} is not a Qwen2-VL checkpoint")


def qwen2vl_vision_spec(cfg: dict, where: str = "", **overrides) -> EncoderConfig:
    """Qwen2-VL's tower: Conv3d patches (T=2, no bias) as one linear map, 2D RoPE, QuickGELU,
    attention within each temporal patch, no final norm (the merger's `ln_q` is it)."""
    v = qwen2vl_vision_config(cfg)
    if v.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise PretrainedError(f"hidden_act {v.get('hidden_act')!r} is not supported")
    D = int(v.get("embed_dim", 1280))
    kw = dict(
        patch_size=int(v.get("patch_size", 14)),
        dim=D,
        n_layers=int(v.get("depth", 32)),
        n_heads=int(v.get("num_heads", 16)),
        mlp_hidden=int(D * float(v.get("mlp_ratio", 4))),
        channels=int(v.get("in_channels", 3)),
        patch_embed="linear",
        pos="rope2d",
        temporal_patch=int(v.get("temporal_patch_size", 2)),
        act="quick_gelu",
        norm_eps=1e-6,
        final_norm=False,
        patch_bias=False,
        attention="frame",
        rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
    )
    return EncoderConfig(**{**kw, **_given(overrides)})


def qwen2vl_merger_spec(cfg: dict, where: str = "", **overrides) -> ProjectorConfig:
    """Qwen2-VL's `merger`: LayerNorm per patch -> 2×2 concat -> Linear -> GELU -> Linear."""
    v = qwen2vl_vision_config(cfg)
    m, D = int(v.get("spatial_merge_size", 2)), int(v.get("embed_dim", 1280))
    kw = dict(
        in_dim=D, out_dim=int(v.get("hidden_size", 3584)), kind="merge", merge_size=m, hidden=D * m * m, norm_eps=1e-6
    )
    return ProjectorConfig(**{**kw, **_given(overrides)})


# ---- LLaVA-1.5 projector ----------------------------------------------------------------------------
def llava_projector_spec(cfg: dict, where: str = "", **overrides) -> ProjectorConfig:
    """LLaVA-1.5's `multi_modal_projector`: Linear -> GELU -> Linear, no merge."""
    if cfg.get("model_type") != "llava":
        raise PretrainedError(f"{where}: model_type {cfg.get('model_type')!r} is not llava")
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
    return ProjectorConfig(**{**kw, **_given(overrides)})
