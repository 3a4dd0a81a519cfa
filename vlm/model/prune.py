"""Inference-time visual-token pruning: drop the least important visual tokens before the decoder.

    python infer.py ckpt=… data=synthvqa_heldout infer.prune.keep_ratio=0.5 infer.prune.method=attention

Per media span, `ceil(keep_ratio · n)` tokens (at least one) are kept, in their original order,
ranked by `method`:

- `attention`: the attention each visual token receives from the last prompt token in the
  decoder's first layer (heads averaged), the FastV-style signal;
- `norm`: the L2 norm of the projected visual token;
- `random`: a seeded random choice (the control every pruning result should beat).

Kept tokens keep their position ids (1D or M-RoPE), so the decoder sees each surviving token
exactly where it was; text tokens are never dropped. Rows shrink by different amounts and are
left-padded again, as generation expects. Only `fusion=interleave` has visual tokens in the
sequence to drop.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vlm.model.rope import apply_rope, rope_cos_sin
from vlm.model.vlm import VLM, media_span_ids

METHODS = ("attention", "norm", "random")


def _attention_scores(model: VLM, embeds: Tensor, position_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """`[B, L]`: softmax attention from the last position to every key in decoder layer 0,
    averaged over heads (the last column is the last prompt token: batches are left-padded)."""
    dec = model.decoder
    layer = dec.layers[0]
    attn = layer.self_attn
    x = layer.input_layernorm(embeds)
    B, L, _ = x.shape
    q = attn.q_proj(x[:, -1:]).view(B, 1, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, L, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = rope_cos_sin(position_ids, dec.inv_freq, dec.mrope_section if dec.rope == "mrope" else None)
    q = apply_rope(q, cos[..., -1:, :], sin[..., -1:, :])
    k = apply_rope(k, cos, sin)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.head_dim)  # [B, H, 1, L]
    logits = logits.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
    return logits.softmax(-1).mean(1)[:, 0]


def token_scores(
    model: VLM,
    embeds: Tensor,
    position_ids: Tensor,
    attention_mask: Tensor,
    method: str,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Importance `[B, L]` of every position (only the visual positions are read)."""
    if method == "attention":
        return _attention_scores(model, embeds, position_ids, attention_mask)
    if method == "norm":
        return embeds.float().norm(dim=-1)
    if method == "random":
        return torch.rand(embeds.shape[:2], generator=generator).to(embeds.device)
    raise ValueError(f"infer.prune.method must be one of {METHODS}, got {method!r}")


@torch.no_grad()
def prune_visual_tokens(model: VLM, batch: dict, keep_ratio: float, method: str = "attention", seed: int = 0) -> dict:
    """A left-padded batch (`input_ids`, `position_ids`, `attention_mask`, and media or their
    `inputs_embeds` already made, e.g. by the serving engine's embedding cache) -> the same keys
    with pruned rows, plus `inputs_embeds` `[B, L', D]` for `VLM.forward(inputs_embeds=…)` and
    `visual_kept` / `visual_total` counts."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"infer.prune.keep_ratio must be in (0, 1], got {keep_ratio}")
    if model.fusion != "interleave":
        raise ValueError(f"visual-token pruning needs fusion=interleave (the model uses {model.fusion!r})")
    ids, pos, am = batch["input_ids"], batch["position_ids"], batch["attention_mask"]
    embeds = batch.get("inputs_embeds")
    if embeds is None:
        embeds = model.embed(
            ids, batch.get("pixel_patches"), batch.get("grid_thw"), batch.get("media_per_sample"), batch.get("keys")
        )
    spans = media_span_ids(model.is_media(ids))  # [B, L], k > 0 on the k-th span
    keep = spans == 0
    if keep_ratio < 1.0 and bool((spans > 0).any()):
        gen = torch.Generator().manual_seed(seed)
        scores = token_scores(model, embeds, pos, am, method, gen)
        for b in range(ids.shape[0]):
            for s in spans[b].unique().tolist():
                if s == 0:
                    continue
                where = (spans[b] == s).nonzero().squeeze(-1)
                k = max(1, math.ceil(keep_ratio * where.numel()))
                top = scores[b, where].topk(k).indices
                keep[b, where[top]] = True
    else:
        keep = torch.ones_like(keep)
    lengths = keep.sum(-1)
    Lp = int(lengths.max())
    B = ids.shape[0]
    # left-pad every row to Lp: row b's kept tokens go to columns [Lp - len_b, Lp)
    cols = torch.arange(Lp, device=ids.device)
    out_ids = ids.new_full((B, Lp), int(batch.get("pad_id", 0)))
    out_am = am.new_zeros(B, Lp)
    out_emb = embeds.new_zeros(B, Lp, embeds.shape[-1])
    out_pos = pos.new_zeros(*pos.shape[:-2], B, Lp) if pos.dim() == 3 else pos.new_zeros(B, Lp)
    for b in range(B):
        src = keep[b].nonzero().squeeze(-1)
        dst = cols[Lp - src.numel() :]
        out_ids[b, dst], out_am[b, dst], out_emb[b, dst] = ids[b, src], am[b, src], embeds[b, src]
        if pos.dim() == 3:
            out_pos[:, b, dst] = pos[:, b, src]
        else:
            out_pos[b, dst] = pos[b, src]
    n_visual = int((spans > 0).sum())
    return {
        **batch,
        "input_ids": out_ids,
        "position_ids": out_pos,
        "attention_mask": out_am,
        "inputs_embeds": out_emb,
        "visual_total": n_visual,
        "visual_kept": n_visual - int((~keep).sum()),
    }
