"""The embedded default model end to end: cached answers equal re-prefilled answers."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cag.cli.main import app

pytestmark = pytest.mark.integration

DOCS = {
    "orders.md": "# Orders at Quillfeather Ltd\nEvery order above 900 marks needs a purchase code that starts with QF-. "
    "The warehouse in Tarrow ships on Tuesdays and Fridays only.\n",
    "people.md": "# People\nMirela Okonjo leads the Tarrow warehouse. Benedikt Saal approves purchase codes. "
    "The night shift starts at 22:00.\n",
    "returns.txt": "Returns are accepted for 17 days after delivery. Damaged parcels are reported with form QR-9.\n",
}
QUESTIONS = [
    "Who approves purchase codes?",
    "On which days does the Tarrow warehouse ship?",
    "Which form is used for damaged parcels?",
]


def test_build_and_ask_default_model_matches_no_cache(real_home, tmp_path, monkeypatch):
    monkeypatch.setenv("CAG_HOME", str(real_home))
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    runner = CliRunner()

    built = runner.invoke(app, ["build", str(folder), "--name", "quill", "--json"])
    assert built.exit_code == 0, built.output
    report = json.loads(built.stdout.strip().splitlines()[-1])
    assert report["tokens"] > 100 and report["bytes"] > report["tokens"] * 1000

    args = ["ask", "--cache", "quill", *QUESTIONS, "--max-new-tokens", "24", "--json"]
    cached = [json.loads(l) for l in runner.invoke(app, args).stdout.splitlines() if l.startswith("{")]
    full = [json.loads(l) for l in runner.invoke(app, [*args, "--no-cache"]).stdout.splitlines() if l.startswith("{")]
    assert len(cached) == len(full) == len(QUESTIONS)
    for a, b in zip(cached, full):
        assert a["answer"] == b["answer"] and a["new_tokens"] == b["new_tokens"] > 0
        assert a["reused_tokens"] == report["tokens"] and b["reused_tokens"] == 0
    # The model reads the documents: at least one answer carries a fact only they contain.
    facts = ["Benedikt", "Saal", "Tuesday", "Friday", "QR-9"]
    assert any(f in a["answer"] for a in cached for f in facts), [a["answer"] for a in cached]
