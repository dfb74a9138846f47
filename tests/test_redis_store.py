"""The Redis store against real redis-server processes: sharing between machines, the local copy,
atomic publish, faults (each a clear error, the store still usable afterwards), redaction, a cluster.

The protocol's own suite runs on Redis too, in test_store.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cag
from cag.cli.main import app
from cag.errors import (
    CacheNotFoundError,
    CorruptCacheError,
    EntryTooBigError,
    StoreAuthError,
    StoreError,
    StoreUnreachableError,
)
from cag.kvcache import cache_from_layers
from cag.stores import RedisStore, open_store
from redis_servers import RedisCluster, RedisServer, free_port
from test_store import fake_cache, meta, put_fake

pytestmark = pytest.mark.services

FP = "f" * 64
runner = CliRunner()


def connect(url: str, home: Path | None = None, *, block_size: int = 4, local_copy: bool = False, prefix: str | None = None) -> RedisStore:
    prefix = prefix or f"t{uuid.uuid4().hex[:12]}:"
    sep = "&" if "?" in url else "?"
    return RedisStore.from_url(f"{url}{sep}prefix={prefix}", home=home, block_size=block_size, local_copy=local_copy)


def keys_of(server: RedisServer, pattern: str) -> list[str]:
    return sorted(line for line in server.cli("--scan", "--pattern", pattern).stdout.splitlines() if line)


def assert_still_usable(store: RedisStore) -> None:
    """A fresh put, lookup and restore work: the fault left nothing behind that gets in the way."""
    ids = [90 + i % 7 for i in range(21)]
    entry = put_fake(store, ids, name="after", seed=42)
    assert store.resolve("after").key == entry.key
    assert store.longest_prefix(ids + [1], FP, "float32").tokens == len(ids)
    assert store.restore(entry).token_ids == ids


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, for tests that kill, flush or reconfigure it."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def run_cli(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    return lines[0]


# ------------------------------------------------------------ two machines


HANDBOOK = "\n".join(
    f"Rule {i}: refunds within 21 days need form RF-20; travel above 500 crowns is approved by Ida Marsh; "
    f"badges come from the Lisbon front desk between 9 and 11." for i in range(6)
)
APPENDIX = "Appendix: the refund desk closes on Fridays at noon."


def _cag(args: list, home: Path, **env) -> dict | list[dict]:
    """Run the real `cag` command in a process of its own with its own cache home (another machine)."""
    environ = {k: v for k, v in os.environ.items() if k != "CAG_STORE"}
    environ.update(CAG_HOME=str(home), **env)
    done = subprocess.run([sys.executable, "-m", "cag.cli.main", *map(str, args), "--json"], env=environ,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return rows[0] if len(rows) == 1 else rows


def test_two_machines_share_one_redis(tiny_dir, tmp_path, redis_url):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "handbook.md").write_text(HANDBOOK)
    (docs / "appendix.md").write_text(APPENDIX)
    a_home, b_home = tmp_path / "machine-a", tmp_path / "machine-b"
    questions = ["Who approves travel?", "When does the refund desk close?"]

    built = _cag(["build", docs / "handbook.md", "--name", "handbook", "--model", tiny_dir, "--store", redis_url], a_home)
    assert built["prefilled_tokens"] == built["tokens"] > 256  # more than one block, all prefilled on A

    # B has never seen the documents: its answers come from A's cache, only the questions prefilled.
    answers = _cag(["ask", "--cache", "handbook", *questions, "--max-new-tokens", "8", "--batch-size", "1"], b_home,
                   CAG_STORE=redis_url)
    assert [a["reused_tokens"] for a in answers] == [built["tokens"]] * 2
    assert all(a["prefilled_tokens"] == a["prompt_tokens"] - built["tokens"] for a in answers)
    assert list((b_home / "store-copies").glob("*/entries/*.safetensors"))  # B keeps a local copy

    # The same greedy answers as re-prefilling the whole prompt with the same weights.
    lm = cag.load_model(str(tiny_dir))
    reference = cag.load("handbook", model=lm, store=redis_url, home=tmp_path / "ref")
    for question, answer in zip(questions, answers):
        assert answer["answer"] == reference.ask(question, max_new_tokens=8, use_cache=False).text

    # B's build of handbook + appendix starts from A's handbook blocks.
    both = _cag(["build", docs / "handbook.md", docs / "appendix.md", "--name", "both", "--model", tiny_dir,
                 "--store", redis_url], b_home)
    assert 256 <= both["reused_tokens"] < both["tokens"] and both["prefilled_tokens"] == both["tokens"] - both["reused_tokens"]
    names = {tuple(e.names) for e in open_store(redis_url, tmp_path / "c").entries()}
    assert names == {("handbook",), ("both",)}


# ---------------------------------------------------------------- local copy


def test_second_restore_on_a_machine_reads_its_local_copy(redis_server, tmp_path):
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    a = connect(redis_server.url, tmp_path / "a", prefix=prefix, local_copy=True)
    ids = list(range(700))
    entry = put_fake(a, ids, name="seven")
    b = connect(redis_server.url, tmp_path / "b", prefix=prefix, local_copy=True)
    first = b.restore(b.resolve("seven"))
    assert first.token_ids == ids and first.bytes_read >= entry.bytes  # the whole entry came over the network
    assert len(list((tmp_path / "b" / "store-copies").glob("*/entries/*.safetensors"))) == 1

    # Take the blocks away from Redis: B still restores, from its own disk.
    redis_server.cli("DEL", *(f"{prefix}{{{entry.key}}}:b:{i}" for i in range(3)))
    again = b.restore(b.resolve("seven"))
    assert again.token_ids == ids
    for got, want in zip(again.cache.layers, first.cache.layers):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    assert b.resolve("seven").hits == 2  # still counted in Redis
    with pytest.raises(CacheNotFoundError, match="no longer"):  # a machine without a copy finds the loss
        connect(redis_server.url, tmp_path / "c", prefix=prefix, local_copy=True).restore(entry)


def test_local_copy_is_bounded_least_recently_used_first(redis_server, tmp_path):
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    a = connect(redis_server.url, prefix=prefix)
    entries = [put_fake(a, [i] * 300, name=f"e{i}", seed=i) for i in range(3)]
    limit = int(entries[0].bytes * 2.5)  # room for two
    b = RedisStore.from_url(f"{redis_server.url}?prefix={prefix}&local_copy={limit}", home=tmp_path / "b", block_size=4)
    for entry in entries:
        b.restore(entry)
    b.restore(entries[1])  # e1 used last; e0 the least recently
    b.restore(entries[0])  # fetched again from Redis: e2 is now the least recently used and goes
    kept = sorted(p.stem for p in (tmp_path / "b" / "store-copies").glob("*/entries/*.safetensors"))
    assert kept == sorted([entries[0].key, entries[1].key])


# ----------------------------------------------------------- atomic publish


def test_redis_killed_mid_put_leaves_no_entry_and_the_next_put_works(tmp_path, monkeypatch):
    server = RedisServer(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always").start()
    try:
        store = connect(server.url)
        ids = list(range(700))  # three blocks: the first reaches Redis (and its append-only file), the rest never do
        real_send = RedisStore._send

        def send_then_die(self, items):
            items = list(items)
            real_send(self, items[:1])
            server.kill()
            real_send(self, items[1:])

        monkeypatch.setattr(RedisStore, "_send", send_then_die)
        with pytest.raises(StoreUnreachableError, match=f"127.0.0.1:{server.port}"):
            put_fake(store, ids, name="torn")
        monkeypatch.setattr(RedisStore, "_send", real_send)

        server.start()  # reloads what was written before the kill
        staged = keys_of(server, f"{store.prefix}*stage*")
        assert len(staged) == 1 and 0 < int(server.cli("PTTL", staged[0]).stdout) <= 3600 * 1000  # expires on its own
        assert keys_of(server, f"{store.prefix}*:meta") == []
        assert store.entries() == [] and store.longest_prefix(ids, FP, "float32") is None
        with pytest.raises(CacheNotFoundError):
            store.resolve("torn")
        entry = put_fake(store, ids, name="torn")  # the same put again, on the same store object
        assert store.restore(entry).token_ids == ids and store.resolve("torn").key == entry.key
        assert_still_usable(store)
    finally:
        server.stop()


def test_a_reader_sees_no_entry_before_its_publish(redis_server, monkeypatch):
    """Between the staged blocks and the publishing script, nothing of the entry is visible."""
    store = connect(redis_server.url)
    ids = list(range(40))
    seen = {}
    real_send = RedisStore._send

    def send_and_look(self, items):
        real_send(self, items)
        seen["entries"], seen["match"] = store.entries(), store.longest_prefix(ids, FP, "float32")

    monkeypatch.setattr(RedisStore, "_send", send_and_look)
    entry = put_fake(store, ids)
    assert seen == {"entries": [], "match": None}
    assert store.longest_prefix(ids, FP, "float32").entry.key == entry.key
    assert keys_of(redis_server, f"{store.prefix}*stage*") == []  # renamed into place, none left over


# -------------------------------------------------------------------- faults


def test_unreachable_redis_is_a_clear_error_naming_host_and_port(tmp_path):
    port = free_port()
    with pytest.raises(StoreUnreachableError) as info:
        RedisStore.from_url(f"redis://127.0.0.1:{port}/0")
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "redis-server" in message and "--store" in message
    line = one_line_error(run_cli("ls", "--store", f"redis://:pw123@127.0.0.1:{port}/0"))
    assert f"127.0.0.1:{port}" in line and "pw123" not in line


def test_a_server_that_never_answers_times_out_instead_of_hanging():
    with socket.socket() as silent:  # accepts connections (the kernel does), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        with pytest.raises(StoreUnreachableError, match=f"127.0.0.1:{port}.*(?i:timeout|timed out)"):
            RedisStore.from_url(f"redis://127.0.0.1:{port}/0?socket_timeout=0.5")


def test_wrong_or_missing_password(tmp_path):
    server = RedisServer(tmp_path / "redis", password="right-horse").start()
    try:
        with pytest.raises(StoreAuthError) as info:
            RedisStore.from_url(f"redis://:battery-staple@127.0.0.1:{server.port}/0")
        assert f"127.0.0.1:{server.port}" in str(info.value) and "password" in str(info.value)
        assert "battery-staple" not in str(info.value) and "right-horse" not in str(info.value)
        with pytest.raises(StoreAuthError, match="needs a password"):
            RedisStore.from_url(f"redis://127.0.0.1:{server.port}/0")
        line = one_line_error(run_cli("ls", "--store", f"redis://:battery-staple@127.0.0.1:{server.port}/0"))
        assert "battery-staple" not in line and "refused" in line
        assert_still_usable(connect(server.url))  # the right password works
    finally:
        server.stop()


def test_flushed_redis_turns_entries_into_misses(own_redis, tiny, docs, tmp_path):
    store = connect(own_redis.url, block_size=16)
    kb = cag.build([docs], name="kb", model=tiny, store=store)
    entry = store.resolve("kb")
    own_redis.cli("FLUSHALL")
    assert store.entries() == [] and store.longest_prefix(kb.context_ids, tiny.fingerprint, "float32") is None
    with pytest.raises(CacheNotFoundError, match="no cache named 'kb'"):
        cag.load("kb", model=tiny, store=store)
    with pytest.raises(CacheNotFoundError, match="no longer"):
        store.restore(entry)
    rebuilt = cag.build([docs], name="kb", model=tiny, store=store)  # a miss: prefilled again, then found again
    assert rebuilt.report.reused_tokens == 0 and cag.load("kb", model=tiny, store=store).key == kb.key
    assert_still_usable(store)


def test_restarted_redis_without_persistence_is_misses_and_the_store_reconnects(own_redis):
    store = connect(own_redis.url)
    entry = put_fake(store, list(range(30)), name="gone")
    own_redis.kill()
    own_redis.start()
    assert store.entries() == []
    with pytest.raises(CacheNotFoundError):
        store.restore(entry)
    assert_still_usable(store)


def test_entry_bigger_than_maxmemory_is_refused_before_anything_is_written(own_redis):
    store = connect(own_redis.url)
    ids = list(range(256))
    big = cache_from_layers([(torch.randn(1, 2, 256, 512), torch.randn(1, 2, 256, 512)) for _ in range(2)])  # ~4 MiB
    used = int(next(l for l in own_redis.cli("INFO", "memory").stdout.splitlines() if l.startswith("used_memory:")).split(":")[1])
    own_redis.cli("CONFIG", "SET", "maxmemory", str(used + (1 << 20)))
    with pytest.raises(EntryTooBigError, match="maxmemory") as info:
        store.put(big, ids, meta(256), name="big")
    assert "nothing was written" in str(info.value) and "cag gc" in str(info.value)
    assert keys_of(own_redis, f"{store.prefix}*") == [f"{store.prefix}settings"]
    own_redis.cli("CONFIG", "SET", "maxmemory", "0")
    assert store.restore(store.put(big, ids, meta(256), name="big")).cache.get_seq_length() == 256
    assert_still_usable(store)


def test_block_over_the_bulk_limit_is_refused_before_anything_is_written(own_redis):
    store = connect(own_redis.url)
    own_redis.cli("CONFIG", "SET", "proto-max-bulk-len", str(1 << 20))
    big = cache_from_layers([(torch.randn(1, 2, 256, 512), torch.randn(1, 2, 256, 512)) for _ in range(2)])
    with pytest.raises(EntryTooBigError, match="proto-max-bulk-len"):
        store.put(big, list(range(256)), meta(256))
    assert keys_of(own_redis, f"{store.prefix}*") == [f"{store.prefix}settings"]
    assert_still_usable(store)


def test_corrupted_block_is_refused_removed_and_never_loaded(redis_server):
    store = connect(redis_server.url)
    keep = put_fake(store, [5] * 30, name="keep", seed=1)
    ids = list(range(700))
    victim = put_fake(store, ids, name="victim")
    redis_server.cli("SETRANGE", f"{store.prefix}{{{victim.key}}}:b:1", "100", "XXXX")
    assert store.restore(victim, 200).token_ids == ids[:200]  # block 1 is not needed, nor read
    with pytest.raises(CorruptCacheError, match="'victim'.*block 1") as info:
        store.restore(victim)
    assert "removed" in str(info.value) and "cag build" in str(info.value)
    assert keys_of(redis_server, f"{store.prefix}*{victim.key}*") == []
    assert [e.key for e in store.entries()] == [keep.key] and store.longest_prefix(ids, FP, "float32") is None
    assert store.verify().ok == [keep.key]
    assert_still_usable(store)


def test_verify_finds_a_corrupted_block_no_restore_read(redis_server):
    store = connect(redis_server.url)
    keep = put_fake(store, [5] * 30, seed=1)
    victim = put_fake(store, list(range(700)))
    redis_server.cli("SETRANGE", f"{store.prefix}{{{victim.key}}}:b:2", "0", "Z")
    report = store.verify()
    assert report.ok == [keep.key] and report.quarantined == [(victim.key, "checksum mismatch")]
    assert [e.key for e in store.entries()] == [keep.key]


def test_corrupted_token_ids_are_skipped_by_lookup_and_removed(redis_server):
    store = connect(redis_server.url)
    ids = list(range(40))
    victim = put_fake(store, ids)
    redis_server.cli("SETRANGE", f"{store.prefix}{{{victim.key}}}:ids", "8", "Q")
    assert store.longest_prefix(ids, FP, "float32") is None
    assert store.entries() == []
    assert_still_usable(store)


def test_verify_reindexes_an_entry_whose_index_writes_were_lost(redis_server):
    """A put that died after publishing, before indexing: the complete entry is found again."""
    store = connect(redis_server.url)
    ids = list(range(40))
    entry = put_fake(store, ids, name="orphan")
    redis_server.cli("DEL", f"{store.prefix}entries", f"{store.prefix}name:orphan",
                     *keys_of(redis_server, f"{store.prefix}blk:*"))
    assert store.entries() == [] and store.longest_prefix(ids, FP, "float32") is None
    report = store.verify()
    assert report.reindexed == [entry.key] and report.ok == [entry.key]
    assert store.resolve("orphan").key == entry.key and store.longest_prefix(ids, FP, "float32").tokens == 40


# ---------------------------------------------------------- lookup, layout


def test_lookup_is_a_few_round_trips_even_for_a_long_prompt(redis_server, monkeypatch):
    from redis.connection import AbstractConnection

    store = connect(redis_server.url)
    entry = put_fake(store, list(range(50)))
    sent = []
    real = AbstractConnection.send_packed_command
    monkeypatch.setattr(AbstractConnection, "send_packed_command", lambda self, *a, **k: sent.append(1) or real(self, *a, **k))
    match = store.longest_prefix(list(range(50)) + [0] * 4000, FP, "float32")  # 1012 blocks of 4
    assert match.entry.key == entry.key and match.tokens == 50
    assert 1 <= len(sent) <= 10, len(sent)  # a pipelined search, not one command per block


def test_keys_of_one_entry_share_a_hash_tag(redis_server):
    store = connect(redis_server.url)
    entry = put_fake(store, list(range(700)), name="tagged")
    own = keys_of(redis_server, f"{store.prefix}{{{entry.key}}}:*")
    assert len(own) == 6  # meta, names, three blocks, ids
    from redis.crc import key_slot

    assert len({key_slot(k.encode()) for k in own}) == 1


def test_block_size_is_fixed_when_the_redis_store_is_created(redis_server):
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    first = connect(redis_server.url, block_size=8, prefix=prefix)
    put_fake(first, list(range(20)))
    again = connect(redis_server.url, block_size=256, prefix=prefix)
    assert again.block_size == 8 and again.longest_prefix(list(range(20)), FP, "float32").tokens == 20
    assert connect(redis_server.url, block_size=256).block_size == 256


def test_prefixes_keep_projects_apart(redis_server):
    a, b = connect(redis_server.url), connect(redis_server.url)
    put_fake(a, list(range(12)), name="shared-name")
    assert b.entries() == [] and b.longest_prefix(list(range(12)), FP, "float32") is None
    with pytest.raises(CacheNotFoundError):
        b.resolve("shared-name")
    with pytest.raises(StoreError, match="prefix"):
        RedisStore.from_url(f"{redis_server.url}?prefix={{oops}}")


# --------------------------------------------------------------- redaction


def test_passwords_are_never_printed(tmp_path, tiny, docs, monkeypatch):
    from cag.cli import ui

    monkeypatch.setattr(ui.out, "_width", 200)
    server = RedisServer(tmp_path / "redis", password="s3cret-pw").start()
    try:
        url = f"redis://:s3cret-pw@127.0.0.1:{server.port}/0?prefix=p{uuid.uuid4().hex[:8]}:"
        cag.build([docs], name="kb", model=tiny, store=url, home=tmp_path / "home")
        store = open_store(url, tmp_path / "home")
        assert "s3cret-pw" not in repr(store) and "***" in repr(store)
        for args in (("ls",), ("info", "kb"), ("info", "kb", "--json"), ("verify",)):
            result = run_cli(*args, "--store", url, env={"CAG_HOME": str(tmp_path / "home")})
            assert result.exit_code == 0, result.output
            assert "s3cret-pw" not in result.output + result.stderr
        assert "redis://:***@127.0.0.1" in run_cli("ls", "--store", url).stdout
        result = run_cli("ls", env={"CAG_STORE": url})
        assert "kb" in result.stdout and "s3cret-pw" not in result.output + result.stderr
        missing = one_line_error(run_cli("info", "nothing", "--store", url))
        assert "s3cret-pw" not in missing
    finally:
        server.stop()


# ---------------------------------------------------------------------- CLI


def test_cli_commands_on_a_redis_store(tiny_dir, docs, tmp_path, redis_url, monkeypatch):
    monkeypatch.setenv("CAG_HOME", str(tmp_path / "home"))
    built = run_cli("build", docs, "--name", "kb", "--model", tiny_dir, "--store", redis_url, "--json")
    assert built.exit_code == 0, built.output
    monkeypatch.setenv("CAG_STORE", redis_url)  # from here on, the environment names the store
    asked = run_cli("ask", "--cache", "kb", "Who approves travel?", "--max-new-tokens", "4", "--json")
    assert asked.exit_code == 0, asked.output
    assert json.loads(asked.stdout)["reused_tokens"] == json.loads(built.stdout)["tokens"]
    rows = [json.loads(l) for l in run_cli("ls", "--json").stdout.splitlines()]
    assert [r["names"] for r in rows] == [["kb"]] and rows[0]["hits"] >= 1
    assert json.loads(run_cli("verify", "--json").stdout)["ok"] == [rows[0]["key"]]
    gc = run_cli("gc", "--max-size", "0")
    assert gc.exit_code == 0 and "1 cache(s) removed" in gc.stdout
    assert "no caches yet" in run_cli("ls").stdout
    assert one_line_error(run_cli("rm", "kb")).startswith("error: no cache named 'kb'")


# ------------------------------------------------------------------ cluster


def test_cluster_put_lookup_restore_remove(redis_cluster, tmp_path):
    store = connect(redis_cluster.url)
    assert store.cluster
    entries = [put_fake(store, [i] * 300 + list(range(40)), name=f"c{i}", seed=i) for i in range(8)]
    holding = [int(n.cli("DBSIZE").stdout) for n in redis_cluster.nodes]
    assert sum(1 for n in holding if n > 0) >= 2  # entries spread over the nodes
    for i, entry in enumerate(entries):
        own = [k for n in redis_cluster.nodes for k in keys_of(n, f"{store.prefix}{{{entry.key}}}:*")]
        slots = {redis_cluster.nodes[0].cli("CLUSTER", "KEYSLOT", k).stdout.strip() for k in own}
        assert len(own) == 5 and len(slots) == 1  # meta, names, two blocks, ids: one slot, published by one script
        assert store.resolve(f"c{i}").key == entry.key
    match = store.longest_prefix([3] * 300 + list(range(20)) + [7], FP, "float32")
    assert match.entry.key == entries[3].key and match.tokens == 320
    assert store.restore(entries[3], 100).token_ids == [3] * 100
    assert store.restore(entries[3]).cache.get_seq_length() == 340
    assert sorted(store.verify().ok) == sorted(e.key for e in entries)
    redis_cluster.nodes[0].cli("-c", "DEL", f"{store.prefix}entries")  # every node's entries must be found again
    assert store.entries() == [] and sorted(store.verify().reindexed) == sorted(e.key for e in entries)
    assert [e.key for e in store.remove("c0")] == [entries[0].key]
    assert len(store.gc(entries[0].bytes * 3)) == 4 and len(store.entries()) == 3
    assert_still_usable(store)


def test_knowledge_base_on_a_cluster(redis_cluster, tiny, docs, tmp_path):
    url = f"{redis_cluster.url}?prefix=k{uuid.uuid4().hex[:8]}:"
    kb = cag.build([docs], name="kb", model=tiny, store=url, home=tmp_path / "a")
    again = cag.load("kb", model=tiny, store=url, home=tmp_path / "b")
    question = "Who approves travel?"
    assert again.ask(question, max_new_tokens=4).text == kb.ask(question, max_new_tokens=4, use_cache=False).text
