"""ViT vision encoder over packed, variable-size media.

Input is the packed patch sequence of every media item in a batch, `patches [N, C·P·P]`, and each
item's grid `grid_thw [M, 3]` (t, h, w in patches, row-major). Attention never crosses media
items: items are grouped by patch count and each group runs as one dense batch, so the attention
is exactly block-diagonal with no padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.model.attention import SelfAttention


class PatchEmbed(nn.Module):
    """`[N, C·P·P]` -> `[N, D]`.

    `linear`: one matrix (the classic ViT stem). `conv`: a small CNN inside each patch
    (3x3 conv, GELU, 3x3 stride-2 conv, GELU, linear); it sees only its own patch, so the
    packed-patch contract holds, but learns edges and strokes far faster than a single linear map
    — a large win for tiny models trained from scratch.
    """

    def __init__(self, patch_size: int, dim: int, channels: int = 3, kind: str = "linear", conv_channels: int = 32):
        super().__init__()
        self.patch_size, self.channels, self.kind = patch_size, channels, kind
        if kind == "linear":
            self.proj = nn.Linear(channels * patch_size * patch_size, dim)
        elif kind == "conv":
            if patch_size % 2:
                raise ValueError("encoder.patch_embed=conv needs an even patch_size")
            c = conv_channels
            self.conv = nn.Sequential(
                nn.Conv2d(channels, c, 3, padding=1), nn.GELU(),
                nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GELU(),
            )
            self.proj = nn.Linear(c * (patch_size // 2) ** 2, dim)
        else:
            raise ValueError(f"encoder.patch_embed must be 'linear' or 'conv', got {kind!r}")

    def forward(self, patches: Tensor) -> Tensor:
        if self.kind == "conv":
            P = self.patch_size
            x = self.conv(patches.view(-1, self.channels, P, P))
            patches = x.flatten(1)
        return self.proj(patches)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, n_heads, bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:  # [G, n, D]
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    """Patch embedding + learned 2D position embedding + pre-norm transformer blocks.

    The position table is `[pos_grid, pos_grid, D]` and is bicubically interpolated to each
    item's (h, w), so any grid works. `feature_layer` picks which block's output feeds the
    projector (-1 = last, -2 = penultimate as in LLaVA); the final LayerNorm is applied to it.
    """

    def __init__(
        self,
        patch_size: int = 8,
        dim: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_ratio: float = 4.0,
        channels: int = 3,
        pos_grid: int = 8,
        patch_embed: str = "linear",
        conv_channels: int = 32,
        feature_layer: int = -1,
    ):
        super().__init__()
        if not -n_layers <= feature_layer < n_layers:
            raise ValueError(f"encoder.feature_layer {feature_layer} out of range for {n_layers} layers")
        self.patch_size, self.dim, self.channels = patch_size, dim, channels
        self.feature_layer = feature_layer % n_layers
        self.patch_embed = PatchEmbed(patch_size, dim, channels, patch_embed, conv_channels)
        self.pos_embed = nn.Parameter(torch.randn(pos_grid, pos_grid, dim) * 0.02)
        # Only the blocks up to the feature layer are ever used; don't build dead ones.
        self.blocks = nn.ModuleList(ViTBlock(dim, n_heads, mlp_ratio) for _ in range(self.feature_layer + 1))
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def position_embedding(self, t: int, h: int, w: int) -> Tensor:
        """`[t·h·w, D]` for one item (same table for every frame)."""
        table = self.pos_embed
        if table.shape[:2] != (h, w):
            table = F.interpolate(
                table.permute(2, 0, 1)[None].float(), size=(h, w), mode="bicubic", align_corners=False
            )[0].permute(1, 2, 0).to(table.dtype)
        return table.reshape(1, h * w, -1).expand(t, -1, -1).reshape(t * h * w, -1)

    def forward(self, patches: Tensor, grid_thw: Tensor) -> Tensor:
        """patches: `[N, C·P·P]`, grid_thw: `[M, 3]` with Σ t·h·w = N. Returns `[N, D]`."""
        grids = [tuple(g) for g in grid_thw.tolist()]
        sizes = [t * h * w for t, h, w in grids]
        if sum(sizes) != patches.shape[0]:
            raise ValueError(f"grid_thw covers {sum(sizes)} patches but {patches.shape[0]} were given")
        x = self.patch_embed(patches)
        pos_cache: dict[tuple, Tensor] = {}
        pos = [pos_cache.setdefault(g, self.position_embedding(*g)) for g in grids]
        x = x + torch.cat(pos, 0).to(x.dtype)

        # Group items by patch count: each group is a dense [G, n, D] batch (block-diagonal attention).
        offsets = torch.tensor([0] + sizes[:-1]).cumsum(0).tolist()
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(sizes):
            groups.setdefault(n, []).append(i)
        if len(groups) == 1:
            n = sizes[0]
            return self._encode(x.view(len(sizes), n, -1)).reshape(-1, self.dim)
        out = torch.empty(x.shape[0], self.dim, dtype=x.dtype, device=x.device)
        for n, items in groups.items():
            idx = torch.cat([torch.arange(offsets[i], offsets[i] + n) for i in items]).to(x.device)
            out[idx] = self._encode(x[idx].view(len(items), n, -1)).reshape(-1, self.dim).to(out.dtype)
        return out

    def _encode(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
