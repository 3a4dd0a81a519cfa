"""A prompt -> the decoder inputs of one row: its embedding sequence (visual tokens in place) or,
with fusion=cross_attn, its media keys/values, with the image-embedding cache in front of the
encoder and projector, and optional visual-token pruning.

Computed once per request, on the engine thread (the model's), before its first prefill chunk;
chunks then take slices of `embeds`. Each media item is encoded on its own, so what the cache
holds for a hash does not depend on which other items came with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vlm.model.vlm import VLM
from vlm.serve.api import RequestError
from vlm.serve.embed_cache import EmbedCache
from vlm.serve.prompt import Prompt


@dataclass
class RowInputs:
    """input_ids `[L]`; position_ids `[L]` or `[3, L]`; embeds `[L, D]`; cross: fusion=cross_attn
    `{"kv": {layer: (k, v) [1, H_kv, Nm, Dh]}, "item": [1, Nm], "markers": [1]}` or None."""

    input_ids: Tensor
    position_ids: Tensor
    embeds: Tensor
    cross: dict | None
    visual_kept: int


def _item_visual(model: VLM, patches: Tensor, grid, cache: EmbedCache | None, key: str, device) -> object:
    """One media item -> visual tokens `[n, D]` (interleave) or per-block media (k, v) (cross_attn)."""
    value = cache.get(key) if cache is not None else None
    if value is not None:
        return value
    g = torch.tensor([list(grid)], device=device)
    visual = model.encode_media(patches.to(device), g)
    if model.cross_attn is not None:
        x = visual.to(model.decoder.embed_tokens.weight.dtype)[None]
        value = {i: blk.media_kv(x) for i, blk in zip(model.cross_attn.layer_ids, model.cross_attn.blocks)}
    else:
        value = visual
    if cache is not None:
        cache.put(key, value)
    return value


def row_inputs(model: VLM, prompt: Prompt, cache: EmbedCache | None, device, prune: dict | None = None) -> RowInputs:
    ids = prompt.input_ids.to(device)
    pos = prompt.position_ids.to(device)
    embeds = model.decoder.embed_tokens(ids)
    values = [
        _item_visual(model, p, g, cache, h, device)
        for p, g, h in zip(prompt.patches, prompt.grids, prompt.media_hashes, strict=True)
    ]
    is_media = model.is_media(ids)
    n_slots = int(is_media.sum())
    cross = None
    if model.cross_attn is not None:
        if n_slots != len(values):
            raise RequestError(f"the prompt has {n_slots} media markers for {len(values)} media items")
        if values:
            kv = {
                i: tuple(torch.cat([v[i][j] for v in values], 2) for j in range(2)) for i in model.cross_attn.layer_ids
            }
            counts = [v[model.cross_attn.layer_ids[0]][0].shape[2] for v in values]
            item = torch.cat([torch.full((c,), j, dtype=torch.long) for j, c in enumerate(counts)])[None]
            cross = {"kv": kv, "item": item.to(device), "markers": torch.zeros(1, dtype=torch.long, device=device)}
        return RowInputs(ids, pos, embeds, cross, 0)
    if values:
        visual = torch.cat(values)
        if visual.shape[0] != n_slots:
            raise RequestError(f"the prompt has {n_slots} visual-token slots for {visual.shape[0]} visual tokens")
        embeds = embeds.masked_scatter(is_media[:, None], visual.to(embeds.dtype))
    elif n_slots:
        raise RequestError(f"the prompt has {n_slots} visual-token slots but no media")
    kept = n_slots
    if prune and float(prune.get("keep_ratio", 1.0)) < 1.0 and n_slots:
        ids, pos, embeds, kept = _prune(model, ids, pos, embeds, prune)
    return RowInputs(ids, pos, embeds, None, kept)


def _prune(model: VLM, ids: Tensor, pos: Tensor, embeds: Tensor, prune: dict):
    """`vlm.model.prune` on this one row, from the embeddings already made (no second encoder pass)."""
    from vlm.model.prune import prune_visual_tokens

    batch = {
        "input_ids": ids[None],
        "position_ids": pos[:, None] if pos.dim() == 2 else pos[None],
        "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long, device=ids.device),
        "inputs_embeds": embeds[None],
    }
    pb = prune_visual_tokens(
        model, batch, float(prune["keep_ratio"]), prune.get("method", "attention"), int(prune.get("seed", 0))
    )
    p = pb["position_ids"]
    return pb["input_ids"][0], (p[:, 0] if p.dim() == 3 else p[0]), pb["inputs_embeds"][0], pb["visual_kept"]
