"""Restored caches held in memory by the server: an LRU bounded in bytes, with pins.

A context is a cache the server restored (a knowledge base, a stored prompt prefix) or
computed (a prompt it just prefilled). Running batches read their context, so a
pinned context is never evicted; a context that does not fit beside the pinned ones is
refused, never squeezed in, so the bound holds however many requests run.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

from transformers import DynamicCache

from cag.hashing import common_prefix_length

__all__ = ["Context", "ContextLRU", "cache_bytes"]


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes of the keys and values a cache holds."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass(eq=False)
class Context:
    """A cache in memory and the tokens it holds; ``key`` names it (its store key, for one restored whole)."""

    key: str
    cache: DynamicCache
    token_ids: list[int]
    kv_dtype: str  # what the keys and values were stored as: only exact ones may serve as another prompt's prefix
    nbytes: int = field(default=-1)
    users: int = 0  # batches reading it right now: a context in use is never evicted

    def __post_init__(self) -> None:
        if self.nbytes < 0:
            self.nbytes = cache_bytes(self.cache)


class ContextLRU:
    """Contexts by key, least recently used first out, at most ``limit`` bytes in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[str, Context] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Context | None:
        context = self._items.get(key)
        if context is not None:
            self._items.move_to_end(key)
        return context

    def add(self, context: Context) -> bool:
        """Hold ``context``, evicting unpinned ones least recently used first; False if it cannot fit."""
        if context.key in self._items:
            self._items.move_to_end(context.key)
            return True
        if not self.can_hold(context.nbytes):
            return False
        for key in [k for k, c in self._items.items() if c.users == 0]:
            if self.bytes + context.nbytes <= self.limit:
                break
            self.bytes -= self._items.pop(key).nbytes
        self._items[context.key] = context
        self.bytes += context.nbytes
        return True

    def can_hold(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit once every unpinned context is evicted."""
        pinned = sum(c.nbytes for c in self._items.values() if c.users > 0)
        return pinned + nbytes <= self.limit

    def pin(self, context: Context) -> None:
        context.users += 1

    def unpin(self, context: Context) -> None:
        context.users -= 1

    def longest_prefix(self, token_ids: Sequence[int], kv_dtype: str, minimum: int = 1) -> tuple[Context, int] | None:
        """The context of ``kv_dtype`` sharing the most leading tokens with ``token_ids`` (at least ``minimum``), and how many."""
        best: tuple[Context, int] | None = None
        for context in self._items.values():
            if context.kv_dtype != kv_dtype:
                continue
            shared = common_prefix_length(context.token_ids, token_ids)
            if shared >= minimum and (best is None or shared > best[1]):
                best = (context, shared)
        if best is not None:
            self._items.move_to_end(best[0].key)
        return best
