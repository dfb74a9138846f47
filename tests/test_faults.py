"""Faults: truncated or flipped files, lost files, stray files, bad headers, interrupted writes.

Each gives a clear error (never a load of bad data) and leaves the store usable.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cag.kvcache as kvcache
from cag.errors import CacheNotFoundError, CorruptCacheError, StoreError
from cag.kvcache import MAX_HEADER_BYTES, CacheMetadata, cache_from_layers, load_cache, read_token_ids
from cag.stores import LocalStore
from conftest import header_of, rewrite_header

FP = "f" * 64


def fake_cache(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return cache_from_layers([(torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g)) for _ in range(2)])


def meta(n: int) -> CacheMetadata:
    return CacheMetadata(model_name="fake", fingerprint=FP, tokenizer_hash="t" * 64, kv_dtype="float32",
                         tokens=n, num_layers=2)


def put(store: LocalStore, ids: list[int], name: str | None = None, seed: int = 0):
    return store.put(fake_cache(len(ids), seed), ids, meta(len(ids)), name=name)


@pytest.fixture
def store(tmp_path):
    s = LocalStore(tmp_path / "store", block_size=4)
    yield s
    s.close()


@pytest.fixture
def two(store):
    """A healthy entry that must survive, and a victim entry to damage (600 tokens: three CRC blocks)."""
    keep = put(store, list(range(1000, 1012)), name="keep", seed=1)
    victim = put(store, [7 + i % 50 for i in range(600)], name="victim", seed=2)
    return keep, victim


def file_of(store: LocalStore, entry) -> Path:
    return store.path(entry)


def data_start(path: Path) -> int:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n


def tensor_span(path: Path, name: str) -> tuple[int, int]:
    begin, end = header_of(path)[name]["data_offsets"]
    return data_start(path) + begin, data_start(path) + end


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def quarantined(store: LocalStore) -> list[str]:
    folder = store.root / "quarantine"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def assert_still_usable(store: LocalStore, keep, victim_key: str | None = None) -> None:
    """The healthy entry loads, new entries can be written, and the damaged key can be rebuilt."""
    assert store.restore(store.resolve("keep")).token_ids == list(range(1000, 1012))
    fresh = put(store, list(range(2000, 2009)), name="fresh")
    assert store.restore(fresh, 5).cache.get_seq_length() == 5
    if victim_key is not None:
        rebuilt = put(store, [7 + i % 50 for i in range(600)], name="victim", seed=2)
        assert rebuilt.key == victim_key and store.restore(rebuilt).cache.get_seq_length() == 600
    report = store.verify()
    assert not report.quarantined and not report.removed_rows and keep.key in report.ok


# ------------------------------------------------------------- damaged files


def test_truncated_file_is_refused_and_quarantined(store, two):
    keep, victim = two
    path = file_of(store, victim)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptCacheError, match="corrupt") as info:
        store.restore(victim)
    assert "victim" in str(info.value) and "cag build" in str(info.value) and "quarantine" in str(info.value)
    assert not path.exists() and quarantined(store)[0].startswith(path.name)
    with pytest.raises(CacheNotFoundError):
        store.resolve("victim")
    assert_still_usable(store, keep, victim.key)


@pytest.mark.parametrize("cut", [0, 5, 8, 100])
def test_file_cut_inside_its_header_is_refused(store, two, cut):
    keep, victim = two
    path = file_of(store, victim)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(CorruptCacheError):
        store.restore(victim, 10)
    assert_still_usable(store, keep)


@pytest.mark.parametrize("where", ["first_block", "token_ids"])
def test_flipped_byte_is_refused_on_restore(store, two, where):
    keep, victim = two
    path = file_of(store, victim)
    if where == "first_block":
        begin, _ = tensor_span(path, "layers.1.values")
        flip(path, begin + 10)  # token 0 of head 0
    else:
        begin, _ = tensor_span(path, "token_ids")
        flip(path, begin + 8 * 300)
    with pytest.raises(CorruptCacheError, match="checksum"):
        store.restore(victim, 100)
    assert not path.exists() and len(quarantined(store)) == 1
    assert_still_usable(store, keep, victim.key)


def test_a_restore_checked_later_is_refused_when_waited_on_and_quarantined(store, two):
    keep, victim = two
    path = file_of(store, victim)
    begin, _ = tensor_span(path, "layers.1.values")
    flip(path, begin + 10)
    restored = store.restore(victim, 100, check_later=True)  # returns before the pages are checked
    assert restored.pending is not None and restored.zero_copy
    with pytest.raises(CorruptCacheError, match="checksum") as info:
        restored.pending.wait()
    assert "victim" in str(info.value) and "quarantine" in str(info.value)
    assert not path.exists() and len(quarantined(store)) == 1
    assert_still_usable(store, keep, victim.key)


def test_a_restore_checked_later_gives_the_same_cache(store, two):
    _, victim = two
    now = store.restore(victim, 300)
    later = store.restore(victim, 300, check_later=True)
    assert later.pending.wait() >= 0 and later.token_ids == now.token_ids
    for a, b in zip(now.cache.layers, later.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_restore_that_converts_is_checked_at_once(store, two):
    _, victim = two
    path = file_of(store, victim)
    begin, _ = tensor_span(path, "layers.0.keys")
    flip(path, begin + 4)
    with pytest.raises(CorruptCacheError, match="checksum"):
        store.restore(victim, 100, dtype=torch.float64, check_later=True)  # a copy is made: no pending check


def test_flip_outside_a_truncated_restore_is_caught_by_verify(store, two):
    """A prefix restore checks only the blocks it reads; verify re-hashes whole files."""
    keep, victim = two
    path = file_of(store, victim)
    begin, end = tensor_span(path, "layers.0.keys")
    flip(path, end - 4)  # the last token of the last head: outside the first 256 tokens
    assert store.restore(victim, 100).cache.get_seq_length() == 100
    with pytest.raises(CorruptCacheError, match="checksum"):
        store.restore(victim)  # the full restore checks every block
    assert quarantined(store)


def test_verify_quarantines_checksum_mismatch(store, two):
    keep, victim = two
    path = file_of(store, victim)
    flip(path, data_start(path) + 4 * 1000)
    report = store.verify()
    assert report.ok == [keep.key] and report.quarantined == [(victim.key, "checksum mismatch")]
    assert not path.exists() and quarantined(store)
    assert_still_usable(store, keep, victim.key)


def test_header_metadata_that_disagrees_with_the_index_is_refused(store, two):
    """The JSON header carries no checksum of its own: the index row is checked against it."""
    keep, victim = two
    path = file_of(store, victim)
    raw = path.read_bytes()
    path.write_bytes(raw.replace(FP.encode(), ("e" + FP[1:]).encode(), 1))
    with pytest.raises(CorruptCacheError, match="fingerprint"):
        store.restore(victim)
    assert_still_usable(store, keep, victim.key)


def test_flipped_header_byte_is_refused(store, two):
    keep, victim = two
    path = file_of(store, victim)
    raw = bytearray(path.read_bytes())
    raw[8] = ord("[")  # the JSON header no longer is an object
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCacheError):
        store.restore(victim)
    assert_still_usable(store, keep, victim.key)


def test_corrupt_entry_is_skipped_by_lookup(store, two):
    keep, victim = two
    path = file_of(store, victim)
    begin, _ = tensor_span(path, "token_ids")
    flip(path, begin)
    assert store.longest_prefix([7 + i % 50 for i in range(40)], FP, "float32") is None
    assert quarantined(store)
    assert store.longest_prefix(list(range(1000, 1012)), FP, "float32").entry.key == keep.key


# ----------------------------------------------------------- index vs files


def test_index_row_without_file(store, two):
    keep, victim = two
    file_of(store, victim).unlink()
    with pytest.raises(CacheNotFoundError, match="lost its file"):
        store.restore(victim)
    with pytest.raises(CacheNotFoundError):
        store.resolve("victim")
    assert_still_usable(store, keep, victim.key)


def test_rebuilding_an_entry_whose_file_is_gone_writes_it_again(store, two):
    keep, victim = two
    file_of(store, victim).unlink()
    again = put(store, [7 + i % 50 for i in range(600)], name="victim", seed=2)
    assert again.key == victim.key and file_of(store, victim).exists()
    assert store.restore(again, 10).cache.get_seq_length() == 10
    assert sorted(store.verify().ok) == sorted([keep.key, victim.key])


def test_remove_racing_a_rebuild_of_the_same_key_stays_consistent(store, two, monkeypatch):
    """A remove must not delete the file that a rebuild published after the row went away."""
    import threading

    keep, victim = two
    ids = [7 + i % 50 for i in range(600)]
    target = file_of(store, victim)
    real_unlink = Path.unlink
    rebuild: list[threading.Thread] = []

    def rebuild_in_between(self, *args, **kwargs):
        if self == target and not rebuild:
            def other_process():
                other = LocalStore(store.root)
                put(other, ids, name="again", seed=2)
                other.close()
            rebuild.append(threading.Thread(target=other_process))
            rebuild[0].start()
            rebuild[0].join(timeout=0.5)  # give it every chance to slip in before this unlink
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", rebuild_in_between)
    store.remove("victim")
    rebuild[0].join(timeout=120)
    monkeypatch.undo()
    entry = store.resolve("again")
    assert file_of(store, entry).exists()  # the row points to a file
    assert store.restore(entry, 10).cache.get_seq_length() == 10
    assert not store.verify().removed_rows


def test_verify_drops_rows_without_files(store, two):
    keep, victim = two
    file_of(store, victim).unlink()
    report = store.verify()
    assert report.removed_rows == [victim.key] and report.ok == [keep.key] and not report.quarantined
    assert [e.key for e in store.entries()] == [keep.key]
    assert store.longest_prefix([7 + i % 50 for i in range(40)], FP, "float32") is None
    assert_still_usable(store, keep, victim.key)


def test_lookup_skips_a_row_without_file(store, two):
    keep, victim = two
    file_of(store, victim).unlink()
    assert store.longest_prefix([7 + i % 50 for i in range(40)], FP, "float32") is None
    assert [e.key for e in store.entries()] == [keep.key]


def test_files_without_index_row_that_are_not_their_key_go_to_quarantine(store, two):
    """A valid cache file under another key's name, and a stray non-cache file: neither can be indexed."""
    keep, victim = two
    stray = store.root / "entries" / ("ab" * 20 + ".safetensors")
    stray.write_bytes(file_of(store, victim).read_bytes())
    junk = store.root / "entries" / "notes.txt"
    junk.write_text("not a cache")
    report = store.verify()
    assert sorted(report.quarantined) == sorted([(junk.name, "not a cache file"), (stray.name, "file name does not match its content")])
    assert report.reindexed == []
    assert sorted(report.ok) == sorted([keep.key, victim.key])
    assert not stray.exists() and not junk.exists() and len(quarantined(store)) == 2
    assert_still_usable(store, keep)


def test_stale_staging_files_are_removed_and_fresh_ones_kept(store, two):
    keep, _ = two
    folder = store.root / "entries"
    stale, fresh = folder / ".old.staging.tmp", folder / ".new.staging.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    report = store.verify()
    assert not report.quarantined and not stale.exists() and fresh.exists()
    assert_still_usable(store, keep)


def test_store_and_quarantine_folders_are_created_on_demand(tmp_path):
    store = LocalStore(tmp_path / "deep" / "store", block_size=4)
    entry = put(store, list(range(8)))
    file_of(store, entry).write_bytes(b"x" * 20)
    with pytest.raises(CorruptCacheError):
        store.restore(entry)
    assert quarantined(store)


def test_unwritable_store_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="CAG_HOME"):
        LocalStore(blocker / "store")


# -------------------------------------------------------------- bad headers


class ReadSpy:
    """Wraps open() in cag.kvcache and records the largest single read request."""

    def __init__(self) -> None:
        self.largest = 0

    def __call__(self, *args, **kwargs):
        f = open(*args, **kwargs)
        spy = self

        class Wrapped:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def read(self, n=-1):
                spy.largest = max(spy.largest, n if n >= 0 else 1 << 62)
                return f.read(n)

            def __getattr__(self, name):
                return getattr(f, name)

        return Wrapped()


def test_oversized_header_is_refused_before_allocation(store, two, monkeypatch):
    keep, victim = two
    path = file_of(store, victim)
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10 * 10**9) + raw[8:])  # a 10 GB header claim
    spy = ReadSpy()
    monkeypatch.setattr(kvcache, "open", spy, raising=False)
    with pytest.raises(CorruptCacheError, match="header claims"):
        store.restore(victim)
    assert spy.largest <= 8  # only the length prefix was read: nothing sized by the claim
    monkeypatch.undo()
    assert not path.exists() and quarantined(store)
    assert_still_usable(store, keep, victim.key)


def test_header_just_over_the_limit_is_refused_even_if_the_file_is_large(tmp_path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.truncate(MAX_HEADER_BYTES + 1024)  # sparse: the claim fits in the file
    with pytest.raises(CorruptCacheError, match="header claims"):
        load_cache(path)
    with pytest.raises(CorruptCacheError, match="header claims"):
        read_token_ids(path)


MALFORMED = {
    "not-json": None,
    "tensor-outside-file": lambda h: h["layers.0.keys"].update(data_offsets=[0, 10**12]),
    "negative-offset": lambda h: h["layers.0.keys"].update(data_offsets=[-64, h["layers.0.keys"]["data_offsets"][1] - 64]),
    "shape-vs-bytes": lambda h: h["layers.0.keys"].update(shape=[1, 2, 600, 8]),
    "huge-shape": lambda h: h["layers.0.keys"].update(shape=[1, 2**40, 2**40, 4]),
    "negative-dims": lambda h: h["layers.0.keys"].update(shape=[1, -2, -600, 4]),
    "negative-dims-same-product": lambda h: h["layers.0.keys"].update(shape=[1, -2, 600, -4]),
    "unknown-dtype": lambda h: h["layers.0.keys"].update(dtype="F128"),
    "shape-not-a-list": lambda h: h["layers.0.keys"].update(shape="big"),
    "missing-layer": lambda h: h.pop("layers.1.values"),
    "tokens-wrong": lambda h: h["__metadata__"].update(tokens="599"),
    "tokens-not-a-number": lambda h: h["__metadata__"].update(tokens="many"),
    "other-format": lambda h: h["__metadata__"].update(format="gguf"),
    "future-version": lambda h: h["__metadata__"].update(format_version="99"),
    "no-metadata": lambda h: h.pop("__metadata__"),
    "no-layers": lambda h: h["__metadata__"].update(num_layers="0"),
    "crc-block-zero": lambda h: h["__metadata__"].update(crc_block_tokens="0"),
    "crc-block-negative": lambda h: h["__metadata__"].update(crc_block_tokens="-256"),
    "crc-not-hex": lambda h: h["__metadata__"].update(block_crc32="zz,yy,xx"),
    "crc-missing": lambda h: h["__metadata__"].pop("block_crc32"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_header_is_refused_and_quarantined(store, two, kind):
    keep, victim = two
    path = file_of(store, victim)
    if MALFORMED[kind] is None:
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        path.write_bytes(raw[:8] + b"{" * n + raw[8 + n :])
    else:
        rewrite_header(path, MALFORMED[kind])
    with pytest.raises(CorruptCacheError):
        store.restore(victim, 10)
    assert not path.exists() and quarantined(store)
    assert_still_usable(store, keep, victim.key)


# --------------------------------------------------------- interrupted writes


def test_failure_mid_write_leaves_no_row_and_no_file(store, two, monkeypatch):
    keep, victim = two
    before = sorted(p.name for p in (store.root / "entries").iterdir())

    def die_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a partial file
        raise OSError(28, "No space left on device")

    def interrupted_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(kvcache, "save_file", die_half_way)
    with pytest.raises(StoreError, match="No space left"):
        put(store, list(range(3000, 3040)), name="doomed")
    monkeypatch.setattr(kvcache, "save_file", interrupted_half_way)
    with pytest.raises(KeyboardInterrupt):
        put(store, list(range(3000, 3040)), name="doomed")
    monkeypatch.undo()
    assert sorted(p.name for p in (store.root / "entries").iterdir()) == before
    assert sorted(e.key for e in store.entries()) == sorted([keep.key, victim.key])
    with pytest.raises(CacheNotFoundError):
        store.resolve("doomed")
    assert store.longest_prefix(list(range(3000, 3040)), FP, "float32") is None
    assert store.restore(victim, 300).cache.get_seq_length() == 300
    assert_still_usable(store, keep)


def test_failure_while_indexing_removes_the_published_file(store, two, monkeypatch):
    """If the index insert fails after the rename, the file goes too: no file without a row."""
    keep, _ = two
    before = sorted(p.name for p in (store.root / "entries").iterdir())
    real = store._db

    class FailingDb:
        """The store's connection, except that adding an entry row fails."""

        def __getattr__(self, name):
            return getattr(real, name)

        def execute(self, sql, *args):
            if sql.startswith("INSERT INTO entries"):
                raise sqlite3.OperationalError("disk I/O error")
            return real.execute(sql, *args)

    monkeypatch.setattr(store, "_db", FailingDb())
    with pytest.raises(StoreError, match="disk I/O"):
        put(store, list(range(4000, 4020)))
    monkeypatch.undo()
    assert sorted(p.name for p in (store.root / "entries").iterdir()) == before
    assert_still_usable(store, keep)


CRASH = """
import os, sys
from pathlib import Path
import torch
import cag.kvcache as kvcache
from cag.kvcache import CacheMetadata, cache_from_layers
from cag.stores import LocalStore

def crash(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\\0" * 64)  # part of the file, then the process dies
    os._exit(9)

kvcache.save_file = crash
store = LocalStore(sys.argv[1], block_size=4)
n = 20
cache = cache_from_layers([(torch.zeros(1, 2, n, 4), torch.zeros(1, 2, n, 4))] * 2)
meta = CacheMetadata(model_name="fake", fingerprint="f" * 64, tokenizer_hash="t", kv_dtype="float32",
                     tokens=n, num_layers=2)
store.put(cache, list(range(n)), meta, name="crashed")
"""


def test_process_killed_mid_write_leaves_the_store_consistent(store, two):
    keep, victim = two
    done = subprocess.run([sys.executable, "-c", CRASH, str(store.root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    entries = store.root / "entries"
    leftovers = [p for p in entries.iterdir() if p.name.endswith(".tmp")]
    assert leftovers and all(p.name.startswith(".") for p in leftovers)  # only hidden temp files remain
    assert sorted(e.key for e in store.entries()) == sorted([keep.key, victim.key])
    with pytest.raises(CacheNotFoundError):
        store.resolve("crashed")
    report = store.verify()  # fresh temp files are left alone: their build might still be running
    assert not report.quarantined and not report.removed_rows
    old = time.time() - 2 * 3600
    for p in leftovers:
        os.utime(p, (old, old))
    store.verify()
    assert not any(p.name.endswith(".tmp") for p in entries.iterdir())
    assert_still_usable(store, keep, victim.key)
