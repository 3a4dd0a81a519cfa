"""Our VLM -> a Hugging Face-layout folder (`python -m vlm.export ckpt=… out=… format=hf_qwen2vl|hf_llava`).

The inverse of `vlm.model.hf`: the same key tables, read backwards, with the fused / reshaped
tensors put back together (q, k, v -> `qkv`; our linear patch embedding -> the Conv2d / Conv3d
weight; the learned position table -> the flat embedding, CLIP's CLS position first). The folder
holds `config.json`, `model.safetensors` (the hub checkpoints' key layout, which transformers 4
and 5 and serving engines read) and `tokenizer.json`, so a model trained here can be served by
any engine that reads those layouts.

Only a model whose architecture *is* the target's can be written: a mismatch (a conv patch stem,
learned positions where Qwen2-VL has 2D RoPE, an M-RoPE split that differs, …) is an error that
names the option, never a silently different model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlm.model.hf import LLAMA_LAYER, QKV_BIAS, QWEN2VL_BLOCK, QWEN2VL_MERGER, SIGLIP_LAYER, expand
from vlm.model.vlm import VLM
from vlm.tokenizer import TextTokenizer

FORMATS = ("hf_qwen2vl", "hf_llava")


class ExportError(ValueError):
    """The model's architecture does not fit the requested format."""


def _num(x: float):
    return int(x) if float(x).is_integer() else x


def _need(ok: bool, what: str, fmt: str) -> None:
    if not ok:
        raise ExportError(f"format={fmt}: {what}")


def _decoder_state(dec, body: str, head: str) -> dict[str, torch.Tensor]:
    table = expand(
        {**LLAMA_LAYER, **(QKV_BIAS if dec.layers[0].self_attn.q_proj.bias is not None else {})},
        dec.n_layers,
        {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"},
    )
    sd = dec.state_dict()
    out = {body + k[len("model.") :]: sd[v] for k, v in table.items()}
    tied = dec.lm_head.weight is dec.embed_tokens.weight
    if not tied:
        out[head + "lm_head.weight"] = sd["lm_head.weight"]
    return out


def _text_config(dec, tied: bool) -> dict:
    return {
        "vocab_size": dec.vocab_size,
        "hidden_size": dec.dim,
        "intermediate_size": dec.layers[0].mlp.down_proj.in_features,
        "num_hidden_layers": dec.n_layers,
        "num_attention_heads": dec.n_heads,
        "num_key_value_heads": dec.n_kv_heads,
        "rms_norm_eps": dec.layers[0].input_layernorm.eps,
        "max_position_embeddings": dec.max_seq_len,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "rope_theta": dec.rope_theta,
    }


def qwen2vl_state_and_config(model: VLM, tok: TextTokenizer) -> tuple[dict, dict]:
    fmt = "hf_qwen2vl"
    enc, proj, dec = model.encoder, model.projector, model.decoder
    _need(model.fusion == "interleave", "needs fusion=interleave", fmt)
    _need(
        enc.pos == "rope2d" and enc.patch_embed.kind == "linear" and enc.patch_embed.proj.bias is None,
        "needs a linear patch embedding without bias and pos=rope2d (model/encoder=qwen2vl_vit)",
        fmt,
    )
    _need(
        enc.cls is None and not enc.final_norm and enc.pre_norm is None and enc.attention == "frame",
        "needs no CLS token, no final norm, no pre-norm and attention=frame",
        fmt,
    )
    _need(
        len(enc.blocks) == max(enc.feature_layers) + 1 and len(enc.feature_layers) == 1,
        "needs the last built layer as the only feature layer",
        fmt,
    )
    _need(
        enc.blocks[0].mlp.act_name == "quick_gelu" and enc.blocks[0].norm1.eps == 1e-6,
        "needs QuickGELU and LayerNorm eps 1e-6 in the vision blocks",
        fmt,
    )
    _need(
        proj.kind == "merge" and proj.merge_size == 2,
        "needs model/projector=merge with merge_size 2 (Qwen2-VL's merger)",
        fmt,
    )
    _need(
        dec.rope == "mrope" and dec.layers[0].self_attn.q_proj.bias is not None,
        "needs a Qwen2 decoder (q/k/v biases) with rope=mrope",
        fmt,
    )
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
        **_text_config(dec, tied),
        "model_type": "qwen2_vl_text",
        "rope_scaling": {"type": "mrope", "mrope_section": list(dec.mrope_section)},
    }
    vision = {
        "model_type": "qwen2_vl",
        "depth": len(enc.blocks),
        "embed_dim": D,
        "hidden_size": dec.dim,
        "num_heads": enc.blocks[0].attn.n_heads,
        "mlp_ratio": _num(enc.blocks[0].mlp.fc1.out_features / D),
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
    fmt = "hf_llava"
    enc, proj, dec = model.encoder, model.projector, model.decoder
    _need(model.fusion == "interleave", "needs fusion=interleave", fmt)
    _need(
        enc.cls is not None
        and enc.pre_norm is not None
        and not enc.final_norm
        and enc.pos == "learned"
        and enc.patch_embed.kind == "linear"
        and enc.patch_embed.proj.bias is None
        and enc.temporal_patch == 1,
        "needs a CLIP-style tower (model/encoder=clip_vit: CLS, pre-norm, no final norm, linear patches without bias)",
        fmt,
    )
    _need(enc.blocks[0].mlp.act_name == "quick_gelu", "needs QuickGELU in the vision blocks (CLIP's)", fmt)
    _need(len(enc.feature_layers) == 1, "needs one feature layer", fmt)
    _need(
        proj.kind == "mlp" and proj.merge_size == 1,
        "needs model/projector=mlp without merge (LLaVA-1.5's projector)",
        fmt,
    )
    _need(
        dec.rope == "rope" and dec.layers[0].self_attn.q_proj.bias is None,
        "needs a Llama decoder (no q/k/v bias, 1D RoPE)",
        fmt,
    )
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
        "intermediate_size": enc.blocks[0].mlp.fc1.out_features,
        "num_hidden_layers": n,
        "num_attention_heads": enc.blocks[0].attn.n_heads,
        "image_size": g * P,
        "patch_size": P,
        "num_channels": C,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": enc.blocks[0].norm1.eps,
    }
    cfg = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision,
        "text_config": {**_text_config(dec, tied), "model_type": "llama"},
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
