"""Attention building blocks shared by the vision encoder and the decoder.

Everything goes through `F.scaled_dot_product_attention`, which picks the fused kernel for the
device — except short square sequences (training shapes) on a CPU (`attend`): there PyTorch's CPU flash kernel costs 2–3x
more than three plain batched matmuls (fwd+bwd of [16, 4, 64, 32] in bf16: 7.2 ms vs 2.7 ms; equal
near 200 tokens), and attention was a quarter of the default model's training step. Masks are
boolean with True = may attend.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.model import packed
from vlm.model.packed import PackedGemm, PackedLinear, packed_gemm
from vlm.model.rope import apply_rope, apply_rope_one


class KVCache:
    """Preallocated per-layer key/value buffers for incremental decoding.

    Buffers: `[B, H_kv, max_len, Dh]` per layer. `length` counts the positions already written;
    a forward with L new tokens writes slots `[length, length + L)` and the caller advances.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0
        self.cross: dict | None = None  # fusion=cross_attn: media keys/values, computed once

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write `[B, H_kv, L, Dh]` at the current offset; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, self.length : end] = k.to(self.k[layer].dtype)
        self.v[layer][:, :, self.length : end] = v.to(self.v[layer].dtype)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


class FusedLinears:
    """Inference: `nn.Linear`s that read the same input, run as one GEMM.

    Their weights (and biases) are copied once into one buffer and each layer's parameters become
    views of it, so the memory stays the same and in-place weight updates reach both. `__call__`
    returns None (the caller runs the layers one by one) while grad is on or once a parameter no
    longer is its view (the module was cast or moved, a weight or a layer was replaced)."""

    def __init__(self, linears: list[nn.Linear]):
        ws = [lin.weight for lin in linears]
        with torch.no_grad():
            self.weight = torch.cat([w.detach() for w in ws])
            self.bias = None  # a layer without bias adds zeros
            if any(lin.bias is not None for lin in linears):
                self.bias = torch.cat(
                    [w.new_zeros(w.shape[0]) if lin.bias is None else lin.bias.detach() for lin, w in zip(linears, ws)]
                )
        self.sizes = [w.shape[0] for w in ws]
        start = 0
        for lin, n in zip(linears, self.sizes):
            lin.weight = nn.Parameter(self.weight[start : start + n], requires_grad=lin.weight.requires_grad)
            if lin.bias is not None:
                lin.bias = nn.Parameter(self.bias[start : start + n], requires_grad=lin.bias.requires_grad)
            start += n
        self.linears = linears
        self._params = [(lin.weight, lin.bias) for lin in linears]
        self._ptrs = self._pointers(linears)
        self._gemm: PackedGemm | None = None  # while the layers are `PackedLinear`s (`pack_linears`)

    @staticmethod
    def _pointers(linears) -> list:
        return [(lin.weight.data_ptr(), -1 if lin.bias is None else lin.bias.data_ptr()) for lin in linears]

    def _still_fused(self, linears) -> bool:
        """`linears` are the fused layers, with the same parameters, still views of the buffer.
        Checked before every call, so it compares objects and pointers only (no tuples built)."""
        for lin, mine, (w, b), (wp, bp) in zip(linears, self.linears, self._params, self._ptrs):
            if lin is not mine or lin.weight is not w or lin.bias is not b or w.data_ptr() != wp:
                return False
            if b is not None and b.data_ptr() != bp:
                return False
        return len(linears) == len(self.linears)

    def __call__(self, x: Tensor, linears) -> tuple[Tensor, ...] | None:
        """The layers' outputs, or None: grad is on, or `linears` (the module's layers now) are not
        the fused ones with their parameters still views of the buffer."""
        if torch.is_grad_enabled() or not self._still_fused(linears):
            return None
        if (
            type(linears[0]) is PackedLinear
            and x.numel() * self.weight.shape[0] >= packed.SMALL
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype
        ):
            return self.packed()(x).split(self.sizes, -1)
        self._gemm = None
        return F.linear(x, self.weight, self.bias).split(self.sizes, -1)

    def packed(self) -> PackedGemm:
        """The packed GEMM of the fused weight and bias as they are now (packed again if they changed)."""
        self._gemm = packed_gemm(self._gemm, self.weight, self.bias)
        return self._gemm

    @staticmethod
    def of(linears: list) -> FusedLinears | None:
        """Fused when every layer is a plain `nn.Linear` of one input size, dtype and device."""
        if any(type(lin) not in (nn.Linear, PackedLinear) for lin in linears):
            return None
        w0 = linears[0].weight
        if any(
            lin.in_features != linears[0].in_features or lin.weight.dtype != w0.dtype or lin.weight.device != w0.device
            for lin in linears
        ):
            return None
        return FusedLinears(linears)


class SelfAttention(nn.Module):
    """Multi-head self-attention with grouped-query heads and optional rotary positions.

    x: `[B, L, D]` -> `[B, L, D]`. `n_kv_heads < n_heads` shares each key/value head across
    `n_heads // n_kv_heads` query heads (GQA).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        bias: bool = False,
        qkv_bias: bool | None = None,
        qk_norm: bool = False,
    ):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv_heads} do not divide")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=bias)
        # QK-norm (OLMo 2, Qwen3): RMS-normalise each head's queries and keys, which keeps
        # attention logits bounded and tolerates higher learning rates.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self._qkv: FusedLinears | None = None  # `fuse_projections` (inference)

    def fuse_projections(self, enabled: bool = True) -> bool:
        """Inference: the q/k/v projections as one GEMM (`FusedLinears`); False if they cannot be
        (or `enabled` is False: back to three layers, the fused buffer dropped)."""
        self._qkv = FusedLinears.of([self.q_proj, self.k_proj, self.v_proj]) if enabled else None
        return self._qkv is not None

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> Tensor:
        B, L, _ = x.shape
        qkv = (
            self._qkv(x, (self.q_proj, self.k_proj, self.v_proj))
            if self._qkv is not None and not self.training
            else None
        )
        q, k, v = qkv if qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        attend_in_cache = getattr(cache, "attend", None)  # a cache over several sequences (serving)
        if attend_in_cache is not None:
            return self.o_proj(attend_in_cache(layer_idx, q, k, v).transpose(1, 2).reshape(B, L, -1))
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        if mask is not None and not isinstance(mask, Tensor):  # a FlexAttention BlockMask (packed rows)
            out = flex_attention(q, k, v, block_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            out = attend(q, k, v, mask, is_causal and mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))

    def forward_one(
        self, x: Tensor, cos: Tensor, signed_sin: Tensor, mask: Tensor | None, cache, layer_idx: int
    ) -> Tensor:
        """`forward` for one new token per row over a cache that already holds the rows' past (a
        decode step), in fewer ops: x `[B, D]` -> `[B, D]`; the rotary tables come from
        `vlm.model.rope.one_token_tables`. The same bits as `forward` (the same GEMMs, rotary
        products, QK-norm, cache writes and `attend`)."""
        B, H, Hkv, Dh = x.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self._qkv(x, (self.q_proj, self.k_proj, self.v_proj)) if self._qkv is not None else None
        q, k, v = qkv if qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q, k = q.view(B, H, Dh), k.view(B, Hkv, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope_one(q, cos, signed_sin), apply_rope_one(k, cos, signed_sin)
        k, v = cache.update(layer_idx, k.view(B, Hkv, 1, Dh), v.view(B, Hkv, 1, Dh))
        return self.o_proj(attend(q.view(B, H, 1, Dh), k, v, mask).reshape(B, H * Dh))


#: square CPU sequences up to this many query x key positions use `attend`'s matmul path (measured
#: crossover ~200 x 200 on AVX-512; the [B, H, L, S] scores it materialises stay small).
EAGER_CPU_MAX = 128 * 128


@functools.lru_cache(maxsize=32)
def _causal_mask(L: int, S: int, device: torch.device) -> Tensor:
    """`[L, S]` top-left causal mask, built once per shape (attend runs per layer per step)."""
    return torch.ones(L, S, dtype=torch.bool, device=device).tril()


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """Scaled dot-product attention, `q [B, H, L, Dh]`, `k, v [B, H_kv, S, Dh]` -> `[B, H, L, Dh]`.

    Same result as `F.scaled_dot_product_attention` (GQA by head groups; `is_causal` aligned top
    left; a query row with nothing to attend to gives zeros, as SDPA's CPU kernel does).

    Short square CPU sequences (training shapes, `L == S`) take plain matmuls (module docstring).
    Everything else goes to SDPA: a decoding step (`L` of 1 against hundreds of cached keys) is
    17-25x slower through matmuls, which materialise `[B, H, L, S]` scores and repeat the GQA
    keys. A single query per row is folded into its key head group (`[B, H_kv, H/H_kv, Dh]`
    queries against unrepeated keys), which is exact (queries are independent) and lets SDPA's
    fused kernel run without expanding the keys: 2-10x faster than `enable_gqa` on CPUs."""
    L, S = q.shape[-2], k.shape[-2]
    B, H, Hkv, Dh = q.shape[0], q.shape[1], k.shape[1], q.shape[-1]
    if L * S > EAGER_CPU_MAX and _bf16_cpu_full(q, k, mask, is_causal):
        return _query_chunks(q, k, v)
    if q.device.type != "cpu" or L != S or L * S > EAGER_CPU_MAX:
        one_mask = mask is None or mask.dim() < 4 or mask.shape[1] == 1  # the same for every head
        if L == 1 and Hkv != H and not (is_causal and S > 1) and one_mask:
            out = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, Dh), k, v, attn_mask=mask)
            return out.reshape(B, H, 1, Dh)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=Hkv != H)
    if Hkv != H:
        rep = H // Hkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    # in q's dtype: the bf16 scores of a bf16 matmul lose nothing by staying bf16, and the CPU
    # softmax kernels accumulate bf16 in fp32 (the result equals softmax in fp32 rounded to bf16,
    # bit for bit), so the fp32 round trip only cost four casts of [B, H, L, S] per layer
    scores = (q * Dh**-0.5) @ k.transpose(-1, -2)
    if is_causal:
        mask = (
            torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
            if torch.compiler.is_compiling()
            else _causal_mask(L, S, q.device)
        )  # compiled: traced (and folded) instead of cached
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    if mask is not None and not is_causal:  # rows with nothing to attend to: zeros, not NaN
        probs = probs.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return probs @ v


#: bytes of one chunk's scores in `_query_chunks` (`[B, H, rows, S]`): a chunk whose scores stay
#: in the core's cache is written, softmaxed and read again there. 2-core AVX-512 BF16, 4 heads of
#: 64 dims, median ms of the whole attention: 1564 patches 22.5 with 512-row chunks (6.4 MB of
#: scores) vs 11.7 with 128 rows (1.6 MB); 4096 patches 154 vs 73 (64 rows); 768 patches 2.6 vs 2.5.
QUERY_CHUNK_BYTES = 2 << 20
#: the most query rows per chunk, and the fewest (below it the matmuls get too thin to run fast)
QUERY_CHUNK, QUERY_CHUNK_MIN = 512, 64


def _bf16_cpu_full(q: Tensor, k: Tensor, mask, is_causal: bool) -> bool:
    """Inference in bf16 on a CPU, every query against every key (a vision encoder's attention)."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and mask is None
        and not is_causal
        and q.shape[1] == k.shape[1]
        and not torch.is_grad_enabled()
    )


def query_chunk_rows(q: Tensor, S: int) -> int:
    """Query rows per chunk of `_query_chunks` for `q [B, H, L, Dh]` against `S` keys: the largest
    power of two whose scores fit `QUERY_CHUNK_BYTES`, within `[QUERY_CHUNK_MIN, QUERY_CHUNK]`."""
    fit = QUERY_CHUNK_BYTES // max(1, q.shape[0] * q.shape[1] * S * q.element_size())
    rows = QUERY_CHUNK
    while rows > QUERY_CHUNK_MIN and rows > fit:
        rows //= 2
    return rows


def _query_chunks(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Full attention as matmuls over chunks of queries (`query_chunk_rows`): in bf16 on a CPU
    these run at GEMM speed where SDPA's flash kernel does not (4 heads of 64 dims, 2-core AVX-512
    BF16: 768 image patches 2.5 vs 4.0 ms, 1564 11.7 vs 16.8 ms, 4096 73 vs 109 ms); fp32 stays
    on SDPA, faster there. Each query row's result does not depend on the chunking."""
    L, rows = q.shape[-2], query_chunk_rows(q, k.shape[-2])
    qs, kt = q * q.shape[-1] ** -0.5, k.transpose(-1, -2)
    if rows >= L:
        return (qs @ kt).softmax(-1) @ v
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for a in range(0, L, rows):
        out[..., a : a + rows, :] = (qs[..., a : a + rows, :] @ kt).softmax(-1) @ v
    return out


def fast_causal(q: Tensor) -> bool:
    """`causal_chunks` is the faster way to run causal attention for these queries: bf16 inference
    on a CPU, several queries (a prefill chunk)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] > 1 and not torch.is_grad_enabled()


#: query positions per chunk of `causal_chunks` (times the query heads of a key head: its scores
#: are `[B, H_kv, H / H_kv * CAUSAL_CHUNK, S]`). 8 query / 2 key heads of 64 dims, bf16, 2-core
#: AVX-512 BF16, median ms: 430 positions 2.15 with 128 vs 2.93 with 256, 1600 19.2 vs 22.9.
CAUSAL_CHUNK = 128


def causal_chunks(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention as matmuls over chunks of queries: `q [B, H, L, Dh]` are the last `L` of
    the `S` positions of `k, v [B, H_kv, S, Dh]`, each attending to the keys up to its own
    position -> `[B, H, L, Dh]`.

    The query heads that share a key head are folded into one matrix (`[B, H_kv, H / H_kv * n, Dh]`
    against unrepeated keys) and a chunk of queries reads only the keys up to its last position,
    so the GEMMs skip most of the masked half. In bf16 on a CPU this runs at GEMM speed where SDPA's
    flash kernel does not (8 query / 2 key heads of 64 dims, 2-core AVX-512 BF16: 430 positions
    2.5 vs 3.1 ms, 1600 18.8 vs 22.8 ms)."""
    B, H, L, Dh = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, off = H // Hkv, S - L
    qg = q.reshape(B, Hkv, G, L, Dh)
    kt = k.transpose(-1, -2)
    outs = []
    for a in range(0, L, CAUSAL_CHUNK):
        n = min(CAUSAL_CHUNK, L - a)
        end = off + a + n  # the chunk's last query sees keys [0, end)
        qc = qg[:, :, :, a : a + n].reshape(B, Hkv, G * n, Dh) * Dh**-0.5
        scores = (qc @ kt[..., :end]).view(B, Hkv, G, n, end)
        scores[..., off + a :].masked_fill_(_upper(n, q.device), float("-inf"))  # keys after each query
        probs = scores.softmax(-1).view(B, Hkv, G * n, end)
        outs.append((probs @ v[:, :, :end]).view(B, Hkv, G, n, Dh))
    return torch.cat(outs, dim=3).reshape(B, H, L, Dh)


@functools.lru_cache(maxsize=8)
def _upper(n: int, device: torch.device) -> Tensor:
    """`[n, n]` True above the diagonal."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


_FLEX = None


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask, enable_gqa: bool = False) -> Tensor:
    """FlexAttention with a block mask: compiled (fused, skips empty blocks) on GPUs; the eager
    reference implementation elsewhere (correct, for tests and CPU runs)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention as fa

        _FLEX = torch.compile(fa, dynamic=False) if q.is_cuda else fa
    return _FLEX(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def packed_block_mask(seq_ids: Tensor, span_ids: Tensor | None = None):
    """FlexAttention `BlockMask` for packed rows: causal within each sample (`seq_ids [B, L]`,
    0 = padding, which sees only itself), plus both ways inside a media span when `span_ids` is
    given — the same pattern as `causal_mask` + the packed restriction, built blockwise."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = seq_ids.shape

    def mask_mod(b, h, qi, ki):
        same = seq_ids[b, qi] == seq_ids[b, ki]
        ok = same & ((ki <= qi) & (seq_ids[b, ki] > 0) | (qi == ki))
        if span_ids is not None:
            ok = ok | ((span_ids[b, qi] == span_ids[b, ki]) & (span_ids[b, qi] > 0))
        return ok

    return create_block_mask(mask_mod, B, None, L, L, device=seq_ids.device)


def causal_mask(
    q_len: int,
    k_len: int,
    key_valid: Tensor | None = None,
    span_ids_q: Tensor | None = None,
    span_ids_k: Tensor | None = None,
    device=None,
) -> Tensor:
    """Boolean mask `[B or 1, 1, q_len, k_len]`, True = may attend.

    Queries are the last `q_len` of `k_len` positions (so it also serves cached decoding).
    key_valid: `[B, k_len]` False at padding. span_ids_*: `[B, len]`, >0 inside a media span;
    tokens of the same span see each other both ways (bidirectional attention within an image).
    """
    qpos = torch.arange(k_len - q_len, k_len, device=device)
    kpos = torch.arange(k_len, device=device)
    mask = (kpos[None, :] <= qpos[:, None])[None, None]  # [1, 1, q, k]
    if span_ids_q is not None and span_ids_k is not None:
        same = (span_ids_q[:, :, None] == span_ids_k[:, None, :]) & (span_ids_q[:, :, None] > 0)
        mask = mask | same[:, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :].bool()
        # A fully padded query row would attend to nothing (NaN); let it see itself instead.
        eye = (kpos[None, :] == qpos[:, None])[None, None]
        mask = mask | (eye & ~mask.any(-1, keepdim=True))
    return mask
