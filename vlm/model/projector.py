"""Projectors: vision features -> LLM-dimension visual tokens.

`visual_token_count` is THE function that says how many LLM tokens a media item gets. The chat
template calls it to size placeholder spans and the model calls it to check them, so the two can
never disagree silently.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def visual_token_count(grid_thw, merge_size: int = 1) -> int:
    """LLM tokens for one media item with grid (t, h, w) in patches after an m×m spatial merge."""
    t, h, w = (int(v) for v in grid_thw)
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid {h}x{w} is not divisible by merge_size {merge_size}")
    return t * (h // merge_size) * (w // merge_size)


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


class Projector(nn.Module):
    """`kind="linear"`: one Linear. `kind="mlp"`: Linear -> GELU -> Linear (LLaVA-1.5).

    With `merge_size=m > 1`, each m×m patch block is concatenated first (token count / m²),
    then LayerNorm'd (Qwen2-VL's merger) before the projection.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp", merge_size: int = 1, hidden: int | None = None):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"projector.kind must be 'linear' or 'mlp', got {kind!r}")
        self.kind, self.merge_size = kind, merge_size
        d = in_dim * merge_size * merge_size
        self.norm = nn.LayerNorm(d) if merge_size > 1 else nn.Identity()
        if kind == "linear":
            self.proj = nn.Linear(d, out_dim)
        else:
            hidden = hidden or out_dim
            self.proj = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def token_count(self, grid_thw) -> int:
        return visual_token_count(grid_thw, self.merge_size)

    def forward(self, features: Tensor, grid_thw: Tensor) -> Tensor:
        """features: `[N, D_vis]` packed per item -> `[Σ token_count(item), D_llm]`."""
        return self.proj(self.norm(spatial_merge(features, grid_thw, self.merge_size)))

