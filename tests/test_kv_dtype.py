"""KV dtypes on disk (float32, bfloat16, float16, int8) and the zero-copy restore."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import cag.kvcache as kvcache
from cag.errors import CagError, CorruptCacheError
from cag.generate import generate
from cag.kvcache import (
    CRC_BLOCK_TOKENS,
    INT8_KEY_GROUP_TOKENS,
    KV_DTYPES,
    CacheMetadata,
    cache_from_layers,
    check_kv_dtype,
    load_cache,
    read_metadata,
    save_cache,
)
from cag.prefill import prefill
from cag.stores import LocalStore
from conftest import header_of, rewrite_header

G = INT8_KEY_GROUP_TOKENS


def random_cache(tokens: int, seed: int = 0, layers: int = 2, heads: int = 2, dim: int = 8):
    """Keys with per-channel offsets (as real keys have) and plain values."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        offsets = torch.randn(1, heads, 1, dim, generator=g) * 4
        keys = torch.randn(1, heads, tokens, dim, generator=g) + offsets
        values = torch.randn(1, heads, tokens, dim, generator=g)
        out.append((keys, values))
    return cache_from_layers(out)


def meta(tokens: int, kv_dtype: str, layers: int = 2) -> CacheMetadata:
    return CacheMetadata(model_name="fake", fingerprint="f" * 64, tokenizer_hash="t" * 64, kv_dtype=kv_dtype,
                         tokens=tokens, num_layers=layers)


def save(tmp_path: Path, cache, kv_dtype: str, tokens: int | None = None) -> Path:
    n = tokens or cache.get_seq_length()
    path = tmp_path / f"{kv_dtype}-{n}.safetensors"
    save_cache(path, cache, list(range(n)), meta(n, kv_dtype, len(cache.layers)))
    return path


def int8_error_bound(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half a quantization step (plus float slack) for each element: the most rounding may cost."""
    b, h, t, d = keys.shape
    groups = -(-t // G)
    padded = torch.cat([keys, keys[:, :, -1:].expand(b, h, groups * G - t, d)], dim=2).view(b, h, groups, G, d)
    key_step = (padded.amax(3) - padded.amin(3)) / 255
    key_bound = key_step.repeat_interleave(G, dim=2)[:, :, :t] / 2 + 1e-5 * (1 + keys.abs())
    value_step = (values.amax(-1, keepdim=True) - values.amin(-1, keepdim=True)) / 255
    return key_bound, value_step / 2 + 1e-5 * (1 + values.abs())


# ----------------------------------------------------------------- dtype names


def test_kv_dtype_names_and_aliases():
    assert [check_kv_dtype(n) for n in KV_DTYPES] == list(KV_DTYPES)
    assert check_kv_dtype(torch.bfloat16) == "bfloat16" and check_kv_dtype("FP16") == "float16" and check_kv_dtype("fp32") == "float32"
    with pytest.raises(CagError, match="int8"):
        check_kv_dtype("int4")


def test_unknown_kv_dtype_is_refused_on_save(tmp_path):
    with pytest.raises(CagError, match="unsupported KV dtype"):
        save(tmp_path, random_cache(10), "float8")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ float dtypes


@pytest.mark.parametrize("kv_dtype,torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_half_precision_round_trip_equals_a_cast(tmp_path, kv_dtype, torch_dtype):
    cache = random_cache(300)
    path = save(tmp_path, cache, kv_dtype)
    assert read_metadata(path).kv_dtype == kv_dtype
    stored = load_cache(path)  # in the stored dtype: views, no conversion
    restored = load_cache(path, dtype=torch.float32)  # in the compute dtype
    assert stored.zero_copy and not restored.zero_copy
    for a, s, r in zip(cache.layers, stored.cache.layers, restored.cache.layers):
        assert s.keys.dtype == torch_dtype and r.keys.dtype == torch.float32
        assert torch.equal(r.keys, a.keys.to(torch_dtype).float()) and torch.equal(r.values, a.values.to(torch_dtype).float())
        assert torch.equal(s.values, a.values.to(torch_dtype))
    # Half the bytes of float32 per tensor, and no extra tensors or header fields.
    h16, h32 = header_of(path), header_of(save(tmp_path, cache, "float32"))
    span = lambda h, name: h[name]["data_offsets"][1] - h[name]["data_offsets"][0]  # noqa: E731
    assert span(h16, "layers.0.keys") * 2 == span(h32, "layers.0.keys")
    assert set(h16) == set(h32) and set(h16["__metadata__"]) == set(h32["__metadata__"])


def test_float32_restore_is_zero_copy_and_writes_never_reach_the_file(tmp_path):
    cache = random_cache(300)
    path = save(tmp_path, cache, "float32")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    restored = load_cache(path, dtype=torch.float32)
    assert restored.zero_copy
    layer = restored.cache.layers[0]
    assert torch.equal(layer.keys, cache.layers[0].keys)
    layer.keys.add_(1.0)  # private mapping: copy-on-write
    assert not torch.equal(layer.keys, cache.layers[0].keys)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    again = load_cache(path)
    assert torch.equal(again.cache.layers[0].keys, cache.layers[0].keys)


def test_restore_without_mmap_reads_the_same(tmp_path, monkeypatch):
    cache = random_cache(600)
    paths = {k: save(tmp_path, cache, k) for k in ("float32", "int8")}
    mapped = {k: load_cache(p, 300, dtype=torch.float32) for k, p in paths.items()}
    monkeypatch.setattr(kvcache, "_map", lambda f: None)
    for kind, path in paths.items():
        read = load_cache(path, 300, dtype=torch.float32)
        assert not read.zero_copy and read.bytes_read == mapped[kind].bytes_read
        for a, b in zip(read.cache.layers, mapped[kind].cache.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8"])
def test_restore_into_caller_buffers(tmp_path, kv_dtype):
    """out= fills the caller's buffers (capacity beyond the prefix) in place: the same values, no new tensors."""
    cache = random_cache(600)
    path = save(tmp_path, cache, kv_dtype)
    expected = load_cache(path, 300, dtype=torch.float32).cache
    buffers = [(torch.full((1, 2, 1000, 8), 7.0), torch.full((1, 2, 1000, 8), 7.0)) for _ in cache.layers]
    restored = load_cache(path, 300, out=buffers)
    assert not restored.zero_copy and restored.cache.get_seq_length() == 300
    for (k, v), layer, want in zip(buffers, restored.cache.layers, expected.layers):
        assert layer.keys.data_ptr() == k.data_ptr() and layer.values.data_ptr() == v.data_ptr()
        assert torch.equal(k[:, :, :300], want.keys) and torch.equal(v[:, :, :300], want.values)
        assert (k[:, :, 300:] == 7).all() and (v[:, :, 300:] == 7).all()  # nothing past the prefix is touched


def test_restore_into_wrong_buffers_is_refused(tmp_path):
    path = save(tmp_path, random_cache(100), "float32")
    good = lambda tokens=100, dim=8: (torch.empty(1, 2, tokens, dim), torch.empty(1, 2, tokens, dim))  # noqa: E731
    for out in ([good()], [good(), good(50)], [good(), good(dim=4)]):
        with pytest.raises(ValueError, match="out"):
            load_cache(path, out=out)
    with pytest.raises(ValueError, match="bfloat16"):
        load_cache(path, dtype=torch.bfloat16, out=[good(), good()])


# -------------------------------------------------------------------------- int8


def test_int8_file_layout(tmp_path):
    cache = random_cache(300, layers=3)
    path = save(tmp_path, cache, "int8")
    h = header_of(path)
    assert h["__metadata__"]["kv_dtype"] == "int8" and h["__metadata__"]["kv_key_group_tokens"] == str(G)
    groups = -(-300 // G)
    assert h["layers.2.keys"] == {**h["layers.2.keys"], "dtype": "I8", "shape": [1, 2, 300, 8]}
    assert h["layers.2.keys_scale"]["shape"] == h["layers.2.keys_zero"]["shape"] == [1, 2, groups, 8]
    assert h["layers.2.values_scale"]["shape"] == h["layers.2.values_zero"]["shape"] == [1, 2, 300, 1]
    # Still plain safetensors: any reader de-quantizes it with x = q * scale + zero.
    with safe_open(path, framework="pt") as f:
        q, scale, zero = (f.get_tensor(f"layers.1.values{s}") for s in ("", "_scale", "_zero"))
    assert torch.allclose(q.float() * scale + zero, cache.layers[1].values, atol=float(scale.max()))
    h16 = header_of(save(tmp_path, cache, "float16"))
    span = lambda h, name: h[name]["data_offsets"][1] - h[name]["data_offsets"][0]  # noqa: E731
    assert span(h, "layers.0.keys") * 2 == span(h16, "layers.0.keys") and span(h, "layers.0.values") * 2 == span(h16, "layers.0.values")


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 3 * G + 5), seed=st.integers(0, 10**6), scale=st.sampled_from([1e-3, 1.0, 300.0]))
def test_int8_error_is_within_half_a_step(tmp_path_factory, tokens, seed, scale):
    folder = tmp_path_factory.mktemp("q")
    cache = random_cache(tokens, seed)
    for layer in cache.layers:
        layer.keys.mul_(scale)
    path = save(folder, cache, "int8")
    restored = load_cache(path)
    assert not restored.zero_copy
    for a, r in zip(cache.layers, restored.cache.layers):
        assert r.keys.dtype == torch.float32 and r.keys.shape == a.keys.shape
        key_bound, value_bound = int8_error_bound(a.keys, a.values)
        assert ((r.keys - a.keys).abs() <= key_bound).all()
        assert ((r.values - a.values).abs() <= value_bound).all()


def test_int8_constant_channels_are_exact(tmp_path):
    keys = torch.full((1, 2, 70, 4), 3.25)
    values = torch.full((1, 2, 70, 4), -1.5)
    path = save(tmp_path, cache_from_layers([(keys, values)]), "int8")
    restored = load_cache(path).cache.layers[0]
    assert torch.equal(restored.keys, keys) and torch.equal(restored.values, values)


def test_int8_refuses_non_finite_values(tmp_path):
    cache = random_cache(20)
    cache.layers[0].keys[0, 0, 3, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        save(tmp_path, cache, "int8")


def test_int8_prefix_restore_reads_only_the_prefix(tmp_path):
    cache = random_cache(900)
    path = save(tmp_path, cache, "int8")
    full = load_cache(path)
    part = load_cache(path, 100)
    assert part.cache.get_seq_length() == 100 and part.token_ids == list(range(100))
    assert part.bytes_read < path.stat().st_size / 2
    for f, p in zip(full.cache.layers, part.cache.layers):
        assert torch.equal(p.keys, f.keys[:, :, :100]) and torch.equal(p.values, f.values[:, :, :100])


def test_int8_prefix_on_a_group_boundary_equals_quantizing_the_prefix_alone(tmp_path):
    cache = random_cache(5 * G + 7)
    n = 2 * G
    from_entry = load_cache(save(tmp_path, cache, "int8"), n).cache
    prefix = cache_from_layers([(l.keys[:, :, :n], l.values[:, :, :n]) for l in cache.layers])
    alone = load_cache(save(tmp_path, prefix, "int8", n)).cache
    for a, b in zip(from_entry.layers, alone.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("tensor", ["layers.0.keys", "layers.1.keys_scale", "layers.0.keys_zero", "layers.1.values", "layers.0.values_scale", "layers.1.values_zero"])
def test_int8_flipped_byte_in_any_tensor_is_refused(tmp_path, tensor):
    path = save(tmp_path, random_cache(300), "int8")
    h = header_of(path)
    begin = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0] + h[tensor]["data_offsets"][0]
    raw = bytearray(path.read_bytes())
    raw[begin + 1] ^= 0x10  # within the first CRC block
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCacheError, match="checksum"):
        load_cache(path, 10)


@pytest.mark.parametrize("edit", [
    lambda h: h["__metadata__"].pop("kv_key_group_tokens"),
    lambda h: h["__metadata__"].update(kv_key_group_tokens="100"),  # straddles CRC blocks
    lambda h: h["__metadata__"].update(kv_key_group_tokens="-64"),
    lambda h: h.pop("layers.1.values_zero"),
    lambda h: h["layers.0.keys_scale"].update(shape=[1, 2, 8, -(-300 // G)]),  # same bytes, rows and width swapped
    lambda h: h["__metadata__"].update(kv_dtype="float32"),  # int8 tensors under a float32 label
    lambda h: h["__metadata__"].update(kv_dtype="int4"),
], ids=["no-group", "group-straddles", "negative-group", "missing-scale", "scale-shape", "dtype-label", "unknown-dtype"])
def test_int8_malformed_header_is_refused(tmp_path, edit):
    path = save(tmp_path, random_cache(300), "int8")
    rewrite_header(path, edit)
    with pytest.raises(CorruptCacheError):
        load_cache(path)


def test_checksum_is_zlibs_crc32_whichever_implementation_is_installed():
    import zlib

    data = bytes(range(256)) * 1000
    assert kvcache._crc32(data) == zlib.crc32(data)
    assert kvcache._crc32(memoryview(data)[5:70001], 12345) == zlib.crc32(data[5:70001], 12345)


def test_group_divides_the_crc_block():
    assert CRC_BLOCK_TOKENS % INT8_KEY_GROUP_TOKENS == 0


# ----------------------------------------------------- on a model and in a store


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_every_kv_dtype_restores_into_the_compute_dtype_on_the_tiny_model(tiny, tmp_path, kv_dtype):
    """float32 answers exactly as the live cache; the others give next-token logits close to it."""
    ids = [3 + i % 200 for i in range(400)]
    live = prefill(tiny, ids).cache
    path = tmp_path / "c.safetensors"
    save_cache(path, live, ids, meta(len(ids), kv_dtype, len(live.layers)))
    restored = load_cache(path, dtype=tiny.dtype)
    assert restored.metadata.kv_dtype == kv_dtype and restored.cache.layers[0].keys.dtype == tiny.dtype
    assert restored.zero_copy == (kv_dtype == "float32")
    question = [5, 6, 7]
    expected = prefill(tiny, question, prefill(tiny, ids).cache).last_logits
    got = prefill(tiny, question, restored.cache).last_logits
    if kv_dtype == "float32":
        assert torch.equal(got, expected)
        restored = load_cache(path, dtype=tiny.dtype)
        answer = generate(tiny, restored.cache, question, max_new_tokens=8)
        assert answer.token_ids == generate(tiny, prefill(tiny, ids).cache, question, max_new_tokens=8).token_ids
    else:
        assert not torch.equal(got, expected)  # the cache really went through the narrower dtype
        assert (got - expected).abs().max() < TOLERANCE[kv_dtype] * expected.abs().max()


TOLERANCE = {"bfloat16": 0.05, "float16": 0.01, "int8": 0.05}


def test_store_keeps_kv_dtypes_apart(tmp_path):
    store = LocalStore(tmp_path / "store", block_size=4)
    try:
        ids = list(range(40))
        cache = random_cache(40, dim=64)
        entries = {k: store.put(cache, ids, meta(40, k)) for k in ("float32", "int8")}
        assert entries["float32"].key != entries["int8"].key
        assert entries["int8"].bytes < entries["float32"].bytes / 2
        match = store.longest_prefix(ids + [99], "f" * 64, "int8")
        assert match is not None and match.entry.key == entries["int8"].key
        restored = store.restore(match.entry, 20, dtype=torch.float32)
        assert restored.cache.get_seq_length() == 20 and restored.metadata.kv_dtype == "int8"
        assert store.verify().ok and not store.verify().quarantined
    finally:
        store.close()
