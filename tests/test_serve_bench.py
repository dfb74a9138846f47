"""`python -m cag.measure.serve`: cag serve timed over HTTP, on the tiny model."""

from __future__ import annotations

import pytest

from cag.measure.serve import main, run_serve_bench

pytestmark = pytest.mark.services


def test_serve_bench_reports_cold_cached_restart_and_clients(tiny_dir, tmp_path):
    report = run_serve_bench(str(tiny_dir), home=tmp_path / "home", system_tokens=150, clients=(1, 2), max_tokens=4)
    cold, cached, restarted = report.prompts
    assert [p.when for p in report.prompts] == ["cold", "cached", "after restart"]
    assert report.system_prompt_tokens == cold.prompt_tokens > 256  # past one 256-token block
    assert cold.cached_tokens == 0
    # The second request and the one after the restart restore the system prompt's prefix, never more than the prompt.
    for timing in (cached, restarted):
        assert 256 <= timing.cached_tokens <= timing.prompt_tokens
    for timing in report.prompts:
        assert 0 < timing.ttft_s <= timing.total_s and 1 <= timing.completion_tokens <= 4
    assert [c.clients for c in report.clients] == [1, 2]
    for row in report.to_dict()["clients"]:
        assert row["completion_tokens"] >= row["clients"] and row["speedup"] > 0


def test_bad_arguments_are_one_line_and_exit_2(capsys):
    assert main(["--clients", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
