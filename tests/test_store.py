"""The store protocol's suite, run on every backend (local disk and Redis): lookup, truncated restore,
names, LRU gc, checksums; and what only the local store has (its SQLite index, its files)."""

from __future__ import annotations

import hashlib
import random
import sqlite3
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cag
from cag.errors import CacheNotFoundError, InvalidNameError
from cag.hashing import block_hashes, chain_seed, sequence_key
from cag.kvcache import CacheMetadata, cache_from_layers
from cag.model import forward
from cag.prefill import prefill
from cag.stores import CacheStore, Entry, LocalStore, PrefixMatch, validate_name

BLOCK = 16
BACKENDS = ["local", "redis"]


# ------------------------------------------------------------------- helpers


def fake_cache(ids, seed: int = 0, layers: int = 2):
    """A cache of random tensors [1, 2, T, 4]: enough for everything but logits."""
    g = torch.Generator().manual_seed(seed)
    return cache_from_layers(
        [(torch.randn(1, 2, len(ids), 4, generator=g), torch.randn(1, 2, len(ids), 4, generator=g)) for _ in range(layers)]
    )


def meta(n: int, fingerprint: str = "f" * 64, kv_dtype: str = "float32", layers: int = 2, model: str = "fake") -> CacheMetadata:
    return CacheMetadata(model_name=model, fingerprint=fingerprint, tokenizer_hash="t" * 64, kv_dtype=kv_dtype,
                         tokens=n, num_layers=layers)


def put_fake(store, ids, name=None, seed=0, **kwargs) -> Entry:
    return store.put(fake_cache(ids, seed), ids, meta(len(ids), **kwargs), name=name)


def tiny_meta(lm, n: int) -> CacheMetadata:
    return CacheMetadata(model_name=lm.name, fingerprint=lm.fingerprint, tokenizer_hash=lm.tokenizer_hash,
                         kv_dtype="float32", tokens=n, num_layers=lm.model.config.num_hidden_layers)


def random_ids(lm, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, lm.model.config.vocab_size) for _ in range(n)]


def rchar() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def open_backend(kind: str, request, folder: Path, block_size: int = 4):
    """A fresh, empty store of one backend: a local store in ``folder``, or a Redis store under a prefix of its own
    (its local copy off, so every read goes to Redis)."""
    if kind == "local":
        return LocalStore(folder / "store", block_size=block_size)
    import uuid

    from cag.stores import RedisStore

    server = request.getfixturevalue("redis_server")
    return RedisStore.from_url(f"{server.url}?prefix=t{uuid.uuid4().hex[:12]}:", block_size=block_size, local_copy=False)


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    s = open_backend(request.param, request, tmp_path)
    yield s
    s.close()


@pytest.fixture
def local_store(tmp_path):
    s = LocalStore(tmp_path / "store", block_size=4)
    yield s
    s.close()


# ---------------------------------------------------- lookup on the tiny model


@pytest.fixture(scope="module", params=BACKENDS)
def stored_entry(tiny, tmp_path_factory, request):
    """An 80-token entry (5 blocks of 16) of the tiny model, and the store it lives in."""
    store = open_backend(request.param, request, tmp_path_factory.mktemp("lookup"), block_size=BLOCK)
    ids = random_ids(tiny, 80, seed=1)
    entry = store.put(prefill(tiny, ids).cache, ids, tiny_meta(tiny, len(ids)), name="entry")
    return store, entry, ids


def _assert_restored_logits_match(tiny, store, match: PrefixMatch, prompt: list[int]) -> None:
    restored = store.restore(match.entry, match.tokens)
    assert restored.cache.get_seq_length() == match.tokens
    assert restored.token_ids == prompt[: match.tokens]
    with torch.no_grad():
        full = tiny.model(input_ids=torch.tensor([prompt])).logits[0, match.tokens :]
        rest = forward(tiny.model, restored.cache, input_ids=torch.tensor([prompt[match.tokens :]])).logits[0]
    torch.testing.assert_close(rest, full, atol=1e-4, rtol=0)


def _diverge(ids: list[int], at: int, extra: int, vocab: int, seed: int) -> list[int]:
    """``ids[:at]`` followed by ``extra`` tokens, the first of which differs from ``ids[at]``."""
    rng = random.Random(seed)
    tail = [rng.randrange(3, vocab) for _ in range(extra)]
    if at < len(ids) and tail and tail[0] == ids[at]:
        tail[0] = 3 if ids[at] != 3 else 4
    return ids[:at] + tail


@pytest.mark.parametrize("shared", [37, 16, 32, 79])  # k blocks and part of one; exactly 1 and 2 blocks; all but one token
def test_longest_prefix_finds_the_exact_common_prefix(tiny, stored_entry, shared):
    store, entry, ids = stored_entry
    prompt = _diverge(ids, shared, 12, tiny.model.config.vocab_size, seed=shared)
    match = store.longest_prefix(prompt, tiny.fingerprint, "float32")
    assert match is not None and match.entry.key == entry.key
    assert match.tokens == shared  # past the last full block, up to the first differing token
    _assert_restored_logits_match(tiny, store, match, prompt)


def test_prompt_extending_the_whole_entry_matches_all_of_it(tiny, stored_entry):
    store, entry, ids = stored_entry
    prompt = ids + random_ids(tiny, 9, seed=7)
    match = store.longest_prefix(prompt, tiny.fingerprint, "float32")
    assert match is not None and match.tokens == len(ids) == entry.tokens
    _assert_restored_logits_match(tiny, store, match, prompt)


def test_prompt_inside_the_entry_matches_its_own_length(tiny, stored_entry):
    store, entry, ids = stored_entry
    match = store.longest_prefix(ids[:50], tiny.fingerprint, "float32")
    assert match is not None and match.tokens == 50
    # Restore all but the last prompt token, so there is something left to forward.
    _assert_restored_logits_match(tiny, store, PrefixMatch(match.entry, 49), ids[:50])


@pytest.mark.parametrize("shared", [0, 1, 15])  # nothing, or part of the first block only
def test_less_than_one_shared_block_is_no_match(tiny, stored_entry, shared):
    store, _, ids = stored_entry
    prompt = _diverge(ids, shared, 40, tiny.model.config.vocab_size, seed=shared)
    assert store.longest_prefix(prompt, tiny.fingerprint, "float32") is None


def test_prompt_shorter_than_a_block_is_no_match(tiny, stored_entry):
    store, _, ids = stored_entry
    assert store.longest_prefix(ids[:BLOCK - 1], tiny.fingerprint, "float32") is None
    assert store.longest_prefix([], tiny.fingerprint, "float32") is None


def test_other_model_or_kv_dtype_never_matches(tiny, stored_entry):
    from conftest import make_tiny_model

    store, _, ids = stored_entry
    other = make_tiny_model(seed=3)
    assert other.fingerprint != tiny.fingerprint
    assert store.longest_prefix(ids, other.fingerprint, "float32") is None
    assert store.longest_prefix(ids, tiny.fingerprint, "bfloat16") is None
    assert store.longest_prefix(ids, tiny.fingerprint, "float32").tokens == len(ids)


def test_longest_of_several_entries_wins(store):
    base = list(range(100, 124))  # 6 blocks of 4
    short = put_fake(store, base[:9])
    long = put_fake(store, base[:21] + [1, 2, 3])
    put_fake(store, [9] * 12)  # unrelated
    match = store.longest_prefix(base, "f" * 64, "float32")
    assert match.entry.key == long.key and match.tokens == 21
    match = store.longest_prefix(base[:10] + [0] * 10, "f" * 64, "float32")
    assert match.entry.key in {short.key, long.key} and match.tokens == 10


def test_many_entries_sharing_the_deepest_block_still_find_the_best(store):
    """More entries than one lookup batch share the same blocks; the best tail must still win."""
    base = list(range(200, 212))  # 3 blocks of 4
    keys = sorted(put_fake(store, base[:8] + [t, t, t, 99], seed=t).key for t in range(12))  # 2 blocks + 0 tail
    # The best entry's key sorts after most others, so a lookup that looks at a few rows only misses it.
    seed = chain_seed("f" * 64, "float32", 4)
    tail = next(t for t in ([500, 501, 502, x] for x in range(1000)) if sequence_key(base[:8] + t, seed, 4) > keys[-2])
    best = put_fake(store, base[:8] + tail, seed=99)  # shares 2 blocks + 3 tail tokens
    match = store.longest_prefix(base[:8] + [500, 501, 502, 7], "f" * 64, "float32")
    assert match is not None and match.entry.key == best.key and match.tokens == 11


def test_lookup_is_a_few_queries_even_for_a_long_prompt(local_store):
    store = local_store
    entry = put_fake(store, list(range(50)))
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    match = store.longest_prefix(list(range(50)) + [0] * 800, "f" * 64, "float32")  # 212 blocks of 4
    store._db.set_trace_callback(None)
    assert match.entry.key == entry.key and match.tokens == 50
    on_blocks = [q for q in statements if "FROM blocks" in q]
    assert 1 <= len(on_blocks) <= 12, on_blocks  # a binary search over blocks, not one query per block
    assert len(statements) <= 20


@pytest.mark.parametrize("kind", BACKENDS)
def test_lookup_of_a_very_long_prompt(tmp_path, request, kind):
    """More blocks than SQLite takes parameters in one statement (32766)."""
    store = open_backend(kind, request, tmp_path, block_size=1)
    entry = put_fake(store, list(range(10)))
    prompt = list(range(10)) + [7] * 40_000
    match = store.longest_prefix(prompt, "f" * 64, "float32")
    assert match is not None and match.entry.key == entry.key and match.tokens == 10
    assert store.longest_prefix([5] * 40_000, "f" * 64, "float32") is None
    store.close()


def test_a_hand_made_entry_cannot_point_outside_the_store(store, tmp_path):
    real = put_fake(store, list(range(8)))
    outside = tmp_path / "victim.safetensors"
    outside.write_bytes(b"keep me")
    fake = Entry(**{**real.__dict__, "key": "../../victim"})
    with pytest.raises(CacheNotFoundError):
        store.restore(fake)
    with pytest.raises(CacheNotFoundError):
        store.token_ids(fake)
    assert outside.read_bytes() == b"keep me"


def test_lookup_uses_the_index_not_the_files(local_store, monkeypatch):
    store = local_store
    """Entries that share no block are never opened: the index answers."""
    import cag.stores.local as local

    for t in range(10):
        put_fake(store, [t] * 8, seed=t)
    opened = []
    real = local.read_token_ids
    monkeypatch.setattr(local, "read_token_ids", lambda path: opened.append(Path(path).stem) or real(path))
    match = store.longest_prefix([3] * 8 + [1], "f" * 64, "float32")
    assert match.tokens == 8 and len(opened) == 1 and opened[0] == match.entry.key
    assert store.longest_prefix([42] * 8, "f" * 64, "float32") is None and len(opened) == 1


def test_block_hashes_are_indexed(local_store):
    store = local_store
    entry = put_fake(store, list(range(10)))
    assert entry.blocks == 2
    db = sqlite3.connect(store.root / "index.sqlite")
    rows = db.execute("SELECT hash, idx FROM blocks WHERE key=? ORDER BY idx", (entry.key,)).fetchall()
    assert [h for h, _ in rows] == block_hashes(list(range(10)), chain_seed("f" * 64, "float32", 4), 4)
    for query in ("SELECT 1 FROM blocks WHERE hash='a' LIMIT 1", "SELECT key FROM blocks WHERE hash='a' ORDER BY key",
                  "SELECT COUNT(*) FROM blocks WHERE key='a'", "SELECT key FROM names WHERE name='a'"):
        plan = " ".join(r[-1] for r in db.execute("EXPLAIN QUERY PLAN " + query))
        assert plan.startswith("SEARCH") and "INDEX" in plan, (query, plan)  # an index search, not a scan
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    stored=st.lists(st.lists(st.integers(0, 2), min_size=0, max_size=14), min_size=1, max_size=6),
    prompt=st.lists(st.integers(0, 2), max_size=16),
)
@pytest.mark.parametrize("kind", BACKENDS)
def test_lookup_matches_a_brute_force_oracle(tmp_path_factory, request, kind, stored, prompt):
    store = open_backend(kind, request, tmp_path_factory.mktemp("prop"))
    try:
        for i, ids in enumerate(stored):
            if ids:
                put_fake(store, ids, seed=i)
        eligible = [ids for ids in stored if len(ids) >= 4 and len(prompt) >= 4 and ids[:4] == prompt[:4]]
        expected = max((_naive_prefix(ids, prompt) for ids in eligible), default=0)
        match = store.longest_prefix(prompt, "f" * 64, "float32")
        if expected == 0:
            assert match is None
        else:
            assert match is not None and match.tokens == expected
            assert _naive_prefix(store.token_ids(match.entry), prompt) == expected
    finally:
        store.close()


def _naive_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ----------------------------------------------------------- truncated restore


@pytest.fixture(scope="module", params=BACKENDS)
def long_entry(tiny, tmp_path_factory, request):
    """A 700-token entry (three CRC blocks of 256) of the tiny model."""
    store = open_backend(request.param, request, tmp_path_factory.mktemp("trunc"), block_size=256)
    ids = random_ids(tiny, 700, seed=2)
    cache = prefill(tiny, ids).cache
    entry = store.put(cache, ids, tiny_meta(tiny, len(ids)))
    return store, entry, ids, cache


@pytest.mark.parametrize("n", [1, 100, 255, 256, 257, 511, 699, 700])
def test_truncated_restore_returns_exactly_n_tokens(long_entry, n):
    store, entry, ids, cache = long_entry
    restored = store.restore(entry, n)
    assert restored.cache.get_seq_length() == n
    assert restored.token_ids == ids[:n]
    for got, want in zip(restored.cache.layers, cache.layers):
        assert got.keys.shape[2] == got.values.shape[2] == n
        assert torch.equal(got.keys, want.keys[:, :, :n]) and torch.equal(got.values, want.values[:, :, :n])


def test_truncated_restore_reads_only_what_the_prefix_needs(long_entry):
    store, entry, ids, _ = long_entry
    size = entry.bytes  # the cache file's size, whichever store holds it
    if isinstance(store, LocalStore):
        assert size == (store.root / "entries" / f"{entry.key}.safetensors").stat().st_size
    before = rchar()
    part = store.restore(entry, 100)
    after = rchar()
    whole = store.restore(entry)
    assert whole.bytes_read <= size and whole.cache.get_seq_length() == 700
    assert part.bytes_read < size / 2  # 100 tokens round up to one 256-token checked block of three
    if before is not None and isinstance(store, LocalStore):
        assert after - before < size / 2
    reads = [store.restore(entry, n).bytes_read for n in (1, 256, 257, 512, 700)]
    assert reads == sorted(reads) and reads[0] == reads[1] < reads[2]


def test_restored_prefix_continues_like_a_full_forward(tiny, long_entry):
    store, entry, ids, _ = long_entry
    restored = store.restore(entry, 300)
    with torch.no_grad():
        full = tiny.model(input_ids=torch.tensor([ids[:310]])).logits[0, 300:]
        rest = forward(tiny.model, restored.cache, input_ids=torch.tensor([ids[300:310]])).logits[0]
    torch.testing.assert_close(rest, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n", [0, -1, 701])
def test_restore_outside_the_entry_is_refused(long_entry, n):
    store, entry, _, _ = long_entry
    with pytest.raises((ValueError, cag.CagError)):
        store.restore(entry, n)


def test_restore_converts_dtype(long_entry):
    store, entry, _, _ = long_entry
    restored = store.restore(entry, 10, dtype=torch.bfloat16)
    assert restored.cache.layers[0].keys.dtype == torch.bfloat16


# -------------------------------------------------------- entries and names


def test_put_records_entry_and_checksum(local_store):
    store = local_store
    ids = list(range(10))
    entry = put_fake(store, ids, name="ten")
    path = store.root / "entries" / f"{entry.key}.safetensors"
    assert entry.names == ("ten",) and entry.tokens == 10 and entry.bytes == path.stat().st_size
    assert entry.hits == 0 and entry.created <= entry.last_used and entry.fingerprint == "f" * 64 and entry.kv_dtype == "float32"
    db = sqlite3.connect(store.root / "index.sqlite")
    (sha,) = db.execute("SELECT sha256 FROM entries WHERE key=?", (entry.key,)).fetchone()
    db.close()
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert store.token_ids(entry) == ids
    assert store.verify().ok == [entry.key]


def test_same_content_is_stored_once_and_names_share_it(store):
    ids = list(range(30))
    a = put_fake(store, ids, name="alpha")
    b = put_fake(store, ids, name="beta", seed=5)  # same tokens, same key: not written again
    assert a.key == b.key and b.names == ("alpha", "beta")
    assert len(store.entries()) == 1
    if isinstance(store, LocalStore):
        assert len(list((store.root / "entries").iterdir())) == 1
    assert store.resolve("alpha") == store.resolve("beta") == store.resolve(a.key[:8])

    assert store.remove("alpha") == []  # beta still points to it
    assert store.resolve("beta").names == ("beta",)
    with pytest.raises(CacheNotFoundError):
        store.resolve("alpha")
    removed = store.remove("beta")
    assert [e.key for e in removed] == [a.key]
    assert store.entries() == []
    if isinstance(store, LocalStore):
        assert list((store.root / "entries").iterdir()) == []


def test_label_moves_a_name_and_remove_by_key_drops_all_names(store):
    a = put_fake(store, list(range(8)), name="x")
    b = put_fake(store, list(range(1, 9)))
    store.label("x", b.key)
    assert store.resolve("x").key == b.key and store.resolve(a.key).names == ()
    store.label("y", b.key)
    assert [e.key for e in store.remove(b.key)] == [b.key]
    for name in ("x", "y", b.key):
        with pytest.raises(CacheNotFoundError):
            store.resolve(name)
    assert store.resolve(a.key).key == a.key


def test_label_of_unknown_key_is_a_clear_error(store):
    with pytest.raises(CacheNotFoundError):
        store.label("name", "0" * 40)


def test_resolve_errors(store):
    a = put_fake(store, list(range(8)))
    b = put_fake(store, list(range(1, 9)))
    with pytest.raises(CacheNotFoundError, match="cag build"):
        store.resolve("missing")
    common = next(i for i in range(40) if a.key[i] != b.key[i])
    if common >= 6:
        with pytest.raises(CacheNotFoundError, match="ambiguous"):
            store.resolve(a.key[:common])
    assert store.resolve(a.key).key == a.key


@pytest.mark.parametrize("name", ["../x", "..", "/abs", "/etc/passwd", "a/b", "a\\b", "", ".hidden", "x" * 129,
                                  "a\nb", "abc\n", "a b", "-rf", "ok/../../x", "a..b"])
def test_names_that_could_escape_or_confuse_are_refused(store, name):
    with pytest.raises(InvalidNameError, match="invalid cache name"):
        validate_name(name)
    with pytest.raises(InvalidNameError):
        put_fake(store, list(range(8)), name=name)
    entry = put_fake(store, list(range(8)))
    with pytest.raises(InvalidNameError):
        store.label(name, entry.key)
    with pytest.raises((InvalidNameError, CacheNotFoundError)):
        store.resolve(name)
    if isinstance(store, LocalStore):
        assert [p.name for p in store.root.iterdir()] and not (store.root.parent / "x").exists()
    assert all(e.names == () for e in store.entries())


@pytest.mark.parametrize("name", ["handbook", "a", "v1.2", "team@site+v2", "x" * 128, "A_b-C"])
def test_ordinary_names_are_accepted(store, name):
    assert validate_name(name) == name
    assert put_fake(store, list(range(8)), name=name).names == (name,)
    assert store.resolve(name).names == (name,)


def test_restore_counts_hits_and_last_use(store):
    entry = put_fake(store, list(range(8)))
    store.restore(entry)
    store.restore(entry, 3)
    after = store.resolve(entry.key)
    assert after.hits == 2 and after.last_used >= entry.last_used


def test_gc_removes_least_recently_used_first(store):
    entries = [put_fake(store, [i] * 40, name=f"e{i}", seed=i) for i in range(3)]
    size = entries[0].bytes
    store.restore(entries[0])  # e0 is now the most recently used
    assert store.gc(10 * size) == []
    removed = store.gc(size + size // 2)  # room for one
    assert [e.names for e in removed] == [("e1",), ("e2",)]
    assert [e.names for e in store.entries()] == [("e0",)]
    if isinstance(store, LocalStore):
        assert sorted(p.stem for p in (store.root / "entries").iterdir()) == [entries[0].key]
    assert [e.key for e in store.gc(0)] == [entries[0].key] and store.entries() == []


def test_block_size_is_fixed_when_the_store_is_created(tmp_path):
    first = LocalStore(tmp_path / "s", block_size=8)
    put_fake(first, list(range(20)))
    first.close()
    again = LocalStore(tmp_path / "s")  # default 256 asked, but hashes were made with 8
    assert again.block_size == 8 and again.longest_prefix(list(range(20)), "f" * 64, "float32").tokens == 20
    again.close()
    assert LocalStore(tmp_path / "other").block_size == 256


def test_store_implements_the_protocol(store):
    assert isinstance(store, CacheStore)


class ProtocolOnly:
    """A store exposing only the CacheStore methods."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.block_size = inner.block_size
        self.calls: list[str] = []

    def __getattr__(self, name):
        raise AssertionError(f"cag used {name!r}, which is not part of the CacheStore protocol")

    def _call(self, method, /, *args, **kwargs):
        self.calls.append(method)
        return getattr(self._inner, method)(*args, **kwargs)

    def put(self, *a, **k): return self._call("put", *a, **k)  # noqa: E704
    def resolve(self, *a, **k): return self._call("resolve", *a, **k)  # noqa: E704
    def restore(self, *a, **k): return self._call("restore", *a, **k)  # noqa: E704
    def token_ids(self, *a, **k): return self._call("token_ids", *a, **k)  # noqa: E704
    def longest_prefix(self, *a, **k): return self._call("longest_prefix", *a, **k)  # noqa: E704
    def label(self, *a, **k): return self._call("label", *a, **k)  # noqa: E704
    def entries(self, *a, **k): return self._call("entries", *a, **k)  # noqa: E704
    def remove(self, *a, **k): return self._call("remove", *a, **k)  # noqa: E704
    def gc(self, *a, **k): return self._call("gc", *a, **k)  # noqa: E704
    def verify(self, *a, **k): return self._call("verify", *a, **k)  # noqa: E704


@pytest.mark.parametrize("kind", BACKENDS)
def test_cag_needs_nothing_beyond_the_protocol(tiny, docs, tmp_path, request, kind):
    store = ProtocolOnly(open_backend(kind, request, tmp_path, block_size=BLOCK))
    assert isinstance(store, CacheStore)
    first = cag.build([docs / "refunds.md", docs / "travel.md"], name="two", model=tiny, store=store)
    both = cag.build([docs / "refunds.md", docs / "travel.md", docs / "badges.txt"], name="three", model=tiny, store=store)
    assert both.report.reused_tokens >= BLOCK and both.report.reused_tokens < both.report.tokens
    kb = cag.load("three", model=tiny, store=store)
    assert kb.ask("Who approves travel?", max_new_tokens=3).text == both.ask("Who approves travel?", max_new_tokens=3).text
    assert {"put", "longest_prefix", "restore", "resolve"} <= set(store.calls)
    assert first.key != both.key
