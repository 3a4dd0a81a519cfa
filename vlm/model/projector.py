"""Projectors: vision features -> LLM-dimension visual tokens.

`token_grid` / `visual_token_count` (`vlm.model.geometry`) are THE functions that say how many LLM tokens a media item
gets and how they are laid out. The chat template calls them to size placeholder spans (and to
lay out M-RoPE positions) and the model calls them to check the spans, so the two can never
disagree silently.

Kinds (`model/projector=...`):

| kind            | tokens per item     | what it does                                                            |
| --------------- | ------------------- | ----------------------------------------------------------------------- |
| `linear`        | t·(h/m)·(w/m)       | [m×m concat → LayerNorm if m > 1] → Linear                              |
| `mlp`           | t·(h/m)·(w/m)       | [m×m concat → LayerNorm if m > 1] → Linear → GELU → Linear (LLaVA-1.5)  |
| `merge`         | t·(h/m)·(w/m)       | LayerNorm per patch → m×m concat → MLP of width m²·D (Qwen2-VL merger)  |
| `pixel_shuffle` | t·(h/m)·(w/m)       | m×m space-to-depth → one Linear without bias (Idefics3 / nanoVLM)       |
| `qformer`       | `queries`, any grid | N learned queries: self-attention + cross-attention to the item's      |
|                 |                     | features, a few blocks (BLIP-2 Q-Former / resampler), → Linear          |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.model.config import PROJECTOR_KINDS as KINDS
from vlm.model.config import ProjectorConfig
from vlm.model.fields import SpecError
from vlm.model.geometry import token_grid, visual_token_count  # noqa: F401 - re-exported

SPATIAL_KINDS = tuple(k for k in KINDS if k != "qformer")


def spatial_merge(features: Tensor, grid_thw: Tensor, m: int) -> Tensor:
    """Concatenate each m×m block of neighbouring patches: `[N, D]` -> `[N/m², m²·D]`.

    Patches are row-major per item; output tokens are row-major over the merged grid.
    """
    if m == 1:
        return features
    D = features.shape[-1]
    out, start = [], 0
    for t, h, w in grid_thw.tolist():
        n = t * h * w
        x = features[start : start + n].view(t, h // m, m, w // m, m, D)
        out.append(x.permute(0, 1, 3, 2, 4, 5).reshape(-1, m * m * D))
        start += n
    return out[0] if len(out) == 1 else torch.cat(out, 0)


class QFormerBlock(nn.Module):
    """Pre-norm: queries self-attend, cross-attend to the media features, then an MLP."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.n_heads = n_heads
        self.norm_q = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, n_heads, batch_first=True)
        self.norm_x = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.o = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, q: Tensor, feats: Tensor) -> Tensor:
        """q: `[G, N, D]` queries; feats: `[G, n, D]` features of G items with n patches each."""
        h = self.norm_q(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        G, N, D = q.shape
        H = self.n_heads
        qq = self.q(self.norm_x(q)).view(G, N, H, D // H).transpose(1, 2)
        k, v = self.kv(self.norm_kv(feats)).view(G, -1, 2, H, D // H).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qq, k, v).transpose(1, 2).reshape(G, N, D)
        q = q + self.o(x)
        return q + self.mlp(self.norm_mlp(q))


class QFormer(nn.Module):
    """`queries` learned query vectors read each media item through `blocks` blocks; the item
    becomes exactly `queries` tokens whatever its grid. Items are grouped by patch count and each
    group runs as one dense batch (no padding, no cross-item attention), like the vision encoder."""

    def __init__(
        self, in_dim: int, out_dim: int, queries: int = 32, blocks: int = 2, n_heads: int = 4, dim: int | None = None
    ):
        super().__init__()
        dim = dim or in_dim
        if dim % n_heads:
            raise ValueError(f"projector.dim {dim} is not divisible by projector.n_heads {n_heads}")
        self.queries = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.inp = nn.Linear(in_dim, dim) if dim != in_dim else nn.Identity()
        self.blocks = nn.ModuleList(QFormerBlock(dim, n_heads) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, features: Tensor, grid_thw: Tensor) -> Tensor:
        """features `[N, D_vis]` packed per item -> `[M·queries, D_llm]`, item order."""
        x = self.inp(features)
        sizes = [t * h * w for t, h, w in grid_thw.tolist()]
        offsets = torch.tensor([0] + sizes[:-1]).cumsum(0).tolist()
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(sizes):
            groups.setdefault(n, []).append(i)
        M, N = len(sizes), self.queries.shape[0]
        out = x.new_empty(M, N, self.out.out_features)
        for n, items in groups.items():
            idx = torch.cat([torch.arange(offsets[i], offsets[i] + n) for i in items]).to(x.device)
            feats = x[idx].view(len(items), n, -1)
            q = self.queries.to(x.dtype).expand(len(items), -1, -1)
            for block in self.blocks:
                q = block(q, feats)
            out[torch.tensor(items, device=x.device)] = self.out(self.norm(q)).to(out.dtype)
        return out.reshape(M * N, -1)


class Projector(nn.Module):
    """Vision features `[N, D_vis]` (packed per item) -> visual tokens `[Σ tokens(item), D_llm]`.

    kind: one of `KINDS` (table in the module docstring). merge_size: m for the spatial kinds;
    `qformer` reads the unmerged patches (its m only rounds the processor's grids to multiples of m). hidden: the MLP width (`mlp`: out_dim;
    `merge`: m²·in_dim by default). queries / blocks / n_heads / dim: the `qformer`'s.
    """

    def __init__(self, *args, **kwargs):
        """The fields of `ProjectorConfig` (positionally or by name), or one `ProjectorConfig`;
        `in_dim` and `out_dim` must be set."""
        super().__init__()
        c = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], ProjectorConfig) else None
        self.config = c = c or ProjectorConfig(*args, **kwargs)  # validated there
        for key in ("in_dim", "out_dim"):
            if getattr(c, key) is None:
                raise SpecError(f"model.projector.{key} is not set (ModelSpec fills it from the encoder / decoder)")
        kind, in_dim, out_dim, m = c.kind, c.in_dim, c.out_dim, c.merge_size
        self.kind, self.merge_size = kind, m
        self.queries = c.queries or None
        d = c.merged_dim
        self.norm: nn.Module = nn.Identity()
        if kind in ("linear", "mlp"):
            self.norm = nn.LayerNorm(d, eps=c.norm_eps) if m > 1 else nn.Identity()
            if kind == "linear":
                self.proj = nn.Linear(d, out_dim)
            else:
                hidden = c.hidden or out_dim
                self.proj = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        elif kind == "merge":
            self.norm = nn.LayerNorm(in_dim, eps=c.norm_eps)  # per patch, before the concat (Qwen2-VL's ln_q)
            hidden = c.hidden or d
            self.proj = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        elif kind == "pixel_shuffle":
            self.proj = nn.Linear(d, out_dim, bias=False)
        else:
            self.proj = QFormer(in_dim, out_dim, self.queries, c.blocks, c.n_heads, c.dim)

    @classmethod
    def from_config(cls, config: ProjectorConfig) -> Projector:
        return cls(config)

    def token_grid(self, grid_thw) -> tuple[int, int, int]:
        return token_grid(grid_thw, self.merge_size, self.queries)

    def token_count(self, grid_thw) -> int:
        return visual_token_count(grid_thw, self.merge_size, self.queries)

    def forward(self, features: Tensor, grid_thw: Tensor) -> Tensor:
        """features: `[N, D_vis]` packed per item -> `[Σ token_count(item), D_llm]`."""
        if self.kind == "qformer":
            return self.proj(features, grid_thw)
        if self.kind == "merge":
            return self.proj(spatial_merge(self.norm(features), grid_thw, self.merge_size))
        return self.proj(self.norm(spatial_merge(features, grid_thw, self.merge_size)))
