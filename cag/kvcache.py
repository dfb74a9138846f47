"""The KV cache file format: transformers' ``DynamicCache`` <-> a safetensors file.

Header, layout, checksums, the writer and the reader live here; the int8 codec that
int8 files store is ``kvint8``.

File layout (format ``cag-kv`` version 1), all in one safetensors file:

* ``layers.{i}.keys`` / ``layers.{i}.values``: shape ``[1, kv_heads, tokens, head_dim]``,
  the cache's own layout, so each head's first ``n`` tokens are one contiguous byte
  range and a prefix is restored by reading only its bytes;
* ``token_ids``: int64 ``[tokens]``, so a match can be confirmed token by token;
* header metadata (strings): format and version, model fingerprint, tokenizer hash,
  KV dtype, token count, context boundary, sources, creation time, and a CRC32 per
  block of tokens, so corruption is caught on every load, including prefix loads;
  ``names``, a JSON list, where the cache has names: a file describes itself fully,
  so a lost store index is rebuilt from the files. An unnamed file has no ``names``
  field and is what version 1 always wrote; readers that predate the field ignore it.

The KV dtype on disk is ``float32``, ``bfloat16``, ``float16`` or ``int8``. An int8
file (``kvint8``: KIVI's keys per channel, values per token) adds four float32 tensors
per layer and one metadata field (``kv_key_group_tokens``):

* ``layers.{i}.keys_scale`` / ``keys_zero``: ``[1, kv_heads, ceil(tokens / G), head_dim]``,
  one row per group of ``G`` tokens (keys have outlier *channels*, so each channel
  gets its own range, taken over a group of tokens);
* ``layers.{i}.values_scale`` / ``values_zero``: ``[1, kv_heads, tokens, 1]``, one per token.

Groups never straddle a CRC block, so a prefix restore still reads only its own
blocks. A prefix of ``n`` tokens read from an int8 entry equals what quantizing that
prefix alone gives when ``n`` is a multiple of ``G``; otherwise its last group's key
range also covers the tokens after it (a slightly coarser step, never an error).

The file is written with the ``safetensors`` library and read back by a small reader
of our own that validates the header before touching any data. On POSIX the reader
maps the file privately (copy-on-write): a cache restored in its stored dtype on the
CPU is a set of views into that mapping (zero-copy; the kernel's page cache is the
only copy), and any other restore converts straight from the mapping into the
result, with no intermediate buffer. The CRC check still reads every restored byte.
A mapped file must never be truncated in place while a cache restored from it is
alive (reading a page past the new end would kill the process with SIGBUS); the
store never does that: it replaces and removes files by rename and unlink, which
leave existing mappings intact.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import save_file
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .errors import CacheNotFoundError, CagError, CorruptCacheError, StoreError
from .kvint8 import INT8_KEY_GROUP_TOKENS, dequantize_layer, quantize_layer

try:  # ISA-L's CRC-32 is zlib's, ~5x faster (carry-less multiply); the checksums are identical
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is optional
    from zlib import crc32 as _crc32

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KV_DTYPES",
    "INT8_KEY_GROUP_TOKENS",
    "CacheMetadata",
    "PendingCheck",
    "RestoredCache",
    "check_kv_dtype",
    "save_cache",
    "load_cache",
    "read_metadata",
    "read_token_ids",
    "FileBlocks",
    "file_blocks",
    "write_names",
    "cache_from_layers",
    "cache_layers",
    "crop_to",
]

FORMAT_NAME = "cag-kv"
FORMAT_VERSION = 1
CRC_BLOCK_TOKENS = 256
# A real header holds ~100 bytes per tensor: anything near this size is not ours.
MAX_HEADER_BYTES = 8 * 1024 * 1024

KV_DTYPES = ("float32", "bfloat16", "float16", "int8")
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux's value; Python 3.11 lacks the name
_FLOAT_KV = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KV_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16", "half": "float16"}

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
    num_layers: int
    sources: tuple[str, ...] = ()
    created: str = ""
    names: tuple[str, ...] = ()  # the names the cache is known by in its store

    def to_header(self, block_crcs: Sequence[int], token_crc: int) -> dict[str, str]:
        header = {k: str(v) for k, v in asdict(self).items() if k not in ("sources", "names")}
        header["sources"] = json.dumps(list(self.sources))
        # Version 1 files spell out a context boundary; every writer has set it to ``tokens``.
        header["boundary"] = str(self.tokens)
        header["format_version"] = str(FORMAT_VERSION)
        if self.names:
            header["names"] = json.dumps(list(self.names))
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
                num_layers=int(header["num_layers"]),
                sources=tuple(json.loads(header.get("sources", "[]"))),
                created=header.get("created", ""),
                names=tuple(str(n) for n in json.loads(header.get("names", "[]"))),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise CorruptCacheError(f"{path}: cache header lacks or garbles {exc}") from exc


class PendingCheck:
    """A restored cache's block checksums, read and checked by a background thread.

    The cache's tensors are usable at once (views into the file's mapping), so a question
    can be prefilled while the pages are read from disk and checked; ``wait`` must return
    before anything computed from them is shown or stored. It raises CorruptCacheError
    (through ``guard``, which a store sets to quarantine the file) if the check failed.
    """

    def __init__(self, work: Callable[[], None], started: float) -> None:
        self.started = started
        self.finished: float | None = None  # perf_counter() when the check ended
        self.guard: Callable[[Callable[[], None]], None] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name="cag-cache-check", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self._error = exc
        finally:
            self.finished = time.perf_counter()

    def _join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def wait(self) -> float:
        """Block until the check ends; returns the restore's seconds, from its start to the check's end."""
        if self.guard is not None:
            self.guard(self._join)
        else:
            self._join()
        return self.finished - self.started  # set by the thread before it ends


@dataclass
class RestoredCache:
    cache: DynamicCache
    token_ids: list[int]
    metadata: CacheMetadata
    bytes_read: int
    seconds: float
    zero_copy: bool = False  # the KV tensors are views into a private mapping of the file
    pending: PendingCheck | None = None  # set when the checksums are being checked in the background


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
    file_size: int = 0


@dataclass(frozen=True)
class _Part:
    """One tensor of a layer: its name after ``layers.{i}.``, dtype, and tokens per row."""

    name: str
    dtype: torch.dtype
    group: int = 1


@dataclass(frozen=True)
class _Layout:
    parts: tuple[_Part, ...]
    block: int  # tokens per CRC block
    group: int  # tokens per key quantization group (1 for float files)


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


# ------------------------------------------------------------------- KV dtypes


def check_kv_dtype(name: str | torch.dtype) -> str:
    """The file name of a KV dtype (``float32``, ``bfloat16``, ``float16``, ``int8``); accepts torch dtypes and fp16-style aliases."""
    text = str(name).removeprefix("torch.").strip().lower()
    text = _KV_ALIASES.get(text, text)
    if text not in KV_DTYPES:
        raise CagError(f"unsupported KV dtype {str(name)!r}: use one of {', '.join(KV_DTYPES)}")
    return text


def _parts(kv_dtype: str, group: int) -> tuple[_Part, ...]:
    if kv_dtype == "int8":
        f32 = torch.float32
        return (
            _Part("keys", torch.int8), _Part("keys_scale", f32, group), _Part("keys_zero", f32, group),
            _Part("values", torch.int8), _Part("values_scale", f32), _Part("values_zero", f32),
        )
    return (_Part("keys", _FLOAT_KV[kv_dtype]), _Part("values", _FLOAT_KV[kv_dtype]))


def _encode_layer(keys: torch.Tensor, values: torch.Tensor, kv_dtype: str, group: int) -> dict[str, torch.Tensor]:
    """A layer's tensors as stored, on the CPU, in the order of ``_parts``."""
    if kv_dtype in _FLOAT_KV:
        dtype = _FLOAT_KV[kv_dtype]
        return {"keys": keys.to("cpu", dtype).contiguous(), "values": values.to("cpu", dtype).contiguous()}
    return {name: t.to("cpu").contiguous() for name, t in quantize_layer(keys, values, group).items()}


# ----------------------------------------------------------------------- write


def save_cache(path: str | os.PathLike, cache: DynamicCache, token_ids: Sequence[int], metadata: CacheMetadata) -> int:
    """Write the first ``metadata.tokens`` tokens of ``cache`` to ``path`` atomically; return its size.

    The tensors are stored in ``metadata.kv_dtype``, converted (or quantized) from the
    cache's own dtype. A temporary file in the same folder is renamed over ``path`` once
    complete and synced, so a reader never sees a partial file and a crash leaves none behind.
    """
    path = Path(path)
    n = metadata.tokens
    if len(token_ids) < n or cache.get_seq_length() < n:
        raise ValueError(f"cache holds {cache.get_seq_length()} tokens and {len(token_ids)} ids, metadata says {n}")
    if metadata.kv_dtype not in KV_DTYPES:
        raise CagError(f"unsupported KV dtype {metadata.kv_dtype!r}: use one of {', '.join(KV_DTYPES)}")
    group = INT8_KEY_GROUP_TOKENS if metadata.kv_dtype == "int8" else 1
    parts = _parts(metadata.kv_dtype, group)
    tensors: dict[str, torch.Tensor] = {}
    for i, (keys, values) in enumerate(cache_layers(cache)):
        for name, tensor in _encode_layer(keys[:, :, :n], values[:, :, :n], metadata.kv_dtype, group).items():
            tensors[f"layers.{i}.{name}"] = tensor
    ids = torch.tensor(list(token_ids[:n]), dtype=torch.int64)
    crc_parts = [
        (_as_bytes(tensors[f"layers.{i}.{p.name}"]), tensors[f"layers.{i}.{p.name}"].shape, p.group, tensors[f"layers.{i}.{p.name}"].element_size())
        for i in range(len(cache.layers))
        for p in parts
    ]
    tensors["token_ids"] = ids
    header = metadata.to_header(_block_crcs(_in_crc_order(crc_parts, len(cache.layers), parts), n, n), _crc32(_as_bytes(ids)))
    if metadata.kv_dtype == "int8":
        # Only int8 files carry these, so float files stay byte-identical to format 1's golden file.
        header["kv_key_group_tokens"] = str(group)
        header["kv_quantization"] = "int8 asymmetric: keys per channel over kv_key_group_tokens tokens, values per token; x = q * scale + zero"
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
        fsync_dir(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    return path.stat().st_size


def _in_crc_order(items: list, num_layers: int, parts: Sequence[_Part]) -> list:
    """The CRC covers every layer tensor in the order of their names, as strings (layers.10 before layers.2)."""
    names = [f"layers.{i}.{p.name}" for i in range(num_layers) for p in parts]
    return [item for _, item in sorted(zip(names, items), key=lambda pair: pair[0])]


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
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
    info = header.tensors.get("token_ids")
    if info is None or len(info.shape) != 1 or info.dtype != torch.int64:
        raise CorruptCacheError(f"{path}: token ids missing or of the wrong shape")
    ids = torch.empty(info.shape, dtype=torch.int64)
    with open(path, "rb", buffering=0) as f:
        f.seek(info.begin)
        _read_exact(f, _as_bytes(ids), path)
    _check_token_crc(_as_bytes(ids), header, path)
    return ids.tolist()


def load_cache(
    path: str | os.PathLike,
    tokens: int | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    out: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    check_later: bool = False,
) -> RestoredCache:
    """Restore the first ``tokens`` tokens (all if None) of a cache file, in ``dtype`` on ``device``.

    ``dtype`` is the compute dtype (None: the stored dtype; float32 for int8 files,
    which are de-quantized). Reads only the byte ranges those tokens need (rounded up
    to a CRC block, so the block can be checked), and refuses a file whose header or
    checksums are wrong. When the stored dtype is ``dtype`` and the device is the CPU,
    the tensors are views into a private mapping of the file: nothing is copied, and
    a write to them never reaches the file.

    ``out``, one ``(keys, values)`` pair per layer shaped ``[batch, heads, capacity, dim]``
    with ``capacity >= tokens``, restores into those tensors instead (their dtype and
    device rule): one pass from the file into memory the caller already holds, the
    fastest restore when a cache's buffers are reused question after question. The
    returned cache then holds views of their first ``tokens`` tokens.

    ``check_later`` (zero-copy restores only; others check at once) returns before the
    file's pages are read: a background thread reads them and checks the block
    checksums, and the result's ``pending`` must be waited on before the cache's
    contents are used for output. A cold restore then overlaps the question's prefill.
    """
    start = time.perf_counter()
    path = Path(path)
    header = _read_header(path)
    meta = CacheMetadata.from_header(header.metadata, path)
    layout = _check_layout(header, meta, path)
    n = meta.tokens if tokens is None else tokens
    if not 0 < n <= meta.tokens:
        raise ValueError(f"cannot restore {n} tokens from a cache of {meta.tokens}")
    if out is not None:
        _check_out(out, header, meta, n, dtype)
    span = min(meta.tokens, math.ceil(n / layout.block) * layout.block)
    names = [f"layers.{i}.{p.name}" for i in range(meta.num_layers) for p in layout.parts]
    groups = {f"layers.{i}.{p.name}": p.group for i in range(meta.num_layers) for p in layout.parts}
    ids_info = header.tensors["token_ids"]
    ranges = [r for name in names for r in _head_ranges(header.tensors[name], -(-span // groups[name]))]
    ranges.append((ids_info.begin, ids_info.end))
    target = torch.device(device)
    stored = _FLOAT_KV.get(meta.kv_dtype)
    views_suffice = out is None and stored is not None and target.type == "cpu" and dtype in (None, stored)
    with open(path, "rb", buffering=0) as f:
        data = _FileData(f, header.file_size, ranges, path, populate=not (check_later and views_suffice))
        zero_copy = views_suffice and data.mapped
        later = check_later and zero_copy
    read = header.size + sum(end - begin for begin, end in ranges)

    _check_token_crc(data.bytes[ids_info.begin : ids_info.end], header, path)
    ids = _tensor_view(data, ids_info)[:n].tolist()
    crc_parts = _in_crc_order([_crc_part(data, header.tensors[name], groups[name]) for name in names], meta.num_layers, layout.parts)
    pending = None
    if later:
        def check() -> None:
            _prefetch(path, ranges[:-1])
            _check_block_crcs(crc_parts, header, meta, layout, span, path)

        pending = PendingCheck(check, start)
    else:
        _check_block_crcs(crc_parts, header, meta, layout, span, path)

    views = {name: _tensor_view(data, header.tensors[name]) for name in names}
    layers = [
        _restore_layer(views, i, n, layout.group, stored, target, dtype, out[i] if out is not None else None, zero_copy)
        for i in range(meta.num_layers)
    ]
    return RestoredCache(
        cache=cache_from_layers(layers),
        token_ids=ids,
        metadata=meta,
        bytes_read=read,
        seconds=time.perf_counter() - start,
        zero_copy=zero_copy,
        pending=pending,
    )


@dataclass(frozen=True)
class FileBlocks:
    """Where a cache file keeps each checked block of tokens, so a store can keep blocks apart.

    ``blocks[b]`` lists the byte ranges (absolute file offsets) that CRC block ``b``
    covers, in checksum order: the CRC32 of their bytes, concatenated, is
    ``block_crcs[b]``. The header (``[0, header_size)``), every block's ranges and
    ``token_ids`` cover the whole file, each byte once, so the file is rebuilt from them.
    """

    header_size: int
    file_size: int
    tokens: int
    block_tokens: int
    blocks: tuple[tuple[tuple[int, int], ...], ...]
    block_crcs: tuple[int, ...]
    token_ids: tuple[int, int]
    token_ids_crc: int


def file_blocks(path: str | os.PathLike) -> FileBlocks:
    """The block layout of a cache file, from its header alone (the data is not read)."""
    path = Path(path)
    header = _read_header(path)
    meta = CacheMetadata.from_header(header.metadata, path)
    layout = _check_layout(header, meta, path)
    infos = [(header.tensors[f"layers.{i}.{p.name}"], p.group) for i in range(meta.num_layers) for p in layout.parts]
    infos = _in_crc_order(infos, meta.num_layers, layout.parts)
    blocks = []
    for begin in range(0, meta.tokens, layout.block):
        end = min(begin + layout.block, meta.tokens)
        ranges = []
        for info, group in infos:
            batch, heads, rows, width = info.shape
            row = width * _itemsize(info.dtype)
            first, last = begin // group, min(rows, -(-end // group))
            ranges += [(info.begin + (bh * rows + first) * row, info.begin + (bh * rows + last) * row) for bh in range(batch * heads)]
        blocks.append(tuple(ranges))
    try:
        crcs = tuple(int(c, 16) for c in header.metadata.get("block_crc32", "").split(",") if c)
        token_crc = int(header.metadata.get("token_ids_crc32", ""), 16)
    except ValueError as exc:
        raise CorruptCacheError(f"{path}: the checksums in the header are garbled; the file is corrupt") from exc
    if len(crcs) != len(blocks):
        raise CorruptCacheError(f"{path}: the header has {len(crcs)} block checksums for {len(blocks)} blocks; the file is corrupt")
    ids = header.tensors["token_ids"]
    return FileBlocks(header.size, header.file_size, meta.tokens, layout.block, tuple(blocks), crcs, (ids.begin, ids.end), token_crc)


def write_names(src: str | os.PathLike, dst: str | os.PathLike, names: Sequence[str]) -> int:
    """Copy cache file ``src`` to ``dst`` (a new file) with ``names`` in its header, the data as it is; returns its size.

    Only the header changes; the caller replaces ``src`` by ``dst`` with a rename, so a
    reader never sees a half-written file, and one that maps ``src`` keeps its mapping.
    """
    src, dst = Path(src), Path(dst)
    header = _read_header(src)
    try:
        with open(src, "rb") as f, open(dst, "xb") as out:
            f.seek(8)
            doc = json.loads(f.read(header.size - 8))
            if names:
                doc["__metadata__"]["names"] = json.dumps(list(names))
            else:
                doc["__metadata__"].pop("names", None)
            text = json.dumps(doc, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors writes it
            out.write(struct.pack("<Q", len(text)) + text)
            shutil.copyfileobj(f, out, 1 << 22)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise StoreError(f"cannot write {dst}: {exc.strerror or exc}") from exc
    return dst.stat().st_size


def _restore_layer(
    views: dict[str, torch.Tensor],
    i: int,
    n: int,
    group: int,
    stored: torch.dtype | None,
    device: torch.device,
    dtype: torch.dtype | None,
    dest: tuple[torch.Tensor, torch.Tensor] | None,
    zero_copy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``i``'s first ``n`` tokens: views into the file, or converted (or de-quantized) into ``dest``.

    ``stored`` is the float dtype on disk, None for int8; ``dest`` None means new tensors.
    """
    keys_src, values_src = views[f"layers.{i}.keys"], views[f"layers.{i}.values"]
    if zero_copy:
        return keys_src[:, :, :n], values_src[:, :, :n]
    if dest is None:
        result = dtype or stored or torch.float32
        dest = tuple(torch.empty(src.shape[:2] + (n, src.shape[3]), dtype=result, device=device) for src in (keys_src, values_src))  # type: ignore[assignment]
    keys, values = dest[0][:, :, :n], dest[1][:, :, :n]
    if stored is None:
        stored_layer = {name.removeprefix(f"layers.{i}."): t for name, t in views.items() if name.startswith(f"layers.{i}.")}
        dequantize_layer(stored_layer, n, group, keys, values)
    else:
        keys.copy_(keys_src[:, :, :n])  # one pass: dtype and device change in the same copy
        values.copy_(values_src[:, :, :n])
    return keys, values


def _check_out(out: Sequence[tuple[torch.Tensor, torch.Tensor]], header: _Header, meta: CacheMetadata, n: int, dtype: torch.dtype | None) -> None:
    if len(out) != meta.num_layers:
        raise ValueError(f"out has {len(out)} layers, the cache {meta.num_layers}")
    for i, pair in enumerate(out):
        for kind, tensor in zip(("keys", "values"), pair):
            info = header.tensors[f"layers.{i}.{kind}"]
            if tensor.dim() != 4 or tensor.shape[:2] != info.shape[:2] or tensor.shape[3] != info.shape[3] or tensor.shape[2] < n:
                raise ValueError(f"out layer {i} {kind} has shape {tuple(tensor.shape)}; it needs {info.shape[:2] + (n, info.shape[3])} or more tokens")
            if dtype is not None and tensor.dtype != dtype:
                raise ValueError(f"out layer {i} {kind} is {tensor.dtype}, not the requested {dtype}")


class _FileData:
    """A cache file's bytes as one uint8 tensor.

    Where the platform maps files, a private (copy-on-write) mapping of the whole file:
    restored tensors can be views into it, and a write to them stays in this process.
    Elsewhere, a buffer the size of the file into which only the needed ranges are read.
    """

    def __init__(self, f, size: int, ranges: Sequence[tuple[int, int]], path: Path, populate: bool = True) -> None:
        mapping = _map(f)
        if mapping is not None and len(mapping) < size:
            raise CorruptCacheError(f"{path}: file shrank while being read; it is truncated or being rewritten")
        self.mapped = mapping is not None
        if mapping is not None:
            if populate:
                _populate(mapping, ranges)
            self.tensor = torch.frombuffer(mapping, dtype=torch.uint8)
            self.bytes = memoryview(mapping)
        else:
            self.tensor = torch.empty(size, dtype=torch.uint8)
            self.bytes = _as_bytes(self.tensor)
            for begin, end in _merged(ranges):
                f.seek(begin)
                _read_exact(f, self.bytes[begin:end], path)


def _map(f) -> mmap.mmap | None:
    if os.name != "posix":
        return None  # a mapped file cannot be renamed or deleted there, and the store does both
    try:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None  # a file system without mmap: read instead


def _populate(mapping: mmap.mmap, ranges: Sequence[tuple[int, int]]) -> None:
    """Fault the needed ranges in with one call each (Linux 5.14+), instead of page by page later."""
    if not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    for begin, end in _merged(ranges):
        aligned = begin - begin % page
        try:
            mapping.madvise(_MADV_POPULATE_READ, aligned, end - aligned)
        except (AttributeError, OSError, ValueError):
            return  # an older kernel: the pages fault in as they are read


_PREFETCH_BYTES = 8 << 20  # Linux reads ahead this much of one advice at most


def _prefetch(path: Path, ranges: Sequence[tuple[int, int]]) -> None:
    """Have the kernel read the ranges into the page cache, in the order given (layer by layer,
    the order a forward pass touches them). The advice releases the GIL, unlike an madvise
    through ``mmap``, so the thread computing meanwhile is not held up. Only a hint: if the
    file was replaced meanwhile, the mapping still reads the old one, page by page."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        for begin, end in _joined(ranges):
            for at in range(begin, end, _PREFETCH_BYTES):
                os.posix_fadvise(fd, at, min(_PREFETCH_BYTES, end - at), os.POSIX_FADV_WILLNEED)
    except (AttributeError, OSError):
        pass  # no advice here: the check's own reads fault the pages in
    finally:
        os.close(fd)


def _merged(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    return _joined(sorted(ranges))


def _joined(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Neighbouring ranges that touch or overlap joined, keeping their order."""
    out: list[tuple[int, int]] = []
    for begin, end in ranges:
        if out and out[-1][0] <= begin <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((begin, end))
    return out


def _head_ranges(info: _TensorInfo, rows: int) -> list[tuple[int, int]]:
    """Byte ranges of the first ``rows`` rows of each head: one contiguous range per head."""
    batch, heads, total, width = info.shape
    row = width * _itemsize(info.dtype)
    rows = min(rows, total)
    return [(info.begin + bh * total * row, info.begin + (bh * total + rows) * row) for bh in range(batch * heads)]


def _tensor_view(data: _FileData, info: _TensorInfo) -> torch.Tensor:
    raw = data.tensor[info.begin : info.end]
    if info.begin % _itemsize(info.dtype):
        raw = raw.clone()  # misaligned (another writer's file): a view would not be allowed
    return raw.view(info.dtype).view(info.shape)


def _crc_part(data: _FileData, info: _TensorInfo, group: int) -> tuple[memoryview, tuple[int, ...], int, int]:
    return data.bytes[info.begin : info.end], info.shape, group, _itemsize(info.dtype)


def _check_block_crcs(parts: list, header: _Header, meta: CacheMetadata, layout: _Layout, span: int, path: Path) -> None:
    try:
        expected = [int(c, 16) for c in header.metadata.get("block_crc32", "").split(",") if c]
    except ValueError as exc:
        raise CorruptCacheError(f"{path}: the block checksums in the header are garbled; the file is corrupt") from exc
    actual = _block_crcs(parts, span, meta.tokens, layout.block)
    if actual != expected[: len(actual)] or len(expected) != math.ceil(meta.tokens / layout.block):
        raise CorruptCacheError(f"{path}: checksum mismatch in the KV tensors, the file is corrupt")


def _check_token_crc(data: memoryview, header: _Header, path: Path) -> None:
    if f"{_crc32(data):08x}" != header.metadata.get("token_ids_crc32"):
        raise CorruptCacheError(f"{path}: checksum mismatch in the token ids, the file is corrupt")


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
    header = _Header(metadata=metadata, size=8 + length, file_size=size)
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
    if any(d < 0 for d in shape) or begin < 0 or end - begin != nbytes or data_start + end > size:
        raise CorruptCacheError(f"{path}: tensor {name} lies outside the file; the file is truncated or corrupt")
    return _TensorInfo(dtype, shape, data_start + begin, data_start + end)


def _positive_int(metadata: dict[str, str], key: str, default: int | None, path: Path) -> int:
    try:
        value = int(metadata[key]) if key in metadata or default is None else default
    except (KeyError, ValueError) as exc:
        raise CorruptCacheError(f"{path}: cache header lacks or garbles {key}") from exc
    if value <= 0:
        raise CorruptCacheError(f"{path}: cache header has {key}={value}; the file is corrupt")
    return value


def _check_layout(header: _Header, meta: CacheMetadata, path: Path) -> _Layout:
    """Every tensor the KV dtype calls for, with consistent dtypes and shapes; the CRC block and group sizes."""
    if meta.kv_dtype not in KV_DTYPES:
        raise CorruptCacheError(f"{path}: KV dtype {meta.kv_dtype!r} is not one this cag reads ({', '.join(KV_DTYPES)})")
    if meta.num_layers < 1 or meta.tokens < 1:
        raise CorruptCacheError(f"{path}: cache header claims {meta.num_layers} layers and {meta.tokens} tokens")
    block = _positive_int(header.metadata, "crc_block_tokens", CRC_BLOCK_TOKENS, path)
    group = _positive_int(header.metadata, "kv_key_group_tokens", None, path) if meta.kv_dtype == "int8" else 1
    if block % group:
        raise CorruptCacheError(f"{path}: key groups of {group} tokens straddle CRC blocks of {block}; the file is corrupt")
    parts = _parts(meta.kv_dtype, group)
    for i in range(meta.num_layers):
        data_shapes: dict[str, tuple[int, ...]] = {}
        for part in parts:
            info = header.tensors.get(f"layers.{i}.{part.name}")
            kind, _, role = part.name.partition("_")
            ok = info is not None and info.dtype == part.dtype and len(info.shape) == 4
            ok = ok and info.shape[2] == -(-meta.tokens // part.group) and min(info.shape) > 0
            if ok and not role:
                data_shapes[kind] = info.shape
            elif ok:
                width = data_shapes[kind][3] if kind == "keys" else 1
                ok = info.shape[:2] == data_shapes[kind][:2] and info.shape[3] == width
            if not ok:
                raise CorruptCacheError(f"{path}: layer {i} {part.name} missing or of the wrong dtype or shape")
        if data_shapes["keys"][:2] != data_shapes["values"][:2]:
            raise CorruptCacheError(f"{path}: layer {i} keys and values disagree on batch or heads")
    ids = header.tensors.get("token_ids")
    if ids is None or ids.shape != (meta.tokens,) or ids.dtype != torch.int64:
        raise CorruptCacheError(f"{path}: token ids missing or of the wrong shape")
    return _Layout(parts=parts, block=block, group=group)


def _read_exact(f, buffer: memoryview, path: Path) -> None:
    view = buffer
    while len(view):
        got = f.readinto(view)
        if not got:
            raise CorruptCacheError(f"{path}: file ends early; it is truncated")
        view = view[got:]


def _block_crcs(parts: Sequence[tuple[memoryview, Sequence[int], int, int]], span: int, total: int, block: int = CRC_BLOCK_TOKENS) -> list[int]:
    """CRC32 of each block of tokens within ``span``, over every layer tensor in a fixed order.

    ``parts`` holds, per tensor, its bytes, shape ``[batch, heads, rows, width]``, tokens
    per row and item size. Within a block, each tensor contributes the rows that block
    covers, head by head. Only blocks that lie wholly within the span, or end the
    cache, can be checked.
    """
    crcs = []
    for begin in range(0, span, block):
        end = begin + block
        if end > span and span < total:
            break
        crc = 0
        for data, (batch, heads, rows, width), group, itemsize in parts:
            row = width * itemsize
            first, last = begin // group, min(rows, -(-min(end, total) // group))
            for bh in range(batch * heads):
                base = bh * rows * row
                crc = _crc32(data[base + first * row : base + last * row], crc)
        crcs.append(crc)
    return crcs


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor, writable in place."""
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.dim() else memoryview(t.reshape(1).view(torch.uint8).numpy())


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
