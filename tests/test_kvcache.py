"""The cache file: a round trip is bit-exact, and the format is pinned by a golden file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cag.errors import CorruptCacheError
from cag.kvcache import FORMAT_VERSION, CacheMetadata, cache_from_layers, load_cache, read_metadata, save_cache
from cag.prefill import prefill

GOLDEN = Path(__file__).parent / "golden" / f"kv_v{FORMAT_VERSION}.safetensors"


def _golden_cache():
    """Two layers, two KV heads, three tokens, head dim 4: small and exactly reproducible."""
    layers = []
    for i in range(2):
        keys = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4) / 8 + i
        layers.append((keys, -keys))
    metadata = CacheMetadata(
        model_name="golden", fingerprint="f" * 64, tokenizer_hash="t" * 64, kv_dtype="float32",
        tokens=3, num_layers=2, sources=("a.md", "b.md"), created="2026-01-01T00:00:00+00:00",
    )
    return cache_from_layers(layers), [5, 6, 7], metadata


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def test_format_matches_golden_file(tmp_path):
    cache, ids, metadata = _golden_cache()
    written = tmp_path / "x.safetensors"
    save_cache(written, cache, ids, metadata)
    # safetensors does not fix the order of header keys, so compare the parsed header and the bytes of the data.
    assert _split(written) == _split(GOLDEN), "the cache file format changed: bump FORMAT_VERSION and add a golden file"


def test_golden_file_loads(tmp_path):
    cache, ids, metadata = _golden_cache()
    restored = load_cache(GOLDEN)
    assert restored.metadata == metadata
    assert restored.token_ids == ids
    for (k, v), layer in zip(((l.keys, l.values) for l in cache.layers), restored.cache.layers):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_round_trip_is_bit_exact(tiny, tmp_path):
    ids = list(range(3, 300))
    cache = prefill(tiny, ids).cache
    metadata = CacheMetadata(
        model_name=tiny.name, fingerprint=tiny.fingerprint, tokenizer_hash=tiny.tokenizer_hash, kv_dtype="float32",
        tokens=len(ids), num_layers=len(cache.layers), sources=("s",), created="now",
    )
    path = tmp_path / "c.safetensors"
    size = save_cache(path, cache, ids, metadata)
    assert size == path.stat().st_size
    restored = load_cache(path)
    assert restored.token_ids == ids and restored.metadata == metadata
    assert restored.bytes_read == size
    for a, b in zip(cache.layers, restored.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # Any safetensors reader sees the same tensors: the file is plain safetensors.
    with safe_open(path, framework="pt") as f:
        assert torch.equal(f.get_tensor("layers.1.values"), cache.layers[1].values)
        assert f.get_tensor("token_ids").tolist() == ids
        assert f.metadata()["format_version"] == str(FORMAT_VERSION)
    assert read_metadata(path) == metadata


def test_prefix_restore_reads_only_the_prefix(tiny, tmp_path):
    ids = [3 + i % (tiny.model.config.vocab_size - 3) for i in range(900)]
    cache = prefill(tiny, ids).cache
    metadata = CacheMetadata(
        model_name=tiny.name, fingerprint=tiny.fingerprint, tokenizer_hash=tiny.tokenizer_hash, kv_dtype="float32",
        tokens=len(ids), num_layers=len(cache.layers),
    )
    path = tmp_path / "c.safetensors"
    size = save_cache(path, cache, ids, metadata)
    part = load_cache(path, 100)
    assert part.cache.get_seq_length() == 100 and part.token_ids == ids[:100]
    assert part.bytes_read < size / 2
    assert torch.equal(part.cache.layers[0].keys, cache.layers[0].keys[:, :, :100])


def test_flipped_byte_is_refused(tiny, tmp_path):
    cache, ids, metadata = _golden_cache()
    path = tmp_path / "c.safetensors"
    save_cache(path, cache, ids, metadata)
    raw = bytearray(path.read_bytes())
    raw[-40] ^= 0x01  # inside the KV data
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCacheError, match="checksum"):
        load_cache(path)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import cag.kvcache as kvcache

    def explode(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(kvcache, "save_file", explode)
    cache, ids, metadata = _golden_cache()
    with pytest.raises(KeyboardInterrupt):
        save_cache(tmp_path / "c.safetensors", cache, ids, metadata)
    assert list(tmp_path.iterdir()) == []
