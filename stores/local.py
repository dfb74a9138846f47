"""The local disk store: one safetensors file per entry and a SQLite index.

Layout under the store folder::

    index.sqlite          entries, their block hashes, names, sizes, last use, hits
    entries/<key>.safetensors
    quarantine/           files that failed a check, kept for inspection

    settings.json         the block size, kept beside the index so a rebuilt index keeps it

Files are named by content key, never by a user's name, so no name can reach a path.
A new entry is written to a staging file first, outside any lock; the rename into
place and the index row then happen under the index's write lock, in one
transaction. So a crash leaves at worst a staging file (removed by ``verify`` once
stale) or a complete file without a row, never a row pointing to a missing or
partial file. Every change to ``entries/`` (rename in, unlink, quarantine) happens
under that lock, so processes never undo each other.

A file describes itself, names included (they are written into its header when they
change), so the index can always be rebuilt: a valid file without a row is indexed
again from its header by ``verify``, and a lost or unreadable ``index.sqlite`` is
rebuilt from the files when the store is next opened. Only files that fail their
checks go to quarantine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar
from urllib.parse import urlsplit
from urllib.request import url2pathname

import torch
from transformers import DynamicCache

from cag.errors import CacheNotFoundError, CagError, CorruptCacheError, InvalidNameError, StoreError
from cag.hashing import DEFAULT_BLOCK_SIZE, block_hashes, chain_seed, common_prefix_length, sequence_key
from cag.kvcache import (
    CacheMetadata,
    RestoredCache,
    fsync_dir,
    load_cache,
    read_metadata,
    read_token_ids,
    save_cache,
    write_names,
)

from .base import Entry, PrefixMatch, VerifyReport, over_budget

__all__ = ["LocalStore", "open_file_store", "validate_name"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,127}")  # used with fullmatch: '$' would admit a trailing newline
_KEY_PREFIX = re.compile(r"[0-9a-f]{6,40}")
_KEY = re.compile(r"[0-9a-f]{40}")
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
_T = TypeVar("_T")


def validate_name(name: str) -> str:
    """A cache name: letters, digits and ``._+@-``, starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid cache name {name!r}: use letters, digits and . _ + @ - (start with a letter or digit, no '..', "
            "at most 128 characters)"
        )
    return name


def open_file_store(url: str, home: Path) -> "LocalStore":
    """The ``file://`` backend: ``file:///path/to/store``; ``file://`` alone is the store under the cache home."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise StoreError(f"file store URL {url!r} names host {parts.netloc!r}: use file:///ABSOLUTE/PATH (three slashes)")
    path = url2pathname(parts.path)
    return LocalStore(Path(path) if path.strip("/") else Path(home) / "store")


class LocalStore:
    """Caches on this machine's disk, indexed by chained block hashes in SQLite."""

    def __init__(self, root: str | os.PathLike, *, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        self.root = Path(root).expanduser()
        self.entries_dir = self.root / "entries"
        self.quarantine_dir = self.root / "quarantine"
        self._undo: list[Callable[[], None]] = []
        self._cleanup: list[Callable[[], None]] = []
        try:
            self.entries_dir.mkdir(parents=True, exist_ok=True)
            fresh = self._open_index()
            settings = self.root / "settings.json"
            if fresh and settings.is_file():
                block_size = int(json.loads(settings.read_text())["block_size"])  # the files' keys were made with it
            with self._write() as db:
                db.execute("INSERT OR IGNORE INTO settings VALUES ('block_size', ?)", (str(block_size),))
            self.block_size = int(self._db.execute("SELECT value FROM settings WHERE key='block_size'").fetchone()[0])
            if not settings.is_file():
                _write_atomically(settings, json.dumps({"block_size": self.block_size}) + "\n")
        except (OSError, sqlite3.Error, ValueError, KeyError) as exc:
            raise StoreError(f"cannot open the cache store at {self.root}: {exc}; set CAG_HOME to a writable folder") from exc
        if fresh:
            self._recover(VerifyReport())

    def _open_index(self) -> bool:
        """Connect to the index, creating it, or rebuilding it if unreadable; True if it starts empty."""
        path = self.root / "index.sqlite"
        fresh = not path.exists()
        try:
            self._connect(path)
            if self._db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            self._db.close()
            for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                if part.exists():
                    self._move_to_quarantine(part)  # kept for inspection; the files hold all it held
            self._connect(path)
            fresh = True
        return fresh

    def _connect(self, path: Path) -> None:
        self._db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=60000")
        with self._write() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ writes

    def put(self, cache: DynamicCache, token_ids: Sequence[int], metadata: CacheMetadata, *, name: str | None = None) -> Entry:
        if name is not None:
            validate_name(name)
        ids = list(token_ids[: metadata.tokens])
        seed = chain_seed(metadata.fingerprint, metadata.kv_dtype, self.block_size)
        key = sequence_key(ids, seed, self.block_size)
        if not self._complete(key):
            self._write_entry(key, cache, ids, replace(metadata, names=(name,) if name else ()))
        if name is not None:
            self.label(name, key)
        return self.resolve(key)

    def _write_entry(self, key: str, cache: DynamicCache, ids: list[int], metadata: CacheMetadata) -> None:
        """Write the file outside the lock (it can take seconds), then publish it under the lock.

        Two processes building the same key both write a staging file; the first to take
        the lock renames its file into place and adds the row, the second finds the entry
        complete and throws its copy away. The lock is held for a rename and an insert only.
        """
        staging = self.staging_path(key)
        try:
            size = save_cache(staging, cache, ids, metadata)
            self._publish(key, staging, metadata, ids, size, _file_sha256(staging))
        finally:
            staging.unlink(missing_ok=True)

    def staging_path(self, key: str) -> Path:
        """A fresh path in the store's folder for writing a cache file that ``adopt`` then publishes."""
        self._path(key)  # a key only
        return self.entries_dir / f".{key}.{uuid.uuid4().hex[:12]}.staging.tmp"

    def adopt(self, staging: str | os.PathLike, key: str | None = None) -> Entry:
        """Publish a complete cache file written at ``staging_path(key)`` (by another store, say).

        The file is checked in full first (header, every block checksum, token ids) and
        must hold ``key``'s content; CorruptCacheError otherwise. The staging file is gone afterwards.
        """
        staging = Path(staging)
        try:
            metadata, ids, size, checksum = _check_file(staging)
            found = sequence_key(ids, chain_seed(metadata.fingerprint, metadata.kv_dtype, self.block_size), self.block_size)
            if key is not None and found != key:
                raise CorruptCacheError(f"{staging}: holds cache {found[:12]}, not {key[:12]}")
            self._publish(found, staging, metadata, ids, size, checksum)
            return self.resolve(found)
        finally:
            staging.unlink(missing_ok=True)

    def _publish(self, key: str, staging: Path, metadata: CacheMetadata, ids: list[int], size: int, checksum: str) -> None:
        """Rename a staged file into place and index it, in one locked step (unless the key is complete already)."""
        with self._write() as db:
            if self._complete(key):
                return
            final = self._path(key)
            os.replace(staging, final)
            self._undo.append(lambda: final.unlink(missing_ok=True))
            fsync_dir(self.entries_dir)
            now = time.time()
            self._insert_row(db, key, metadata, ids, size, checksum, now, now)

    def _insert_row(self, db: sqlite3.Connection, key: str, metadata: CacheMetadata, ids: list[int], size: int,
                    checksum: str, created: float, last_used: float) -> None:
        db.execute(
            "INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,0) ON CONFLICT(key) DO UPDATE SET "
            "bytes=excluded.bytes, sha256=excluded.sha256, created=excluded.created, last_used=excluded.last_used",
            (key, metadata.model_name, metadata.fingerprint, metadata.kv_dtype, metadata.tokens,
             metadata.tokens, size, checksum, json.dumps(list(metadata.sources)), created, last_used),
        )
        hashes = block_hashes(ids, chain_seed(metadata.fingerprint, metadata.kv_dtype, self.block_size), self.block_size)
        db.executemany("INSERT OR IGNORE INTO blocks VALUES (?,?,?)", [(h, key, i) for i, h in enumerate(hashes)])

    def label(self, name: str, key: str) -> None:
        validate_name(name)
        with self._write() as db:
            if self._row(key) is None:
                raise CacheNotFoundError(f"no cache with key {key!r} in {self.root}: list caches with `cag ls`")
            before = db.execute("SELECT key FROM names WHERE name=?", (name,)).fetchone()
            db.execute("INSERT OR REPLACE INTO names VALUES (?,?,?)", (name, key, time.time()))
            self._write_header_names(db, key)
            if before is not None and before[0] != key:
                self._write_header_names(db, before[0])

    def remove(self, name_or_key: str) -> list[Entry]:
        entry = self.resolve(name_or_key)
        with self._write() as db:
            if name_or_key in entry.names:
                db.execute("DELETE FROM names WHERE name=?", (name_or_key,))
                if db.execute("SELECT 1 FROM names WHERE key=? LIMIT 1", (entry.key,)).fetchone():
                    self._write_header_names(db, entry.key)
                    return []  # other names still point to the entry
            if not self._delete_entry(entry.key):
                return []  # another process removed it meanwhile
        return [entry]

    def gc(self, max_bytes: int) -> list[Entry]:
        removed = []
        for entry in over_budget(self.entries(), max_bytes):
            with self._write():
                if self._delete_entry(entry.key):
                    removed.append(entry)
        return removed

    # ------------------------------------------------------------------- reads

    def resolve(self, name_or_key: str) -> Entry:
        validate_name(name_or_key)  # keys are valid names too; anything else can name nothing here
        row = self._db.execute("SELECT key FROM names WHERE name=?", (name_or_key,)).fetchone()
        key = row[0] if row else None
        if key is None and _KEY_PREFIX.fullmatch(name_or_key):
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

    def restore(self, entry: Entry, tokens: int | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                check_later: bool = False) -> RestoredCache:
        def read(path: Path) -> RestoredCache:
            restored = load_cache(path, tokens, device=device, dtype=dtype, check_later=check_later)
            check_matches_entry(restored.metadata, entry, path)
            if restored.pending is not None:
                seen = _file_id(path)
                # A failed background check quarantines the file as a failed restore would.
                restored.pending.guard = lambda wait: self._guarded(entry, lambda _: wait(), seen=seen)
            return restored

        restored = self._guarded(entry, read)
        try:
            with self._write() as db:
                db.execute("UPDATE entries SET hits=hits+1, last_used=? WHERE key=?", (time.time(), entry.key))
        except StoreError:
            pass  # the cache is already in memory; a lost hit count is not worth failing the restore
        return restored

    def longest_prefix(self, token_ids: Sequence[int], fingerprint: str, kv_dtype: str) -> PrefixMatch | None:
        hashes = block_hashes(token_ids, chain_seed(fingerprint, kv_dtype, self.block_size), self.block_size)
        if not hashes:
            return None
        # Chained hashes: a hash matches at its own position only, and the deepest matching
        # block names every entry sharing the longest prefix. Each such entry shares
        # between (depth+1) blocks and one token short of (depth+2) blocks, so no entry
        # at a shallower depth can beat one at the deepest: look further down only when
        # every entry at the deepest block turned out to be lost or corrupt.
        depth = self._deepest_stored_block(hashes)
        tried: set[str] = set()
        while depth >= 0:
            keys = [r[0] for r in self._db.execute("SELECT key FROM blocks WHERE hash=? ORDER BY key", (hashes[depth],))]
            best = self._best_of(token_ids, [k for k in keys if k not in tried], depth)
            if best is not None:
                return best
            tried.update(keys)
            depth -= 1
        return None

    def _deepest_stored_block(self, hashes: list[str]) -> int:
        """Index of the last of ``hashes`` found in the index, -1 if none: a binary search.

        An entry stores every block hash of its prefix, so if block i is stored, so is
        every block before it; a few indexed point queries find the deepest one, for
        prompts of any length (no IN list to outgrow SQLite's parameter limit).
        """
        found, missing = -1, len(hashes)
        while missing - found > 1:
            mid = (found + missing) // 2
            if self._db.execute("SELECT 1 FROM blocks WHERE hash=? LIMIT 1", (hashes[mid],)).fetchone():
                found = mid
            else:
                missing = mid
        return found

    def _best_of(self, token_ids: Sequence[int], keys: list[str], depth: int) -> PrefixMatch | None:
        """The candidate whose stored tokens share the most with ``token_ids`` (confirmed token by token)."""
        ceiling = min(len(token_ids), (depth + 2) * self.block_size - 1)
        best: PrefixMatch | None = None
        for key in keys:
            entry = self._entry(key)
            if entry is None or (best is not None and min(entry.tokens, ceiling) <= best.tokens):
                continue
            try:
                stored = self.token_ids(entry)
            except (CacheNotFoundError, CorruptCacheError):
                continue  # already dropped or quarantined by _guarded; another entry may still serve
            shared = common_prefix_length(stored, token_ids)
            if shared > (best.tokens if best else 0):
                best = PrefixMatch(entry, shared)
                if shared >= ceiling:
                    break  # nothing can share more
        return best

    def path(self, entry: Entry) -> Path:
        """The file holding ``entry`` on this machine (for tools that time or inspect it; read it through ``restore``)."""
        return self._path(entry.key)

    def verify(self) -> VerifyReport:
        report = VerifyReport()
        # Hashing every file can take long, so it runs without the lock; each finding is
        # acted on under the lock, and only if the file is still the one that was checked.
        for entry in self.entries():
            path = self._path(entry.key)
            seen = _file_id(path)
            if seen is None:
                if self._drop_if_missing(entry.key):
                    report.removed_rows.append(entry.key)
                continue
            row = self._db.execute("SELECT sha256 FROM entries WHERE key=?", (entry.key,)).fetchone()
            if row is None:
                continue  # removed meanwhile
            if _file_sha256(path) != row[0]:
                if self._quarantine(entry.key, path, seen):
                    report.quarantined.append((entry.key, "checksum mismatch"))
            else:
                report.ok.append(entry.key)
        self._recover(report)  # cache files without a row: indexed again from their headers, if they pass
        with self._write():
            for path in sorted(self.entries_dir.iterdir()):
                if path.name.startswith(".") and path.name.endswith(".tmp"):
                    seen = _file_id(path)  # builds stage files without the lock: this one may be gone already
                    if seen is not None and time.time() - seen[2] / 1e9 > _STALE_TEMP_SECONDS:
                        path.unlink(missing_ok=True)  # left by a build that died; a live one writes fresh files
                    continue
                if path.suffix != ".safetensors" or not _KEY.fullmatch(path.stem):
                    self._move_to_quarantine(path)
                    report.quarantined.append((path.name, "not a cache file"))
        return report

    def _recover(self, report: VerifyReport) -> None:
        """Index every cache file the index lacks, from the file itself; quarantine those failing their checks.

        Looked for under the lock (a build publishes its file and its row in one locked
        step, so outside it a file could be caught between the two), checked without it
        (that reads every byte), and indexed under it again if the file is still the one
        checked and still lacks a row. Of two files claiming a name, the newer keeps it.
        """
        with self._write():
            orphans = [(p, _file_id(p)) for p in sorted(self.entries_dir.glob("*.safetensors"))
                       if _KEY.fullmatch(p.stem) and self._row(p.stem) is None]
        checked = []
        for path, seen in orphans:
            try:
                metadata, ids, size, checksum = _check_file(path)
            except CorruptCacheError as exc:
                checked.append((path, seen, None, str(exc).removeprefix(f"{path}: ")))
                continue
            except CagError:
                continue  # gone meanwhile, or unreadable: left as it is
            key = sequence_key(ids, chain_seed(metadata.fingerprint, metadata.kv_dtype, self.block_size), self.block_size)
            found = (metadata, ids, size, checksum) if key == path.stem else None
            checked.append((path, seen, found, None if found else "file name does not match its content"))
        with self._write() as db:
            for path, seen, found, reason in sorted(checked, key=lambda item: item[1][2] if item[1] else 0):
                if self._row(path.stem) is not None or _file_id(path) != seen:
                    continue  # indexed or replaced meanwhile
                if found is None:
                    self._move_to_quarantine(path)
                    report.quarantined.append((path.name, reason))
                    continue
                metadata, ids, size, checksum = found
                mtime = seen[2] / 1e9
                self._insert_row(db, path.stem, metadata, ids, size, checksum, _timestamp(metadata.created, mtime), mtime)
                for name in metadata.names:
                    held = db.execute("SELECT created FROM names WHERE name=?", (name,)).fetchone()
                    if _NAME.fullmatch(name) and ".." not in name and (held is None or held[0] < mtime):
                        db.execute("INSERT OR REPLACE INTO names VALUES (?,?,?)", (name, path.stem, mtime))
                report.reindexed.append(path.stem)

    def _write_header_names(self, db: sqlite3.Connection, key: str) -> None:
        """Put the entry's names, as the index has them, into its file's header (a copy renamed over it); call under the lock."""
        path = self._path(key)
        names = tuple(r[0] for r in db.execute("SELECT name FROM names WHERE key=? ORDER BY name", (key,)))
        try:
            if read_metadata(path).names == names:
                return
        except CagError:
            return  # a lost or damaged file: reads and verify deal with it
        staging = self.staging_path(key)
        previous = self.entries_dir / f".{key}.{uuid.uuid4().hex[:12]}.previous.tmp"
        try:
            size = write_names(path, staging, names)
            checksum = _file_sha256(staging)
            os.link(path, previous)  # so a failed commit can put the file back as the index knows it
            self._cleanup.append(lambda: previous.unlink(missing_ok=True))
            os.replace(staging, path)
            self._undo.append(lambda: os.replace(previous, path))
            db.execute("UPDATE entries SET bytes=?, sha256=? WHERE key=?", (size, checksum, key))
        except OSError as exc:
            raise StoreError(f"cannot write the names of cache {key[:12]} into {path}: {exc.strerror or exc}") from exc
        finally:
            staging.unlink(missing_ok=True)

    # ---------------------------------------------------------------- internal

    def _path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):  # an Entry can be built by hand; its key must not become a path elsewhere
            raise CacheNotFoundError(f"{key!r} is not a cache key")
        return self.entries_dir / f"{key}.safetensors"

    def _row(self, key: str) -> tuple | None:
        return self._db.execute("SELECT key FROM entries WHERE key=?", (key,)).fetchone()

    def _entry(self, key: str) -> Entry | None:
        row = self._db.execute(
            "SELECT key, model_name, fingerprint, kv_dtype, tokens, bytes, created, last_used, hits, sources "
            "FROM entries WHERE key=?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        names = tuple(r[0] for r in self._db.execute("SELECT name FROM names WHERE key=? ORDER BY name", (key,)))
        blocks = self._db.execute("SELECT COUNT(*) FROM blocks WHERE key=?", (key,)).fetchone()[0]
        return Entry(*row[:9], sources=tuple(json.loads(row[9])), names=names, blocks=blocks)

    def _complete(self, key: str) -> bool:
        return self._row(key) is not None and self._path(key).is_file()

    def _guarded(self, entry: Entry, read: Callable[[Path], _T], seen: tuple | None = None) -> _T:
        """Run a read of an entry's file; a missing file drops the row, a corrupt one is quarantined.

        ``seen``: the file's identity when it was opened, if that was earlier (a background check)."""
        path = self._path(entry.key)
        label = entry.names[0] if entry.names else entry.key[:12]
        seen = _file_id(path) if seen is None else seen
        try:
            return read(path)
        except CacheNotFoundError as exc:
            self._drop_if_missing(entry.key)
            raise CacheNotFoundError(f"cache {label!r} lost its file and was removed from the index: rebuild it") from exc
        except CorruptCacheError as exc:
            self._quarantine(entry.key, path, seen)
            raise CorruptCacheError(
                f"cache {label!r} is corrupt ({exc}); moved it to {self.quarantine_dir}: rebuild it with `cag build`"
            ) from exc

    def _delete_entry(self, key: str) -> bool:
        """Delete an entry's row and file; call under the write lock."""
        deleted = self._db.execute("DELETE FROM entries WHERE key=?", (key,)).rowcount > 0
        if deleted:
            self._path(key).unlink(missing_ok=True)
        return deleted

    def _drop_if_missing(self, key: str) -> bool:
        """Drop the row of an entry whose file is gone, unless a build has put the file back meanwhile."""
        with self._write() as db:
            if self._path(key).exists():
                return False
            return db.execute("DELETE FROM entries WHERE key=?", (key,)).rowcount > 0

    def _quarantine(self, key: str, path: Path, seen: tuple | None) -> bool:
        """Move a corrupt entry's file aside and drop its row, if the file is still the one found corrupt."""
        with self._write() as db:
            if seen is not None and _file_id(path) not in (seen, None):
                return False  # replaced by a fresh build since it was read
            db.execute("DELETE FROM entries WHERE key=?", (key,))
            self._move_to_quarantine(path)
        return True

    def _move_to_quarantine(self, path: Path) -> None:
        try:
            self.quarantine_dir.mkdir(exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%S")
            shutil.move(str(path), self.quarantine_dir / f"{path.name}.{stamp}-{uuid.uuid4().hex[:6]}")
        except FileNotFoundError:
            pass  # another process moved it first

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front, so concurrent writers queue.

        Callables appended to ``self._undo`` inside the block run, still under the lock,
        if the block or its commit fails: they take back file changes the rollback cannot.
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the store index in {self.root}: {exc}") from exc
        self._undo, self._cleanup = [], []
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as exc:
            for undo in reversed(self._undo):
                undo()
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot write the store index in {self.root}: {exc}") from exc
            raise
        finally:
            for cleanup in self._cleanup:
                cleanup()
            self._undo, self._cleanup = [], []


def _check_file(path: Path) -> tuple[CacheMetadata, list[int], int, str]:
    """A cache file checked in full (header, every block checksum, token ids): its metadata, ids, size, sha256."""
    restored = load_cache(path)
    ids = read_token_ids(path)
    del restored
    return read_metadata(path), ids, path.stat().st_size, _file_sha256(path)


def check_matches_entry(meta: CacheMetadata, entry: Entry, where: object) -> None:
    """A file's own header must agree with its index entry (the header has no checksum of its own)."""
    for field_name in ("fingerprint", "kv_dtype", "tokens"):
        if getattr(meta, field_name) != getattr(entry, field_name):
            raise CorruptCacheError(f"{where}: header {field_name} does not match the store index")


def _timestamp(iso: str, default: float) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp() if iso else default
    except ValueError:
        return default


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _file_id(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
