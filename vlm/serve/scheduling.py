"""Small pieces of the engine's step planning: where a prefill chunk may end, and the decode
batch's fusion=cross_attn media stacked over rows."""

from __future__ import annotations

import torch
from torch import Tensor

from vlm.model.vlm import VLM


def chunk_end(input_ids: Tensor, model: VLM, start: int, budget: int, bidirectional: bool) -> int:
    """End (exclusive) of the prefill chunk of `input_ids [L]` from `start` within `budget` tokens.

    With bidirectional image attention the tokens of a contiguous media run see each other both
    ways, so a chunk never ends inside one: it ends before the run, or, when the run starts the
    chunk, after it (over budget: a run cannot be split)."""
    L = int(input_ids.numel())
    end = min(L, start + max(1, budget))
    if not bidirectional or end == L:
        return end
    media = model.is_media(input_ids[max(0, start) : min(L, end + 1)]).tolist()  # positions start..end
    if not (media[end - 1 - start] and media[end - start]):
        return end
    cut = end
    while cut > start and media[cut - 1 - start]:
        cut -= 1
    if cut > start:
        return cut
    rest = model.is_media(input_ids[end:]).tolist()
    n = next((i for i, m in enumerate(rest) if not m), len(rest))
    return end + n


def stack_cross(crosses: list[dict | None], model: VLM) -> dict | None:
    """Per-row cross-attention media (`RowInputs.cross`, keys/values `[1, H_kv, Nm_b, Dh]`) ->
    the batch's `{"kv": {layer: (k, v) [n, H_kv, Nm, Dh]}, "item": [n, Nm], "markers": [n]}`;
    a row without media gets item -1 everywhere (its positions read nothing). None if no row has media."""
    present = [c for c in crosses if c is not None]
    if not present:
        return None
    layers = model.cross_attn.layer_ids
    k0 = present[0]["kv"][layers[0]][0]
    n, Nm = len(crosses), max(c["item"].shape[1] for c in present)
    item = torch.full((n, Nm), -1, dtype=torch.long, device=k0.device)
    markers = torch.zeros(n, dtype=torch.long, device=k0.device)
    kv = {}
    for layer in layers:
        k = k0.new_zeros(n, k0.shape[1], Nm, k0.shape[3])
        v = torch.zeros_like(k)
        for b, c in enumerate(crosses):
            if c is not None:
                ck, cv = c["kv"][layer]
                k[b, :, : ck.shape[2]], v[b, :, : cv.shape[2]] = ck[0], cv[0]
        kv[layer] = (k, v)
    for b, c in enumerate(crosses):
        if c is not None:
            item[b, : c["item"].shape[1]] = c["item"][0]
            markers[b] = c["markers"].reshape(-1)[0]
    return {"kv": kv, "item": item, "markers": markers}
