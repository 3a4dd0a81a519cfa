"""Our VLM -> a Hugging Face-layout folder (`python -m vlm.cli.export ckpt=… out=… format=hf_qwen2vl|hf_llava`).

The inverse of `vlm.model.hf`: the same key tables, read backwards, with the fused / reshaped
tensors put back together (q, k, v -> `qkv`; our linear patch embedding -> the Conv2d / Conv3d
weight; the learned position table -> the flat embedding, CLIP's CLS position first). The folder
holds `config.json`, `model.safetensors` (the hub checkpoints' key layout, which transformers 4
and 5 and serving engines read) and `tokenizer.json`, so a model trained here can be served by
any engine that reads those layouts.

Only a model whose architecture *is* the target's can be written. The model's spec
(`VLM.spec`, `vlm.model.config`) is compared with what the format requires (`REQUIRES`: spec field
-> value); the first field that differs is an error naming it and both values
(`format=hf_qwen2vl: model.encoder.pos='learned', the format needs 'rope2d'`), never a silently
different model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlm.model.config import DecoderConfig, ModelSpec
from vlm.model.hf import LLAMA_LAYER, QKV_BIAS, QWEN2VL_BLOCK, QWEN2VL_MERGER, SIGLIP_LAYER, expand
from vlm.model.vlm import VLM
from vlm.tokenizer import TextTokenizer

FORMATS = ("hf_qwen2vl", "hf_llava")


class ExportError(ValueError):
    """The model's architecture does not fit the requested format."""


def _num(x: float):
    return int(x) if float(x).is_integer() else x


# What each format requires of the spec: "part.field" (or a model-level field) -> value.
_COMMON = {"fusion": "interleave", "encoder.patch_embed": "linear", "decoder.qk_norm": False}
REQUIRES: dict[str, dict[str, Any]] = {
    "hf_qwen2vl": {
        **_COMMON,
        "encoder.pos": "rope2d",
        "encoder.patch_bias": False,
        "encoder.cls_token": False,
        "encoder.pre_norm": False,
        "encoder.final_norm": False,
        "encoder.attention": "frame",
        "encoder.act": "quick_gelu",
        "encoder.norm_eps": 1e-6,
        "projector.kind": "merge",
        "projector.merge_size": 2,
        "projector.norm_eps": 1e-6,
        "decoder.rope": "mrope",
        "decoder.qkv_bias": True,
    },
    "hf_llava": {
        **_COMMON,
        "encoder.pos": "learned",
        "encoder.patch_bias": False,
        "encoder.cls_token": True,
        "encoder.pre_norm": True,
        "encoder.final_norm": False,
        "encoder.temporal_patch": 1,
        "encoder.act": "quick_gelu",
        "projector.kind": "mlp",
        "projector.merge_size": 1,
        "decoder.rope": "rope",
        "decoder.qkv_bias": False,
    },
}
# the presets that give each part the format's layout, for the message
PRESETS = {
    "hf_qwen2vl": {"encoder": "model/encoder=qwen2vl_vit", "projector": "model/projector=merge", "decoder": "qwen2"},
    "hf_llava": {"encoder": "model/encoder=clip_vit", "projector": "model/projector=mlp", "decoder": "llama"},
}


def check_spec(spec: ModelSpec, fmt: str) -> None:
    """ExportError naming the first spec field whose value is not what `fmt` requires."""
    for key, want in REQUIRES[fmt].items():
        part, _, name = key.rpartition(".")
        have = getattr(getattr(spec, part), name) if part else getattr(spec, name)
        if have != want:
            hint = f" ({PRESETS[fmt][part]})" if part else ""
            raise ExportError(f"format={fmt}: model.{key}={have!r}, the format needs {want!r}{hint}")
    enc, proj = spec.encoder, spec.projector
    if len(enc.feature_indices) != 1:
        raise ExportError(f"format={fmt}: model.encoder.feature_layers={enc.feature_layers!r}, the format reads one")
    default = proj.merged_dim if proj.kind == "merge" else proj.out_dim  # the format's hidden width
    if proj.hidden not in (None, default):
        raise ExportError(f"format={fmt}: model.projector.hidden={proj.hidden!r}, the format needs {default}")


def _decoder_state(dec, body: str, head: str) -> dict[str, torch.Tensor]:
    table = expand(
        {**LLAMA_LAYER, **(QKV_BIAS if dec.config.qkv_bias else {})},
        dec.n_layers,
        {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"},
    )
    sd = dec.state_dict()
    out = {body + k[len("model.") :]: sd[v] for k, v in table.items()}
    tied = dec.lm_head.weight is dec.embed_tokens.weight
    if not tied:
        out[head + "lm_head.weight"] = sd["lm_head.weight"]
    return out


def _text_config(c: DecoderConfig, tied: bool) -> dict:
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.mlp_width,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads,
        "rms_norm_eps": c.norm_eps,
        "max_position_embeddings": c.max_seq_len,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "rope_theta": c.rope_theta,
    }


def qwen2vl_state_and_config(model: VLM, tok: TextTokenizer) -> tuple[dict, dict]:
    check_spec(model.spec, "hf_qwen2vl")
    enc, proj, dec = model.encoder, model.projector, model.decoder
    D = enc.dim
    sd = {}
    es = enc.state_dict()
    for k, v in QWEN2VL_BLOCK.items():
        for i in range(len(enc.blocks)):
            sd["visual." + k.format(i)] = es[v.format(i)]
    for i in range(len(enc.blocks)):
        for part in ("weight", "bias"):
            sd[f"visual.blocks.{i}.attn.qkv.{part}"] = torch.cat(
                [es[f"blocks.{i}.attn.{p}_proj.{part}"] for p in "qkv"]
            )
    T, P, C = enc.temporal_patch, enc.patch_size, enc.channels
    sd["visual.patch_embed.proj.weight"] = es["patch_embed.proj.weight"].reshape(D, C, T, P, P)
    ps = proj.state_dict()
    for k, v in QWEN2VL_MERGER.items():
        sd["visual." + k] = ps[v]
    tied = dec.lm_head.weight is dec.embed_tokens.weight
    sd.update(_decoder_state(dec, "model.", ""))
    text = {
        **_text_config(dec.config, tied),
        "model_type": "qwen2_vl_text",
        "rope_scaling": {"type": "mrope", "mrope_section": list(dec.mrope_section)},
    }
    vision = {
        "model_type": "qwen2_vl",
        "depth": len(enc.blocks),
        "embed_dim": D,
        "hidden_size": dec.dim,
        "num_heads": enc.config.n_heads,
        "mlp_ratio": _num(enc.config.mlp_width / D),
        "patch_size": P,
        "spatial_merge_size": 2,
        "temporal_patch_size": T,
        "in_channels": C,
        "hidden_act": "quick_gelu",
    }
    cfg = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        **{k: v for k, v in text.items() if k != "model_type"},
        "text_config": text,
        "vision_config": vision,
        "image_token_id": tok.image_pad_id,
        "video_token_id": tok.video_pad_id,
        "vision_start_token_id": tok.vision_start_id,
        "vision_end_token_id": tok.vision_end_id,
        "eos_token_id": tok.im_end_id,
        "pad_token_id": tok.pad_id,
    }
    return sd, cfg


def llava_state_and_config(model: VLM, tok: TextTokenizer) -> tuple[dict, dict]:
    check_spec(model.spec, "hf_llava")
    enc, proj, dec = model.encoder, model.projector, model.decoder
    D, P, C = enc.dim, enc.patch_size, enc.channels
    n = len(enc.blocks)  # the features are the last built layer's: written as the tower's last layer
    es = enc.state_dict()
    pre = "vision_tower.vision_model."
    sd = {pre + k.removeprefix("vision_model."): es[v] for k, v in expand(SIGLIP_LAYER, n, {}).items()}
    sd[pre + "embeddings.patch_embedding.weight"] = es["patch_embed.proj.weight"].reshape(D, C, P, P)
    sd[pre + "embeddings.class_embedding"] = es["cls"]
    g = enc.pos_embed.shape[0]
    sd[pre + "embeddings.position_embedding.weight"] = torch.cat(
        [es["cls_pos"][None], es["pos_embed"].reshape(g * g, D)]
    )
    sd[pre + "pre_layrnorm.weight"], sd[pre + "pre_layrnorm.bias"] = es["pre_norm.weight"], es["pre_norm.bias"]
    # post_layernorm only touches the pooled CLS, which LLaVA never reads: identity
    sd[pre + "post_layernorm.weight"], sd[pre + "post_layernorm.bias"] = torch.ones(D), torch.zeros(D)
    ps = proj.state_dict()
    for i, j in ((1, 0), (2, 2)):
        for p in ("weight", "bias"):
            sd[f"multi_modal_projector.linear_{i}.{p}"] = ps[f"proj.{j}.{p}"]
    tied = dec.lm_head.weight is dec.embed_tokens.weight
    sd.update(_decoder_state(dec, "language_model.model.", "language_model."))
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": D,
        "intermediate_size": enc.config.mlp_width,
        "num_hidden_layers": n,
        "num_attention_heads": enc.config.n_heads,
        "image_size": g * P,
        "patch_size": P,
        "num_channels": C,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": enc.config.norm_eps,
    }
    cfg = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision,
        "text_config": {**_text_config(dec.config, tied), "model_type": "llama"},
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "image_token_index": tok.image_pad_id,
        "image_token_id": tok.image_pad_id,
        "tie_word_embeddings": tied,
        "image_seq_length": g * g,
        "pad_token_id": tok.pad_id,
    }
    return sd, cfg


def export_hf(model: VLM, tok: TextTokenizer, out: str | Path, fmt: str) -> Path:
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    sd, cfg = (qwen2vl_state_and_config if fmt == "hf_qwen2vl" else llava_state_and_config)(model, tok)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous().clone() for k, v in sd.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(out / "tokenizer.json")
    return out
