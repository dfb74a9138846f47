"""Linears that read a GGUF's Q4_1 blocks: the float32 model's products from a fraction of the
bytes, rows independent, caches unchanged, installed only where the blocks are the weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import cag
from cag import cpu_kernels
from cag.block_linear import MAX_BLOCK_ROWS, BlockReadLinear, use_block_read_linears
from cag.measure.bench import weight_bytes_per_step

from conftest import make_tiny_model, write_tiny_gguf

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no compiled CPU kernels here")


def _block_linears(model) -> list[BlockReadLinear]:
    return [m for m in model.modules() if isinstance(m, BlockReadLinear)]


@pytest.fixture
def tiny_with_gguf(tmp_path):
    lm = make_tiny_model(seed=3)
    return lm, write_tiny_gguf(lm, tmp_path / "tiny.gguf")


def test_the_blocks_give_the_float32_product_and_each_row_its_own_sum(tiny_with_gguf, home):
    lm, path = tiny_with_gguf
    float_bytes = weight_bytes_per_step(lm.model)
    plain = cag.wrap_model(lm.model, lm.tokenizer, name="tiny").fingerprint
    wrapped = cag.wrap_model(lm.model, lm.tokenizer, name="tiny", gguf=path)
    assert wrapped.fingerprint == plain  # the same weights, so the same caches
    layers = _block_linears(wrapped.model)
    assert len(layers) == 7 * lm.model.config.num_hidden_layers + 1
    assert wrapped.model.lm_head in layers and wrapped.model.lm_head.format == "q8_0"
    # A step reads the blocks, not float32: per 32 weights, 16 bytes of codes and a float32 d and
    # m (Q4_1), or 32 bytes and a float32 d (Q8_0, the head).
    saved = sum(layer.weight.numel() * (4 - (36 if layer.format == "q8_0" else 24) / 32) for layer in layers)
    assert weight_bytes_per_step(wrapped.model) == pytest.approx(float_bytes - saved)
    torch.manual_seed(0)
    for layer in layers:
        x = torch.randn(8, layer.in_features)
        together = layer(x)
        torch.testing.assert_close(together, F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
        for row in (0, 5):
            assert torch.equal(layer(x[row : row + 1]), together[row : row + 1])
        for rows in (2, 3, 6):  # every way the kernel groups rows
            assert torch.equal(layer(x[:rows]), together[:rows])
        many = torch.randn(MAX_BLOCK_ROWS + 1, layer.in_features)
        assert torch.equal(layer(many), F.linear(many, layer.weight))  # a prefill: BLAS, as before
        # A norm and the product in one call: the rows normalised exactly as the norm kernel does.
        norm = torch.randn(layer.in_features)
        for rows in (1, 3):
            assert torch.equal(layer.product(x[:rows], norm, 1e-5), layer.product(cpu_kernels.rms_norm(x[:rows], norm, 1e-5)))


def test_a_restored_cache_answers_as_a_full_prefill(tiny_with_gguf, home, docs):
    lm, path = tiny_with_gguf
    wrapped = cag.wrap_model(lm.model, lm.tokenizer, name="tiny", gguf=path)
    assert _block_linears(wrapped.model)
    kb = cag.build([docs], name="kb", model=wrapped, home=home)
    for question in ("Who approves travel?", "Where are badges issued?"):
        cached = kb.ask(question, max_new_tokens=10)
        full = kb.ask(question, max_new_tokens=10, use_cache=False)
        assert cached.token_ids == full.token_ids and cached.reused_tokens > 0


def test_blocks_that_are_not_the_weights_are_not_used(tiny_with_gguf):
    lm, path = tiny_with_gguf
    changed = lm.model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        changed.weight[0, 0] += 1e-3
    assert use_block_read_linears(lm.model, path, "hash") == 7 * lm.model.config.num_hidden_layers  # and the head
    assert type(lm.model.model.layers[1].mlp.up_proj) is nn.Linear


def test_checked_blocks_are_kept_and_taken_while_the_weights_are_the_same(tiny_with_gguf, tmp_path):
    lm, path = tiny_with_gguf
    kept = tmp_path / "kept" / "tiny.blocks.safetensors"
    count = 7 * lm.model.config.num_hidden_layers + 1
    fresh = make_tiny_model(seed=3)
    write_tiny_gguf(fresh, tmp_path / "again.gguf")  # the same de-quantized weights as lm's
    assert use_block_read_linears(lm.model, path, "hash-1", kept) == count
    assert kept.is_file()
    # Same weights hash: the GGUF is not read again (here it is not even there).
    assert use_block_read_linears(fresh.model, tmp_path / "gone.gguf", "hash-1", kept) == count
    other = make_tiny_model(seed=4)
    with pytest.raises(FileNotFoundError):  # another hash: checked again, from the GGUF
        use_block_read_linears(other.model, tmp_path / "gone.gguf", "hash-2", kept)
    assert use_block_read_linears(other.model, path, "hash-2", kept) == 0  # not its weights
