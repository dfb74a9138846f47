"""KV caches on disk: transformers' ``DynamicCache`` <-> a safetensors file.

File layout (format ``cag-kv`` version 1), all in one safetensors file:

* ``layers.{i}.keys`` / ``layers.{i}.values``: shape ``[1, kv_heads, tokens, head_dim]``,
  the cache's own layout, so each head's first ``n`` tokens are one contiguous byte
  range and a prefix is restored by reading only its bytes;
* ``token_ids``: int64 ``[tokens]``, so a match can be confirmed token by token;
* header metadata (strings): format and version, model fingerprint, tokenizer hash,
  KV dtype, token count, context boundary, sources, creation time, and a CRC32 per
  block of tokens, so corruption is caught on every load, including prefix loads.

The file is written with the ``safetensors`` library and read back by a small reader
of our own that validates the header before allocating anything and counts bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .errors import CacheNotFoundError, CorruptCacheError, StoreError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CacheMetadata",
    "RestoredCache",
    "save_cache",
    "load_cache",
    "read_metadata",
    "read_token_ids",
    "cache_from_layers",
    "cache_layers",
    "crop_to",
]

FORMAT_NAME = "cag-kv"
FORMAT_VERSION = 1
CRC_BLOCK_TOKENS = 256
# A real header holds ~100 bytes per tensor: anything near this size is not ours.
MAX_HEADER_BYTES = 8 * 1024 * 1024

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
}


@dataclass(frozen=True)
class CacheMetadata:
    """What a cache file says about itself (its safetensors header metadata)."""

    model_name: str
    fingerprint: str
    tokenizer_hash: str
    kv_dtype: str
    tokens: int
    boundary: int
    num_layers: int
    sources: tuple[str, ...] = ()
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_header(self, block_crcs: Sequence[int], token_crc: int) -> dict[str, str]:
        header = {k: str(v) for k, v in asdict(self).items() if k not in ("sources",)}
        header["sources"] = json.dumps(list(self.sources))
        header["format"] = FORMAT_NAME
        header["crc_block_tokens"] = str(CRC_BLOCK_TOKENS)
        header["block_crc32"] = ",".join(f"{c:08x}" for c in block_crcs)
        header["token_ids_crc32"] = f"{token_crc:08x}"
        return header

    @classmethod
    def from_header(cls, header: dict[str, str], path: Path) -> "CacheMetadata":
        try:
            return cls(
                model_name=header["model_name"],
                fingerprint=header["fingerprint"],
                tokenizer_hash=header["tokenizer_hash"],
                kv_dtype=header["kv_dtype"],
                tokens=int(header["tokens"]),
                boundary=int(header["boundary"]),
                num_layers=int(header["num_layers"]),
                sources=tuple(json.loads(header.get("sources", "[]"))),
                created=header.get("created", ""),
                format_version=int(header["format_version"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise CorruptCacheError(f"{path}: cache header lacks or garbles {exc}") from exc


@dataclass
class RestoredCache:
    cache: DynamicCache
    token_ids: list[int]
    metadata: CacheMetadata
    bytes_read: int
    seconds: float


@dataclass(frozen=True)
class _TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int


@dataclass
class _Header:
    metadata: dict[str, str]
    tensors: dict[str, _TensorInfo] = field(default_factory=dict)
    size: int = 0  # bytes of the length prefix and JSON header


# ----------------------------------------------------------------- DynamicCache


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_layers(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding these tensors as they are (no copy, unlike its constructor)."""
    cache = DynamicCache()
    for keys, values in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def crop_to(cache: DynamicCache, tokens: int) -> None:
    """Drop everything after the first ``tokens`` tokens; slicing, so nothing is copied."""
    excess = cache.get_seq_length() - tokens
    if excess > 0:
        cache.crop(-excess)


# ----------------------------------------------------------------------- write


def save_cache(path: str | os.PathLike, cache: DynamicCache, token_ids: Sequence[int], metadata: CacheMetadata) -> int:
    """Write the first ``metadata.tokens`` tokens of ``cache`` to ``path`` atomically; return its size.

    A temporary file in the same folder is renamed over ``path`` once complete and
    synced, so a reader never sees a partial file and a crash leaves none behind.
    """
    path = Path(path)
    n = metadata.tokens
    if len(token_ids) < n or cache.get_seq_length() < n:
        raise ValueError(f"cache holds {cache.get_seq_length()} tokens and {len(token_ids)} ids, metadata says {n}")
    dtype = _DTYPES[_dtype_code(metadata.kv_dtype)]
    tensors: dict[str, torch.Tensor] = {}
    for i, (keys, values) in enumerate(cache_layers(cache)):
        tensors[f"layers.{i}.keys"] = keys[:, :, :n].to("cpu", dtype).contiguous()
        tensors[f"layers.{i}.values"] = values[:, :, :n].to("cpu", dtype).contiguous()
    ids = torch.tensor(list(token_ids[:n]), dtype=torch.int64)
    tensors["token_ids"] = ids
    header = metadata.to_header(_block_crcs(tensors, n, n), zlib.crc32(_as_bytes(ids)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise StoreError(f"cannot write to {path.parent}: {exc.strerror or exc}; choose a writable store (CAG_HOME)") from exc
    try:
        save_file(tensors, tmp, metadata=header)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    return path.stat().st_size


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ read


def read_metadata(path: str | os.PathLike) -> CacheMetadata:
    path = Path(path)
    return CacheMetadata.from_header(_read_header(path).metadata, path)


def read_token_ids(path: str | os.PathLike) -> list[int]:
    """The token ids of a cache file, checked against their CRC."""
    path = Path(path)
    header = _read_header(path)
    with open(path, "rb", buffering=0) as f:
        ids, _ = _read_token_ids(f, header, path)
    return ids


def load_cache(
    path: str | os.PathLike,
    tokens: int | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> RestoredCache:
    """Restore the first ``tokens`` tokens (all if None) of a cache file.

    Reads only the byte ranges those tokens need (rounded up to a CRC block, so the
    block can be checked), and refuses a file whose header or checksums are wrong.
    """
    start = time.perf_counter()
    path = Path(path)
    header = _read_header(path)
    meta = CacheMetadata.from_header(header.metadata, path)
    _check_layout(header, meta, path)
    n = meta.tokens if tokens is None else tokens
    if not 0 < n <= meta.tokens:
        raise ValueError(f"cannot restore {n} tokens from a cache of {meta.tokens}")
    block = int(header.metadata.get("crc_block_tokens", CRC_BLOCK_TOKENS))
    span = min(meta.tokens, math.ceil(n / block) * block)
    read = header.size
    layers = []
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as f:
        for i in range(meta.num_layers):
            pair = []
            for kind in ("keys", "values"):
                name = f"layers.{i}.{kind}"
                tensor, nbytes = _read_prefix(f, header.tensors[name], span, path)
                tensors[name] = tensor
                read += nbytes
                pair.append(tensor)
            layers.append(pair)
        ids, nbytes = _read_token_ids(f, header, path)
        read += nbytes
    expected = [int(c, 16) for c in header.metadata.get("block_crc32", "").split(",") if c]
    actual = _block_crcs(tensors, span, meta.tokens, block)
    if actual != expected[: len(actual)] or len(expected) != math.ceil(meta.tokens / block):
        raise CorruptCacheError(f"{path}: checksum mismatch in the KV tensors, the file is corrupt")
    target = torch.device(device)
    restored = [
        (_finish(k[:, :, :n], target, dtype), _finish(v[:, :, :n], target, dtype)) for k, v in layers
    ]
    return RestoredCache(
        cache=cache_from_layers(restored),
        token_ids=ids[:n],
        metadata=meta,
        bytes_read=read,
        seconds=time.perf_counter() - start,
    )


def _finish(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.to(device) if t.device != device else t


def _read_header(path: Path) -> _Header:
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except FileNotFoundError as exc:
        raise CacheNotFoundError(f"cache file {path} is missing") from exc
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptCacheError(f"{path}: file is truncated ({size} bytes), not a cache")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise CorruptCacheError(f"{path}: header claims {length:,} bytes (file has {size:,}); the file is corrupt or not a cache")
        raw = f.read(length)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCacheError(f"{path}: header is not valid JSON; the file is corrupt") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("__metadata__"), dict):
        raise CorruptCacheError(f"{path}: header has no metadata; not a cag cache")
    metadata = doc.pop("__metadata__")
    if metadata.get("format") != FORMAT_NAME:
        raise CorruptCacheError(f"{path}: not a {FORMAT_NAME} file")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise CorruptCacheError(
            f"{path}: cache format version {metadata.get('format_version')} is not supported "
            f"(this cag reads version {FORMAT_VERSION}); rebuild the cache"
        )
    header = _Header(metadata=metadata, size=8 + length)
    for name, info in doc.items():
        header.tensors[name] = _tensor_info(name, info, 8 + length, size, path)
    return header


def _tensor_info(name: str, info: object, data_start: int, size: int, path: Path) -> _TensorInfo:
    try:
        dtype = _DTYPES[info["dtype"]]  # type: ignore[index]
        shape = tuple(int(d) for d in info["shape"])  # type: ignore[index]
        begin, end = (int(x) for x in info["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCacheError(f"{path}: tensor {name} has a malformed header entry") from exc
    nbytes = math.prod(shape) * _itemsize(dtype)
    if begin < 0 or end - begin != nbytes or data_start + end > size:
        raise CorruptCacheError(f"{path}: tensor {name} lies outside the file; the file is truncated or corrupt")
    return _TensorInfo(dtype, shape, data_start + begin, data_start + end)


def _check_layout(header: _Header, meta: CacheMetadata, path: Path) -> None:
    for i in range(meta.num_layers):
        for kind in ("keys", "values"):
            info = header.tensors.get(f"layers.{i}.{kind}")
            if info is None or len(info.shape) != 4 or info.shape[2] != meta.tokens:
                raise CorruptCacheError(f"{path}: layer {i} {kind} missing or of the wrong shape")
    ids = header.tensors.get("token_ids")
    if ids is None or ids.shape != (meta.tokens,) or ids.dtype != torch.int64:
        raise CorruptCacheError(f"{path}: token ids missing or of the wrong shape")


def _read_prefix(f, info: _TensorInfo, tokens: int, path: Path) -> tuple[torch.Tensor, int]:
    """Read the first ``tokens`` tokens of each head: one contiguous range per head."""
    batch, heads, total, dim = info.shape
    out = torch.empty((batch, heads, tokens, dim), dtype=info.dtype)
    row = dim * _itemsize(info.dtype)
    for b in range(batch):
        for h in range(heads):
            f.seek(info.begin + ((b * heads + h) * total) * row)
            _read_exact(f, _as_bytes(out[b, h]), path)
    return out, batch * heads * tokens * row


def _read_token_ids(f, header: _Header, path: Path) -> tuple[list[int], int]:
    info = header.tensors["token_ids"]
    ids = torch.empty(info.shape, dtype=torch.int64)
    f.seek(info.begin)
    _read_exact(f, _as_bytes(ids), path)
    if f"{zlib.crc32(_as_bytes(ids)):08x}" != header.metadata.get("token_ids_crc32"):
        raise CorruptCacheError(f"{path}: checksum mismatch in the token ids, the file is corrupt")
    return ids.tolist(), info.end - info.begin


def _read_exact(f, buffer: memoryview, path: Path) -> None:
    view = buffer
    while len(view):
        got = f.readinto(view)
        if not got:
            raise CorruptCacheError(f"{path}: file ends early; it is truncated")
        view = view[got:]


def _block_crcs(tensors: dict[str, torch.Tensor], span: int, total: int, block: int = CRC_BLOCK_TOKENS) -> list[int]:
    """CRC32 of each block of tokens within ``span``, over every KV tensor in a fixed order.

    Only blocks that lie wholly within the span, or end the cache, can be checked.
    """
    names = sorted(n for n in tensors if n.startswith("layers."))
    crcs = []
    for begin in range(0, span, block):
        end = begin + block
        if end > span and span < total:
            break
        crc = 0
        for name in names:
            t = tensors[name]
            for b in range(t.shape[0]):
                for h in range(t.shape[1]):
                    crc = zlib.crc32(_as_bytes(t[b, h, begin:end]), crc)
        crcs.append(crc)
    return crcs


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor, writable in place."""
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.dim() else memoryview(t.reshape(1).view(torch.uint8).numpy())


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_code(name: str) -> str:
    codes = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
    if name not in codes:
        raise ValueError(f"unsupported KV dtype {name!r} (use one of {', '.join(codes)})")
    return codes[name]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
