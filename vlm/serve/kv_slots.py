"""The engine's KV memory: one preallocated slot per running request.

Buffers: keys and values `[n_layers, max_batch, H_kv, max_context, Dh]`. A request owns one slot
(`max_batch` slots) from admission to its end and writes its positions `[0, length)` there.

Slotted, not paged: on a CPU (and for the model sizes this project trains) the decode step's cost
is the attention read and the weights, not memory fragmentation, and a slot makes the decode
batch a plain *view*. The engine keeps the decoding rows in slots `[0, n)`, so a step attends over
`k[layer][:n, :, :S]` (S = the longest row + 1) with a key-validity mask, without gathering
anything; the new token's keys/values are written with one indexed store per layer. Prefilling
rows live at the top of the slot range and move down (one copy of their KV) when they start
decoding; a finished row's slot is filled by the last decoding row. Paging would save memory for
short requests at a large `max_context`; here a slot costs `max_context` positions whatever the
request's length, which `EngineConfig.max_batch x max_context` bounds up front.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlm.model.attention import attend, causal_chunks, causal_mask, fast_causal


class KVSlots:
    """Per-slot KV buffers and the slot bookkeeping (which slots are free)."""

    def __init__(self, n_layers: int, max_batch: int, n_kv_heads: int, max_context: int, head_dim: int, dtype, device):
        shape = (n_layers, max_batch, n_kv_heads, max_context, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_batch, self.max_context = max_batch, max_context
        self.free: set[int] = set(range(max_batch))

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def take_top(self) -> int:
        """A free slot from the top of the range (prefilling rows stay clear of the decode rows)."""
        s = max(self.free)
        self.free.discard(s)
        return s

    def release(self, slot: int) -> None:
        self.free.add(slot)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy positions `[0, length)` of slot `src` into slot `dst` (all layers: two copies)."""
        if src != dst and length:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def swap(self, a: int, la: int, b: int, lb: int) -> None:
        """Exchange the contents of slots a (length la) and b (length lb)."""
        ka, va = self.k[:, a, :, :la].clone(), self.v[:, a, :, :la].clone()
        self.move(b, a, lb)
        self.k[:, b, :, :la], self.v[:, b, :, :la] = ka, va

    def read(self, slot: int, length: int) -> tuple[Tensor, Tensor]:
        """Copies of positions `[0, length)`: keys, values `[n_layers, H_kv, length, Dh]`."""
        return self.k[:, slot, :, :length].clone(), self.v[:, slot, :, :length].clone()

    def write(self, slot: int, k: Tensor, v: Tensor) -> None:
        """Fill positions `[0, m)` from `[n_layers, H_kv, m, Dh]` keys/values (a cached prefix)."""
        m = k.shape[2]
        self.k[:, slot, :, :m] = k
        self.v[:, slot, :, :m] = v


class RowCache:
    """The `KVCache` interface over one slot, for a prefill chunk at positions `[start, start + L)`.

    `cross`: fusion=cross_attn, the row's media keys/values (`CrossAttentionFusion.state`)."""

    def __init__(self, slots: KVSlots, slot: int, start: int, cross: dict | None = None):
        self.slots, self.slot, self.length, self.cross = slots, slot, start, cross

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v `[1, H_kv, L, Dh]` -> all keys/values of the row so far `[1, H_kv, start + L, Dh]`."""
        end = self.length + k.shape[2]
        s = self.slot
        self.slots.k[layer, s, :, self.length : end] = k[0]
        self.slots.v[layer, s, :, self.length : end] = v[0]
        return self.slots.k[layer, s : s + 1, :, :end], self.slots.v[layer, s : s + 1, :, :end]


class DecodeCache:
    """The `KVCache` interface over the decoding rows (slots `[0, n)`) for one decode step.

    lengths: `[n]` positions already written per row; the step writes each row's new token at its
    own length and attends over `S = max(lengths) + 1` keys (the caller masks each row's tail).
    `length` is what the model sees as the past (`S - 1`: queries are the last position)."""

    def __init__(self, slots: KVSlots, lengths: Tensor, cross: dict | None = None):
        self.slots, self.lengths, self.cross = slots, lengths, cross
        self.n = int(lengths.shape[0])
        self.rows = torch.arange(self.n, device=lengths.device)
        self.length = int(lengths.max())
        self.uniform = bool((lengths == self.length).all())  # every row at the same position
        if not self.uniform:  # rows of different lengths: where each (row, head)'s new key goes in
            # a layer's buffer seen as `[max_batch * H_kv * max_context, Dh]` (one index_copy_ per store)
            h, ctx = slots.k.shape[2], slots.max_context
            heads = torch.arange(h, device=lengths.device)
            self.flat = ((self.rows[:, None] * h + heads) * ctx + lengths[:, None]).reshape(-1)

    def key_valid(self) -> Tensor | None:
        """`[n, S]` bool: row b's keys `[0, lengths[b]]` (its new token included); None when every
        row has the same length (nothing to mask: attention without a mask is exact and faster)."""
        if self.uniform:
            return None
        S = self.length + 1
        return torch.arange(S, device=self.lengths.device)[None, :] <= self.lengths[:, None]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v `[n, H_kv, 1, Dh]` -> views `[n, H_kv, S, Dh]` of the decoding slots."""
        S = self.length + 1
        kl, vl = self.slots.k[layer], self.slots.v[layer]
        if self.uniform:  # a slice store: cheaper than the indexed one
            kl[: self.n, :, self.length] = k[:, :, 0]
            vl[: self.n, :, self.length] = v[:, :, 0]
        else:
            dh = kl.shape[-1]
            kl.view(-1, dh).index_copy_(0, self.flat, k[:, :, 0].reshape(-1, dh))
            vl.view(-1, dh).index_copy_(0, self.flat, v[:, :, 0].reshape(-1, dh))
        return kl[: self.n, :, :S], vl[: self.n, :, :S]


class PackedPrefill:
    """A `KVCache` for one forward over the prefill chunks of several rows, packed end to end.

    segments: `(slot, start, n)` per row, in packed order: the row's chunk is positions
    `[start, start + n)` of its slot. The forward sees one sequence `[1, Σn]` (embeddings, positions
    and every GEMM over all chunks at once); attention runs here, per chunk (`attend`): each chunk's
    keys and values go into its slot, and its queries attend causally over its own slot's
    positions `[0, start + n)`, never another row's. `length` is 0, so the model builds no mask of
    its own (causal image attention only: bidirectional media spans are not covered)."""

    length = 0
    cross = None

    def __init__(self, slots: KVSlots, segments: list[tuple[int, int, int]]):
        self.slots, self.segments = slots, segments
        self._masks: dict[int, Tensor] = {}  # segment -> its additive mask, made at the first layer

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q `[1, H, Σn, Dh]`, k, v `[1, H_kv, Σn, Dh]` -> `[1, H, Σn, Dh]`."""
        kl, vl = self.slots.k[layer], self.slots.v[layer]
        outs, at = [], 0
        for i, (slot, start, n) in enumerate(self.segments):
            end = start + n
            kl[slot, :, start:end] = k[0, :, at : at + n]
            vl[slot, :, start:end] = v[0, :, at : at + n]
            keys, values = kl[slot : slot + 1, :, :end], vl[slot : slot + 1, :, :end]
            if fast_causal(q):
                outs.append(causal_chunks(q[:, :, at : at + n], keys, values))
                at += n
                continue
            mask = self._masks.get(i)
            if start and mask is None:  # additive, as the model makes a cached chunk's mask (same kernel, same bits)
                bad = ~causal_mask(n, end, device=q.device)
                mask = torch.zeros(bad.shape, dtype=q.dtype, device=q.device).masked_fill_(bad, float("-inf"))
                self._masks[i] = mask
            outs.append(attend(q[:, :, at : at + n], keys, values, mask, is_causal=start == 0))
            at += n
        return torch.cat(outs, dim=2)
