"""The local disk store: one safetensors file per entry and a SQLite index.

Layout under the store folder::

    index.sqlite          entries, their block hashes, names, sizes, last use, hits
    entries/<key>.safetensors
    quarantine/           files that failed a check, kept for inspection

Files are named by content key, never by a user's name, so no name can reach a path.
A file is complete before its index row exists (atomic rename, then one
transaction), so a crash leaves at worst a file without a row, which ``verify``
quarantines and ``gc`` counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache

from cag.errors import CacheNotFoundError, CorruptCacheError, InvalidNameError, StoreError
from cag.hashing import DEFAULT_BLOCK_SIZE, block_hashes, chain_seed, common_prefix_length, sequence_key
from cag.kvcache import CacheMetadata, RestoredCache, load_cache, read_token_ids, save_cache

from .base import Entry, PrefixMatch, VerifyReport

__all__ = ["LocalStore", "validate_name"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+@-]{0,127}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    model_name TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    kv_dtype TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    boundary INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    sources TEXT NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS blocks (
    hash TEXT NOT NULL,
    key TEXT NOT NULL REFERENCES entries(key) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    PRIMARY KEY (hash, key)
);
CREATE INDEX IF NOT EXISTS blocks_key ON blocks(key);
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY,
    key TEXT NOT NULL REFERENCES entries(key) ON DELETE CASCADE,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS names_key ON names(key);
"""
_STALE_TEMP_SECONDS = 3600


def validate_name(name: str) -> str:
    """A cache name: letters, digits and ``._+@-``, starting with a letter or digit."""
    if not _NAME.match(name) or ".." in name:
        raise InvalidNameError(
            f"invalid cache name {name!r}: use letters, digits and . _ + @ - (start with a letter or digit, no '..', "
            "at most 128 characters)"
        )
    return name


class LocalStore:
    """Caches on this machine's disk, indexed by chained block hashes in SQLite."""

    def __init__(self, root: str | os.PathLike, *, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        self.root = Path(root).expanduser()
        self.entries_dir = self.root / "entries"
        self.quarantine_dir = self.root / "quarantine"
        try:
            self.entries_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.root / "index.sqlite", timeout=60, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=60000")
            with self._write() as db:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                db.execute("INSERT OR IGNORE INTO settings VALUES ('block_size', ?)", (str(block_size),))
            self.block_size = int(self._db.execute("SELECT value FROM settings WHERE key='block_size'").fetchone()[0])
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the cache store at {self.root}: {exc}; set CAG_HOME to a writable folder") from exc

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ writes

    def put(self, cache: DynamicCache, token_ids: Sequence[int], metadata: CacheMetadata, *, name: str | None = None) -> Entry:
        if name is not None:
            validate_name(name)
        ids = list(token_ids[: metadata.tokens])
        seed = chain_seed(metadata.fingerprint, metadata.kv_dtype, self.block_size)
        key = sequence_key(ids, seed, self.block_size)
        # The file is written inside the index's write transaction: a second process
        # building the same key waits, then finds the entry and writes nothing.
        with self._write() as db:
            if self._row(key) is None or not self._path(key).is_file():
                size = save_cache(self._path(key), cache, ids, metadata)
                now = time.time()
                db.execute(
                    "INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,0) ON CONFLICT(key) DO UPDATE SET "
                    "bytes=excluded.bytes, sha256=excluded.sha256, created=excluded.created, last_used=excluded.last_used",
                    (key, metadata.model_name, metadata.fingerprint, metadata.kv_dtype, metadata.tokens,
                     metadata.boundary, size, _file_sha256(self._path(key)), json.dumps(list(metadata.sources)), now, now),
                )
                hashes = block_hashes(ids, seed, self.block_size)
                db.executemany("INSERT OR IGNORE INTO blocks VALUES (?,?,?)", [(h, key, i) for i, h in enumerate(hashes)])
        if name is not None:
            self.label(name, key)
        return self.resolve(key)

    def label(self, name: str, key: str) -> None:
        validate_name(name)
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO names VALUES (?,?,?)", (name, key, time.time()))

    def remove(self, name_or_key: str) -> list[Entry]:
        entry = self.resolve(name_or_key)
        with self._write() as db:
            if name_or_key in entry.names:
                db.execute("DELETE FROM names WHERE name=?", (name_or_key,))
                if len(entry.names) > 1:
                    return []
            db.execute("DELETE FROM entries WHERE key=?", (entry.key,))
        self._path(entry.key).unlink(missing_ok=True)
        return [entry]

    def gc(self, max_bytes: int) -> list[Entry]:
        removed = []
        entries = sorted(self.entries(), key=lambda e: e.last_used)
        total = sum(e.bytes for e in entries)
        for entry in entries:
            if total <= max_bytes:
                break
            with self._write() as db:
                db.execute("DELETE FROM entries WHERE key=?", (entry.key,))
            self._path(entry.key).unlink(missing_ok=True)
            total -= entry.bytes
            removed.append(entry)
        return removed

    # ------------------------------------------------------------------- reads

    def resolve(self, name_or_key: str) -> Entry:
        row = self._db.execute("SELECT key FROM names WHERE name=?", (name_or_key,)).fetchone()
        key = row[0] if row else None
        if key is None and re.fullmatch(r"[0-9a-f]{6,40}", name_or_key):
            keys = [r[0] for r in self._db.execute("SELECT key FROM entries WHERE key LIKE ?", (name_or_key + "%",))]
            if len(keys) > 1:
                raise CacheNotFoundError(f"key prefix {name_or_key!r} is ambiguous ({len(keys)} entries): give more of the key")
            key = keys[0] if keys else None
        entry = self._entry(key) if key else None
        if entry is None:
            raise CacheNotFoundError(f"no cache named {name_or_key!r} in {self.root}: build it with `cag build ... --name {name_or_key}` or list caches with `cag ls`")
        return entry

    def entries(self) -> list[Entry]:
        keys = [r[0] for r in self._db.execute("SELECT key FROM entries ORDER BY created")]
        return [e for e in (self._entry(k) for k in keys) if e is not None]

    def token_ids(self, entry: Entry) -> list[int]:
        return self._guarded(entry, lambda path: read_token_ids(path))

    def restore(self, entry: Entry, tokens: int | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> RestoredCache:
        restored = self._guarded(entry, lambda path: load_cache(path, tokens, device=device, dtype=dtype))
        with self._write() as db:
            db.execute("UPDATE entries SET hits=hits+1, last_used=? WHERE key=?", (time.time(), entry.key))
        return restored

    def longest_prefix(self, token_ids: Sequence[int], fingerprint: str, kv_dtype: str) -> PrefixMatch | None:
        hashes = block_hashes(token_ids, chain_seed(fingerprint, kv_dtype, self.block_size), self.block_size)
        if not hashes:
            return None
        # Chained hashes: the deepest matching block names the entries sharing the longest prefix.
        marks = ",".join("?" * len(hashes))
        rows = self._db.execute(
            f"SELECT key, idx FROM blocks WHERE hash IN ({marks}) ORDER BY idx DESC, key LIMIT 8", hashes
        ).fetchall()
        best: PrefixMatch | None = None
        for key, idx in rows:
            if best is not None and idx < rows[0][1]:
                break
            entry = self._entry(key)
            if entry is None:
                continue
            try:
                stored = self.token_ids(entry)
            except (CacheNotFoundError, CorruptCacheError):
                continue  # already dropped or quarantined by _guarded; another row may still serve
            shared = common_prefix_length(stored, token_ids)
            if shared > (best.tokens if best else 0):
                best = PrefixMatch(entry, shared)
        return best

    def verify(self) -> VerifyReport:
        report = VerifyReport()
        known = set()
        for entry in self.entries():
            path = self._path(entry.key)
            known.add(path.name)
            if not path.is_file():
                self._drop(entry.key)
                report.removed_rows.append(entry.key)
                continue
            expected = self._db.execute("SELECT sha256 FROM entries WHERE key=?", (entry.key,)).fetchone()[0]
            if _file_sha256(path) != expected:
                self._quarantine(entry.key, path)
                report.quarantined.append((entry.key, "checksum mismatch"))
            else:
                report.ok.append(entry.key)
        for path in sorted(self.entries_dir.iterdir()):
            if path.name in known:
                continue
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                if time.time() - path.stat().st_mtime > _STALE_TEMP_SECONDS:
                    path.unlink(missing_ok=True)  # left by a build that died; a live one writes fresh files
                continue
            if self._row(path.stem) is None:
                self._quarantine(None, path)
                report.quarantined.append((path.name, "file without an index entry"))
        return report

    # ---------------------------------------------------------------- internal

    def _path(self, key: str) -> Path:
        return self.entries_dir / f"{key}.safetensors"

    def _row(self, key: str) -> tuple | None:
        return self._db.execute("SELECT key FROM entries WHERE key=?", (key,)).fetchone()

    def _entry(self, key: str) -> Entry | None:
        row = self._db.execute(
            "SELECT key, model_name, fingerprint, kv_dtype, tokens, boundary, bytes, created, last_used, hits, sources "
            "FROM entries WHERE key=?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        names = tuple(r[0] for r in self._db.execute("SELECT name FROM names WHERE key=? ORDER BY name", (key,)))
        blocks = self._db.execute("SELECT COUNT(*) FROM blocks WHERE key=?", (key,)).fetchone()[0]
        return Entry(*row[:10], sources=tuple(json.loads(row[10])), names=names, blocks=blocks)

    def _guarded(self, entry: Entry, read):
        """Run a read of an entry's file; a missing file drops the row, a corrupt one is quarantined."""
        path = self._path(entry.key)
        label = entry.names[0] if entry.names else entry.key[:12]
        try:
            return read(path)
        except CacheNotFoundError as exc:
            self._drop(entry.key)
            raise CacheNotFoundError(f"cache {label!r} lost its file and was removed from the index: rebuild it") from exc
        except CorruptCacheError as exc:
            self._quarantine(entry.key, path)
            raise CorruptCacheError(
                f"cache {label!r} is corrupt ({str(exc).removeprefix(f'{path}: ')}); "
                f"moved it to {self.quarantine_dir}: rebuild it with `cag build`"
            ) from exc

    def _drop(self, key: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM entries WHERE key=?", (key,))

    def _quarantine(self, key: str | None, path: Path) -> None:
        if key is not None:
            self._drop(key)
        try:
            self.quarantine_dir.mkdir(exist_ok=True)
            shutil.move(str(path), self.quarantine_dir / f"{path.name}.{int(time.time())}")
        except FileNotFoundError:
            pass  # another process moved it first

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front, so concurrent writers queue."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the store index in {self.root}: {exc}") from exc
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
