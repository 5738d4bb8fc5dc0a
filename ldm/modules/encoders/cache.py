"""Bounded LRU cache of text embeddings (captions repeat heavily across patches)."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch


class EmbeddingCache:
    """LRU map from a key (caption, max_length) to an embedding, bounded by count and bytes.

    ``max_items=0`` disables caching. Entries are stored detached; ``get`` marks a hit as most
    recently used and ``put`` evicts least recently used entries until both bounds hold.
    """

    def __init__(self, max_items: int = 4096, max_bytes: int | None = 1 << 30) -> None:
        if max_items < 0 or (max_bytes is not None and max_bytes < 0):
            raise ValueError(f"cache bounds must be >= 0, got max_items={max_items}, "
                             f"max_bytes={max_bytes}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    @property
    def enabled(self) -> bool:
        """False when the cache can hold nothing."""
        return self.max_items > 0 and (self.max_bytes is None or self.max_bytes > 0)

    def get(self, key: Hashable) -> torch.Tensor | None:
        """The cached tensor for ``key`` (marked most recently used), or None."""
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        """Store ``value`` (a detached copy that owns its memory) and evict to stay in bounds."""
        if not self.enabled:
            return
        size = value.numel() * value.element_size()
        if self.max_bytes is not None and size > self.max_bytes:
            return
        self.pop(key)
        # clone: a row view would otherwise keep the whole batch tensor alive; outside inference
        # mode, so an entry made during validation (inference_mode) is usable in training steps
        with torch.inference_mode(False):
            self._entries[key] = value.detach().clone()
        self.nbytes += size
        while len(self._entries) > self.max_items or (
                self.max_bytes is not None and self.nbytes > self.max_bytes):
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()

    def pop(self, key: Hashable) -> torch.Tensor | None:
        """Remove and return the entry for ``key`` if present."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.numel() * old.element_size()
        return old

    def clear(self) -> None:
        """Drop every entry (statistics are kept)."""
        self._entries.clear()
        self.nbytes = 0

    def __repr__(self) -> str:
        return (f"EmbeddingCache(entries={len(self)}/{self.max_items}, bytes={self.nbytes}/"
                f"{self.max_bytes}, hits={self.hits}, misses={self.misses})")
