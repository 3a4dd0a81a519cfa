"""ViT vision encoder over packed, variable-size media (images and videos).

Input is the packed patch sequence of every media item in a batch, `patches [N, C·T·P·P]`, and each
item's grid `grid_thw [M, 3]` (t, h, w in patches, `t`-major then row-major). Attention never
crosses media items: items are grouped by patch count and each group runs as one dense batch, so
the attention is exactly block-diagonal with no padding.

Video (Qwen2-VL style): `T = temporal_patch` consecutive frames form one temporal patch, laid out
`[C, T, P, P]` (:func:`vlm.data.video.patchify_video`); an image is repeated `T` times by the
processor (:func:`vlm.data.video.repeat_temporal`), so one encoder takes both. `T = 1` is the
plain image ViT (`[C, P, P]` patches; a video is then one temporal patch per frame).

Positions (`pos`): `learned` adds a `[pos_grid, pos_grid, D]` table, bicubically interpolated to
each item's (h, w) and shared by its frames; `rope2d` rotates queries and keys inside every
attention layer by the patch's (row, column) in its item (half the rotary pairs read the row, half
the column), so attention logits depend on relative offsets only and any grid works without
interpolation. Time is not encoded inside the encoder in either case: the decoder's M-RoPE gives
each temporal patch its own time position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.model.attention import SelfAttention
from vlm.model.config import EncoderConfig
from vlm.model.rope import grid_hw, rope2d_cos_sin, rope2d_inv_frequencies


class PatchEmbed(nn.Module):
    """`[N, C·T·P·P]` -> `[N, D]` (`T = temporal_patch`, 1 for a plain image encoder).

    `linear`: one matrix (the classic ViT stem; equal to Qwen2-VL's `Conv3d(C, D, (T, P, P))`).
    `conv`: a small CNN inside each patch (3x3 conv, GELU, 3x3 stride-2 conv, GELU, linear) whose
    input channels are the `C·T` (channel, frame) planes of the patch; it sees only its own patch,
    so the packed-patch contract holds, but learns edges and strokes far faster than a single
    linear map — a large win for tiny models trained from scratch.
    `conv_image`: the same layers run over each whole image (the patches are put back together
    from the grid, convolved, and cut into patches again), so strokes that cross a patch border
    are seen whole. Same parameters as `conv`; items never mix (each image is its own conv input).
    """

    def __init__(
        self,
        patch_size: int,
        dim: int,
        channels: int = 3,
        kind: str = "linear",
        conv_channels: int = 32,
        temporal_patch: int = 1,
    ):
        super().__init__()
        if temporal_patch < 1:
            raise ValueError(f"encoder.temporal_patch must be >= 1, got {temporal_patch}")
        self.patch_size, self.channels, self.kind, self.temporal_patch = patch_size, channels, kind, temporal_patch
        planes = channels * temporal_patch  # [C, T, P, P] flattens channel-major: plane c*T + t
        self.in_dim = planes * patch_size * patch_size
        if kind == "linear":
            self.proj = nn.Linear(self.in_dim, dim)
        elif kind in ("conv", "conv_image"):
            if patch_size % 2:
                raise ValueError("encoder.patch_embed=conv needs an even patch_size")
            c = conv_channels
            self.conv = nn.Sequential(
                nn.Conv2d(planes, c, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(c, c, 3, stride=2, padding=1),
                nn.GELU(),
            )
            self.proj = nn.Linear(c * (patch_size // 2) ** 2, dim)
        else:
            raise ValueError(f"encoder.patch_embed must be 'linear', 'conv' or 'conv_image', got {kind!r}")

    def forward(self, patches: Tensor, grid_thw: Tensor | None = None) -> Tensor:
        if patches.dim() != 2 or patches.shape[-1] != self.in_dim:
            T, P = self.temporal_patch, self.patch_size
            raise ValueError(
                f"vision encoder expects patches [N, C*T*P*P] = [N, {self.channels}*{T}*{P}*{P}] = [N, {self.in_dim}], "
                f"got {tuple(patches.shape)}: the processor's patch_size / temporal_patch must be the encoder's "
                f"(model.encoder.patch_size={P}, model.encoder.temporal_patch={T}; vlm.model.geometry.Geometry)"
            )
        if self.kind == "conv":
            P = self.patch_size
            x = self.conv(patches.reshape(-1, self.channels * self.temporal_patch, P, P))
            patches = x.flatten(1)
        elif self.kind == "conv_image":
            if grid_thw is None:
                raise ValueError("patch_embed=conv_image needs the grids")
            patches = self._conv_images(patches, [tuple(g) for g in grid_thw.tolist()])
        return self.proj(patches)

    def _conv_images(self, patches: Tensor, grids: list[tuple[int, int, int]]) -> Tensor:
        """Per image: patches -> pixels `[C·T, h·P, w·P]` -> conv -> patches of `c·(P/2)²`.
        Items with the same grid are convolved as one batch."""
        P, Q, C = self.patch_size, self.patch_size // 2, self.channels * self.temporal_patch
        sizes = [t * h * w for t, h, w in grids]
        offsets = torch.tensor([0] + sizes[:-1]).cumsum(0).tolist()
        by_grid: dict[tuple, list[int]] = {}
        for i, g in enumerate(grids):
            by_grid.setdefault(g, []).append(i)
        out = None
        for (t, h, w), items in by_grid.items():
            n = t * h * w
            idx = torch.cat([torch.arange(offsets[i], offsets[i] + n) for i in items]).to(patches.device)
            G = len(items) * t
            x = patches[idx].view(G, h, w, C, P, P).permute(0, 3, 1, 4, 2, 5).reshape(G, C, h * P, w * P)
            y = self.conv(x)  # [G, c, h·Q, w·Q]
            c = y.shape[1]
            y = y.view(G, c, h, Q, w, Q).permute(0, 2, 4, 1, 3, 5).reshape(G * h * w, c * Q * Q)
            if len(by_grid) == 1:
                return y
            if out is None:
                out = y.new_empty(patches.shape[0], y.shape[1])
            out[idx] = y
        return out


ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # SigLIP's gelu_pytorch_tanh
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP's
}


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"encoder.act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act, self.act_name = ACTIVATIONS[act], act

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int,
        mlp_ratio: float,
        act: str = "gelu",
        norm_eps: float = 1e-5,
        mlp_hidden: int | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, n_heads, bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, mlp_hidden or int(dim * mlp_ratio), act)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:  # [G, n, D]
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    """Patch embedding + 2D positions (`pos`: learned table or rope2d) + pre-norm transformer blocks.

    `pos="learned"`: the position table is `[pos_grid, pos_grid, D]` and is bicubically
    interpolated to each item's (h, w), so any grid works. `pos="rope2d"`: no table; 2D rotary
    positions in every attention layer (`rope_theta`), per token, grouped like the tokens.
    `temporal_patch` T: frames per temporal patch (patch vectors are `C·T·P·P`). `feature_layer`
    picks which block's output feeds the projector (-1 = last, -2 = penultimate as in LLaVA); the
    final LayerNorm is applied to it. `act` (gelu / gelu_tanh / quick_gelu), `norm_eps` and
    `mlp_hidden` match pretrained towers (`vlm.model.hf.pretrained_vision_encoder`); so do CLIP's
    `cls_token` (a learned token prepended to every item — and temporal patch — inside attention,
    with its own position, dropped from the output), `pre_norm` (LayerNorm after the embeddings),
    `final_norm: false` (LLaVA reads a hidden layer as is) and `patch_bias: false`; and Qwen2-VL's
    `attention: frame` (each temporal patch of a video attends only within itself; `item`, the
    default, lets a video's patches see each other across time). `feature_layers` (a list, overrides `feature_layer`) takes
    several blocks' outputs, each final-normed, and `feature_combine`s them: `concat` along the
    feature dimension (`out_dim = k·dim`, as multi-layer LLaVA variants / Cambrian) or `mean`.
    """

    def __init__(self, *args, **kwargs):
        """The fields of `EncoderConfig` (positionally or by name), or one `EncoderConfig`."""
        super().__init__()
        c = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], EncoderConfig) else None
        self.config = c = c or EncoderConfig(*args, **kwargs)  # validated there
        self.patch_size, self.dim, self.channels = c.patch_size, c.dim, c.channels
        self.temporal_patch, self.pos = c.temporal_patch, c.pos
        self.feature_layers = c.feature_indices
        self.feature_layer = self.feature_layers[-1]
        self.feature_combine = c.feature_combine
        self.patch_embed = PatchEmbed(c.patch_size, c.dim, c.channels, c.patch_embed, c.conv_channels, c.temporal_patch)
        if not c.patch_bias:
            self.patch_embed.proj.bias = None
        self.cls = nn.Parameter(torch.randn(c.dim) * 0.02) if c.cls_token else None
        self.cls_pos = nn.Parameter(torch.zeros(c.dim)) if c.cls_token else None
        self.pre_norm = nn.LayerNorm(c.dim, eps=c.norm_eps) if c.pre_norm else None
        self.final_norm = c.final_norm
        self.attention = c.attention
        if c.pos == "learned":
            self.pos_embed = nn.Parameter(torch.randn(c.pos_grid, c.pos_grid, c.dim) * 0.02)
        else:
            # Not a parameter and not saved: derived from the config, like the decoder's.
            self.register_buffer("rope_inv_freq", rope2d_inv_frequencies(c.head_dim, c.rope_theta), persistent=False)
        # Only the blocks up to the feature layer are ever used; don't build dead ones.
        self.blocks = nn.ModuleList(
            ViTBlock(c.dim, c.n_heads, c.mlp_ratio, c.act, c.norm_eps, c.mlp_hidden) for _ in range(c.built_layers)
        )
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps) if c.final_norm else nn.Identity()
        self.out_dim = c.out_dim
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: EncoderConfig) -> VisionEncoder:
        return cls(config)

    def reset_parameters(self) -> None:
        """Transformer blocks: N(0, 0.02) weights, zero biases, residual-branch outputs scaled down
        by depth (GPT-2 rule). Why it matters: PyTorch's default init makes each block add a
        near-uniform O(0.3) vector to a residual stream whose image signal is O(0.01) after the
        patch embedding; the image is drowned and a from-scratch ViT learned nothing about
        characters in thousands of steps (docs/results/default_recipe.md, "Why OCR stayed at 0%"). The patch
        embedding keeps its default init; pretrained loaders overwrite all of it anyway."""
        n = max(len(self.blocks), 1)
        for name, p in self.blocks.named_parameters():
            if p.dim() == 2:
                out = name.endswith(("o_proj.weight", "fc2.weight"))
                nn.init.normal_(p, std=0.02 / (2 * n) ** 0.5 if out else 0.02)
            elif name.endswith("bias") and "norm" not in name:
                nn.init.zeros_(p)

    @property
    def patch_dim(self) -> int:
        """Length of one input patch vector, `C·T·P·P`."""
        return self.patch_embed.in_dim

    def position_embedding(self, t: int, h: int, w: int) -> Tensor:
        """`[t·h·w, D]` for one item (same table for every frame); `pos="learned"` only."""
        table = self.pos_embed
        if table.shape[:2] != (h, w):
            table = (
                F.interpolate(table.permute(2, 0, 1)[None].float(), size=(h, w), mode="bicubic", align_corners=False)[0]
                .permute(1, 2, 0)
                .to(table.dtype)
            )
        return table.reshape(1, h * w, -1).expand(t, -1, -1).reshape(t * h * w, -1)

    def rope_tables(self, t: int, h: int, w: int) -> tuple[Tensor, Tensor]:
        """2D rotary cos, sin `[t·h·w, Dh]` for one item (`pos="rope2d"` only)."""
        hh, ww = grid_hw(t, h, w, device=self.rope_inv_freq.device)
        return rope2d_cos_sin(hh, ww, self.rope_inv_freq)

    def forward(self, patches: Tensor, grid_thw: Tensor) -> Tensor:
        """patches: `[N, C·T·P·P]`, grid_thw: `[M, 3]` with Σ t·h·w = N. Returns `[N, D]`."""
        grids = [tuple(g) for g in grid_thw.tolist()]
        sizes = [t * h * w for t, h, w in grids]
        if sum(sizes) != patches.shape[0]:
            raise ValueError(f"grid_thw covers {sum(sizes)} patches but {patches.shape[0]} were given")
        x = self.patch_embed(patches, grid_thw)
        if self.attention == "frame":  # every temporal patch attends only to itself (Qwen2-VL)
            grids = [(1, h, w) for t, h, w in grids for _ in range(t)]
            sizes = [h * w for _, h, w in grids]
        rope = None
        if self.pos == "learned":
            pos_cache: dict[tuple, Tensor] = {}
            pos = [pos_cache.setdefault(g, self.position_embedding(*g)) for g in grids]
            x = x + torch.cat(pos, 0).to(x.dtype)
        else:
            rope_cache: dict[tuple, tuple[Tensor, Tensor]] = {}
            tabs = [rope_cache[g] if g in rope_cache else rope_cache.setdefault(g, self.rope_tables(*g)) for g in grids]
            rope = (torch.cat([c for c, _ in tabs], 0), torch.cat([s for _, s in tabs], 0))  # [N, Dh] each

        if self.cls is not None:  # the CLS joins each frame: group by the frame size too
            return self._forward_cls(x, grids, sizes)
        # Group items by patch count: each group is a dense [G, n, D] batch (block-diagonal attention).
        # The rotary tables are per token, so they are gathered exactly like the tokens.
        offsets = torch.tensor([0] + sizes[:-1]).cumsum(0).tolist()
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(sizes):
            groups.setdefault(n, []).append(i)
        if len(groups) == 1:
            n, G = sizes[0], len(sizes)
            r = None if rope is None else (rope[0].view(G, n, -1), rope[1].view(G, n, -1))
            return self._encode(x.view(G, n, -1), r).reshape(-1, self.out_dim)
        out = torch.empty(x.shape[0], self.out_dim, dtype=x.dtype, device=x.device)
        for n, items in groups.items():
            G = len(items)
            idx = torch.cat([torch.arange(offsets[i], offsets[i] + n) for i in items]).to(x.device)
            r = None if rope is None else (rope[0][idx].view(G, n, -1), rope[1][idx].view(G, n, -1))
            out[idx] = self._encode(x[idx].view(G, n, -1), r).reshape(-1, self.out_dim).to(out.dtype)
        return out

    def _forward_cls(self, x: Tensor, grids, sizes) -> Tensor:
        offsets = torch.tensor([0] + sizes[:-1]).cumsum(0).tolist()
        groups: dict[tuple, list[int]] = {}
        for i, g in enumerate(grids):
            groups.setdefault(g, []).append(i)
        out = torch.empty(x.shape[0], self.out_dim, dtype=x.dtype, device=x.device)
        for (t, h, w), items in groups.items():
            n = t * h * w
            idx = torch.cat([torch.arange(offsets[i], offsets[i] + n) for i in items]).to(x.device)
            out[idx] = (
                self._encode(x[idx].view(len(items), n, -1), frame_tokens=h * w).reshape(-1, self.out_dim).to(out.dtype)
            )
        return out

    def _encode(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, frame_tokens: int | None = None) -> Tensor:
        """`[G, n, D]` -> `[G, n, out_dim]`: the selected blocks' outputs, final-normed, combined.

        frame_tokens: with a CLS token, the patches per frame (h·w): each of the t = n / h·w
        frames of an item gets its own CLS."""
        if self.cls is not None:  # [G, n, D] -> [G·t, 1 + n/t, D]: one CLS per frame, as CLIP sees images
            G, n, D = x.shape
            x = x.reshape(-1, frame_tokens, D)
            cls = (self.cls + self.cls_pos).to(x.dtype).expand(x.shape[0], 1, D)
            x = torch.cat([cls, x], 1)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x, rope)
            if i in self.feature_layers:
                f = self.norm(x)
                feats.append(f[:, 1:].reshape(G, n, D) if self.cls is not None else f)
        if len(feats) == 1:
            return feats[0]
        return torch.cat(feats, -1) if self.feature_combine == "concat" else torch.stack(feats).mean(0)
