"""The local store's index can always be rebuilt: files describe themselves, names included.

A lost or unreadable index.sqlite is rebuilt from the files when the store is next
opened; a valid file without an index row is indexed again by verify; only files
that fail their checks go to quarantine.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
from typer.testing import CliRunner

import cag
from cag.cli.main import app
from cag.kvcache import read_metadata
from cag.stores import LocalStore
from test_store import put_fake

runner = CliRunner()
QUESTION = "Who approves travel?"


def entry_file(store: LocalStore, key: str):
    return store.root / "entries" / f"{key}.safetensors"


def quarantined(store: LocalStore) -> list[str]:
    folder = store.root / "quarantine"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def built(tiny, docs, home):
    """Two caches built through the API: 'two' and 'all' (also named 'handbook'); the answers they give."""
    two = cag.build([docs / "refunds.md", docs / "travel.md"], name="two", model=tiny, home=home)
    both = cag.build([docs], name="all", model=tiny, home=home)
    both.store.label("handbook", both.key)
    answers = {kb.key: kb.ask(QUESTION, max_new_tokens=6).text for kb in (two, both)}
    for kb in (two, both):
        kb.store.close()
    return two, both, answers


def test_names_are_written_into_the_file_header(tmp_path):
    store = LocalStore(tmp_path / "store", block_size=4)
    a = put_fake(store, list(range(10)), name="alpha")
    assert read_metadata(entry_file(store, a.key)).names == ("alpha",)
    store.label("beta", a.key)
    assert read_metadata(entry_file(store, a.key)).names == ("alpha", "beta")
    b = put_fake(store, list(range(1, 11)))
    assert read_metadata(entry_file(store, b.key)).names == ()
    store.label("beta", b.key)  # moved: both headers follow
    assert read_metadata(entry_file(store, a.key)).names == ("alpha",)
    assert read_metadata(entry_file(store, b.key)).names == ("beta",)
    store.remove("alpha")
    assert not entry_file(store, a.key).exists()
    # The index's checksums follow the rewritten files: nothing looks corrupt.
    report = store.verify()
    assert report.ok == [b.key] and not report.quarantined and not report.removed_rows
    assert store.resolve(b.key).bytes == entry_file(store, b.key).stat().st_size
    assert not [p for p in (store.root / "entries").iterdir() if p.name.startswith(".")]  # no leftovers


def test_deleted_index_is_rebuilt_with_names_and_every_entry_answers(built, tiny, docs, home):
    two, both, answers = built
    (home / "store" / "index.sqlite").unlink()
    result = runner.invoke(app, ["ls", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert set(rows) == {two.key, both.key}
    assert rows[two.key]["names"] == ["two"] and rows[both.key]["names"] == ["all", "handbook"]
    assert rows[both.key]["tokens"] == both.report.tokens and len(rows[both.key]["sources"]) == 3
    for name, kb in (("two", two), ("handbook", both)):
        again = cag.load(name, model=tiny, home=home)
        assert again.ask(QUESTION, max_new_tokens=6).text == answers[kb.key]
    # Lookup works again too: a build of the same documents reuses the whole cache.
    assert cag.build([docs], model=tiny, home=home).report.reused_tokens == both.report.tokens
    store = LocalStore(home / "store")
    assert not quarantined(store) and not store.verify().quarantined


def test_unreadable_index_is_set_aside_and_rebuilt(built, home):
    two, both, _ = built
    index = home / "store" / "index.sqlite"
    index.write_bytes(b"this is not a database" * 100)
    store = LocalStore(home / "store")
    assert sorted(e.key for e in store.entries()) == sorted([two.key, both.key])
    assert store.resolve("handbook").key == both.key
    assert any(name.startswith("index.sqlite") for name in quarantined(store))  # kept for inspection


def test_a_file_failing_its_checks_still_goes_to_quarantine_when_the_index_is_rebuilt(built, home):
    two, both, _ = built
    path = home / "store" / "entries" / f"{two.key}.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF  # inside the token ids or the last KV block
    path.write_bytes(bytes(raw))
    (home / "store" / "index.sqlite").unlink()
    store = LocalStore(home / "store")
    assert [e.key for e in store.entries()] == [both.key]
    assert not path.exists() and quarantined(store)[0].startswith(path.name)


def test_verify_reindexes_a_valid_file_without_a_row_instead_of_quarantining_it(built, home):
    two, both, _ = built
    db = sqlite3.connect(home / "store" / "index.sqlite")
    with db:
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("DELETE FROM entries WHERE key=?", (both.key,))  # its names and blocks go with it
    db.close()
    assert [e.key for e in LocalStore(home / "store").entries()] == [two.key]
    result = runner.invoke(app, ["verify"])
    assert result.exit_code == 0, result.output
    assert f"re-indexed {both.key[:12]}" in result.stdout and "quarantined" not in result.stdout
    store = LocalStore(home / "store")
    assert store.resolve("handbook").key == both.key and store.resolve("all").key == both.key
    assert store.longest_prefix(store.token_ids(store.resolve("all")), both.entry.fingerprint, "float32").entry.key == both.key
    assert not quarantined(store)
    report = json.loads(runner.invoke(app, ["verify", "--json"]).stdout)
    assert sorted(report["ok"]) == sorted([two.key, both.key]) and report["reindexed"] == []


def test_the_newer_file_keeps_a_name_two_files_claim(tmp_path):
    store = LocalStore(tmp_path / "store", block_size=4)
    old = put_fake(store, list(range(8)), name="doc")
    new = put_fake(store, list(range(1, 9)))
    store.label("doc", new.key)
    # A crash between the two header rewrites would leave both files claiming the name: mimic it.
    import os

    from cag.kvcache import write_names

    stale = store.root / "stale.tmp"
    write_names(entry_file(store, old.key), stale, ["doc"])
    os.replace(stale, entry_file(store, old.key))
    os.utime(entry_file(store, old.key), (1, 1))  # and older
    store.close()
    (tmp_path / "store" / "index.sqlite").unlink()
    again = LocalStore(tmp_path / "store")
    assert again.resolve("doc").key == new.key and again.resolve(old.key).names == ()


def test_a_rebuilt_index_keeps_the_block_size(tmp_path):
    store = LocalStore(tmp_path / "store", block_size=4)
    entry = put_fake(store, list(range(20)), name="twenty")
    store.close()
    (tmp_path / "store" / "index.sqlite").unlink()
    again = LocalStore(tmp_path / "store")  # the default (256) asked for, as any later process does
    assert again.block_size == 4
    assert again.resolve("twenty").key == entry.key and again.longest_prefix(list(range(20)), "f" * 64, "float32").tokens == 20
