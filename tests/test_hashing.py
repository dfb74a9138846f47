"""Chained block hashes: what the prefix index is keyed by."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cag.hashing import DEFAULT_BLOCK_SIZE, block_hashes, chain_seed, common_prefix_length, sequence_key

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
tokens = st.lists(st.integers(min_value=0, max_value=2**40), max_size=60)
small_tokens = st.lists(st.integers(min_value=0, max_value=5), max_size=40)  # few values: long shared prefixes
block_sizes = st.integers(min_value=1, max_value=9)
SEED = chain_seed("f" * 64, "float32", 4)


def naive_common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_default_block_size_is_256():
    assert DEFAULT_BLOCK_SIZE == 256


def test_hashes_are_chained_sha256_of_parent_and_block():
    seed = chain_seed("model", "float32", 2)
    ids = [1, 2, 3, 4, 5]
    h1 = hashlib.sha256(seed + np.asarray([1, 2], dtype="<i8").tobytes()).digest()
    h2 = hashlib.sha256(h1 + np.asarray([3, 4], dtype="<i8").tobytes()).digest()
    assert block_hashes(ids, seed, 2) == [h1.hex(), h2.hex()]  # the partial tail [5] has no block hash


def test_short_sequences_have_no_block():
    assert block_hashes([], SEED, 4) == []
    assert block_hashes([1, 2, 3], SEED, 4) == []
    assert len(block_hashes(list(range(8)), SEED, 4)) == 2


def test_seed_depends_on_fingerprint_dtype_and_block_size():
    seeds = {
        chain_seed("model-a", "float32", 256),
        chain_seed("model-b", "float32", 256),
        chain_seed("model-a", "bfloat16", 256),
        chain_seed("model-a", "float32", 128),
    }
    assert len(seeds) == 4
    assert chain_seed("model-a", "float32", 256) == chain_seed("model-a", "float32", 256)


def test_other_model_or_tokenizer_gives_other_keys(tiny):
    """The fingerprint covers weights, config and tokenizer (chat template included)."""
    import copy

    import cag
    from conftest import make_tiny_model

    other_weights = make_tiny_model(seed=1)
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace("helpful", "terse")
    other_tokenizer = cag.wrap_model(tiny.model, tokenizer, name=tiny.name)
    same = make_tiny_model(seed=0)
    assert same.fingerprint == tiny.fingerprint
    ids = list(range(20))
    keys = {
        sequence_key(ids, chain_seed(lm.fingerprint, "float32", 4), 4)
        for lm in (tiny, other_weights, other_tokenizer)
    }
    keys.add(sequence_key(ids, chain_seed(tiny.fingerprint, "bfloat16", 4), 4))
    assert len(keys) == 4


@FAST
@given(ids=tokens, cut=st.integers(min_value=0, max_value=60), size=block_sizes)
def test_hashes_of_a_prefix_are_a_prefix_of_the_hashes(ids, cut, size):
    whole = block_hashes(ids, SEED, size)
    part = block_hashes(ids[:cut], SEED, size)
    assert len(whole) == len(ids) // size
    assert part == whole[: len(part)]
    assert len(part) == min(cut, len(ids)) // size


@FAST
@given(ids=st.lists(st.integers(0, 1000), min_size=1, max_size=40), size=block_sizes, data=st.data())
def test_changing_a_token_changes_its_block_and_every_later_one(ids, size, data):
    if len(ids) < size:
        return
    i = data.draw(st.integers(0, len(ids) - 1))
    changed = list(ids)
    changed[i] += 1
    a, b = block_hashes(ids, SEED, size), block_hashes(changed, SEED, size)
    first = i // size
    assert a[:first] == b[:first]
    assert all(x != y for x, y in zip(a[first:], b[first:]))


@FAST
@given(ids=st.lists(st.integers(0, 1000), min_size=1, max_size=40), size=block_sizes,
       fp=st.sampled_from(["a", "b"]), dtype=st.sampled_from(["float32", "float16"]))
def test_different_seeds_give_different_hashes(ids, size, fp, dtype):
    other = chain_seed(fp + "x", dtype, size)
    seed = chain_seed(fp, dtype, size)
    assert sequence_key(ids, seed, size) != sequence_key(ids, other, size)
    if len(ids) >= size:
        assert set(block_hashes(ids, seed, size)).isdisjoint(block_hashes(ids, other, size))


@FAST
@given(ids=tokens, size=block_sizes, data=st.data())
def test_sequence_key_changes_when_any_token_changes(ids, size, data):
    key = sequence_key(ids, SEED, size)
    assert key == sequence_key(list(ids), SEED, size)
    assert sequence_key(ids + [0], SEED, size) != key  # length is part of the key
    if ids:
        assert sequence_key(ids[:-1], SEED, size) != key
        i = data.draw(st.integers(0, len(ids) - 1))
        changed = list(ids)
        changed[i] = changed[i] + data.draw(st.integers(1, 5))
        assert sequence_key(changed, SEED, size) != key


@FAST
@given(ids=tokens)
def test_sequence_key_depends_on_block_size_only_through_the_seed(ids):
    # The same tokens under different block sizes are different index spaces: keys never collide.
    assert sequence_key(ids, chain_seed("m", "float32", 4), 4) != sequence_key(ids, chain_seed("m", "float32", 5), 5)


@FAST
@given(a=small_tokens, b=small_tokens)
def test_common_prefix_length_matches_naive(a, b):
    assert common_prefix_length(a, b) == naive_common_prefix(a, b)
    assert common_prefix_length(b, a) == common_prefix_length(a, b)
    assert common_prefix_length(a, a) == len(a)
    assert common_prefix_length(a + b, a) == len(a)


@pytest.mark.parametrize("a,b,n", [([], [], 0), ([1], [], 0), ([1, 2, 3], [1, 2, 4], 2), ([7], [8], 0), ([2**40], [2**40], 1)])
def test_common_prefix_length_examples(a, b, n):
    assert common_prefix_length(a, b) == n
