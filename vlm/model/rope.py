"""Rotary position embeddings: 1D RoPE for text decoders and M-RoPE (Qwen2-VL) for media.

M-RoPE splits the rotary frequency pairs of each head into sections that read the temporal,
height and width components of a 3D position `(t, h, w)`. Text tokens carry the same value in all
three components, so on text-only input M-RoPE equals 1D RoPE.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=16)
def _mrope_component(section: tuple[int, ...], device: torch.device) -> Tensor:
    """`[Dh/2]` in {0, 1, 2}: which position component each frequency pair reads (built once per
    section and device: a decode step computes its rotation tables once per token)."""
    return torch.repeat_interleave(torch.arange(3, device=device), torch.tensor(section, device=device))


def inv_frequencies(head_dim: int, theta: float, device=None) -> Tensor:
    """`[head_dim // 2]` inverse frequencies, the standard `theta^(-2i/d)` ladder."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rope_cos_sin(
    position_ids: Tensor, inv_freq: Tensor, mrope_section: list[int] | None = None
) -> tuple[Tensor, Tensor]:
    """Rotation tables for every token.

    position_ids: `[B, L]` (1D) or `[3, B, L]` (M-RoPE, components t, h, w).
    inv_freq: `[Dh/2]`.
    mrope_section: with 3D positions, how many of the `Dh/2` frequency pairs read t, h and w
        (must sum to `Dh/2`). Without it, 3D positions use their first component.
    Returns cos, sin: `[B, L, Dh]` in float32.
    """
    if position_ids.dim() == 3:
        if mrope_section is None:
            position_ids = position_ids[0]
        else:
            if sum(mrope_section) != inv_freq.numel():
                raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {inv_freq.numel()}")
            # freqs per component: [3, B, L, Dh/2]; then pick each frequency pair's component.
            freqs = position_ids[..., None].float() * inv_freq
            component = _mrope_component(tuple(mrope_section), inv_freq.device)  # [Dh/2] in {0,1,2}
            freqs = freqs.gather(0, component.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])).squeeze(0)
            emb = torch.cat([freqs, freqs], dim=-1)
            return emb.cos(), emb.sin()
    freqs = position_ids[..., None].float() * inv_freq  # [B, L, Dh/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: `[B, H, L, Dh]`; cos, sin: `[B, L, Dh]`. Computed in float32, returned in x's dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def one_token_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """`rope_cos_sin`'s tables of a one-token step (`[B, 1, Dh]`) laid out for `apply_rope_one`:
    cos as is, sin with its first half negated (`rotate_half`'s sign moved into the table)."""
    half = sin.shape[-1] // 2
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rope_one(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """`apply_rope` for one position per row, in fewer ops: x `[B, H, Dh]`, tables `[B, 1, Dh]`
    from `one_token_tables`. `rotate_half(x) * sin` is `roll(x, Dh / 2) * signed_sin` element for
    element (a sign moved between the factors of a product), so the result is the same bits."""
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, -1) * signed_sin).to(x.dtype)


def rope2d_inv_frequencies(head_dim: int, theta: float = 10000.0, device=None) -> Tensor:
    """`[head_dim // 4]` inverse frequencies for 2D RoPE (each spatial axis gets half the pairs)."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, quarter, 2, device=device, dtype=torch.float32) / quarter))


def grid_hw(t: int, h: int, w: int, device=None) -> tuple[Tensor, Tensor]:
    """Row and column index of every patch of a `(t, h, w)` item in packed order (`t`-major, then
    row-major): two `[t*h*w]` long tensors. Every frame reuses the same (h, w) positions."""
    hh = torch.arange(h, device=device).view(1, h, 1).expand(t, h, w).reshape(-1)
    ww = torch.arange(w, device=device).view(1, 1, w).expand(t, h, w).reshape(-1)
    return hh, ww


def rope2d_cos_sin(h_ids: Tensor, w_ids: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """2D rotary tables (the Qwen2-VL vision rule) for tokens at rows `h_ids` and columns `w_ids`.

    h_ids, w_ids: `[N]`; inv_freq: `[Dh/4]` (:func:`rope2d_inv_frequencies`).
    The first `Dh/4` rotary pairs rotate by the row, the next `Dh/4` by the column, so a query-key
    dot product depends only on the (row, column) offset between the two tokens.
    Returns cos, sin: `[N, Dh]` in float32, laid out for :func:`apply_rope` (`rotate_half` pairs).
    """
    freqs = torch.cat([h_ids[:, None].float() * inv_freq, w_ids[:, None].float() * inv_freq], dim=-1)  # [N, Dh/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()
