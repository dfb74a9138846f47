"""Chained block hashes of token sequences, as prefix caches index them.

Tokens are cut into fixed blocks; block i's hash covers its parent's hash and its own
tokens, ``h_i = sha256(h_{i-1} || tokens_i)``, and ``h_0`` is a seed made from the
model fingerprint, KV dtype and block size. Equal hashes therefore mean equal prefixes
under the same model, and a prompt's longest cached prefix is found by looking its
block hashes up in an index.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

__all__ = ["DEFAULT_BLOCK_SIZE", "chain_seed", "block_hashes", "sequence_key", "common_prefix_length"]

DEFAULT_BLOCK_SIZE = 256


def chain_seed(fingerprint: str, kv_dtype: str, block_size: int) -> bytes:
    return hashlib.sha256(f"cag-prefix-v1|{fingerprint}|{kv_dtype}|{block_size}".encode()).digest()


def _token_bytes(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype="<i8").tobytes()


def block_hashes(token_ids: Sequence[int], seed: bytes, block_size: int) -> list[str]:
    """Hex hashes of every full block of ``token_ids``, each chained to the one before."""
    hashes = []
    parent = seed
    for begin in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hashlib.sha256(parent + _token_bytes(token_ids[begin : begin + block_size])).digest()
        hashes.append(parent.hex())
    return hashes


def sequence_key(token_ids: Sequence[int], seed: bytes, block_size: int) -> str:
    """Content key of a whole sequence: its block chain extended by the partial tail and length."""
    full = len(token_ids) // block_size * block_size
    chain = block_hashes(token_ids[:full], seed, block_size)
    parent = bytes.fromhex(chain[-1]) if chain else seed
    tail = _token_bytes(token_ids[full:])
    return hashlib.sha256(parent + b"|tail|" + len(token_ids).to_bytes(8, "little") + tail).hexdigest()[:40]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n], dtype=np.int64)
    y = np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n
