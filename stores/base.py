"""The store interface: what cag needs from a place that keeps KV caches.

``cag`` talks only to this protocol, so a shared backend (Redis, an object store)
can implement it without touching the library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch
from transformers import DynamicCache

from cag.kvcache import CacheMetadata, RestoredCache

__all__ = ["Entry", "PrefixMatch", "VerifyReport", "CacheStore", "over_budget"]


@dataclass(frozen=True)
class Entry:
    """One stored cache, found by its content key; names are labels on it."""

    key: str
    model_name: str
    fingerprint: str
    kv_dtype: str
    tokens: int
    bytes: int
    created: float
    last_used: float
    hits: int
    sources: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    blocks: int = 0


@dataclass(frozen=True)
class PrefixMatch:
    """The longest stored prefix of a prompt: ``tokens`` leading tokens of ``entry``."""

    entry: Entry
    tokens: int


@dataclass
class VerifyReport:
    ok: list[str] = field(default_factory=list)
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (key or file, reason)
    removed_rows: list[str] = field(default_factory=list)  # index rows whose file was gone
    reindexed: list[str] = field(default_factory=list)  # valid entries the index had lost, indexed again


@runtime_checkable
class CacheStore(Protocol):
    block_size: int

    def put(self, cache: DynamicCache, token_ids: Sequence[int], metadata: CacheMetadata, *, name: str | None = None) -> Entry:
        """Store the first ``metadata.tokens`` tokens of ``cache`` (once per content key) and label it."""

    def resolve(self, name_or_key: str) -> Entry:
        """The entry a name (or a key, or a unique key prefix) points to.

        CacheNotFoundError if none; InvalidNameError if ``name_or_key`` could not be a name.
        """

    def restore(self, entry: Entry, tokens: int | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                check_later: bool = False) -> RestoredCache:
        """Load the first ``tokens`` tokens of an entry; a corrupt entry is quarantined and refused.

        ``check_later`` allows (never requires) returning before the data is read and
        checked: the result's ``pending`` is then set, and its ``wait()`` raises (after the
        quarantine) if the check fails. A store that always checks at once ignores it.
        """

    def token_ids(self, entry: Entry) -> list[int]:
        """The token ids an entry holds."""

    def longest_prefix(self, token_ids: Sequence[int], fingerprint: str, kv_dtype: str) -> PrefixMatch | None:
        """The stored entry sharing the longest prefix with ``token_ids``, if any shares a full block."""

    def label(self, name: str, key: str) -> None:
        """Point ``name`` at the entry ``key`` (moving it if it pointed elsewhere); CacheNotFoundError if no such entry."""

    def entries(self) -> list[Entry]: ...

    def remove(self, name_or_key: str) -> list[Entry]:
        """Remove a name (and its entry once no name points to it), or an entry by key."""

    def gc(self, max_bytes: int) -> list[Entry]:
        """Remove least-recently-used entries until the store holds at most ``max_bytes``."""

    def verify(self) -> VerifyReport:
        """Re-hash every entry against its recorded checksum; quarantine what fails."""


def over_budget(entries: Sequence[Entry], max_bytes: int) -> list[Entry]:
    """The entries ``gc(max_bytes)`` removes: least recently used first, until the rest fit in ``max_bytes``."""
    out = []
    total = sum(e.bytes for e in entries)
    for entry in sorted(entries, key=lambda e: e.last_used):
        if total <= max_bytes:
            break
        total -= entry.bytes
        out.append(entry)
    return out
