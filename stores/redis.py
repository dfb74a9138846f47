"""The Redis store: caches in a Redis server or Redis Cluster that every machine can reach.

Keys, under a prefix (default ``cag:``) so several projects share one Redis::

    cag:{KEY}:meta        hash: the entry (metadata, the cache file's header, block checksums, hits, last use)
    cag:{KEY}:b:I         bytes of checked block I: every layer's keys and values of 256 tokens
    cag:{KEY}:ids         the token ids (int64)
    cag:{KEY}:names       the names pointing to the entry (a reverse index of cag:name:NAME)
    cag:entries           set of every entry's key
    cag:blk:HASH          set of the entries holding that chained block hash (see cag.hashing)
    cag:name:NAME         the key a name points to
    cag:settings          hash: block_size, fixed when the store is first used

The keys of one entry share the hash tag ``{KEY}``, so in a cluster they live in one
slot and one script can publish them atomically. A put writes the blocks under
staging keys that expire (a killed put leaves nothing that lasts), then one Lua
script renames them into place and writes ``meta`` last: an entry is visible only
once all of it is there, and a reader never sees half of one. The global keys
(entries, block index, names) are written after that; a crash between the two
leaves a complete entry that is not yet indexed, which ``verify`` re-indexes.

Every block is checked against its CRC32 (the cache file's own checksums) when it
is read; a block that fails, or that Redis lost, removes the entry, which is then
refused, never loaded. Restored entries are kept in a bounded local copy under
the cache home (a local store, least recently used first out), so the next
restore on this machine reads its disk, not the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import re
import secrets
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit

import numpy as np
import torch
from transformers import DynamicCache

from cag.errors import (
    CacheNotFoundError,
    CagError,
    CorruptCacheError,
    EntryTooBigError,
    StoreAuthError,
    StoreError,
    StoreUnreachableError,
)
from cag.hashing import DEFAULT_BLOCK_SIZE, block_hashes, chain_seed, common_prefix_length, sequence_key
from cag.kvcache import CacheMetadata, RestoredCache, file_blocks, load_cache, save_cache

from .base import Entry, PrefixMatch, VerifyReport, over_budget
from .local import LocalStore, check_matches_entry, validate_name
from .registry import parse_size, redact

try:  # the CRC-32 the cache files use (zlib's); ISA-L computes it faster
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is optional
    from zlib import crc32 as _crc32

__all__ = ["RedisStore", "open_redis_store", "DEFAULT_PREFIX"]

log = logging.getLogger("cag.stores")

DEFAULT_PREFIX = "cag:"
DEFAULT_LOCAL_COPY = 10 << 30
CONNECT_TIMEOUT_S = 3.0
SOCKET_TIMEOUT_S = 10.0  # per read: a server that stops answering fails in seconds, not never
STAGING_TTL_MS = 3600 * 1000  # a put that dies leaves staging keys for at most this long
CHUNK_BYTES = 32 << 20  # bytes sent or fetched per round trip
_PREFIX = re.compile(r"[A-Za-z0-9:_.-]{1,64}")  # no braces: they would override the entries' hash tags
_KEY_PREFIX = re.compile(r"[0-9a-f]{6,40}")
_KEY = re.compile(r"[0-9a-f]{40}")
_OUR_PARAMS = ("prefix", "local_copy", "block_size")
_LISTED = ("key", "model_name", "fingerprint", "kv_dtype", "tokens", "bytes", "created", "last_used",
           "hits", "sources", "blocks")

# Publish: KEYS = meta, then (staging, final) pairs; ARGV = meta's fields and values.
# Every staging key is checked before anything changes, so the script fails whole or not at all.
_PUBLISH = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  for i = 2, #KEYS, 2 do redis.call('DEL', KEYS[i]) end
  return 0
end
for i = 2, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 0 then return redis.error_reply('CAGSTAGING staging key lost: ' .. KEYS[i]) end
end
for i = 2, #KEYS, 2 do
  redis.call('RENAME', KEYS[i], KEYS[i + 1])
  redis.call('PERSIST', KEYS[i + 1])
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
# Delete an entry: KEYS = meta, names, then its data keys; returns {1, names...}, or nil if it was gone.
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local names = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', unpack(KEYS))
table.insert(names, 1, 1)
return names
"""
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'hits', 1)
  redis.call('HSET', KEYS[1], 'last_used', ARGV[1])
end
return 0
"""
_DELETE_IF = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def open_redis_store(url: str, home: Path) -> "RedisStore":
    """The ``redis://`` and ``rediss://`` backend (a cluster node's URL opens the cluster)."""
    return RedisStore.from_url(url, home=home)


class RedisStore:
    """Caches in Redis, indexed by chained block hashes; the same semantics as ``LocalStore``."""

    def __init__(self, client, *, where: str, url: str = "", prefix: str = DEFAULT_PREFIX,
                 block_size: int = DEFAULT_BLOCK_SIZE, local_copy: str | os.PathLike | None = None,
                 local_copy_max: int = DEFAULT_LOCAL_COPY, cluster: bool = False, secret: str | None = None) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise StoreError(f"invalid Redis key prefix {prefix!r}: use up to 64 letters, digits and : _ . - (no braces)")
        self._client = client
        self.where = where
        self.url = redact(url) if url else f"redis://{where}"
        self.prefix = prefix
        self.cluster = cluster
        self._secret = secret
        with self._io():
            self._client.hsetnx(self._g("settings"), "block_size", block_size)
            self.block_size = int(self._client.hget(self._g("settings"), "block_size"))
            self._publish = self._client.register_script(_PUBLISH)
            self._delete = self._client.register_script(_DELETE)
            self._touch_script = self._client.register_script(_TOUCH)
            self._delete_if = self._client.register_script(_DELETE_IF)
        self.local_copy_max = local_copy_max
        self._copy: LocalStore | None = None
        if local_copy is not None and local_copy_max > 0:
            slug = re.sub(r"[^A-Za-z0-9.-]+", "-", f"{where}-{prefix}").strip("-")[:60]
            server = urlsplit(self.url)._replace(query="").geturl()  # the server and database, not the options
            digest = hashlib.sha256(f"{server}|{prefix}|{self.block_size}".encode()).hexdigest()[:10]
            self._copy = LocalStore(Path(local_copy) / f"{slug}-{digest}", block_size=self.block_size)

    @classmethod
    def from_url(cls, url: str, *, home: str | os.PathLike | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 local_copy: bool = True) -> "RedisStore":
        """Connect to ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS).

        Query options of cag's own: ``prefix`` (default ``cag:``), ``local_copy`` (the
        local copy's size limit, e.g. ``2GB``; ``0`` turns it off; default $CAG_LOCAL_COPY
        or 10 GiB), ``block_size``; any other option goes to redis-py (``socket_timeout``...).
        A node of a Redis Cluster is detected and opened with the cluster client.
        """
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = {k: v for k, v in query if k in _OUR_PARAMS}
        theirs = [(k, v) for k, v in query if k not in _OUR_PARAMS]
        client_url = parts._replace(query=urlencode(theirs)).geturl()
        where = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
        prefix = ours.get("prefix", DEFAULT_PREFIX)
        try:
            copy_max = parse_size(ours.get("local_copy") or os.environ.get("CAG_LOCAL_COPY") or str(DEFAULT_LOCAL_COPY))
            block_size = int(ours.get("block_size", block_size))
        except ValueError as exc:
            raise StoreError(f"cannot read the options of store URL {redact(url)!r}: {exc}") from exc
        options = {"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_timeout": SOCKET_TIMEOUT_S}
        options = {k: v for k, v in options.items() if k not in dict(theirs)}
        secret = parts.password or dict(theirs).get("password")
        with _errors(where, secret):
            try:
                client = redis.Redis.from_url(client_url, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1), **options)
            except ValueError as exc:
                raise StoreError(f"cannot read store URL {redact(url)!r}: {exc}") from exc
            cluster = bool(client.info("cluster").get("cluster_enabled"))
            if cluster:
                client.close()
                cluster_url = urlsplit(client_url)
                if cluster_url.path in ("/0", "/"):  # a cluster has database 0 only, and its client takes no path
                    cluster_url = cluster_url._replace(path="")
                client = redis.RedisCluster.from_url(cluster_url.geturl(), **options)
        home_copy = None
        if local_copy:
            from cag.home import cag_home

            home_copy = cag_home(home) / "store-copies"
        return cls(client, where=where, url=url, prefix=prefix, block_size=block_size, local_copy=home_copy,
                   local_copy_max=copy_max, cluster=cluster, secret=secret)

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r})"

    def close(self) -> None:
        self._client.close()
        if self._copy is not None:
            self._copy.close()

    # ------------------------------------------------------------------- keys

    def _g(self, part: str) -> str:
        return f"{self.prefix}{part}"

    def _k(self, key: str, part: str) -> str:
        if not _KEY.fullmatch(key):  # an Entry can be built by hand; its key must not reach other keys
            raise CacheNotFoundError(f"{key!r} is not a cache key")
        return f"{self.prefix}{{{key}}}:{part}"

    # ------------------------------------------------------------------ writes

    def put(self, cache: DynamicCache, token_ids: Sequence[int], metadata: CacheMetadata, *, name: str | None = None) -> Entry:
        if name is not None:
            validate_name(name)
        ids = list(token_ids[: metadata.tokens])
        key = sequence_key(ids, chain_seed(metadata.fingerprint, metadata.kv_dtype, self.block_size), self.block_size)
        with self._io():
            if not self._client.exists(self._k(key, "meta")):
                self._write_entry(key, cache, ids, metadata)
            if name is not None:
                self.label(name, key)
            return self.resolve(key)

    def _write_entry(self, key: str, cache: DynamicCache, ids: list[int], metadata: CacheMetadata) -> None:
        """Write the cache file locally, send its blocks to staging keys, publish them in one script, index them."""
        with self._scratch(key) as path:
            size = save_cache(path, cache, ids, metadata)
            layout = file_blocks(path)
            self._check_fits(key, layout)
            stage = f"stage:{secrets.token_hex(6)}"
            pairs = [(self._k(key, f"{stage}:b:{i}"), self._k(key, f"b:{i}")) for i in range(len(layout.blocks))]
            pairs.append((self._k(key, f"{stage}:ids"), self._k(key, "ids")))
            hashes = block_hashes(ids, chain_seed(metadata.fingerprint, metadata.kv_dtype, self.block_size), self.block_size)
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                try:
                    self._send((staging, _gather(data, ranges)) for (staging, _), ranges in
                               zip(pairs, list(layout.blocks) + [(layout.token_ids,)]))
                    now = time.time()
                    fields = {
                        "key": key, "model_name": metadata.model_name, "fingerprint": metadata.fingerprint,
                        "kv_dtype": metadata.kv_dtype, "tokens": metadata.tokens,
                        "bytes": size, "sources": json.dumps(list(metadata.sources)), "created": now, "last_used": now,
                        "hits": 0, "blocks": len(hashes), "hashes": json.dumps(hashes),
                        "header": bytes(data[: layout.header_size]),
                        "header_sha256": hashlib.sha256(data[: layout.header_size]).hexdigest(),
                        "crc_blocks": len(layout.blocks), "block_crcs": json.dumps(list(layout.block_crcs)),
                        "ids_crc": layout.token_ids_crc,
                    }
                    self._publish(keys=[self._k(key, "meta")] + [k for pair in pairs for k in pair],
                                  args=[x for item in fields.items() for x in item])
                except BaseException:
                    self._forget(staging for staging, _ in pairs)
                    raise
            pipe = self._client.pipeline(transaction=False)
            pipe.hsetnx(self._g("settings"), "block_size", self.block_size)  # again, should Redis have been flushed
            pipe.sadd(self._g("entries"), key)
            for h in hashes:
                pipe.sadd(self._g(f"blk:{h}"), key)
            pipe.execute()
            self._keep_copy(key, path)

    def _send(self, items: Iterable[tuple[str, bytes]]) -> None:
        """SET each staging key (expiring), a few MB per round trip."""
        pipe, queued = self._client.pipeline(transaction=False), 0
        for staging, blob in items:
            pipe.set(staging, blob, px=STAGING_TTL_MS)
            queued += len(blob)
            if queued >= CHUNK_BYTES:
                pipe.execute()
                pipe, queued = self._client.pipeline(transaction=False), 0
        pipe.execute()

    def _forget(self, keys) -> None:
        """Best-effort removal of a failed put's staging keys (they expire anyway)."""
        try:
            keys = list(keys)
            if keys:
                self._client.delete(*keys)
        except Exception:  # noqa: BLE001 - the server may be the reason the put failed
            pass

    def _check_fits(self, key: str, layout) -> None:
        """Refuse, before anything is written, an entry Redis cannot take (a block over its bulk limit, or no memory)."""
        node = self._node(self._k(key, "meta"))
        biggest = max([sum(e - b for b, e in ranges) for ranges in layout.blocks] + [layout.token_ids[1] - layout.token_ids[0]])
        try:
            limit = int(node.config_get("proto-max-bulk-len").get("proto-max-bulk-len", 512 << 20))
        except Exception:  # noqa: BLE001 - CONFIG is often disabled on managed Redis: its default then
            limit = 512 << 20
        if biggest > limit:
            raise EntryTooBigError(
                f"cache of {_size(layout.file_size)} has blocks of {_size(biggest)}, over the {_size(limit)} Redis at "
                f"{self.where} accepts in one value (proto-max-bulk-len); nothing was written: raise proto-max-bulk-len "
                "or store a smaller cache (--kv-dtype int8)"
            )
        memory = node.info("memory")
        cap, used = int(memory.get("maxmemory", 0)), int(memory.get("used_memory", 0))
        evicts = str(memory.get("maxmemory_policy", "noeviction")) != "noeviction"
        if cap and (layout.file_size > cap or (not evicts and used + layout.file_size > cap)):
            raise EntryTooBigError(
                f"cache of {_size(layout.file_size)} does not fit in Redis at {self.where} ({_size(used)} of its maxmemory "
                f"{_size(cap)} in use); nothing was written: free space with `cag gc --max-size ...`, raise maxmemory, "
                "or store a smaller cache (--kv-dtype int8)"
            )

    def _node(self, key: str):
        """A plain client for the server holding ``key`` (the cluster node of its slot)."""
        if not self.cluster:
            return self._client
        return self._client.get_redis_connection(self._client.get_node_from_key(key))

    def label(self, name: str, key: str) -> None:
        validate_name(name)
        with self._io():
            if not self._client.exists(self._k(key, "meta")):
                raise CacheNotFoundError(f"no cache with key {key!r} in Redis at {self.where}: list caches with `cag ls`")
            old = self._client.set(self._g(f"name:{name}"), key, get=True)
            self._client.sadd(self._k(key, "names"), name)
            if old is not None and old.decode() != key and _KEY.fullmatch(old.decode()):
                self._client.srem(self._k(old.decode(), "names"), name)

    def remove(self, name_or_key: str) -> list[Entry]:
        entry = self.resolve(name_or_key)
        with self._io():
            if name_or_key in entry.names:
                self._unname(name_or_key, entry.key)
                after = self._entries([entry.key])
                if after and after[0].names:
                    return []  # other names still point to the entry
            if not self._delete_entry(entry.key):
                return []  # another process removed it meanwhile
        return [entry]

    def gc(self, max_bytes: int) -> list[Entry]:
        victims = over_budget(self.entries(), max_bytes)
        with self._io():
            return [entry for entry in victims if self._delete_entry(entry.key)]

    def _unname(self, name: str, key: str) -> None:
        self._delete_if(keys=[self._g(f"name:{name}")], args=[key])
        self._client.srem(self._k(key, "names"), name)

    def _delete_entry(self, key: str) -> bool:
        """Delete an entry's keys in one script, then its index entries and names."""
        meta = self._client.hmget(self._k(key, "meta"), ["crc_blocks", "hashes"])
        if meta[0] is None:
            self._client.srem(self._g("entries"), key)
            return False
        data = [self._k(key, f"b:{i}") for i in range(int(meta[0]))] + [self._k(key, "ids")]
        result = self._delete(keys=[self._k(key, "meta"), self._k(key, "names")] + data)
        pipe = self._client.pipeline(transaction=False)
        pipe.srem(self._g("entries"), key)
        for h in json.loads(meta[1] or "[]"):
            pipe.srem(self._g(f"blk:{h}"), key)
        pipe.execute()
        for name in (result or [])[1:]:
            self._delete_if(keys=[self._g(f"name:{name.decode()}")], args=[key])
        return result is not None

    # ------------------------------------------------------------------- reads

    def resolve(self, name_or_key: str) -> Entry:
        validate_name(name_or_key)  # keys are valid names too
        with self._io():
            key = self._client.get(self._g(f"name:{name_or_key}"))
            key = key.decode() if key is not None else None
            if key is None and _KEY_PREFIX.fullmatch(name_or_key):
                if _KEY.fullmatch(name_or_key):
                    keys = [name_or_key]
                else:
                    keys = sorted({k.decode() for k in self._client.sscan_iter(self._g("entries"), match=name_or_key + "*", count=1000)})
                if len(keys) > 1:
                    raise CacheNotFoundError(f"key prefix {name_or_key!r} is ambiguous ({len(keys)} entries): give more of the key")
                key = keys[0] if keys else None
            found = self._entries([key]) if key is not None and _KEY.fullmatch(key) else []
        if not found:
            raise CacheNotFoundError(
                f"no cache named {name_or_key!r} in Redis at {self.where}: build it with "
                f"`cag build ... --name {name_or_key}` or list caches with `cag ls`"
            )
        return found[0]

    def entries(self) -> list[Entry]:
        with self._io():
            keys = sorted(k.decode() for k in self._client.smembers(self._g("entries")))
            return sorted(self._entries(keys), key=lambda e: (e.created, e.key))

    def _entries(self, keys: list[str]) -> list[Entry]:
        """The entries of ``keys`` that exist, names checked against the name keys: two round trips."""
        keys = [k for k in keys if _KEY.fullmatch(k)]
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(self._k(key, "meta"), list(_LISTED))
            pipe.smembers(self._k(key, "names"))
        replies = pipe.execute() if keys else []
        rows = [(key, replies[2 * i], sorted(n.decode() for n in replies[2 * i + 1])) for i, key in enumerate(keys)]
        rows = [(key, meta, names) for key, meta, names in rows if meta[0] is not None]
        wanted = [(key, name) for key, _, names in rows for name in names]
        pipe = self._client.pipeline(transaction=False)
        for _, name in wanted:
            pipe.get(self._g(f"name:{name}"))
        pointed = dict(zip(wanted, pipe.execute() if wanted else []))
        out = []
        for key, meta, names in rows:
            f = dict(zip(_LISTED, (v.decode() if v is not None else "" for v in meta)))
            out.append(Entry(
                key=key, model_name=f["model_name"], fingerprint=f["fingerprint"], kv_dtype=f["kv_dtype"],
                tokens=int(f["tokens"] or 0), bytes=int(f["bytes"] or 0),
                created=float(f["created"] or 0), last_used=float(f["last_used"] or 0), hits=int(f["hits"] or 0),
                sources=tuple(json.loads(f["sources"] or "[]")), blocks=int(f["blocks"] or 0),
                names=tuple(n for n in names if pointed.get((key, n)) == key.encode()),
            ))
        return out

    def token_ids(self, entry: Entry) -> list[int]:
        with self._io():
            pipe = self._client.pipeline(transaction=False)
            pipe.get(self._k(entry.key, "ids"))
            pipe.hget(self._k(entry.key, "meta"), "ids_crc")
            raw, crc = pipe.execute()
            if raw is None or crc is None:
                self._lost(entry)
            if _crc32(raw) != int(crc):
                self._corrupt(entry, "the token ids fail their checksum")
            return np.frombuffer(raw, dtype="<i8").tolist()

    def restore(self, entry: Entry, tokens: int | None = None, *, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, check_later: bool = False) -> RestoredCache:
        # check_later is not taken: a damaged local copy is fetched again from Redis, which
        # only a check before returning can do.
        n = entry.tokens if tokens is None else tokens
        if not 0 < n <= entry.tokens:
            raise ValueError(f"cannot restore {n} tokens from a cache of {entry.tokens}")
        start = time.perf_counter()
        restored = self._from_copy(entry, n, device, dtype)
        with self._io():
            if restored is None:
                restored = self._from_redis(entry, n, device, dtype)
            restored.seconds = time.perf_counter() - start
            try:
                self._touch_script(keys=[self._k(entry.key, "meta")], args=[time.time()])
            except Exception:  # noqa: BLE001 - the cache is in memory; a lost hit count is not worth failing for
                pass
        return restored

    def _from_copy(self, entry: Entry, n: int, device, dtype) -> RestoredCache | None:
        if self._copy is None:
            return None
        try:
            local = self._copy.resolve(entry.key)
            return self._copy.restore(local, n, device=device, dtype=dtype)
        except CagError:
            return None  # not there, or dropped there as damaged: fetch it again

    def _from_redis(self, entry: Entry, n: int, device, dtype) -> RestoredCache:
        """Fetch the blocks the first ``n`` tokens need (all of them: into the local copy) and load them."""
        fields = ["header", "header_sha256", "crc_blocks", "block_crcs", "ids_crc", "bytes"]
        meta = dict(zip(fields, self._client.hmget(self._k(entry.key, "meta"), fields)))
        if meta["header"] is None:
            self._lost(entry)
        if hashlib.sha256(meta["header"]).hexdigest() != meta["header_sha256"].decode():
            self._corrupt(entry, "its file header fails its checksum")
        with self._scratch(entry.key) as path:
            with open(path, "wb") as f:
                f.write(meta["header"])
                f.truncate(int(meta["bytes"]))
            layout = file_blocks(path)
            needed = min(len(layout.blocks), math.ceil(n / layout.block_tokens))
            whole = needed == len(layout.blocks)
            crcs = json.loads(meta["block_crcs"])
            fetched = len(meta["header"])
            with open(path, "r+b") as f:
                keys = [self._k(entry.key, f"b:{i}") for i in range(needed)] + [self._k(entry.key, "ids")]
                spans = list(layout.blocks[:needed]) + [(layout.token_ids,)]
                expected = crcs[:needed] + [int(meta["ids_crc"])]
                per = max(1, CHUNK_BYTES // max(1, layout.file_size // max(1, len(layout.blocks))))
                for begin in range(0, len(keys), per):
                    blobs = self._client.mget(keys[begin : begin + per])
                    for i, blob in enumerate(blobs, begin):
                        if blob is None:
                            self._lost(entry)
                        if _crc32(blob) != expected[i]:
                            what = "its token ids fail" if i == len(keys) - 1 else f"block {i} fails"
                            self._corrupt(entry, f"{what} their checksum")
                        _scatter(f.fileno(), blob, spans[i])
                        fetched += len(blob)
            if whole and self._copy is not None:
                self._keep_copy(entry.key, path)
                restored = self._from_copy(entry, n, device, dtype)
                if restored is not None:
                    restored.bytes_read = fetched
                    return restored
            restored = load_cache(path, n, device=device, dtype=dtype)
        check_matches_entry(restored.metadata, entry, f"Redis at {self.where}")
        restored.bytes_read = fetched
        return restored

    @contextmanager
    def _scratch(self, key: str) -> Iterator[Path]:
        """A fresh file for one entry: a staging file of the local copy (adopted there or removed), else a temp file."""
        if self._copy is not None:
            path = self._copy.staging_path(key)
        else:
            fd, name = tempfile.mkstemp(prefix=f".cag-{key[:12]}.", suffix=".tmp")
            os.close(fd)
            path = Path(name)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)  # a restored cache may map it: unlinking leaves the mapping intact

    def _keep_copy(self, key: str, path: Path) -> None:
        """Adopt a complete file into the local copy (a hard link, so ``path`` stays), then bound the copy."""
        if self._copy is None:
            return
        link = self._copy.staging_path(key)
        try:
            os.link(path, link)
            self._copy.adopt(link, key)
            self._copy.gc(self.local_copy_max)
        except (OSError, CagError) as exc:
            link.unlink(missing_ok=True)
            log.warning("cannot keep a local copy of cache %s from %s: %s", key[:12], self.url, exc)

    def longest_prefix(self, token_ids: Sequence[int], fingerprint: str, kv_dtype: str) -> PrefixMatch | None:
        hashes = block_hashes(token_ids, chain_seed(fingerprint, kv_dtype, self.block_size), self.block_size)
        if not hashes:
            return None
        with self._io():
            # As in LocalStore: the deepest stored block names every entry sharing the longest
            # prefix; look further down only if all of those turn out to be gone or damaged.
            depth = self._deepest_stored_block(hashes)
            tried: set[str] = set()
            while depth >= 0:
                keys = sorted(k.decode() for k in self._client.smembers(self._g(f"blk:{hashes[depth]}")))
                found = {e.key: e for e in self._entries([k for k in keys if k not in tried])}
                stale = [k for k in keys if k not in tried and k not in found]
                if stale:  # removed entries whose index cleanup did not finish
                    self._client.srem(self._g(f"blk:{hashes[depth]}"), *stale)
                best = self._best_of(token_ids, [found[k] for k in sorted(found)], depth)
                if best is not None:
                    return best
                tried.update(keys)
                depth -= 1
        return None

    def _deepest_stored_block(self, hashes: list[str], fan: int = 32) -> int:
        """Index of the last of ``hashes`` in the index, -1 if none: a search probing ``fan`` blocks per round trip.

        Every block of an entry's prefix is indexed, so the stored blocks are a prefix of
        ``hashes``: log_fan(blocks) pipelined rounds of EXISTS find its end.
        """
        found, missing = -1, len(hashes)
        while missing - found > 1:
            step = (missing - found) / (fan + 1)
            probes = sorted({min(missing - 1, max(found + 1, int(found + step * (i + 1)))) for i in range(fan)})
            pipe = self._client.pipeline(transaction=False)
            for i in probes:
                pipe.exists(self._g(f"blk:{hashes[i]}"))
            for i, present in zip(probes, pipe.execute()):
                if present:
                    found = i
                else:
                    missing = i
                    break
        return found

    def _best_of(self, token_ids: Sequence[int], entries: list[Entry], depth: int) -> PrefixMatch | None:
        ceiling = min(len(token_ids), (depth + 2) * self.block_size - 1)
        best: PrefixMatch | None = None
        for entry in entries:
            if best is not None and min(entry.tokens, ceiling) <= best.tokens:
                continue
            try:
                stored = self.token_ids(entry)
            except (CacheNotFoundError, CorruptCacheError):
                continue  # removed as lost or damaged; another entry may still serve
            shared = common_prefix_length(stored, token_ids)
            if shared > (best.tokens if best else 0):
                best = PrefixMatch(entry, shared)
                if shared >= ceiling:
                    break
        return best

    def verify(self) -> VerifyReport:
        """Check every entry's blocks against their checksums (removing what fails), and repair the index."""
        report = VerifyReport()
        with self._io():
            listed = {k.decode() for k in self._client.smembers(self._g("entries"))}
            for key in sorted(self._orphans(listed)):
                self._reindex(key)
                report.reindexed.append(key)
                listed.add(key)
            for key in sorted(listed):
                found = self._entries([key])
                if not found:
                    self._client.srem(self._g("entries"), key)
                    report.removed_rows.append(key)
                    continue
                try:
                    self._check_all(found[0])
                except CorruptCacheError:
                    report.quarantined.append((key, "checksum mismatch"))
                except CacheNotFoundError:
                    report.removed_rows.append(key)
                else:
                    report.ok.append(key)
        return report

    def _orphans(self, listed: set[str]) -> set[str]:
        """Complete entries missing from the entries set (a put that died after publishing)."""
        pattern = f"{self.prefix}{{*}}:meta"
        found = {k.decode()[len(self.prefix) + 1 : len(self.prefix) + 41] for k in self._client.scan_iter(match=pattern, count=1000)}
        return {k for k in found if _KEY.fullmatch(k)} - listed

    def _reindex(self, key: str) -> None:
        hashes = json.loads(self._client.hget(self._k(key, "meta"), "hashes") or "[]")
        pipe = self._client.pipeline(transaction=False)
        pipe.sadd(self._g("entries"), key)
        for h in hashes:
            pipe.sadd(self._g(f"blk:{h}"), key)
        pipe.execute()
        for name in self._client.smembers(self._k(key, "names")):
            self._client.set(self._g(f"name:{name.decode()}"), key, nx=True)

    def _check_all(self, entry: Entry) -> None:
        """Fetch and check every block of an entry, a chunk at a time."""
        fields = ["header", "header_sha256", "crc_blocks", "block_crcs", "ids_crc"]
        meta = dict(zip(fields, self._client.hmget(self._k(entry.key, "meta"), fields)))
        if meta["header"] is None:
            self._lost(entry)
        if hashlib.sha256(meta["header"]).hexdigest() != meta["header_sha256"].decode():
            self._corrupt(entry, "its file header fails its checksum")
        keys = [self._k(entry.key, f"b:{i}") for i in range(int(meta["crc_blocks"]))] + [self._k(entry.key, "ids")]
        expected = json.loads(meta["block_crcs"]) + [int(meta["ids_crc"])]
        per = max(1, CHUNK_BYTES // max(1, entry.bytes // len(keys)))
        for begin in range(0, len(keys), per):
            for i, blob in enumerate(self._client.mget(keys[begin : begin + per]), begin):
                if blob is None:
                    self._lost(entry)
                if _crc32(blob) != expected[i]:
                    self._corrupt(entry, f"block {i} fails its checksum")

    # ---------------------------------------------------------------- internal

    def _label(self, entry: Entry) -> str:
        return entry.names[0] if entry.names else entry.key[:12]

    def _lost(self, entry: Entry):
        """An entry Redis lost all or part of (flushed, restarted, evicted): drop what is left, refuse it."""
        self._delete_entry(entry.key)
        raise CacheNotFoundError(
            f"cache {self._label(entry)!r} is no longer (wholly) in Redis at {self.where} (flushed, restarted or "
            "evicted?); removed what was left: rebuild it with `cag build`"
        )

    def _corrupt(self, entry: Entry, what: str):
        self._delete_entry(entry.key)
        raise CorruptCacheError(
            f"cache {self._label(entry)!r} in Redis at {self.where} is corrupt ({what}); removed it: "
            "rebuild it with `cag build`"
        )

    def _io(self):
        return _errors(self.where, self._secret)


@contextmanager
def _errors(where: str, secret: str | None) -> Iterator[None]:
    """Redis errors as one clear line naming the server (never the password)."""
    from redis import exceptions as rex

    def reason(exc: BaseException) -> str:
        text = (str(exc).splitlines() or [""])[0].strip() or type(exc).__name__
        return (text.replace(secret, "***") if secret else text)[:200]

    try:
        yield
    except CagError:
        raise
    except rex.AuthenticationError as exc:
        if not secret:
            raise StoreAuthError(f"Redis at {where} needs a password, and the store URL gives none: put it in the URL, "
                                 f"redis://:PASSWORD@{where}/0, given as --store or $CAG_STORE") from exc
        raise StoreAuthError(f"Redis at {where} refused the password in the store URL ({reason(exc)}): fix it in "
                             f"redis://[USER]:PASSWORD@{where}/0, given as --store or $CAG_STORE") from exc
    except rex.OutOfMemoryError as exc:
        raise EntryTooBigError(
            f"Redis at {where} ran out of memory (maxmemory) while storing; nothing was published: free space "
            "with `cag gc --max-size ...` or raise maxmemory"
        ) from exc
    except (rex.ConnectionError, rex.TimeoutError, rex.ClusterDownError, rex.RedisClusterException) as exc:
        raise StoreUnreachableError(
            f"cannot reach Redis at {where} ({reason(exc)}): start redis-server there, or point --store / $CAG_STORE "
            "at a running one"
        ) from exc
    except rex.RedisError as exc:
        raise StoreError(f"Redis at {where} refused a command ({reason(exc)})") from exc
    except OSError as exc:  # this machine's side: the scratch files and the local copy under the cache home
        raise StoreError(f"cannot write the local files of the Redis store at {where}: {exc.strerror or exc}; "
                         "set CAG_HOME to a writable folder") from exc


def _gather(data: mmap.mmap, ranges) -> bytes:
    return b"".join(data[b:e] for b, e in ranges)


def _scatter(fd: int, blob: bytes, ranges) -> None:
    view, at = memoryview(blob), 0
    for b, e in ranges:
        os.pwrite(fd, view[at : at + e - b], b)
        at += e - b


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
