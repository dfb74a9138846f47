"""The correctness invariant: a restored cache answers exactly as a full prefill does."""

from __future__ import annotations

import torch

import cag
from cag.kvcache import crop_to
from cag.model import forward
from cag.prompt import PromptBuilder


def _full_logits(lm, ids):
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids])).logits[0].float()


def test_restored_cache_logits_match_full_forward(tiny, docs, home):
    cag.build([docs], name="kb", model=tiny, home=home)
    kb = cag.load("kb", model=tiny, home=home)  # a fresh restore from disk
    question = kb.prompt.question_ids("Who approves travel above 500 crowns?")
    full = _full_logits(tiny, kb.context_ids + question)

    restored = kb.store.restore(kb.entry, kb.boundary - 1)  # all context tokens but the last
    with torch.inference_mode():
        out = forward(tiny.model, restored.cache, input_ids=torch.tensor([kb.context_ids[-1:] + question]))
    logits = out.logits[0].float()

    torch.testing.assert_close(logits[0], full[kb.boundary - 1], atol=1e-4, rtol=0)  # last context token
    torch.testing.assert_close(logits[1:], full[kb.boundary :], atol=1e-4, rtol=0)  # every question token


def test_greedy_answer_equals_full_prefill_and_transformers_generate(tiny, docs, home):
    kb = cag.build([docs], name="kb", model=tiny, home=home)
    question = "What is the refund policy?"
    cached = kb.ask(question, max_new_tokens=12)
    baseline = kb.ask(question, max_new_tokens=12, use_cache=False)
    restored = cag.load("kb", model=tiny, home=home).ask(question, max_new_tokens=12)

    prompt = kb.context_ids + kb.prompt.question_ids(question)
    with torch.inference_mode():
        reference = tiny.model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :]
    expected = [t for t in reference.tolist() if t not in tiny.eos_token_ids]

    assert cached.token_ids == expected
    assert baseline.token_ids == expected
    assert restored.token_ids == expected
    assert cached.reused_tokens == kb.boundary and baseline.reused_tokens == 0
    assert cached.prefilled_tokens == len(prompt) - kb.boundary


def test_ask_crops_cache_back_to_boundary_and_keeps_context_intact(tiny, docs, home):
    kb = cag.load(cag.build([docs], name="kb", model=tiny, home=home).key, model=tiny, home=home)
    before = [(k.clone(), v.clone()) for k, v in ((l.keys, l.values) for l in kb.cache.layers)]
    answers = kb.ask_many(["Who approves travel?", "Where are badges issued?"], max_new_tokens=6)
    assert all(a.new_tokens > 0 for a in answers)
    assert kb.cache.get_seq_length() == kb.boundary
    for (k0, v0), layer in zip(before, kb.cache.layers):
        assert torch.equal(layer.keys, k0) and torch.equal(layer.values, v0)
    # The second question from the cropped cache answers as it does alone.
    alone = cag.load("kb", model=tiny, home=home).ask("Where are badges issued?", max_new_tokens=6)
    assert answers[1].token_ids == alone.token_ids


def test_context_and_question_tokens_are_the_full_prompt_tokens(tiny, docs):
    builder = PromptBuilder(tiny.tokenizer)
    documents = cag.load_documents([docs])
    question = "Who approves travel?"
    system = f"{builder.instructions}\n\n" + "\n\n".join(
        f'<document source="{d.source}">\n{d.text.strip()}\n</document>' for d in documents
    )
    text = tiny.tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": question}],
        tokenize=False, add_generation_prompt=True,
    )
    whole = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert builder.context_ids(documents) + builder.question_ids(question) == whole


def test_crop_to_removes_only_the_tail(tiny):
    from cag.prefill import prefill

    cache = prefill(tiny, list(range(3, 40))).cache
    keys = cache.layers[0].keys.clone()
    crop_to(cache, 20)
    assert cache.get_seq_length() == 20
    assert torch.equal(cache.layers[0].keys, keys[:, :, :20])


def test_a_damaged_cache_is_refused_before_the_first_token_of_an_answer(tiny, docs, home):
    """The first question restores the cache and checks it while its prompt is prefilled; a
    failed check raises before any text, and the cache is not kept."""
    import pytest

    from cag.errors import CorruptCacheError

    built = cag.build([docs], name="kb", model=tiny, home=home)
    path = home / "store" / "entries" / f"{built.key}.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-64] ^= 0x10  # inside the last layer's values
    path.write_bytes(bytes(raw))
    kb = cag.load("kb", model=tiny, home=home)
    texts: list[str] = []
    with pytest.raises(CorruptCacheError, match="checksum"):
        kb.ask("Who approves refunds?", max_new_tokens=4, on_text=texts.append)
    assert texts == [] and kb._cache is None
    assert not path.exists()  # quarantined


def test_first_answer_after_a_restore_checked_later_equals_one_checked_at_once(tiny, docs, home):
    built = cag.build([docs], name="kb", model=tiny, home=home)
    later = cag.load(built.key, model=tiny, home=home)
    first = later.ask("Who approves refunds?", max_new_tokens=8)
    assert later.restore_s > 0 and first.ttft_s >= later._unbilled_restore_s
    now = cag.load(built.key, model=tiny, home=home)
    now.restore()
    assert now.ask("Who approves refunds?", max_new_tokens=8).token_ids == first.token_ids
