"""Autoregressive decoding with a KV cache: greedy, temperature and nucleus (top-p) sampling,
token-by-token streaming through a callback.

Batches are left-padded (`collate(..., padding_side="left")`) so every row's prompt ends at the
last column. A new token's position is one past the largest position in its row (the M-RoPE
rule; for 1D RoPE this is simply the next index).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from vlm.model.vlm import VLM


def sample_next(
    logits: Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """logits `[B, V]` -> token ids `[B]`. temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def never_generate(model: VLM, suppress_ids: Sequence[int] = ()) -> Tensor:
    """Token ids `[K]` a model must never emit: `suppress_ids` plus the model's media placeholder
    ids (a generated `<|image_pad|>` would claim visual tokens that do not exist, and the next
    forward would refuse the row), whoever calls."""
    ids = set(int(t) for t in suppress_ids) | set(model.media_token_ids.tolist())
    return torch.tensor(sorted(ids), dtype=torch.long)


@torch.no_grad()
def generate(
    model: VLM,
    batch: dict,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    suppress_ids: Sequence[int] = (),
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    on_token: Callable[[Tensor], None] | None = None,
    prune: dict | None = None,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` per row; a row stops at its first EOS (kept in its output).

    suppress_ids: tokens never generated (structural tokens such as turn starts); the model's media
    placeholder ids are always suppressed (`never_generate`).
    on_token: called with the `[B]` new tokens after every step (streaming).
    prune: `{keep_ratio, method}` drops visual tokens before the prompt's forward (`vlm.model.prune`;
    needs the KV cache). Returns the new token ids per row.
    """
    ids: Tensor = batch["input_ids"]
    am: Tensor = batch["attention_mask"]
    pos: Tensor = batch["position_ids"]
    B, L = ids.shape
    device = ids.device
    media = dict(
        pixel_patches=batch.get("pixel_patches"),
        grid_thw=batch.get("grid_thw"),
        media_per_sample=batch.get("media_per_sample"),
        keys=batch.get("keys"),
    )
    eos = torch.tensor(list(eos_ids), device=device)
    suppress = never_generate(model, suppress_ids).to(device)
    # next position per row: one past the largest used (pad positions are 0, never the max)
    next_pos = (pos.amax(0) if pos.dim() == 3 else pos).amax(-1) + 1  # [B]
    cache = None
    if use_cache:
        param = next(model.parameters())
        cache = model.decoder.new_cache(B, L + max_new_tokens, param.dtype, device)
    if prune and float(prune.get("keep_ratio", 1.0)) < 1.0 and media["grid_thw"] is not None:
        if cache is None:
            raise ValueError("visual-token pruning needs use_cache=True")
        from vlm.model.prune import prune_visual_tokens

        pb = prune_visual_tokens(
            model, batch, float(prune["keep_ratio"]), prune.get("method", "attention"), int(prune.get("seed", 0))
        )
        ids, pos, am = pb["input_ids"], pb["position_ids"], pb["attention_mask"]
        L = ids.shape[1]
        hidden = model(ids, pos, am, cache=cache, inputs_embeds=pb["inputs_embeds"])
    else:
        hidden = model(ids, pos, am, cache=cache, **media)
    if cache is not None:
        cache.advance(L)
    logits = model.logits(hidden[:, -1]).float()
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    for step in range(max_new_tokens):
        if suppress.numel():
            logits[:, suppress] = float("-inf")
        tok = sample_next(logits, temperature, top_p, generator)
        for b in range(B):
            if not done[b]:
                out[b].append(int(tok[b]))
        if on_token is not None:
            on_token(tok.masked_fill(done, -1))
        done |= torch.isin(tok, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        new_pos = (next_pos + step).view(B, 1)
        if pos.dim() == 3:
            new_pos = new_pos.unsqueeze(0).expand(3, B, 1)
        am = torch.cat([am, torch.ones(B, 1, dtype=am.dtype, device=device)], 1)
        if cache is not None:
            hidden = model(tok[:, None], new_pos, am, cache=cache)
            cache.advance(1)
        else:  # full re-forward of the whole sequence (reference path for tests and benchmarks)
            ids = torch.cat([ids, tok[:, None]], 1)
            pos = torch.cat([pos, new_pos], -1)
            hidden = model(ids, pos, am, **media)
        logits = model.logits(hidden[:, -1]).float()
    return out
