"""Image-embedding cache: media content hash -> what the encoder and projector made of it.

The key is `Prompt.media_hashes[i]` (SHA-256 of the bytes and the processor settings), so the
same picture sent twice, in two requests or two turns, skips the encoder and projector. Values are
a tensor or a dict of tensors (fusion=cross_attn caches each block's media keys/values, which is
what a row holds); their size counts against a byte budget, least recently used out first.
A row keeps its own reference to what it uses, so an eviction never pulls memory from under it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from torch import Tensor


def nbytes(value) -> int:
    if isinstance(value, Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


class EmbedCache:
    """LRU within `budget_bytes`. Thread-safe (stats are read from other threads)."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self._items: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._lock = threading.Lock()

    def get(self, key: str):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, value) -> None:
        size = nbytes(value)
        if size > self.budget:
            return  # larger than the whole budget: not cached
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return
            while self.bytes + size > self.budget and self._items:
                _, (_, s) = self._items.popitem(last=False)
                self.bytes -= s
                self.evictions += 1
            self._items[key] = (value, size)
            self.bytes += size

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._items),
                "bytes": self.bytes,
                "budget_bytes": self.budget,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
