"""A store is a URL: the registry from scheme to backend, CAG_STORE, third-party backends,
and a library that never knows which backend it talks to."""

from __future__ import annotations

import re
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import cag
from cag.errors import StoreError
from cag.stores import LocalStore, RedisStore, backends, default_url, open_store, redact
from cag.stores import registry

ROOT = Path(__file__).resolve().parent.parent
# Code that picks or tests for a backend: importing one, isinstance on one, or the redis client itself.
BACKEND_SPECIFIC = re.compile(
    r"import .*\b(LocalStore|RedisStore)\b|isinstance\(.*\b(LocalStore|RedisStore)\b|stores\.(local|redis)\b"
    r"|^\s*(import|from) redis\b|\b(LocalStore|RedisStore)\("
)


def test_the_default_is_the_local_store_under_the_cache_home(home):
    store = open_store(None, home)
    assert isinstance(store, LocalStore) and store.root == (home / "store").resolve()
    assert default_url(home) == (home / "store").resolve().as_uri()


def test_file_urls_and_plain_folders_open_local_stores(tmp_path, home):
    assert open_store(f"file://{tmp_path}/a", home).root == tmp_path / "a"
    assert open_store(str(tmp_path / "b"), home).root == tmp_path / "b"
    assert open_store("file://", home).root == home / "store"
    with pytest.raises(StoreError, match="three slashes"):
        open_store("file://elsewhere/x", home)


def test_cag_store_overrides_the_default(redis_url, home, monkeypatch, tmp_path):
    monkeypatch.setenv("CAG_STORE", redis_url)
    assert isinstance(open_store(None, home), RedisStore) and default_url(home) == redis_url
    monkeypatch.setenv("CAG_STORE", f"file://{tmp_path}/elsewhere")
    assert open_store(None, home).root == tmp_path / "elsewhere"
    passed = LocalStore(tmp_path / "given")
    assert open_store(passed, home) is passed  # a store object is used as it is


def test_cag_store_reaches_the_knowledge_api(tiny, docs, home, tmp_path, monkeypatch):
    monkeypatch.setenv("CAG_STORE", f"file://{tmp_path}/shared")
    kb = cag.build([docs], name="kb", model=tiny)
    assert (tmp_path / "shared" / "entries" / f"{kb.key}.safetensors").is_file()
    assert not (home / "store").exists()
    assert cag.load("kb", model=tiny, store=str(tmp_path / "shared")).key == kb.key


def test_unknown_scheme_names_the_known_ones(home):
    with pytest.raises(StoreError) as info:
        open_store("s3://bucket/caches", home)
    message = str(info.value)
    assert "s3://" in message and "file, redis, rediss" in message and "cag.stores" in message


def test_a_third_party_backend_registers_through_entry_points(monkeypatch, tiny, docs, home, tmp_path):
    """A package declaring [project.entry-points."cag.stores"] mem = "...:factory" serves mem:// URLs."""
    opened = []

    def factory(url, home_dir):
        opened.append((url, home_dir))
        return LocalStore(tmp_path / "mem")

    monkeypatch.setattr(registry, "entry_points", lambda group: [EntryPoint("mem", f"{__name__}:_FACTORY", group)])
    monkeypatch.setitem(globals(), "_FACTORY", factory)
    assert "mem" in backends() and {"file", "redis", "rediss"} <= set(backends())
    kb = cag.build([docs], name="kb", model=tiny, store="mem://anything", home=home)
    assert opened == [("mem://anything", home)] and (tmp_path / "mem" / "entries" / f"{kb.key}.safetensors").is_file()


def test_cag_itself_declares_its_backends_as_entry_points():
    from importlib.metadata import entry_points

    declared = {ep.name: ep.value for ep in entry_points(group="cag.stores")}
    assert declared == {"file": "cag.stores.local:open_file_store", "redis": "cag.stores.redis:open_redis_store",
                        "rediss": "cag.stores.redis:open_redis_store"}


@pytest.mark.parametrize("url, shown", [
    ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
    ("rediss://user:secret@host:6380/1?prefix=x:", "rediss://user:***@host:6380/1?prefix=x:"),
    ("redis://host:6379/0?password=secret&socket_timeout=2", "redis://host:6379/0?password=***&socket_timeout=2"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("file:///tmp/store", "file:///tmp/store"),
])
def test_redact_hides_passwords_only(url, shown):
    assert redact(url) == shown


def test_nothing_outside_stores_knows_which_backend_it_talks_to():
    offenders = []
    for folder in ("cag", "cli"):
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if BACKEND_SPECIFIC.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
