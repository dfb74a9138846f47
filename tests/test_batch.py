"""Batched and shared-prefix decoding: the context cache is read, never written, and every
answer equals the one its prompt gets alone."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

import cag
from cag.batch import SharedPrefixBatch, supports_shared_prefix
from cag.cli.main import app
from cag.generate import _generate_appending, generate, generate_batch
from cag.kvcache import cache_from_layers
from cag.prefill import new_cache, prefill

CONTEXT = list(range(5, 130))
PROMPTS = [[7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18], [20], [30, 31, 32, 33], [40, 41]]


def _reference(lm, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy generate over the whole prompt, EOS dropped."""
    with torch.inference_mode():
        out = lm.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids) :].tolist()
    return [t for t in out if t not in lm.eos_token_ids]


def _snapshot(cache):
    return [(layer.keys, layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _assert_untouched(cache, snapshot, length):
    assert cache.get_seq_length() == length
    for layer, (keys, k0, v0) in zip(cache.layers, snapshot):
        assert layer.keys is keys  # the same tensor object: not replaced, not copied
        assert torch.equal(layer.keys, k0) and torch.equal(layer.values, v0)


@pytest.fixture(scope="module")
def context(tiny):
    return prefill(tiny, CONTEXT).cache


def test_shared_generate_equals_transformers_and_leaves_the_cache_alone(tiny, context):
    assert supports_shared_prefix(tiny, context)
    snapshot = _snapshot(context)
    shared = [generate(tiny, context, p, max_new_tokens=10, extend_cache=False) for p in PROMPTS]
    _assert_untouched(context, snapshot, len(CONTEXT))
    assert tiny.model.config._attn_implementation == "sdpa"  # swapped back after each call
    for prompt, gen in zip(PROMPTS, shared):
        appended = _generate_appending(tiny, context, prompt, 10, 0.0, 0, None, 512, False)  # crops back after
        assert gen.token_ids == appended.token_ids == _reference(tiny, CONTEXT + prompt, 10)
    assert context.get_seq_length() == len(CONTEXT)


def test_batch_logits_equal_each_full_prompt(tiny, context):
    """Left padding, masks and positions: each row's last logits are its full prompt's."""
    batch = SharedPrefixBatch(tiny, context, len(PROMPTS), capacity=16)
    logits = batch.prefill(PROMPTS, chunk_size=4)  # chunks smaller than the longest prompt
    next_tokens = torch.argmax(logits, dim=-1)
    stepped = batch.step(next_tokens)
    with torch.inference_mode():
        for row, prompt in enumerate(PROMPTS):
            ids = CONTEXT + prompt + [int(next_tokens[row])]
            full = tiny.model(input_ids=torch.tensor([ids])).logits[0].float()
            torch.testing.assert_close(logits[row], full[-2], atol=1e-4, rtol=0)
            torch.testing.assert_close(stepped[row], full[-1], atol=1e-4, rtol=0)


def test_generate_batch_equals_one_by_one_with_early_stops(tiny, context):
    alone = [generate(tiny, context, p, max_new_tokens=12, extend_cache=False).token_ids for p in PROMPTS]
    # Make a token that some answers produce mid-way the EOS: those rows finish early and
    # leave the batch while the others go on.
    stopper = alone[1][4]
    lm = dataclasses.replace(tiny, eos_token_ids=(stopper,))
    limits = [12, 12, 3, 12, 7]
    snapshot = _snapshot(context)
    batched = generate_batch(lm, context, PROMPTS, max_new_tokens=limits)
    expected = [generate(lm, context, p, max_new_tokens=n, extend_cache=False) for p, n in zip(PROMPTS, limits)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in expected]
    assert [g.finish_reason for g in batched] == [g.finish_reason for g in expected]
    assert "eos" in {g.finish_reason for g in batched} and "length" in {g.finish_reason for g in batched}
    assert [g.text for g in batched] == [g.text for g in expected]
    _assert_untouched(context, snapshot, len(CONTEXT))


def test_sampling_in_a_batch_draws_like_each_prompt_alone(tiny, context):
    batched = generate_batch(tiny, context, PROMPTS[:3], max_new_tokens=8, temperature=0.9, seed=5)
    alone = [generate(tiny, context, p, max_new_tokens=8, temperature=0.9, seed=5, extend_cache=False) for p in PROMPTS[:3]]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    other_seed = generate_batch(tiny, context, PROMPTS[:3], max_new_tokens=8, temperature=0.9, seed=6)
    assert [g.token_ids for g in other_seed] != [g.token_ids for g in batched]  # it really samples


def test_extend_cache_appends_prompt_and_answer_like_a_prefill(tiny):
    cache = prefill(tiny, CONTEXT).cache
    gen = generate(tiny, cache, PROMPTS[1], max_new_tokens=5)
    fed = CONTEXT + PROMPTS[1] + gen.token_ids[:-1]
    assert cache.get_seq_length() == len(fed)
    full = prefill(tiny, fed).cache
    for a, b in zip(cache.layers, full.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)


def test_empty_cache_and_streaming(tiny):
    """A prompt with nothing cached (PromptCache's first turn) streams its whole text."""
    pieces: list[str] = []
    gen = generate(tiny, new_cache(), CONTEXT[:40], max_new_tokens=9, on_text=pieces.append)
    assert gen.token_ids == _reference(tiny, CONTEXT[:40], 9)
    assert "".join(pieces) == gen.text and len(pieces) > 1


def test_reduced_precision_prefix_is_read_as_stored(tiny, context):
    """A bfloat16 context cache is attended as it is (no float32 copy of it)."""
    halves = cache_from_layers([(l.keys.to(torch.bfloat16), l.values.to(torch.bfloat16)) for l in context.layers])
    widened = cache_from_layers([(l.keys.float(), l.values.float()) for l in halves.layers])
    got = SharedPrefixBatch(tiny, halves, 2, capacity=4).prefill(PROMPTS[:2], chunk_size=64)
    want = SharedPrefixBatch(tiny, widened, 2, capacity=4).prefill(PROMPTS[:2], chunk_size=64)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
    assert halves.layers[0].keys.dtype == torch.bfloat16


def test_models_without_shared_prefix_support_fall_back(tiny):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tiny.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16, max_position_embeddings=256)
    torch.manual_seed(1)
    lm = cag.wrap_model(MistralForCausalLM(config), tiny.tokenizer, name="tiny-mistral")
    cache = prefill(lm, CONTEXT[:40]).cache
    assert not supports_shared_prefix(lm, cache)
    batched = generate_batch(lm, cache, PROMPTS[:3], max_new_tokens=6)
    assert [g.token_ids for g in batched] == [_reference(lm, CONTEXT[:40] + p, 6) for p in PROMPTS[:3]]
    assert cache.get_seq_length() == 40


def test_ask_many_batches_and_matches_ask(tiny, docs, home):
    kb = cag.load(cag.build([docs], name="kb", model=tiny, home=home).key, model=tiny, home=home)
    questions = ["Who approves travel?", "Where are badges issued?", "What is the refund policy for returns?",
                 "When?", "Which form do refunds need?"]
    snapshot = _snapshot(kb.cache)
    batched = kb.ask_many(questions, batch_size=3, max_new_tokens=8)
    alone = [kb.ask(q, max_new_tokens=8) for q in questions]
    assert [a.question for a in batched] == questions
    assert [a.token_ids for a in batched] == [a.token_ids for a in alone]
    assert sorted(a.batch for a in batched) == [2, 2, 3, 3, 3] and {a.batch for a in alone} == {1}
    assert all(a.reused_tokens == kb.boundary and 0 < a.ttft_s <= a.total_s for a in batched)
    _assert_untouched(kb.cache, snapshot, kb.boundary)
    baseline = kb.ask_many(questions[:2], max_new_tokens=8, use_cache=False)
    assert [a.token_ids for a in baseline] == [a.token_ids for a in alone[:2]] and baseline[0].reused_tokens == 0
    with pytest.raises(ValueError):
        kb.ask_many(questions, batch_size=0)


def test_ask_many_refuses_a_question_too_long_before_answering_any(tiny, docs, home, monkeypatch):
    kb = cag.build([docs], name="kb", model=tiny, home=home)
    monkeypatch.setattr("cag.knowledge.generate_batch", lambda *a, **k: pytest.fail("answered before checking"))
    with pytest.raises(cag.ContextTooLongError):
        kb.ask_many(["Who approves travel?", "why " * 1000], max_new_tokens=4)


def test_cli_ask_batches_and_matches_one_by_one(tiny_dir, docs, home):
    runner = CliRunner()
    built = runner.invoke(app, ["build", str(docs), "--name", "kb", "--model", str(tiny_dir), "--threads", "1"])
    assert built.exit_code == 0, built.output
    questions = ["Who approves travel?", "Where are badges issued?", "What is the refund policy?"]
    runs = {}
    for size in ("1", "3"):
        result = runner.invoke(app, ["ask", "--cache", "kb", *questions, "--max-new-tokens", "6", "--batch-size", size, "--json"])
        assert result.exit_code == 0, result.output
        runs[size] = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["question"] for r in runs["3"]] == questions
    assert [r["answer"] for r in runs["3"]] == [r["answer"] for r in runs["1"]]
    assert {r["batch"] for r in runs["3"]} == {3} and {r["batch"] for r in runs["1"]} == {1}
    text = runner.invoke(app, ["ask", "--cache", "kb", *questions[:2], "--max-new-tokens", "4"])
    assert text.exit_code == 0 and text.stdout.count("Q:") == 2 and text.stdout.count("A:") == 2
    bad = runner.invoke(app, ["ask", "--cache", "kb", "Hi?", "--batch-size", "0"])
    assert bad.exit_code != 0


@pytest.mark.integration
def test_default_model_batched_answers_equal_one_by_one(real_home, docs):
    lm = cag.load_model(home=real_home)
    kb = cag.build([docs], name="kb", model=lm, home=real_home)
    questions = ["Who approves travel above 500 crowns?", "Where are badges issued?", "Which form do refunds need?"]
    batched = kb.ask_many(questions, max_new_tokens=16)
    alone = [kb.ask(q, max_new_tokens=16) for q in questions]
    assert [a.token_ids for a in batched] == [a.token_ids for a in alone]
    assert any("Marsh" in a.text or "RF-20" in a.text or "Lisbon" in a.text for a in batched), [a.text for a in batched]


def test_other_threads_using_the_model_meanwhile_are_unaffected(tiny, context):
    """The attention is swapped per call, counted across threads: a plain chunked prefill
    running at the same time still gets its causal masks, and the swap is undone at the end."""
    import threading

    ids = CONTEXT[:90]
    expected = prefill(tiny, ids, chunk_size=32).last_logits
    answers = [generate(tiny, context, p, max_new_tokens=6, extend_cache=False).token_ids for p in PROMPTS]
    failures: list[str] = []

    def batches():
        for _ in range(4):
            if [g.token_ids for g in generate_batch(tiny, context, PROMPTS, max_new_tokens=6)] != answers:
                failures.append("batch")

    def plain():
        for _ in range(6):
            if not torch.allclose(prefill(tiny, ids, chunk_size=32).last_logits, expected, atol=1e-4):
                failures.append("prefill")

    threads = [threading.Thread(target=batches), threading.Thread(target=batches), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert tiny.model.config._attn_implementation == "sdpa"
