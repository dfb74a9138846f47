"""The compiled prefix attention: it matches torch's, every row is summed the same way alone or in a
batch, behind padding and on any number of threads, and a machine without it falls back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cag import cpu_kernels, batch

HEADS = 3


def _cpu_has_vector_units() -> bool:
    """AVX-512, or AVX2 with FMA: what the kernels are written for."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512f" in flags or {"avx2", "fma"} <= set(flags)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A library looked up (and compiled) again, into a cache home of this test's own."""
    monkeypatch.setenv("CAG_HOME", str(tmp_path))
    cpu_kernels._library.cache_clear()
    yield tmp_path
    cpu_kernels._library.cache_clear()


def test_the_kernels_compile_on_a_machine_with_a_compiler_and_avx2_or_avx512(fresh_library):
    if not (_cpu_has_vector_units() and shutil.which("cc")):
        pytest.skip("this machine has no C compiler or neither AVX2 with FMA nor AVX-512: cag uses torch's matmul here")
    assert cpu_kernels.available()
    assert [p.suffix for p in (fresh_library / "kernels").iterdir()] == [".so"]


needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no compiled attention kernels here")


def _reference_attention(query, prefix_keys, prefix_values, keys, values, mask, q_len):
    """``cpu_kernels.attend`` in torch's operations, row by row."""
    heads, rows, _ = query.shape
    per_batch = rows // keys.shape[0]
    out = torch.empty_like(query)
    for r in range(rows):
        b = r // per_batch
        k = torch.cat([prefix_keys, keys[b]], dim=1)
        v = torch.cat([prefix_values, values[b]], dim=1)
        scores = torch.einsum("hd,hnd->hn", query[:, r], k)
        if mask is not None:
            visible = torch.cat([torch.ones(prefix_keys.shape[1], dtype=torch.bool), mask[b, (r % per_batch) % q_len]])
            scores = scores.masked_fill(~visible, float("-inf"))
        out[:, r] = torch.einsum("hn,hnd->hd", torch.softmax(scores, dim=-1), v)
    return out


def _attention_inputs(batch, rows, n, s, dim, q_len=1, seed=0):
    torch.manual_seed(seed)
    query = torch.randn(HEADS, batch * rows, dim) * dim**-0.5
    prefix = torch.randn(HEADS, n, dim), torch.randn(HEADS, n, dim)
    suffix = torch.randn(batch, HEADS, s, dim), torch.randn(batch, HEADS, s, dim)
    return query, *prefix, *suffix


@needs_kernels
@pytest.mark.parametrize("batch, rows, n, s, dim", [(1, 1, 1, 1, 16), (1, 3, 1000, 7, 64), (2, 9, 300, 17, 80),
                                                     (1, 24, 513, 33, 128), (3, 51, 700, 2, 64), (1, 5, 100, 300, 64)])
def test_attention_matches_torch(batch, rows, n, s, dim):
    query, pk, pv, k, v = _attention_inputs(batch, rows, n, s, dim, seed=rows)
    out = cpu_kernels.attend(query, pk, pv, k, v, None, 1)
    torch.testing.assert_close(out, _reference_attention(query, pk, pv, k, v, None, 1), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_attention_masks_padding_and_later_tokens():
    q_len, s = 4, 10
    query, pk, pv, k, v = _attention_inputs(2, 3 * q_len, 200, s, 64)
    mask = torch.ones(2, q_len, s, dtype=torch.bool).tril(diagonal=s - q_len)
    mask[0, :, :3] = False  # three columns of left padding in the first row
    out = cpu_kernels.attend(query, pk, pv, k, v, mask, q_len)
    torch.testing.assert_close(out, _reference_attention(query, pk, pv, k, v, mask, q_len), rtol=1e-5, atol=1e-5)
    # A masked column weighs nothing: what its (finite) keys and values hold does not matter.
    k[0, :, :3], v[0, :, :3] = 1e4, -1e30
    assert torch.equal(cpu_kernels.attend(query, pk, pv, k, v, mask, q_len), out)


@needs_kernels
def test_a_row_is_summed_the_same_alone_in_a_batch_with_padding_and_on_two_threads():
    query, pk, pv, k, v = _attention_inputs(1, 21, 2000, 6, 64)
    together = cpu_kernels.attend(query, pk, pv, k, v, None, 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(cpu_kernels.attend(query, pk, pv, k, v, None, 1), together)
    finally:
        torch.set_num_threads(threads)
    for row in (0, 4, 20):
        alone = cpu_kernels.attend(query[:, row : row + 1].contiguous(), pk, pv, k, v, None, 1)
        assert torch.equal(alone, together[:, row : row + 1])
    # The same rows behind two columns of left padding, batched with another row's suffix.
    padded_k, padded_v = torch.randn(2, HEADS, 8, 64), torch.randn(2, HEADS, 8, 64)
    padded_k[0, :, 2:], padded_v[0, :, 2:] = k[0], v[0]
    mask = torch.ones(2, 1, 8, dtype=torch.bool)
    mask[0, :, :2] = False
    both = cpu_kernels.attend(torch.cat([query, query], dim=1), pk, pv, padded_k, padded_v, mask, 1)
    assert torch.equal(both[:, :21], together)


@needs_kernels
def test_shared_prefix_attention_agrees_with_the_torch_route():
    torch.manual_seed(0)
    b, heads, q_len, s, n, dim = 2, 6, 3, 5, 400, 32
    query = torch.randn(b, heads, q_len, dim)
    key, value = torch.randn(b, HEADS, s, dim), torch.randn(b, HEADS, s, dim)
    prefix_keys, prefix_values = torch.randn(1, HEADS, n, dim), torch.randn(1, HEADS, n, dim)
    mask = torch.ones(b, 1, q_len, s, dtype=torch.bool)
    mask[0, :, :, :2] = False  # left padding in the first row
    mask[..., -2:] = torch.ones(q_len, 2, dtype=torch.bool).tril()  # causal among the new tokens
    with_kernels = batch._attend_kernels(query, key, value, mask, prefix_keys[0], prefix_values[0], dim**-0.5)
    with_torch = batch._attend(query, key, value, mask, prefix_keys, prefix_values, dim**-0.5)
    torch.testing.assert_close(with_kernels, with_torch, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_rms_norm_and_rotary_match_the_models_own():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(5, 7, 96) * 3
    out = cpu_kernels.rms_norm(x, norm.weight, 1e-5)
    torch.testing.assert_close(out, norm(x), rtol=2e-6, atol=2e-6)
    assert torch.equal(cpu_kernels.rms_norm(x[2:3].contiguous(), norm.weight, 1e-5), out[2:3])
    q, k = torch.randn(2, 4, 6, 32), torch.randn(2, 4, 3, 32)  # [batch, tokens, heads, dim], as projected
    cos, sin = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    q_embed, k_embed = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert torch.equal(cpu_kernels.rotary(k, cos, sin), k_embed)  # bit for bit, [batch, heads, tokens, dim]
    # Scaled and laid out as the attention takes its query rows: [kv heads, batch x group x tokens, dim].
    as_rows = (q_embed * 0.25).reshape(2, 3, 2, 4, 32).transpose(0, 1).reshape(3, 16, 32)
    assert torch.equal(cpu_kernels.rotary(q, cos, sin, 0.25, 2), as_rows)


def test_a_wrapped_model_normalises_through_the_kernel_when_it_can(tiny):
    from cag.rms_norm import CompiledRMSNorm

    norms = [m for m in tiny.model.modules() if isinstance(m, CompiledRMSNorm)]
    assert len(norms) == (2 * tiny.model.config.num_hidden_layers + 1 if cpu_kernels.available() else 0)


def test_tensors_the_kernels_cannot_take_are_left_to_torch():
    assert not cpu_kernels.usable(torch.randn(3, 4, 24))  # head dim not a multiple of 16
    assert not cpu_kernels.usable(torch.randn(3, 4, 64, dtype=torch.bfloat16))
    assert not cpu_kernels.usable(torch.randn(3, 64, 4).transpose(1, 2))


def test_switched_off_or_without_a_compiler_torch_takes_over_and_nothing_is_left_behind(fresh_library, monkeypatch):
    monkeypatch.setenv("CAG_CPU_KERNELS", "0")
    assert not cpu_kernels.available()
    monkeypatch.delenv("CAG_CPU_KERNELS")
    cpu_kernels._library.cache_clear()
    monkeypatch.setenv("CC", "cc-that-does-not-exist")
    assert not cpu_kernels.available()
    # A compiler that writes half an output and fails.
    broken = fresh_library / "broken-cc"
    broken.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo broken 1.0; exit 0; }\n'
                      'for last; do :; done\necho half > "$last"\necho "error: no" >&2\nexit 1\n')
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    cpu_kernels._library.cache_clear()
    assert not cpu_kernels.available()
    assert list((fresh_library / "kernels").iterdir()) == []
