"""Llama-style decoder: RMSNorm, SwiGLU, grouped-query attention, RoPE (1D or M-RoPE), KV cache.

The decoder consumes embeddings, not ids, so the VLM can splice visual tokens in before it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.model.attention import FusedLinears, KVCache, SelfAttention
from vlm.model.config import DecoderConfig
from vlm.model.fields import SpecError
from vlm.model.rope import inv_frequencies, one_token_tables, rope_cos_sin


def _additive_for_cached(mask: Tensor | None, x: Tensor) -> Tensor | None:
    """A cached forward's boolean mask (a decode step, a later prefill chunk: queries fewer than keys)
    as the additive one SDPA would make of it in every layer (0 / -inf in x's dtype), made once.
    Inference only: other masks, and every mask under grad, stay as they are."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or torch.is_grad_enabled():
        return mask
    if mask.shape[-1] == mask.shape[-2] or not x.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=x.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """`[..., D]` -> `[..., D]`, normalised and scaled in float32, returned in x's dtype.

        `F.rms_norm`'s fused kernel gives the same bits as `x * rsqrt(mean(x²) + eps) * w` in
        float32, gradients included, in two kernels instead of six (~0.2 ms less per norm on the
        default model's CPU step, within that step's noise)."""
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self._gate_up: FusedLinears | None = None  # `fuse_projections` (inference)

    def fuse_projections(self, enabled: bool = True) -> bool:
        """Inference: gate and up projections as one GEMM (`FusedLinears`; `enabled` False: not)."""
        self._gate_up = FusedLinears.of([self.gate_proj, self.up_proj]) if enabled else None
        return self._gate_up is not None

    def forward(self, x: Tensor) -> Tensor:
        gu = (
            self._gate_up(x, (self.gate_proj, self.up_proj))
            if self._gate_up is not None and not self.training
            else None
        )
        gate, up = gu if gu is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class DecoderBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        mlp_hidden: int,
        norm_eps: float,
        qkv_bias: bool,
        qk_norm: bool = False,
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, norm_eps)
        self.self_attn = SelfAttention(dim, n_heads, n_kv_heads, bias=False, qkv_bias=qkv_bias, qk_norm=qk_norm)
        self.post_attention_layernorm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, x, rope, mask, is_causal, cache, layer_idx):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, is_causal, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_one(self, x: Tensor, cos: Tensor, signed_sin: Tensor, mask, cache, layer_idx: int) -> Tensor:
        """`forward` for one new token per row after a cached past: x `[B, D]` -> `[B, D]`
        (`SelfAttention.forward_one`)."""
        x = x + self.self_attn.forward_one(self.input_layernorm(x), cos, signed_sin, mask, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Token embeddings + N pre-norm blocks + final norm + LM head.

    Args mirror a HF Llama/Qwen2 config; `mlp_hidden=None` uses the Llama rule
    (2/3 · 4 · dim rounded up to a multiple of 64). `rope="mrope"` reads `[3, B, L]` positions and
    splits the rotary pairs by `mrope_section` (t, h, w); `None` gives an even split.
    """

    def __init__(self, *args, **kwargs):
        """The fields of `DecoderConfig` (positionally or by name), or one `DecoderConfig`;
        `vocab_size` must be set."""
        super().__init__()
        c = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], DecoderConfig) else None
        self.config = c = c or DecoderConfig(*args, **kwargs)  # validated there
        if c.vocab_size is None:
            raise SpecError("model.decoder.vocab_size is not set (null follows the tokenizer: vlm.build.model)")
        self.vocab_size, self.dim, self.n_layers = c.vocab_size, c.dim, c.n_layers
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.kv_heads, c.head_dim
        self.rope, self.max_seq_len, self.rope_theta = c.rope, c.max_seq_len, float(c.rope_theta)
        self.mrope_section = c.mrope_sections
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(
            DecoderBlock(c.dim, c.n_heads, c.kv_heads, c.mlp_width, c.norm_eps, c.qkv_bias, c.qk_norm)
            for _ in range(c.n_layers)
        )
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", inv_frequencies(c.head_dim, c.rope_theta), persistent=False)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: DecoderConfig) -> Decoder:
        return cls(config)

    def reset_parameters(self) -> None:
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # Scale residual-branch outputs down with depth (GPT-2 / nanoGPT rule).
                s = std / (2 * self.n_layers) ** 0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                nn.init.normal_(p, std=s)
            elif "bias" in name:
                nn.init.zeros_(p)

    def forward(
        self,
        inputs_embeds: Tensor,
        position_ids: Tensor,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        before_layer: Callable[[int, Tensor], Tensor] | None = None,
    ) -> Tensor:
        """inputs_embeds: `[B, L, D]`; position_ids: `[B, L]` or `[3, B, L]`; mask: bool
        `[B|1, 1, L, L_total]` or None for plain causal. Returns final-normed hidden `[B, L, D]`
        (apply `lm_head` only where logits are needed). before_layer(i, x) -> x runs before layer
        i (the cross-attention fusion blocks hook in here)."""
        rope = rope_cos_sin(position_ids, self.inv_freq, self.mrope_section if self.rope == "mrope" else None)
        if (
            inputs_embeds.shape[1] == 1
            and cache is not None
            and cache.length > 0
            and self._one_token_path(before_layer, cache)
        ):
            return self._forward_one(inputs_embeds, rope, mask, cache)
        # Plain causal fast path only when the queries are the whole key sequence.
        is_causal = mask is None and (cache is None or cache.length == 0)
        if mask is None and not is_causal and inputs_embeds.shape[1] > 1:
            raise ValueError("a mask is needed for multi-token forwards on a non-empty cache")
        mask = _additive_for_cached(mask, inputs_embeds)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            if before_layer is not None:
                x = before_layer(i, x)
            x = layer(x, rope, mask, is_causal, cache, i)
        return self.norm(x)

    def _one_token_path(self, before_layer, cache) -> bool:
        """A decode step may take `_forward_one`: inference, no per-layer hook (cross-attention),
        a cache that stores keys (not one that attends itself), the blocks built here."""
        return (
            before_layer is None
            and getattr(cache, "attend", None) is None
            and not torch.is_grad_enabled()
            and all(type(b) is DecoderBlock for b in self.layers)
        )

    def _forward_one(self, inputs_embeds: Tensor, rope: tuple[Tensor, Tensor], mask, cache) -> Tensor:
        """`forward` for one new token per row after a cached past (every decode step): `[B, 1, D]`
        -> `[B, 1, D]`, the same bits in fewer ops. A decode step's tensors are tiny, so its time
        beyond the GEMMs and attention is mostly the cost of issuing ops; here the layers run on
        `[B, D]` rows (no per-layer head transposes) and the rotary step rolls instead of
        splitting, negating and joining (`vlm.model.rope.apply_rope_one`): a qwen40m decode step
        on a 2-core AVX-512 CPU took 0.4-0.6 ms less (4 rows: fp32 14.6 -> 14.1 ms, bf16
        11.6 -> 11.0 ms)."""
        B = inputs_embeds.shape[0]
        cos, signed_sin = one_token_tables(*rope)
        mask = _additive_for_cached(mask, inputs_embeds)
        x = inputs_embeds.reshape(B, -1)
        for i, layer in enumerate(self.layers):
            x = layer.forward_one(x, cos, signed_sin, mask, cache, i)
        return self.norm(x).view(B, 1, -1)

    @torch.no_grad()
    def grow_vocab(self, n: int) -> None:
        """Grow the embedding (and an untied head) to `n` rows for tokens added to a pretrained
        tokenizer; new rows are the mean of the old ones (a neutral start, as in LLaVA / HF's
        `resize_token_embeddings(mean_resizing=True)`)."""
        old = self.embed_tokens.weight
        if n <= old.shape[0]:
            return
        emb = nn.Embedding(n, self.dim, device=old.device, dtype=old.dtype)
        emb.weight[: old.shape[0]] = old
        emb.weight[old.shape[0] :] = old.mean(0)
        tied = self.lm_head.weight is old
        head = nn.Linear(self.dim, n, bias=False, device=old.device, dtype=old.dtype)
        if tied:
            head.weight = emb.weight
        else:
            head.weight[: old.shape[0]] = self.lm_head.weight
            head.weight[old.shape[0] :] = self.lm_head.weight.mean(0)
        self.embed_tokens, self.lm_head, self.vocab_size = emb, head, n
        self.config = self.config.replace(vocab_size=n)  # the stored spec follows

    def new_cache(self, batch: int, max_len: int, dtype, device) -> KVCache:
        return KVCache(self.n_layers, batch, self.n_kv_heads, max_len, self.head_dim, dtype, device)
