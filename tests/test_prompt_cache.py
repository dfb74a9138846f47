"""Automatic prompt caching: the longest cached prefix of any chat prompt is reused."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import cag
from cag.cli.main import app
from cag.errors import ContextTooLongError
from cag.stores import LocalStore

# About 700 tokens of the tiny model: more than two store blocks, well inside its 1024-token window.
LONG_SYSTEM = "You are the archivist of the Tarrow warehouse. " + "Shelf rules: keep aisles clear and label every crate. " * 16


def _reference(lm, ids, n):
    with torch.inference_mode():
        out = lm.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids) :]
    return [t for t in out.tolist() if t not in lm.eos_token_ids]


def test_second_turn_reuses_first_prompt_and_answers_like_full_prefill(tiny, home):
    store = LocalStore(home / "store", block_size=16)
    pc = cag.PromptCache(tiny, store=store)
    first = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Who keeps the archive?"}]
    one = pc.generate(first, max_new_tokens=6)
    assert one.reused_tokens == 0 and one.prefilled_tokens == one.prompt_tokens and one.key is not None

    second = first + [{"role": "assistant", "content": one.text}, {"role": "user", "content": "And the aisles?"}]
    two = pc.generate(second, max_new_tokens=6)
    ids = pc.prompt.chat_ids(second)
    # Everything up to where the first prompt's generation prompt began is shared.
    assert two.reused_tokens >= one.prompt_tokens - 8
    assert two.reused_tokens + two.prefilled_tokens == two.prompt_tokens == len(ids)
    assert two.token_ids == _reference(tiny, ids, 6)


def test_same_system_prompt_other_question_reuses_it(tiny, home):
    pc = cag.PromptCache(tiny, store=LocalStore(home / "store", block_size=16))
    ask = lambda q: [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": q}]
    pc.generate(ask("Who keeps the archive?"), max_new_tokens=3)
    other = pc.generate(ask("What about crates?"), max_new_tokens=5)
    assert other.reused_tokens > 300
    assert other.token_ids == _reference(tiny, pc.prompt.chat_ids(ask("What about crates?")), 5)


def test_short_prompts_are_not_stored(tiny, home):
    store = LocalStore(home / "store")
    out = cag.PromptCache(tiny, store=store).generate("Hi?", max_new_tokens=2)
    assert out.key is None and store.entries() == []


def test_a_prompt_longer_than_the_window_is_refused_naming_both_numbers(tiny, home):
    pc = cag.PromptCache(tiny, store=LocalStore(home / "store", block_size=16))
    with pytest.raises(ContextTooLongError, match=r"the prompt is \d+ tokens but the model's context window is 1024"):
        pc.generate([{"role": "system", "content": LONG_SYSTEM * 3}, {"role": "user", "content": "Who?"}], max_new_tokens=2)


def test_cli_prompt_reports_reuse(tiny_dir, home, tmp_path):
    system = tmp_path / "system.txt"
    system.write_text(LONG_SYSTEM)
    runner = CliRunner()
    args = ["prompt", "--system", str(system), "--model", str(tiny_dir), "--max-new-tokens", "3", "--json"]
    first = json.loads(runner.invoke(app, [*args, "Who keeps the archive?"]).stdout.splitlines()[-1])
    second = json.loads(runner.invoke(app, [*args, "What about crates?"]).stdout.splitlines()[-1])
    assert first["reused_tokens"] == 0
    assert second["reused_tokens"] >= 256 and second["prefilled_tokens"] < first["prefilled_tokens"]
