"""Weight key tables: Hugging Face name -> ours, `{}` standing for the layer index.

One table per family, read forwards by the loaders (`vlm.model.hf.loaders`) and backwards by the
export (`vlm.checkpoint.hf_export`), so the two can never disagree.
"""

from __future__ import annotations

from vlm.model.hf.folder import prefix_of
from vlm.model.hf.specs import text_config

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
DECODER_GLOBAL = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"}
DECODER_LAYER = {"llama": LLAMA_LAYER, "mistral": LLAMA_LAYER, "qwen2": {**LLAMA_LAYER, **QKV_BIAS}}

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
SIGLIP_GLOBAL = {
    "vision_model.embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "vision_model.post_layernorm.weight": "norm.weight",
    "vision_model.post_layernorm.bias": "norm.bias",
}
# reshaped on the way in: conv [D, C, P, P] -> linear [D, C·P·P]; table [n², D] -> [n, n, D]
SIGLIP_RESHAPED = {
    "vision_model.embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "vision_model.embeddings.position_embedding.weight": "pos_embed",
}


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
QWEN2VL_FUSED = {
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

LLAVA_PROJECTOR = {
    f"multi_modal_projector.linear_{i}.{p}": f"proj.{j}.{p}" for i, j in ((1, 0), (2, 2)) for p in ("weight", "bias")
}
# a whole VLM's folder (Qwen2-VL, LLaVA): the decoder's loader leaves these to the other parts'
VISION_PREFIXES = (
    "visual.",
    "model.visual.",
    "vision_tower.",
    "model.vision_tower.",
    "multi_modal_projector.",
    "model.multi_modal_projector.",
)


def expand(
    layer_map: dict[str, str], n_layers: int, global_map: dict[str, str], prefix_hf: str = "", prefix_ours: str = ""
) -> dict[str, str]:
    """The full HF -> ours name table for `n_layers` layers."""
    out = {prefix_hf + k: prefix_ours + v for k, v in global_map.items()}
    for i in range(n_layers):
        out.update({prefix_hf + k.format(i): prefix_ours + v.format(i) for k, v in layer_map.items()})
    return out


def decoder_key_map(cfg: dict, keys: set[str] | None = None) -> dict[str, str]:
    """HF -> ours for a decoder, from the folder's `config.json`. `keys` (the checkpoint's) picks
    the prefix: `model.` for LLMs, `model.language_model.` for VLMs saved by transformers 5,
    `language_model.model.` by transformers 4."""
    text_cfg = text_config(cfg)
    n = int(text_cfg["num_hidden_layers"])
    glob = dict(DECODER_GLOBAL)
    if not text_cfg.get("tie_word_embeddings", False):
        glob["lm_head.weight"] = "lm_head.weight"
    table = expand(DECODER_LAYER[text_cfg["model_type"]], n, glob)
    if keys is not None:
        body = prefix_of([k for k in keys if "vision" not in k], "embed_tokens.weight", "decoder")
        heads = [k[: -len("lm_head.weight")] for k in keys if k.endswith("lm_head.weight")]
        head = heads[0] if heads else ""
        table = {(body + k[len("model.") :] if k.startswith("model.") else head + k): v for k, v in table.items()}
    return table
