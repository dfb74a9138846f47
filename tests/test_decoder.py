"""The one decode loop: rows joining a running batch at step boundaries, and leaving it early."""

from __future__ import annotations

import pytest
import torch

from cag.generate import Decoder, Sampling, generate
from cag.prefill import new_cache, prefill

CONTEXT = list(range(5, 130))
PROMPTS = [[7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18], [20], [30, 31, 32, 33], [40, 41]]


@pytest.fixture(scope="module")
def context(tiny):
    return prefill(tiny, CONTEXT).cache


def _alone(lm, cache, prompt, n, **kw):
    return generate(lm, cache, prompt, max_new_tokens=n, extend_cache=False, **kw).token_ids


@pytest.mark.parametrize("shared", [True, False])
def test_rows_joining_mid_flight_get_their_answers_alone(tiny, context, shared):
    """Rows added after others have decoded some tokens (longer and shorter than the batch so far)."""
    expected = [_alone(tiny, context, p, 12) for p in PROMPTS]
    decoder = Decoder(tiny, context, shared=shared)
    rows = decoder.add(PROMPTS[:1], [12])
    for prompt in PROMPTS[1:]:
        decoder.step()
        decoder.step()
        rows += decoder.add([prompt], [12])
    decoder.run()
    decoder.close()
    assert [r.token_ids for r in rows] == expected
    assert [r.finish_reason for r in rows] == ["length"] * len(PROMPTS)
    assert context.get_seq_length() == len(CONTEXT)


def test_a_dropped_row_leaves_the_others_alone_and_frees_its_columns(tiny, context):
    expected = [_alone(tiny, context, p, 30) for p in PROMPTS[:3]]
    decoder = Decoder(tiny, context)
    long_one = decoder.add([list(range(40, 100))], [30])[0]  # the widest row
    rows = decoder.add(PROMPTS[:3], [30] * 3)
    for _ in range(3):
        decoder.step()
    decoder.drop(long_one, "cancelled")
    assert long_one.finish_reason == "cancelled" and long_one not in decoder.rows
    # Its prompt's columns were padding for everyone else: gone with it. Three picks, two fed.
    assert decoder._batch.cache.suffix_length == max(map(len, PROMPTS[:3])) + 2
    decoder.run()
    assert [r.token_ids for r in rows] == expected


def test_sampled_and_greedy_rows_share_a_batch(tiny, context):
    sampled = Sampling(temperature=0.8, top_p=0.9, seed=3)
    want_sampled = _alone(tiny, context, PROMPTS[0], 10, temperature=0.8, top_p=0.9, seed=3)
    want_greedy = _alone(tiny, context, PROMPTS[1], 10)
    decoder = Decoder(tiny, context)
    [a] = decoder.add([PROMPTS[0]], [10], sampled)
    decoder.step()
    [b] = decoder.add([PROMPTS[1]], [10])
    decoder.run()
    assert a.token_ids == want_sampled and b.token_ids == want_greedy
    assert want_sampled != _alone(tiny, context, PROMPTS[0], 10, temperature=0.8, top_p=0.9, seed=4)


def test_top_p_keeps_only_the_nucleus(tiny):
    """With a tiny nucleus, sampling can only pick the most likely token: greedy's answer."""
    greedy = _alone(tiny, new_cache(), CONTEXT[:30], 8)
    nucleus = _alone(tiny, new_cache(), CONTEXT[:30], 8, temperature=1.0, top_p=1e-6, seed=1)
    assert nucleus == greedy


def test_text_callbacks_per_row(tiny, context):
    pieces: list[list[str]] = [[], []]
    decoder = Decoder(tiny, context)
    rows = decoder.add(PROMPTS[:2], [9, 9], on_text=[pieces[0].append, pieces[1].append])
    decoder.run()
    assert ["".join(p) for p in pieces] == [r.stream.text() for r in rows]
    assert torch.is_tensor(context.layers[0].keys)
