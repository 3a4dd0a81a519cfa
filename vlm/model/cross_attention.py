"""`fusion=cross_attn`: Flamingo-style tanh-gated cross-attention from text to media.

The text sequence holds one marker token per media item (the template's `token_grid` is
`(1, 1, 1)` in this mode) instead of the visual tokens. Before every `every`-th decoder layer a
GATED XATTN-DENSE block lets each text position read the visual tokens of the media whose markers
are at or before it (`media="all"`) or of the most recent one only (`media="last"`, Flamingo's
rule):

    x = x + tanh(a) · CrossAttn(RMSNorm(x), media)
    x = x + tanh(b) · SwiGLU(RMSNorm(x))

with the gates `a`, `b` initialised to 0, so a pretrained decoder starts exactly unchanged and
learns how much to look. Positions with no media before them get no update. No rotary positions
on this path (the media tokens carry their layout from the encoder).

KV cache: the media keys and values of every block are computed once, at the first forward, and
kept on the decoder's `KVCache` (`cache.cross`), together with the markers seen so far; decoding
steps reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.model.attention import KVCache
from vlm.model.decoder import RMSNorm, SwiGLU

MEDIA_RULES = ("all", "last")


class GatedCrossAttentionBlock(nn.Module):
    """x `[B, L, D]` attends to media keys/values `[B, H_kv, Nm, Dh]`; two tanh gates at 0."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, mlp_hidden: int, norm_eps: float = 1e-6):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.norm = RMSNorm(dim, norm_eps)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_norm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.ff_gate = nn.Parameter(torch.zeros(1))
        for lin in (
            self.q_proj,
            self.k_proj,
            self.v_proj,
            self.o_proj,
            self.mlp.gate_proj,
            self.mlp.up_proj,
            self.mlp.down_proj,
        ):
            nn.init.normal_(lin.weight, std=0.02)

    def media_kv(self, media: Tensor) -> tuple[Tensor, Tensor]:
        """media `[B, Nm, D]` -> keys, values `[B, H_kv, Nm, Dh]`."""
        B, N, _ = media.shape
        k = self.k_proj(media).view(B, N, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(media).view(B, N, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor, sees_media: Tensor) -> Tensor:
        """mask: `[B, 1, L, Nm]` bool (True = may attend, every row has at least one True);
        sees_media: `[B, L, 1]`, 0 where the position has no media before it."""
        B, L, D = x.shape
        q = self.q_proj(self.norm(x)).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads
        )
        a = self.o_proj(a.transpose(1, 2).reshape(B, L, D)) * sees_media.to(x.dtype)
        x = x + torch.tanh(self.attn_gate).to(x.dtype) * a
        ff = self.mlp(self.ff_norm(x)) * sees_media.to(x.dtype)
        return x + torch.tanh(self.ff_gate).to(x.dtype) * ff


@dataclass
class CrossState:
    """What the blocks need for one forward: per-block media K/V and the text→media mask."""

    kv: dict[int, tuple[Tensor, Tensor]]
    mask: Tensor  # [B, 1, L, Nm] bool, rows with no media allowed everywhere (zeroed by sees_media)
    sees_media: Tensor  # [B, L, 1]


class CrossAttentionFusion(nn.Module):
    """The gated blocks, keyed by the decoder layer they run before (`0, every, 2·every, …`)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        mlp_hidden: int,
        n_layers: int,
        every: int = 2,
        media: str = "all",
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if every < 1:
            raise ValueError(f"model.cross_attn.every must be >= 1, got {every}")
        if media not in MEDIA_RULES:
            raise ValueError(f"model.cross_attn.media must be one of {MEDIA_RULES}, got {media!r}")
        self.layer_ids = list(range(0, n_layers, every))
        self.media_rule = media
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(dim, n_heads, n_kv_heads, mlp_hidden, norm_eps) for _ in self.layer_ids
        )

    def state(
        self, is_marker: Tensor, media: Tensor | None, media_item: Tensor | None, cache: KVCache | None
    ) -> CrossState | None:
        """Build the per-forward state.

        is_marker: `[B, L]` media marker tokens among this forward's tokens. media: `[B, Nm, D]`
        visual tokens per row (padded), media_item: `[B, Nm]` item index in the row (-1 = pad);
        both None on cached decoding steps (the cache holds the keys/values).
        """
        cached = getattr(cache, "cross", None) if cache is not None else None
        if media is not None:
            kv = {i: blk.media_kv(media) for i, blk in zip(self.layer_ids, self.blocks)}
            markers_before = torch.zeros(is_marker.shape[0], dtype=torch.long, device=is_marker.device)
            if cache is not None:
                cache.cross = {"kv": kv, "item": media_item, "markers": markers_before}
        elif cached is not None:
            kv, media_item, markers_before = cached["kv"], cached["item"], cached["markers"]
        else:
            return None
        # c[b, q] = markers at or before query q = the number of media this position may read
        c = markers_before[:, None] + is_marker.long().cumsum(-1)  # [B, L]
        if cache is not None:
            cache.cross["markers"] = c[:, -1]
        item = media_item[:, None, :]  # [B, 1, Nm]
        valid = item >= 0
        if self.media_rule == "all":
            allowed = valid & (item < c[:, :, None])
        else:
            allowed = valid & (item == c[:, :, None] - 1)
        sees = allowed.any(-1, keepdim=True)  # [B, L, 1]
        mask = allowed | ~sees  # keep SDPA rows non-empty; their output is zeroed by `sees`
        return CrossState(kv, mask[:, None], sees)

    def block_for(self, layer: int) -> int | None:
        try:
            return self.layer_ids.index(layer)
        except ValueError:
            return None

    def apply(self, layer: int, x: Tensor, st: CrossState) -> Tensor:
        j = self.block_for(layer)
        if j is None:
            return x
        k, v = st.kv[layer]
        return self.blocks[j](x, k, v, st.mask, st.sees_media)


def pad_media(visual: Tensor, counts: list[int], media_per_sample: list[int]) -> tuple[Tensor, Tensor]:
    """Visual tokens `[Σ counts, D]` (item order) -> per-row `[B, Nm, D]` and item ids `[B, Nm]` (-1 = pad)."""
    B = len(media_per_sample)
    per_row, start_item, start_tok = [], 0, 0
    for m in media_per_sample:
        n = sum(counts[start_item : start_item + m])
        ids = (
            torch.cat(
                [torch.full((c,), j, dtype=torch.long) for j, c in enumerate(counts[start_item : start_item + m])]
            )
            if m
            else torch.zeros(0, dtype=torch.long)
        )
        per_row.append((visual[start_tok : start_tok + n], ids))
        start_item, start_tok = start_item + m, start_tok + n
    Nm = max(1, max(r[0].shape[0] for r in per_row))
    media = visual.new_zeros(B, Nm, visual.shape[-1])
    item = torch.full((B, Nm), -1, dtype=torch.long, device=visual.device)
    for b, (tok, ids) in enumerate(per_row):
        media[b, : tok.shape[0]] = tok
        item[b, : ids.shape[0]] = ids.to(visual.device)
    return media, item
