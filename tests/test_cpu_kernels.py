"""The compiled prefix-attention loops: they match torch's products, every row is summed the same
way alone or in a batch and on any number of threads, and a machine without them falls back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cag import cpu_kernels, batch

HEADS = 3


def _cpu_has_avx512() -> bool:
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A library looked up (and compiled) again, into a cache home of this test's own."""
    monkeypatch.setenv("CAG_HOME", str(tmp_path))
    cpu_kernels._library.cache_clear()
    yield tmp_path
    cpu_kernels._library.cache_clear()


def test_the_kernels_compile_on_a_machine_with_a_compiler_and_avx512(fresh_library):
    if not (_cpu_has_avx512() and shutil.which("cc")):
        pytest.skip("this machine has no C compiler or no AVX-512: cag uses torch's matmul here")
    assert cpu_kernels.available()
    assert [p.suffix for p in (fresh_library / "kernels").iterdir()] == [".so"]


needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no compiled attention kernels here")


@needs_kernels
@pytest.mark.parametrize("rows, n, dim", [(1, 1, 16), (3, 1000, 64), (9, 300, 80), (24, 513, 128), (51, 700, 64)])
def test_scores_and_weighted_values_match_torch(rows, n, dim):
    torch.manual_seed(rows)
    query = torch.randn(HEADS, rows, dim)
    keys, values = torch.randn(HEADS, n, dim), torch.randn(HEADS, n, dim)
    # Outputs and weights inside wider buffers, as the attention lays them out.
    scores = torch.full((HEADS, rows, n + 5), float("nan"))
    cpu_kernels.prefix_scores(query, keys, scores)
    torch.testing.assert_close(scores[..., :n], query @ keys.transpose(-1, -2), rtol=1e-5, atol=1e-5)
    assert scores[..., n:].isnan().all()  # nothing written past the prefix's columns
    weights = torch.softmax(scores[..., :n], dim=-1)
    out = torch.empty(HEADS, rows, dim)
    cpu_kernels.weighted_values(weights, values, out)
    torch.testing.assert_close(out, weights @ values, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_a_row_is_summed_the_same_alone_in_a_batch_and_on_two_threads():
    torch.manual_seed(0)
    query, keys, values = torch.randn(HEADS, 9, 64), torch.randn(HEADS, 2000, 64), torch.randn(HEADS, 2000, 64)
    weights = torch.softmax(torch.randn(HEADS, 9, 2000), dim=-1)

    def both(q, w):
        scores, out = torch.empty(HEADS, q.shape[1], 2000), torch.empty(HEADS, q.shape[1], 64)
        cpu_kernels.prefix_scores(q.contiguous(), keys, scores)
        cpu_kernels.weighted_values(w, values, out)
        return scores, out

    threads = torch.get_num_threads()
    together = both(query, weights)
    try:
        torch.set_num_threads(2)
        on_two = both(query, weights)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(together, on_two))
    for row in (0, 4, 8):
        alone = both(query[:, row : row + 1], weights[:, row : row + 1])
        assert torch.equal(alone[0], together[0][:, row : row + 1])
        assert torch.equal(alone[1], together[1][:, row : row + 1])


@needs_kernels
def test_shared_prefix_attention_agrees_with_the_torch_route(monkeypatch):
    torch.manual_seed(0)
    b, heads, q_len, s, n, dim = 2, 6, 3, 5, 400, 32
    query = torch.randn(b, heads, q_len, dim)
    key, value = torch.randn(b, HEADS, s, dim), torch.randn(b, HEADS, s, dim)
    prefix_keys, prefix_values = torch.randn(1, HEADS, n, dim), torch.randn(1, HEADS, n, dim)
    mask = torch.ones(b, 1, q_len, s, dtype=torch.bool)
    mask[0, :, :, :2] = False  # left padding in the first row
    mask[..., -2:] = torch.ones(q_len, 2, dtype=torch.bool).tril()  # causal among the new tokens
    args = (query, key, value, mask, prefix_keys, prefix_values, dim**-0.5)
    with_kernels = batch._attend(*args)
    monkeypatch.setattr(cpu_kernels, "usable", lambda *tensors: False)
    torch.testing.assert_close(with_kernels, batch._attend(*args), rtol=1e-5, atol=1e-6)


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
