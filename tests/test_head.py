"""The half-read output head: greedy picks exact, other logits within the bound, rows independent."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cag.head import HalfReadHead, exact_logits, use_half_read_head

VOCAB, HIDDEN = 8192, 96


@pytest.fixture(scope="module")
def weight() -> nn.Parameter:
    torch.manual_seed(0)
    return nn.Parameter(torch.randn(VOCAB, HIDDEN) * 0.05, requires_grad=False)


def test_greedy_pick_is_the_float32_argmax_and_other_logits_keep_the_bound(weight):
    head = HalfReadHead(weight)
    hidden = torch.randn(32, HIDDEN) * 20
    logits = head(hidden)
    exact = exact_logits(hidden, weight)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    bound = 2.0**-9 * hidden.norm(dim=-1, keepdim=True) * weight.norm(dim=-1)
    assert bool(((logits - exact).abs() <= bound).all())
    assert not torch.equal(logits, exact)  # the others were read in float16, not recomputed


def test_a_near_tie_float16_cannot_see_is_settled_in_float32():
    torch.manual_seed(1)
    weight = torch.randn(VOCAB, HIDDEN) * 0.05
    hidden = torch.randn(1, HIDDEN) * 20
    top = int((hidden @ weight.t()).argmax())
    rival = (top + 1) % VOCAB
    # The rival equals the top row in float16 and is better by far less than float16 resolves.
    weight[top] = weight[top].half().float()
    weight[rival] = weight[top] + 1e-8 * torch.sign(hidden[0])
    assert torch.equal(weight[rival].half(), weight[top].half())
    head = HalfReadHead(nn.Parameter(weight, requires_grad=False))
    assert int(head(hidden).argmax()) == rival


def test_a_row_gets_the_same_logits_for_its_candidates_alone_or_in_a_batch(weight):
    head = HalfReadHead(weight)
    hidden = torch.randn(8, HIDDEN) * 20
    together = head(hidden[None])[0]
    for i in range(8):
        alone = head(hidden[i : i + 1])[0]
        pick = int(alone.argmax())
        assert int(together[i].argmax()) == pick
        assert together[i, pick] == alone[pick]


def test_many_rows_and_values_float16_cannot_hold_take_the_float32_product(weight):
    head = HalfReadHead(weight)
    many = torch.randn(100, HIDDEN)
    assert torch.equal(head(many), F.linear(many, weight))
    huge = torch.randn(1, HIDDEN) * 1e5
    assert torch.equal(head(huge), F.linear(huge, weight))


def test_installed_on_a_model_with_a_large_vocabulary_and_answers_agree():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(2)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert use_half_read_head(model)
        after = model(input_ids=ids).logits
    assert isinstance(model.get_output_embeddings(), HalfReadHead)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(before.argmax(-1), after.argmax(-1))
    torch.testing.assert_close(after, before, atol=1e-3, rtol=0)

    from cag.measure.bench import weight_bytes_per_step

    everything = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    embedding = model.get_input_embeddings().weight
    assert weight_bytes_per_step(model) == everything - embedding.numel() * embedding.element_size()


def test_not_installed_where_it_does_not_pay_or_is_not_a_plain_float32_head(tiny):
    assert not use_half_read_head(tiny.model)  # a vocabulary of hundreds
    assert not isinstance(tiny.model.get_output_embeddings(), HalfReadHead)
