"""The compiled Llama decode step: bit for bit the model's own forward with the same kernels, in a
batch with padding too, and only where it covers the model."""

from __future__ import annotations

import pytest
import torch

import cag
from cag import batch as batch_module
from cag import cpu_kernels, llama_step
from cag.batch import SharedPrefixBatch
from cag.prefill import prefill

from conftest import make_tiny_model, write_tiny_gguf

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no compiled CPU kernels here")

CONTEXT = list(range(5, 90))
PROMPTS = [[7, 8, 9], list(range(10, 20))]  # a prefill of 2 x 10 rows: more than the block products take


@pytest.fixture
def with_blocks(tmp_path, home):
    lm = make_tiny_model(seed=5)
    return cag.wrap_model(lm.model, lm.tokenizer, name="tiny", gguf=write_tiny_gguf(lm, tmp_path / "tiny.gguf"))


def _decode(lm, steps: int) -> list[torch.Tensor]:
    rows = SharedPrefixBatch(lm, prefill(lm, CONTEXT).cache, len(PROMPTS), capacity=4)
    logits = [rows.prefill(PROMPTS, chunk_size=64)]
    for _ in range(steps):
        logits.append(rows.step(torch.argmax(logits[-1], dim=-1)))
    rows.keep_rows([1])  # the longer prompt alone: no padding left
    logits.append(rows.step(torch.argmax(logits[-1][1:], dim=-1)))
    logits.append(rows.step(torch.argmax(logits[-1], dim=-1)))
    return logits


def test_the_step_gives_the_models_own_logits_bit_for_bit(with_blocks, monkeypatch):
    step = llama_step.llama_step(with_blocks.model)
    assert step is not None
    calls = []
    original = llama_step.LlamaStep.__call__
    monkeypatch.setattr(llama_step.LlamaStep, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    fused = []
    rotary_attend = cpu_kernels.rotary_attend
    monkeypatch.setattr(cpu_kernels, "rotary_attend", lambda *a: fused.append(1) or rotary_attend(*a))
    fast = _decode(with_blocks, steps=4)
    assert len(calls) == 7  # the prompts' prefill and every decode step (with padding, then one row alone)
    assert len(fused) == 6 * with_blocks.model.config.num_hidden_layers  # each decode step's attention in one call
    monkeypatch.setattr(batch_module, "llama_step", lambda model: None)
    slow = _decode(with_blocks, steps=4)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))


def test_a_short_prompts_prefill_goes_through_the_one_call_attention_bit_for_bit(with_blocks, monkeypatch):
    def run() -> list[torch.Tensor]:
        rows = SharedPrefixBatch(with_blocks, prefill(with_blocks, CONTEXT).cache, 2, capacity=4)
        logits = [rows.prefill([[7, 8, 9], [4, 5]], chunk_size=64)]  # 2 x 3 rows, padded: a few, on fresh buffers
        for _ in range(3):
            logits.append(rows.step(torch.argmax(logits[-1], dim=-1)))
        return logits

    fused = []
    rotary_attend = cpu_kernels.rotary_attend
    monkeypatch.setattr(cpu_kernels, "rotary_attend", lambda *a: fused.append(1) or rotary_attend(*a))
    fast = run()
    assert len(fused) == 4 * with_blocks.model.config.num_hidden_layers
    monkeypatch.setattr(batch_module, "llama_step", lambda model: None)
    assert all(torch.equal(a, b) for a, b in zip(fast, run()))


def test_the_step_covers_only_models_it_was_checked_for(tiny, with_blocks):
    assert llama_step.llama_step(tiny.model) is None  # float32 linears, no blocks
    with_blocks.model.model.layers[0].mlp.up_proj = torch.nn.Linear(64, 128, bias=False)
    assert not llama_step._covered(with_blocks.model)
