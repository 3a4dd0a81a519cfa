"""Prefix KV cache: the keys/values of earlier sequences, reused by requests that start the same way.

An entry is a finished request's prompt + generated tokens (all but the last, whose KV was never
computed): its `prefix_keys` (token ids, and a hash of (media hash, offset) per visual token, see
`vlm.serve.prompt`), its positions, and its KV `[n_layers, H_kv, L, Dh]`. Turn 2 of a chat is
turn 1's prompt + answer + a new user turn, so it finds turn 1's entry and prefills only the new
turn. Equal keys give equal KV only when the positions are equal too (M-RoPE positions follow
the media grids); the match is cut where they differ.

Lookup: keys are hashed in blocks of `BLOCK` positions, chained (a block's hash covers everything
before it), so the longest indexed block boundary is one dict probe per block; the match is then
extended token by token. Bytes are counted per entry; least recently used entries are evicted
to stay within the budget, except entries pinned by requests that will read them.

With bidirectional image attention a visual token's KV depends on the whole contiguous media
run it is in, so a match never ends inside a run (of the request or of the entry).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from torch import Tensor

BLOCK = 16


@dataclass(eq=False)
class Entry:
    keys: list[int]
    positions: Tensor  # [L] or [3, L]
    k: Tensor  # [n_layers, H_kv, L, Dh]
    v: Tensor
    chain: list[int] = field(default_factory=list)  # hash of keys[: (j + 1) · BLOCK] per full block
    pins: int = 0
    id: int = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.positions.nbytes


def chain_hashes(keys: list[int]) -> list[int]:
    out, h = [], 0
    for j in range(len(keys) // BLOCK):
        h = hash((h, tuple(keys[j * BLOCK : (j + 1) * BLOCK])))
        out.append(h)
    return out


def _common(a: list[int], b: list[int], start: int) -> int:
    n = min(len(a), len(b))
    i = start
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _run_safe(m: int, req: list[int], ent: list[int]) -> int:
    """Cut `m` back to the start of a media run (negative keys) that crosses position m, in the
    request or in the entry (they agree before m)."""
    if m == 0 or req[m - 1] >= 0:
        return m
    if (m < len(req) and req[m] < 0) or (m < len(ent) and ent[m] < 0):
        while m > 0 and req[m - 1] < 0:
            m -= 1
    return m


class PrefixCache:
    """Thread-safe: lookups run on the preprocessing threads, inserts on the engine thread."""

    def __init__(self, budget_bytes: int, bidirectional_media: bool = False):
        self.budget = int(budget_bytes)
        self.bidir = bidirectional_media
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # id -> entry, LRU order
        self._index: dict[int, set[int]] = {}  # chain hash -> entry ids
        self._ids = itertools.count(1)
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.inserts = 0
        self.hit_tokens = 0
        self._lock = threading.Lock()

    def lookup(self, keys: list[int], positions: Tensor, limit: int) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `keys` (at most `limit` positions), pinned,
        and that prefix length; (None, 0) when nothing useful matches. `release` the entry."""
        chain = chain_hashes(keys[:limit])
        with self._lock:
            best, best_m = None, 0
            j = len(chain) - 1
            while j >= 0 and chain[j] not in self._index:  # the longest indexed block boundary
                j -= 1
            for eid in self._index.get(chain[j], ()) if j >= 0 else ():
                e = self._entries[eid]
                if keys[: (j + 1) * BLOCK] != e.keys[: (j + 1) * BLOCK]:  # a hash collision
                    continue
                m = min(_common(keys, e.keys, (j + 1) * BLOCK), limit)
                m = _positions_agree(positions, e.positions, m)
                if self.bidir:
                    m = _run_safe(m, keys, e.keys)
                if m > best_m:
                    best, best_m = e, m
            if best is None or best_m == 0:
                self.misses += 1
                return None, 0
            best.pins += 1
            self._entries.move_to_end(best.id)
            self.hits += 1
            self.hit_tokens += best_m
            return best, best_m

    def release(self, entry: Entry | None) -> None:
        if entry is None:
            return
        with self._lock:
            entry.pins -= 1

    def insert(self, keys: list[int], positions: Tensor, k: Tensor, v: Tensor) -> bool:
        """Store a sequence's KV (`[n_layers, H_kv, L, Dh]`, already copied out of its slot).
        Entries it extends are dropped; a sequence an entry already covers only refreshes it."""
        if len(keys) < BLOCK:
            return False
        e = Entry(list(keys), positions, k, v, chain_hashes(keys))
        if e.nbytes > self.budget:
            return False
        with self._lock:
            for h in reversed(e.chain):
                for eid in list(self._index.get(h, ())):
                    old = self._entries[eid]
                    if len(old.keys) >= len(keys) and old.keys[: len(keys)] == keys:
                        self._entries.move_to_end(eid)  # already covered
                        return False
                    if len(old.keys) < len(keys) and keys[: len(old.keys)] == old.keys and not old.pins:
                        self._drop(old)
            while self.bytes + e.nbytes > self.budget:
                victim = next((x for x in self._entries.values() if not x.pins), None)
                if victim is None:
                    return False  # everything is pinned: do not store
                self._drop(victim)
                self.evictions += 1
            e.id = next(self._ids)
            self._entries[e.id] = e
            for h in e.chain:
                self._index.setdefault(h, set()).add(e.id)
            self.bytes += e.nbytes
            self.inserts += 1
            return True

    def _drop(self, e: Entry) -> None:
        del self._entries[e.id]
        for h in e.chain:
            ids = self._index.get(h)
            if ids is not None:
                ids.discard(e.id)
                if not ids:
                    del self._index[h]
        self.bytes -= e.nbytes

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self.bytes,
                "budget_bytes": self.budget,
                "hits": self.hits,
                "misses": self.misses,
                "hit_tokens": self.hit_tokens,
                "inserts": self.inserts,
                "evictions": self.evictions,
                "pinned": sum(1 for e in self._entries.values() if e.pins),
            }


def _positions_agree(a: Tensor, b: Tensor, m: int) -> int:
    """The longest prefix `<= m` on which positions `[..., L]` agree."""
    if m == 0:
        return 0
    diff = (a[..., :m] != b[..., :m]).reshape(-1, m).any(0)
    bad = diff.nonzero()
    return int(bad[0, 0]) if bad.numel() else m
