"""`cag bench` end to end on the tiny model: rows, JSON fields, plot, bad input. No speed is asserted."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from cag.measure.bench import BenchError, bundled_questions, fit_lengths, read_questions, run_bench
from cag.cli.main import app
from cag.documents import Document
from cag.errors import CagError, PromptError
from cag.knowledge import open_store

runner = CliRunner()

DOCUMENTED_FIELDS = {
    "context_tokens", "ttft_full_s", "ttft_restored_cold_s", "ttft_restored_warm_s", "ttft_in_memory_s",
    "bytes_per_token", "restore_mb_s", "raw_read_mb_s", "raw_read_cold_mb_s", "per_question_s", "prefill_tok_s",
    "cold_dropped", "kv_dtype", "identical_to_full_precision", "batch_speedup", "batch_identical", "vs_peer",
}
TIMES = ("ttft_full_s", "ttft_restored_cold_s", "ttft_restored_warm_s", "ttft_in_memory_s", "per_question_s",
         "per_question_ttft_s", "per_question_restore_s", "restore_warm_s", "restore_cold_s", "one_by_one_s",
         "batched_s")
RATES = ("prefill_tok_s", "restore_mb_s", "restore_cold_mb_s", "raw_read_mb_s", "batch_speedup")


def _kv_bytes_per_token(lm) -> int:
    config = lm.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = lm.model.dtype.itemsize
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize


def _assert_sane(row: dict, requested: int, kv_per_token: int) -> None:
    assert DOCUMENTED_FIELDS <= row.keys()
    # The cut is the longest that fits: at most the requested length, and only a few tokens short of it.
    assert requested - 8 <= row["context_tokens"] <= requested
    for name in TIMES + RATES:
        assert isinstance(row[name], float) and math.isfinite(row[name]) and row[name] > 0, (name, row[name])
    assert row["per_question_s"] >= row["per_question_ttft_s"] >= row["per_question_restore_s"]
    assert 0 <= row["new_tokens"] <= row["max_new_tokens"]
    # A rate needs a second token: the first comes from the prompt's pass, not a decode step.
    assert row["decode_tok_s"] > 0 if row["new_tokens"] > 1 else row["decode_tok_s"] == 0
    # Batched answers are the one-by-one greedy answers.
    assert row["batch_identical"] == 1.0 and 1 <= row["batch_size"] <= row["questions"]
    assert row["peer"] is row["vs_peer"] is row["peer_per_question_s"] is None  # no peer asked for
    assert isinstance(row["cold_dropped"], bool)
    # A cold read needs the OS to drop the file's pages; where it cannot, there is no cold read to report.
    assert row["raw_read_cold_mb_s"] is None or row["raw_read_cold_mb_s"] > 0
    # On disk: the KV tensors, one int64 token id per token, and a header of a few hundred bytes.
    assert row["kv_bytes_per_token"] == kv_per_token
    # A step reads the KV of the context and every weight; the rate is that times the steps per second.
    assert row["decode_bytes_per_step"] > kv_per_token * row["context_tokens"]
    assert row["decode_gb_s"] == pytest.approx(row["decode_bytes_per_step"] * row["decode_tok_s"] / 1e9, rel=1e-3)
    assert row["memory_gb_s"] > 0 and row["decode_bandwidth_share"] == pytest.approx(row["decode_gb_s"] / row["memory_gb_s"], rel=1e-3)
    assert kv_per_token + 8 < row["bytes_per_token"] < kv_per_token + 8 + 4096 / row["context_tokens"] * 4
    assert row["cache_bytes"] == pytest.approx(row["bytes_per_token"] * row["context_tokens"])


def test_run_bench_measures_every_mode(tiny, home):
    questions = bundled_questions()[:3]
    events = []
    rows = run_bench(tiny, [384, 256], questions, home=home, max_new_tokens=2, repeats=2,
                     on_progress=lambda what, done, total: events.append((what, done, total)))

    assert [r.requested_tokens for r in rows] == [256, 384]
    for row in rows:
        _assert_sane(row.to_dict(), row.requested_tokens, _kv_bytes_per_token(tiny))
        assert row.questions == 3 and row.repeats == 2 and row.model == tiny.name

    # Each cache is stored under its bench name and holds exactly the measured context.
    store = open_store(home)
    for row in rows:
        entry = store.resolve(row.cache_name)
        assert entry.tokens == row.context_tokens
        assert entry.bytes == row.cache_bytes
        text = tiny.tokenizer.decode(store.token_ids(entry))
        assert "Corvane Aerostructures" in text  # cut from the bundled corpus, from its start

    dones = [done for _, done, _ in events]
    assert dones == sorted(dones) and events[-1][1] == events[-1][2] > 0
    assert len({total for _, _, total in events}) == 1
    # Every announced step happens once: 0, 1, ..., total - 1, then "done".
    assert dones == list(range(events[-1][2] + 1))


def test_short_documents_are_repeated_to_reach_the_length(tiny, home):
    docs = [Document(source="note.md", text="Badges are issued at the front desk. ")]
    (row,) = run_bench(tiny, [300], ["Where are badges issued?"], documents=docs, home=home, max_new_tokens=1, repeats=1)
    assert 292 <= row.context_tokens <= 300
    entry = open_store(home).resolve("bench-300")
    assert tiny.tokenizer.decode(open_store(home).token_ids(entry)).count("Badges are issued") > 3


def test_lengths_are_clipped_to_the_window_and_deduplicated(tiny):
    questions = ["Where are badges issued?", "Who approves travel above 500 crowns, and when?"]
    fitted = fit_lengths(tiny, [5000, 256, 256, 100_000], questions, max_new_tokens=16)
    assert fitted[0] == 256 and len(fitted) == 2
    longest = max(len(tiny.tokenizer(q)["input_ids"]) for q in questions)
    assert fitted[1] + longest + 16 < tiny.max_context
    assert fitted[1] > tiny.max_context - 200  # clipped, not dropped


def test_a_length_below_the_fixed_prompt_is_refused(tiny, home):
    with pytest.raises(PromptError, match="fixed part"):
        run_bench(tiny, [16], ["Where are badges issued?"], home=home, repeats=1)


def test_bad_arguments_are_refused(tiny, home, tmp_path):
    with pytest.raises(BenchError, match="no questions"):
        run_bench(tiny, [256], [], home=home)
    with pytest.raises(BenchError, match="repeats"):
        run_bench(tiny, [256], ["Where?"], home=home, repeats=0)
    empty = tmp_path / "questions.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(BenchError, match="no question"):
        read_questions(empty)


def test_cli_json_and_plot(tiny_dir, home, tmp_path):
    questions = tmp_path / "q.txt"
    questions.write_text("# bench questions\nWhere are badges issued?\nWho approves travel?\n")
    plot = tmp_path / "plots" / "ttft.png"
    result = runner.invoke(app, ["bench", "--model", str(tiny_dir), "--lengths", "256,384", "--repeats", "1",
                                 "--max-new-tokens", "2", "--questions", str(questions), "--json",
                                 "--plot", str(plot), "--home", str(home)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["requested_tokens"] for r in rows] == [256, 384]
    from conftest import make_tiny_model

    kv = _kv_bytes_per_token(make_tiny_model())
    for row in rows:
        _assert_sane(row, row["requested_tokens"], kv)
        assert row["questions"] == 2 and row["max_new_tokens"] == 2
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_default_run_is_quick_and_full_is_the_whole_table(tiny_dir, home):
    from cag.cli.bench import FULL, QUICK

    quick = runner.invoke(app, ["bench", "--model", str(tiny_dir), "--max-new-tokens", "2", "--json", "--home", str(home)])
    assert quick.exit_code == 0, quick.output
    rows = [json.loads(line) for line in quick.stdout.splitlines()]
    # Both quick lengths clip to the tiny model's 1,024-token window: one row.
    assert len(rows) == 1 and rows[0]["repeats"] == QUICK.repeats and rows[0]["questions"] == QUICK.questions
    full = runner.invoke(app, ["bench", "--full", "--lengths", "256", "--model", str(tiny_dir), "--max-new-tokens", "2",
                               "--json", "--home", str(home)])
    assert full.exit_code == 0, full.output
    row = json.loads(full.stdout.splitlines()[0])
    assert row["repeats"] == FULL.repeats and row["questions"] == len(bundled_questions()) > QUICK.questions


def test_cli_table_and_bad_lengths(tiny_dir, home, docs):
    result = runner.invoke(app, ["bench", str(docs), "--model", str(tiny_dir), "--lengths", "0.25k,300", "--home", str(home)])
    assert result.exit_code != 0 and "cannot read context length '0.25k'" in result.output

    result = runner.invoke(app, ["bench", str(docs), "--model", str(tiny_dir), "--lengths", "8", "--home", str(home)])
    assert result.exit_code == 1
    assert "fixed part" in result.output and "Traceback" not in result.output

    result = runner.invoke(app, ["bench", str(docs), "--model", str(tiny_dir), "--lengths", "300,2k", "--repeats", "1",
                                 "--max-new-tokens", "1", "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert "time to first token" in result.stdout and "cache on disk" in result.stdout
    assert "clipped" in result.output  # 2k does not fit the tiny model's 1,024-token window


def test_a_smaller_kv_dtype_reports_agreement_with_the_full_precision_cache(tiny, home):
    questions = bundled_questions()[:2]
    (full,) = run_bench(tiny, [256], questions, home=home, max_new_tokens=4, repeats=1)
    (small,) = run_bench(tiny, [256], questions, home=home, max_new_tokens=4, repeats=1, kv_dtype="int8")
    assert full.kv_dtype == "float32" and full.identical_to_full_precision is None
    assert small.kv_dtype == "int8" and open_store(home).resolve("bench-256").kv_dtype == "int8"
    assert small.identical_to_full_precision in (0.0, 0.5, 1.0)  # a share of the 2 answers
    assert small.bytes_per_token < 0.4 * full.bytes_per_token  # int8 codes and their scales
    with pytest.raises(CagError, match="unsupported KV dtype"):
        run_bench(tiny, [256], questions, home=home, repeats=1, kv_dtype="int4")


def test_the_reference_for_a_smaller_kv_dtype_is_the_cache_as_prefilled(tiny, home):
    from cag.measure.bench import _build_cache
    from cag.prefill import prefill

    ids = tiny.tokenizer("Badges are issued at the front desk. " * 20)["input_ids"]
    kb, prefilled = _build_cache(tiny, open_store(home), ids, "ref", "int8")
    fresh = prefill(tiny, ids).cache
    for mine, theirs in zip(prefilled.layers, fresh.layers):
        assert mine.keys.dtype == tiny.dtype and torch.equal(mine.keys, theirs.keys)
        assert torch.equal(mine.values, theirs.values)
    # The knowledge base answers from the stored int8 file, which differs from the prefilled cache.
    assert kb.entry.kv_dtype == "int8"
    assert not torch.equal(kb.cache.layers[0].keys.to(tiny.dtype), prefilled.layers[0].keys)


def test_decode_speed_sums_tokens_and_seconds_over_the_answers():
    from cag.measure.bench import _decode_rate

    # A one-token answer adds neither tokens nor time, instead of a rate of zero in a mean.
    assert _decode_rate([1, 5, 3], [0.0, 0.4, 0.2]) == pytest.approx((4 + 2) / 0.6)
    assert _decode_rate([1], [0.0]) == 0.0


class _FakePeer:
    """Stands in for llama.cpp: answers each question with fixed timings and tokens."""

    def __init__(self, log: list) -> None:
        self.log = log

    def answer(self, question_ids):
        from cag.measure.peers.llamacpp import PeerQuestion

        self.log.append(("peer", len(question_ids)))
        return PeerQuestion(len(question_ids), 3, restore_s=0.01, prefill_s=0.02, decode_s=0.04, total_s=0.07,
                            token_ids=[5, 6, 7])

    def close(self) -> None:
        self.log.append(("closed", 0))


def test_the_peer_alternates_with_cag_question_by_question(tiny, home, monkeypatch):
    import cag.measure.bench as bench

    log: list = []
    monkeypatch.setattr(bench, "_check_peer", lambda lm, peer: None)  # the tiny model has no GGUF
    monkeypatch.setattr(bench, "_open_peer", lambda *args: _FakePeer(log))
    real_load = bench.load
    monkeypatch.setattr(bench, "load", lambda *a, **k: (log.append(("cag", 0)), real_load(*a, **k))[1])
    questions = bundled_questions()[:2]
    (row,) = run_bench(tiny, [256], questions, home=home, max_new_tokens=3, repeats=2, peer="llamacpp")

    per_question = [who for who, _ in log if who != "closed"][-8:]  # the last four: 2 repeats x 2 questions
    assert per_question == ["cag", "peer"] * 4 and log[-1][0] == "closed"
    assert row.peer == "llama.cpp" and row.peer_per_question_s == pytest.approx(0.07)
    assert row.peer_ttft_s == pytest.approx(0.03) and row.peer_new_tokens == 3
    assert row.peer_decode_tok_s == pytest.approx(2 / 0.04)
    assert row.vs_peer == pytest.approx(row.per_question_s / 0.07)
    assert row.to_dict()["vs_peer"] == pytest.approx(row.vs_peer, rel=1e-4)
    assert row.peer_identical == 0.0  # the fake's tokens are not the model's answer


def test_the_peer_is_closed_when_a_measurement_fails(tiny, home, monkeypatch):
    import cag.measure.bench as bench

    log: list = []
    monkeypatch.setattr(bench, "_check_peer", lambda lm, peer: None)
    monkeypatch.setattr(bench, "_open_peer", lambda *args: (log.append(("opened", 0)), _FakePeer(log))[1])
    real_load = bench.load

    def load_failing_once_the_peer_runs(*args, **kwargs):
        if log:
            raise RuntimeError("disk gone")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(bench, "load", load_failing_once_the_peer_runs)
    with pytest.raises(RuntimeError, match="disk gone"):
        run_bench(tiny, [256], bundled_questions()[:2], home=home, max_new_tokens=2, repeats=1, peer="llamacpp")
    assert log == [("opened", 0), ("closed", 0)]


def test_cli_refuses_a_peer_it_cannot_run(tiny_dir, home, docs):
    result = runner.invoke(app, ["bench", str(docs), "--model", str(tiny_dir), "--lengths", "256", "--peer", "vllm",
                                 "--home", str(home)])
    assert result.exit_code == 1 and "unknown peer 'vllm'" in result.output
    result = runner.invoke(app, ["bench", str(docs), "--model", str(tiny_dir), "--lengths", "256", "--peer", "llamacpp",
                                 "--home", str(home)])
    assert result.exit_code == 1 and "embedded model's GGUF" in result.output
    assert "Traceback" not in result.output
    assert open_store(home).entries() == []  # refused before any cache was built


def test_weight_bytes_count_the_head_and_not_an_untied_input_embedding(tiny):
    from cag.measure.bench import weight_bytes_per_step

    model = tiny.model
    everything = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    expected = everything if tied else everything - embedding.numel() * embedding.element_size()
    assert weight_bytes_per_step(model) == expected
