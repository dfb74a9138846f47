"""`cag eval`: metrics, QA-set loading, the four systems end to end on the tiny model, the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cag.cli.main import app
from cag.errors import DatasetError
from cag.measure.evaluate import (
    QAFields,
    contains_answer,
    exact_match,
    load_qa,
    normalize_answer,
    run_eval,
    token_f1,
)
from cag.retrieval import Embedder

PUMPS = [
    {"source": "pumps.md", "text": "The Lyra pump has product code KP-2208. It weighs 14 kilograms."},
    {"source": "staff.md", "text": "Marta Velling leads the night shift. The canteen opens at seven."},
]
ALARMS = [{"source": "alarms.md", "text": "Alarm E-31 means the coolant is low. Alarm E-44 means a fan stopped."}]
ROWS = [
    {"id": "q1", "context_id": "pumps", "documents": PUMPS, "question": "What is the code of the Lyra pump?", "answers": ["KP-2208"]},
    {"id": "q2", "context_id": "pumps", "documents": PUMPS, "question": "Who leads the night shift?", "answers": ["Marta Velling", "Velling"]},
    {"id": "q3", "context_id": "alarms", "documents": ALARMS, "question": "What does alarm E-44 mean?", "answers": ["a fan stopped"]},
]
SYSTEM_FIELDS = {"system", "top_k", "n", "em", "f1", "contains", "similarity", "retrieval_s", "generation_s",
                 "prompt_tokens", "setup_s"}


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture
def qa_jsonl(tmp_path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


@pytest.fixture
def qa_csv(tmp_path) -> Path:
    """One document per row as a plain string column, answers as a string or a JSON list."""
    path = tmp_path / "qa.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer", "context"])
        writer.writeheader()
        writer.writerow({"question": "What is the code of the Lyra pump?", "answer": "KP-2208", "context": PUMPS[0]["text"]})
        writer.writerow({"question": "How heavy is the pump?", "answer": '["14 kilograms", "14 kg"]', "context": PUMPS[0]["text"]})
        writer.writerow({"question": "What does alarm E-44 mean?", "answer": "a fan stopped", "context": ALARMS[0]["text"]})
    return path


# --- metrics (expected values worked out by hand) ------------------------------------


def test_normalize_answer_as_squad():
    assert normalize_answer("  The Code is: KP-2208! ") == "code is kp2208"
    assert normalize_answer("An apple, a pear") == "apple pear"


def test_exact_match():
    assert exact_match("The KP-2208.", ["KP-2208"]) == 1.0
    assert exact_match("KP-2208 pump", ["KP-2208"]) == 0.0
    assert exact_match("velling", ["Marta Velling", "Velling"]) == 1.0


def test_token_f1_is_the_best_over_references():
    # "marta velling leads" vs "marta velling": precision 2/3, recall 1 -> F1 0.8
    assert token_f1("Marta Velling leads", ["Marta Velling"]) == pytest.approx(0.8)
    # against "velling": precision 1/3, recall 1 -> 0.5; the best reference counts
    assert token_f1("Marta Velling leads", ["Velling"]) == pytest.approx(0.5)
    assert token_f1("Marta Velling leads", ["Velling", "Marta Velling"]) == pytest.approx(0.8)
    assert token_f1("nothing in common", ["Marta Velling"]) == 0.0
    # repeated tokens only count as often as the reference has them: 1 common of 3 vs 1 -> P 1/3, R 1
    assert token_f1("fan fan fan", ["fan"]) == pytest.approx(0.5)


def test_contains_answer_matches_whole_words_only():
    assert contains_answer("The code of the Lyra pump is KP-2208.", ["KP-2208"]) == 1.0
    assert contains_answer("It weighs 114 kilograms.", ["14 kilograms"]) == 0.0
    assert contains_answer("It weighs 14 kg.", ["14 kilograms", "14 kg"]) == 1.0
    assert contains_answer("", ["KP-2208"]) == 0.0


# --- loading QA sets -------------------------------------------------------------------


def test_load_jsonl_groups_contexts_and_keeps_sources(qa_jsonl):
    items = load_qa(qa_jsonl)
    assert [i.id for i in items] == ["q1", "q2", "q3"]
    assert [i.context_id for i in items] == ["pumps", "pumps", "alarms"]
    assert [d.source for d in items[0].documents] == ["pumps.md", "staff.md"]
    assert items[1].answers == ("Marta Velling", "Velling")


def test_load_csv_with_a_single_document_column(qa_csv):
    items = load_qa(qa_csv)
    assert len(items) == 3
    assert items[1].answers == ("14 kilograms", "14 kg")  # a JSON list in a cell
    assert items[0].answers == ("KP-2208",)
    # Without a context_id column, rows with the same document share a context.
    assert items[0].context_id == items[1].context_id != items[2].context_id
    assert items[0].documents[0].text == PUMPS[0]["text"]


def test_load_parquet(tmp_path):
    import datasets

    path = tmp_path / "qa.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert [i.question for i in load_qa(path)] == [r["question"] for r in ROWS]


def test_missing_question_field_names_the_field_and_the_option(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"query_text": "Who?", "answers": ["x"], "documents": ["some text"]}) + "\n")
    with pytest.raises(DatasetError, match=r"no question field.*query_text.*--question-field"):
        load_qa(path)
    items = load_qa(path, fields=QAFields(question="query_text"))
    assert items[0].question == "Who?" and items[0].documents[0].text == "some text"


@pytest.mark.parametrize("name, text, message", [
    ("missing.jsonl", None, "no such dataset file"),
    ("qa.txt", "question\n", "unsupported dataset file type"),
    ("noanswer.jsonl", json.dumps({"question": "Q?", "answers": [], "documents": ["d"]}) + "\n", "no reference answer"),
    ("nodocs.jsonl", json.dumps({"question": "Q?", "answers": ["a"], "documents": [" "]}) + "\n", "no documents"),
])
def test_bad_datasets_raise_dataset_error(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        load_qa(path)


def test_one_context_id_with_two_document_sets_is_refused(tmp_path):
    rows = [dict(ROWS[0]), dict(ROWS[2], context_id="pumps")]
    path = tmp_path / "clash.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match="other documents"):
        load_qa(path)


# --- the evaluation end to end ---------------------------------------------------------


def test_run_eval_end_to_end_on_the_tiny_model(tiny, home, qa_jsonl, embedder):
    progress = []
    report = run_eval(tiny, qa_jsonl, top_k=[1, 2], max_new_tokens=6, home=home, embedder=embedder,
                      on_progress=lambda done, total, what: progress.append((done, total)))
    assert report.questions == 3 and report.contexts == 2
    keys = [(r.system, r.top_k) for r in report.systems]
    assert keys == [("cag", None), ("bm25", 1), ("bm25", 2), ("dense", 1), ("dense", 2), ("full", None)]
    # 3 questions x (cag + full + 2 retrievers x 2 values of k)
    assert progress[-1] == (18, 18) and len(progress) == 18 == len(report.answers)
    for row in report.systems:
        data = row.to_dict()
        assert SYSTEM_FIELDS <= data.keys()
        assert row.n == 3
        for metric in ("em", "f1", "contains", "similarity"):
            assert 0.0 <= data[metric] <= 1.0
        assert row.generation_s > 0 and row.prompt_tokens > 0
        assert (row.retrieval_s > 0) == (row.system in ("bm25", "dense"))  # cag and full retrieve nothing
        assert ("identical_to_full" in data) == (row.system == "cag")
    by_key = {(r.system, r.top_k): r for r in report.systems}
    # Greedy answers from the cache are the answers from the full prompt.
    assert by_key[("cag", None)].identical_to_full == 1.0
    assert by_key[("cag", None)].setup_s > 0 and by_key[("bm25", 1)].setup_s > 0
    assert by_key[("bm25", 1)].retrieval_s > 0 and by_key[("dense", 1)].retrieval_s > 0
    # The first context holds two documents, so one passage is a shorter prompt than all of them.
    assert by_key[("bm25", 1)].prompt_tokens < by_key[("full", None)].prompt_tokens
    assert by_key[("cag", None)].prompt_tokens == by_key[("full", None)].prompt_tokens
    cag_answers = [a for a in report.answers if a.system == "cag"]
    full_answers = [a for a in report.answers if a.system == "full"]
    assert [a.token_ids for a in cag_answers] == [a.token_ids for a in full_answers]
    assert all(a.reused_tokens > 0 for a in cag_answers) and all(a.reused_tokens == 0 for a in full_answers)
    rag = [a for a in report.answers if a.system == "bm25" and a.top_k == 2]
    assert all(len(a.sources) == 2 for a in rag if a.context_id == "pumps")
    assert all(len(a.sources) == 1 for a in rag if a.context_id == "alarms")  # k clamped to the passages there
    table = report.markdown().splitlines()
    assert len(table) == 2 + len(report.systems) and table[2].startswith("| CAG")


def test_run_eval_builds_one_cache_per_context_and_reuses_it(tiny, home, qa_jsonl, embedder):
    from cag.knowledge import open_store

    run_eval(tiny, qa_jsonl, systems=["cag"], max_new_tokens=2, home=home, embedder=embedder)
    entries = open_store(home).entries()
    assert len(entries) == 2
    assert {e.sources for e in entries} == {("pumps.md", "staff.md"), ("alarms.md",)}
    report = run_eval(tiny, qa_jsonl, systems=["cag"], max_new_tokens=2, home=home, embedder=embedder)
    assert len(open_store(home).entries()) == 2
    assert report.systems[0].identical_to_full is None  # no full baseline to compare with


def test_run_eval_context_filter_limit_and_bad_arguments(tiny, home, qa_jsonl, embedder):
    report = run_eval(tiny, qa_jsonl, systems=["bm25"], contexts=["alarms"], max_new_tokens=2, home=home, embedder=embedder)
    assert report.questions == 1 and {a.context_id for a in report.answers} == {"alarms"}
    report = run_eval(tiny, qa_jsonl, systems=["dense"], limit=2, max_new_tokens=2, home=home, embedder=embedder)
    assert report.questions == 2 and report.systems[0].n == 2
    with pytest.raises(DatasetError, match="no context 'huge'"):
        run_eval(tiny, qa_jsonl, contexts=["huge"], home=home, embedder=embedder)
    with pytest.raises(DatasetError, match="unknown system colbert"):
        run_eval(tiny, qa_jsonl, systems=["cag", "colbert"], home=home, embedder=embedder)
    with pytest.raises(DatasetError, match="top-k"):
        run_eval(tiny, qa_jsonl, top_k=0, home=home, embedder=embedder)


# --- the CLI -------------------------------------------------------------------------------


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_cli_eval_json_and_answers_file(tiny_dir, home, qa_jsonl, tmp_path):
    answers = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(app, ["eval", str(qa_jsonl), "--model", str(tiny_dir), "--top-k", "1,2",
                                      "--max-new-tokens", "4", "--json", "--answers-out", str(answers)])
    assert result.exit_code == 0, result.output
    rows = _json_lines(result.stdout)
    assert [(r["system"], r["top_k"]) for r in rows] == [
        ("cag", None), ("bm25", 1), ("bm25", 2), ("dense", 1), ("dense", 2), ("full", None)]
    for row in rows:
        assert SYSTEM_FIELDS <= row.keys() and row["n"] == 3
        assert all(0.0 <= row[m] <= 1.0 for m in ("em", "f1", "contains", "similarity"))
    assert rows[0]["identical_to_full"] == 1.0
    dumped = _json_lines(answers.read_text())
    assert len(dumped) == 18
    assert {"system", "question", "answer", "references", "em", "f1", "contains", "similarity"} <= dumped[0].keys()


def test_cli_eval_table_on_a_csv(tiny_dir, home, qa_csv):
    result = CliRunner().invoke(app, ["eval", str(qa_csv), "--model", str(tiny_dir), "--systems", "cag,bm25,full",
                                      "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "BM25" in result.stdout and "CAG" in result.stdout and "dense" not in result.stdout
    assert "identical to the no-cache answers: 100%" in result.stdout


def test_cli_eval_missing_field_is_one_line_and_nonzero(tiny_dir, home, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,answer,context\nWho?,Ida,Ida approves travel.\n")
    result = CliRunner().invoke(app, ["eval", str(path), "--model", str(tiny_dir)])
    assert result.exit_code != 0
    assert "no question field" in result.output and "--question-field" in result.output
    assert "Traceback" not in result.output
    ok = CliRunner().invoke(app, ["eval", str(path), "--model", str(tiny_dir), "--question-field", "prompt",
                                  "--systems", "bm25", "--max-new-tokens", "2", "--json"])
    assert ok.exit_code == 0, ok.output
    assert _json_lines(ok.stdout)[0]["n"] == 1


@pytest.mark.parametrize("args", [["--top-k", "x"], ["--top-k", "0"], ["--systems", "cag,colbert"]])
def test_cli_eval_bad_options_exit_nonzero(tiny_dir, home, qa_jsonl, args):
    result = CliRunner().invoke(app, ["eval", str(qa_jsonl), "--model", str(tiny_dir), *args])
    assert result.exit_code != 0
    assert "Traceback" not in result.output


def test_cli_eval_checks_the_dataset_before_loading_the_model(home, tmp_path):
    missing_model = tmp_path / "no-such-model"  # loading it would fail with a ModelError
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "nope.jsonl"), "--model", str(missing_model)])
    assert result.exit_code != 0 and "no such dataset file" in result.output
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "nope.jsonl"), "--systems", "cag,colbert"])
    assert result.exit_code != 0 and "unknown system colbert" in result.output


# --- cached passages ---------------------------------------------------------------------


def test_run_eval_composed_systems_against_the_same_passages_prefilled(tiny, home, qa_jsonl, embedder):
    progress = []
    report = run_eval(tiny, qa_jsonl, systems=["bm25", "cached-bm25"], top_k=[1, 2], recompute=[0, 10_000],
                      max_new_tokens=5, home=home, embedder=embedder, passage_tokens=32,
                      on_progress=lambda done, total, what: progress.append((done, total)))
    keys = [(r.system, r.top_k, r.recompute) for r in report.systems]
    assert keys == [("bm25", 1, None), ("bm25", 2, None),
                    ("prefilled-bm25", 1, None), ("cached-bm25", 1, 0), ("cached-bm25", 1, 10_000),
                    ("prefilled-bm25", 2, None), ("cached-bm25", 2, 0), ("cached-bm25", 2, 10_000)]
    assert progress[-1] == (24, 24) == (len(report.answers), len(report.answers))  # 3 x (2 + 2 x 3)
    by_key = {(r.system, r.top_k, r.recompute): r for r in report.systems}
    for k in (1, 2):
        exact = by_key[("cached-bm25", k, 10_000)]
        assert exact.identical_to_prefill == 1.0 and exact.kl_first_token < 1e-9
        assert by_key[("prefilled-bm25", k, None)].identical_to_prefill is None
    # One passage behind the prefix sits where it was prefilled: composing it is exact.
    assert by_key[("cached-bm25", 1, 0)].identical_to_prefill == 1.0 and by_key[("cached-bm25", 1, 0)].kl_first_token < 1e-9
    # Two passages: the second never saw the first; the first token's distribution moves.
    two = [a for a in report.answers if a.system == "cached-bm25" and a.top_k == 2 and a.recompute == 0
           and a.context_id == "pumps"]
    exact_two = [a for a in report.answers if a.system == "cached-bm25" and a.top_k == 2 and a.recompute == 10_000
                 and a.context_id == "pumps"]
    assert two and all(a.kl_first_token > 1e-7 for a in two) and all(a.kl_first_token < 1e-9 for a in exact_two)
    composed = [a for a in report.answers if a.system == "cached-bm25"]
    assert all(0 < a.ttft_s <= a.generation_s and a.reused_tokens > 0 for a in composed)
    rows = [r.to_dict() for r in report.systems]
    assert ("kl_first_token" in rows[3]) and ("kl_first_token" not in rows[0]) and ("kl_first_token" not in rows[2])
    table = report.markdown().splitlines()
    assert "KL first token" in table[0] and len(table) == 2 + len(report.systems)
    with pytest.raises(DatasetError, match="recompute"):
        run_eval(tiny, qa_jsonl, systems=["cached-bm25"], recompute=-1, home=home, embedder=embedder)


def test_cli_eval_composed_table(tiny_dir, home, qa_jsonl):
    result = CliRunner().invoke(app, ["eval", str(qa_jsonl), "--model", str(tiny_dir), "--systems", "cached-dense",
                                      "--top-k", "2", "--recompute", "0,4", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "cached passages (MiniLM), k=2, recompute 4" in result.stdout and "KL(prefilled || composed)" in result.stdout
    bad = CliRunner().invoke(app, ["eval", str(qa_jsonl), "--systems", "cached-bm25", "--recompute", "x"])
    assert bad.exit_code != 0 and "--recompute" in bad.output
