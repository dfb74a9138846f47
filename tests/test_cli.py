"""`cag build` and `cag ask` through the real CLI, and every bad input of the core issue."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cag.cli.main import app
from conftest import save_tiny_model

runner = CliRunner()


def cag(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _store_files(home):
    folder = home / "store" / "entries"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_build_then_ask_json_matches_no_cache(tiny_dir, docs, home):
    built = cag("build", docs, "--name", "handbook", "--model", tiny_dir, "--json")
    assert built.exit_code == 0, built.output
    info = _json_lines(built.stdout)[0]
    assert info["name"] == "handbook" and info["tokens"] > 50 and info["bytes"] > 0 and info["seconds"] > 0
    assert info["prefilled_tokens"] == info["tokens"] and info["reused_tokens"] == 0

    questions = ["Who approves travel?", "Where are badges issued?", "What is the refund policy?"]
    cached = cag("ask", "--cache", "handbook", *questions, "--max-new-tokens", "8", "--json")
    assert cached.exit_code == 0, cached.output
    rows = _json_lines(cached.stdout)
    assert [r["question"] for r in rows] == questions
    for row in rows:
        assert {"question", "answer", "new_tokens", "ttft_s", "total_s", "reused_tokens", "prefilled_tokens"} <= row.keys()
        assert row["reused_tokens"] == info["tokens"] and 0 < row["ttft_s"] <= row["total_s"]

    plain = cag("ask", "--cache", "handbook", *questions, "--max-new-tokens", "8", "--json", "--no-cache")
    assert plain.exit_code == 0, plain.output
    baseline = _json_lines(plain.stdout)
    assert [r["answer"] for r in rows] == [r["answer"] for r in baseline]
    assert all(r["reused_tokens"] == 0 for r in baseline)


def test_ask_streams_answers_and_reads_questions_file(tiny_dir, docs, home, tmp_path):
    assert cag("build", docs, "--name", "kb", "--model", tiny_dir).exit_code == 0
    qfile = tmp_path / "q.txt"
    qfile.write_text("# a comment\nWho approves travel?\n\nWhere are badges issued?\n")
    result = cag("ask", "-c", "kb", "--questions", qfile, "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("Q:") == 2 and "first token" in result.stdout


def test_build_reads_stdin(tiny_dir, home):
    result = cag("build", "-", "--name", "piped", "--model", tiny_dir, "--json", input="Piped text about refunds.\n")
    assert result.exit_code == 0, result.output
    assert _json_lines(result.stdout)[0]["sources"] == ["stdin"]


def _fails(result, message: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert message in lines[0], lines[0]


def test_missing_document(tiny_dir, home):
    _fails(cag("build", "nowhere.md", "--name", "x", "--model", tiny_dir), "nowhere.md")
    assert _store_files(home) == []


def test_empty_document(tiny_dir, home, tmp_path):
    (tmp_path / "empty.md").write_text("  \n")
    _fails(cag("build", tmp_path / "empty.md", "--model", tiny_dir), "empty")
    assert _store_files(home) == []


def test_unknown_cache(home):
    _fails(cag("ask", "--cache", "nope", "hello?"), "no cache named 'nope'")


def test_no_question(tiny_dir, docs, home):
    assert cag("build", docs, "--name", "kb", "--model", tiny_dir).exit_code == 0
    _fails(cag("ask", "--cache", "kb"), "no question")


def test_cache_from_another_model_is_refused(tiny_dir, docs, home, tmp_path):
    other = save_tiny_model(tmp_path / "other-model", seed=1)
    assert cag("build", docs, "--name", "kb", "--model", tiny_dir).exit_code == 0
    result = cag("ask", "--cache", "kb", "--model", other, "Who approves travel?")
    _fails(result, "was built by model")
    assert str(tiny_dir.resolve()) in result.output and str(other.resolve()) in result.output
    assert cag("ask", "--cache", "kb", "Who approves travel?", "--max-new-tokens", "2").exit_code == 0


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_cache_is_refused_and_store_stays_usable(tiny_dir, docs, home, tmp_path, damage):
    assert cag("build", docs, "--name", "kb", "--model", tiny_dir).exit_code == 0
    (tmp_path / "other.md").write_text("A second, unrelated knowledge base about parking permits.")
    assert cag("build", tmp_path / "other.md", "--name", "parking", "--model", tiny_dir).exit_code == 0
    path = home / "store" / "entries" / (json.loads(cag("info", "kb", "--json").stdout)["key"] + ".safetensors")
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))

    _fails(cag("ask", "--cache", "kb", "Who approves travel?"), "corrupt")
    assert (home / "store" / "quarantine").is_dir() and not path.exists()
    assert cag("ask", "--cache", "parking", "Permits?", "--max-new-tokens", "2").exit_code == 0
    listed = cag("ls", "--json")
    assert listed.exit_code == 0 and [e["names"] for e in _json_lines(listed.stdout)] == [["parking"]]


def test_context_too_long(home, tmp_path):
    short = save_tiny_model(tmp_path / "short-window", max_positions=64)
    (tmp_path / "long.md").write_text("Refund within 21 days. " * 60)
    result = cag("build", tmp_path / "long.md", "--model", short)
    _fails(result, "context window is 64 tokens")
    assert "tokens but" in result.output
    assert _store_files(home) == []


def test_unwritable_store(tiny_dir, docs, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CAG_HOME", str(blocker / "home"))
    _fails(cag("build", docs, "--model", tiny_dir), "cache store")


def test_invalid_name(tiny_dir, docs, home):
    _fails(cag("build", docs, "--name", "../escape", "--model", tiny_dir), "invalid cache name")
    assert _store_files(home) == []


def test_build_with_int8_kv_dtype_is_smaller_and_answers(tiny_dir, docs, home):
    full = _json_lines(cag("build", docs, "--name", "f32", "--model", tiny_dir, "--json").stdout)[0]
    small = cag("build", docs, "--name", "i8", "--model", tiny_dir, "--kv-dtype", "int8", "--json")
    assert small.exit_code == 0, small.output
    row = _json_lines(small.stdout)[0]
    assert row["key"] != full["key"] and row["bytes"] < full["bytes"] / 2
    assert json.loads(cag("info", "i8", "--json").stdout)["kv_dtype"] == "int8"
    answer = cag("ask", "--cache", "i8", "Who approves travel?", "--max-new-tokens", "3", "--json")
    assert answer.exit_code == 0 and _json_lines(answer.stdout)[0]["new_tokens"] > 0
    _fails(cag("build", docs, "--model", tiny_dir, "--kv-dtype", "int4"), "unsupported KV dtype")
