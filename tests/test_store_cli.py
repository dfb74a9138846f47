"""`cag ls`, `info`, `rm`, `gc`, `verify` on caches built through the API (these commands load no model)."""

from __future__ import annotations

import json
import struct

import pytest
from typer.testing import CliRunner

import cag
from cag.cli.main import app
from cag.stores import LocalStore

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def built(tiny, docs, home):
    """Two caches: 'two' (two documents) and 'all' (three), plus a second name on 'all'."""
    two = cag.build([docs / "refunds.md", docs / "travel.md"], name="two", model=tiny, home=home)
    both = cag.build([docs], name="all", model=tiny, home=home)
    store = LocalStore(home / "store")
    store.label("handbook", both.key)
    store.close()
    return two, both


def entry_file(home, key: str):
    return home / "store" / "entries" / f"{key}.safetensors"


def test_ls_on_an_empty_store(home):
    result = run("ls")
    assert result.exit_code == 0 and "no caches yet" in result.stdout
    result = run("ls", "--json")
    assert result.exit_code == 0 and result.stdout == ""


def test_ls_lists_names_keys_and_sizes(built, tiny, monkeypatch):
    from cag.cli import ui

    monkeypatch.setattr(ui.out, "_width", 160)  # a wide terminal: at 80 columns rich elides the cells
    two, both = built
    result = run("ls")
    assert result.exit_code == 0, result.output
    for text in ("two", "all, handbook", two.key[:8], both.key[:8], f"{both.report.tokens:,}"):
        assert text in result.stdout
    rows = {r["key"]: r for r in json_lines(run("ls", "--json").stdout)}
    assert set(rows) == {two.key, both.key}
    row = rows[both.key]
    assert row["names"] == ["all", "handbook"] and row["tokens"] == both.report.tokens == row["boundary"]
    assert row["bytes"] == entry_file(built[0].store.root.parent, both.key).stat().st_size
    assert row["fingerprint"] == tiny.fingerprint and row["model"] == tiny.name and row["kv_dtype"] == "float32"
    assert len(row["sources"]) == 3 and row["hits"] == 0


def test_info_by_name_key_and_key_prefix(built, home):
    two, both = built
    by_name = json_lines(run("info", "handbook", "--json").stdout)
    by_key = json_lines(run("info", both.key, "--json").stdout)
    by_prefix = json_lines(run("info", both.key[:10], "--json").stdout)
    assert by_name == by_key == by_prefix and by_name[0]["key"] == both.key
    assert by_name[0]["blocks"] == both.report.tokens // 256
    text = run("info", "two")
    assert text.exit_code == 0 and two.key in text.stdout and "refunds.md" in text.stdout


def test_info_counts_hits_after_a_load(built, tiny, home):
    _, both = built
    kb = cag.load("all", model=tiny, home=home)
    kb.ask("Who approves travel?", max_new_tokens=2)
    assert json_lines(run("info", "all", "--json").stdout)[0]["hits"] == 1


def test_rm_removes_a_name_then_the_entry(built, home):
    two, both = built
    result = run("rm", "handbook")
    assert result.exit_code == 0 and "entry kept" in result.stdout
    assert entry_file(home, both.key).exists()
    result = run("rm", "all")
    assert result.exit_code == 0 and "freed" in result.stdout
    assert not entry_file(home, both.key).exists()
    assert [r["key"] for r in json_lines(run("ls", "--json").stdout)] == [two.key]
    result = run("rm", two.key)
    assert result.exit_code == 0 and not entry_file(home, two.key).exists()
    assert run("ls", "--json").stdout == ""


def test_rm_unknown_cache_is_one_line(built):
    assert_one_line_error(run("rm", "nope"), "nope", "cag ls")


def test_names_that_could_escape_the_store_are_refused(built, home):
    for name in ["../x", "/abs", "a/b", "", "x" * 200, "..", "../../etc/passwd", "two/../all"]:
        for command in (["info", name], ["rm", name]):
            assert_one_line_error(run(*command), "invalid cache name")
    assert len(json_lines(run("ls", "--json").stdout)) == 2  # nothing was touched


def test_names_are_refused_by_the_api_too(docs, tiny, home):
    with pytest.raises(cag.InvalidNameError):
        cag.build([docs], name="../escape", model=tiny, home=home)
    assert not (home / "escape").exists() and not (home.parent / "escape").exists()


def test_gc_keeps_the_recently_used_cache(built, tiny, home):
    two, both = built
    cag.load("two", model=tiny, home=home).ask("Who approves travel?", max_new_tokens=1)  # 'two' is now newest
    size_two = two.report.bytes
    result = run("gc", "--max-size", str(size_two))
    assert result.exit_code == 0, result.output
    assert "1 cache(s) removed" in result.stdout and "all, handbook" in result.stdout
    assert [r["key"] for r in json_lines(run("ls", "--json").stdout)] == [two.key]
    assert not entry_file(home, both.key).exists()
    result = run("gc", "--max-size", "1GB")
    assert result.exit_code == 0 and "0 cache(s) removed" in result.stdout
    assert run("gc", "--max-size", "0").exit_code == 0 and run("ls", "--json").stdout == ""


def test_gc_with_a_bad_size_is_refused(built):
    result = run("gc", "--max-size", "lots")
    assert result.exit_code != 0 and "cannot read size" in result.output
    assert len(json_lines(run("ls", "--json").stdout)) == 2


def test_verify_clean_store(built):
    result = run("verify")
    assert result.exit_code == 0 and "2 ok" in result.stdout
    report = json_lines(run("verify", "--json").stdout)[0]
    assert sorted(report["ok"]) == sorted(e.key for e in built) and report["quarantined"] == [] and report["removed_rows"] == []


def test_verify_finds_a_flipped_byte_and_a_lost_file(built, home):
    two, both = built
    path = entry_file(home, both.key)
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 + n + 100] ^= 0xFF
    path.write_bytes(bytes(raw))
    entry_file(home, two.key).unlink()
    result = run("verify", "--json")
    assert result.exit_code == 1
    report = json_lines(result.stdout)[0]
    assert report["ok"] == [] and report["removed_rows"] == [two.key]
    assert report["quarantined"] == [{"item": both.key, "reason": "checksum mismatch"}]
    assert list((home / "store" / "quarantine").iterdir())
    assert run("ls", "--json").stdout == ""
    result = run("verify")
    assert result.exit_code == 0 and "0 ok" in result.stdout  # the store is clean and usable again


def test_asking_a_corrupt_cache_is_one_line_and_quarantines_it(docs, home, tiny_dir):
    lm = cag.load_model(str(tiny_dir), home=home)  # the model `--model` will load, so the fingerprints agree
    two = cag.build([docs / "refunds.md", docs / "travel.md"], name="two", model=lm, home=home)
    both = cag.build([docs], name="all", model=lm, home=home)
    path = entry_file(home, two.key)
    path.write_bytes(path.read_bytes()[:200])
    result = run("ask", "--cache", "two", "Who approves travel?", "--model", tiny_dir, "--max-new-tokens", "1")
    assert_one_line_error(result, "'two'", "corrupt", "cag build")
    assert_one_line_error(run("info", "two"), "two")  # gone from the index
    assert [p.name.split(".")[0] for p in (home / "store" / "quarantine").iterdir()] == [two.key]
    assert [r["key"] for r in json_lines(run("ls", "--json").stdout)] == [both.key]
    assert run("verify").exit_code == 0
