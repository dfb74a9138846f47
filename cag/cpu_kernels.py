"""cag's compiled CPU loops (``cpu_kernels.c``), where torch's operations leave speed behind.

* Attention over a shared prefix. At a decode step each key/value group has a handful of
  query rows (batch x group: 3 for one question to SmolLM2) against thousands of context
  keys; BLAS ran ``[3, 64] x [64, 4096]`` at about a third of this machine's memory
  bandwidth. Here each context key and value row is loaded once for a tile's rows, and the
  scores, their softmax and the weighted values of a tile stay in one buffer: a decode step
  at a 4k context took 39.8 ms against 50.4 ms with the two products compiled apart and torch's
  softmax between them, and a question's first token 272 ms against 317 ms (one thread).
* A linear layer over ggml's Q4_1 or Q8_0 blocks (``cag.block_linear``): the float32
  weights are computed in registers from the blocks, exactly as de-quantizing them once
  does, so a decode step reads 101 MB instead of 427 MB of float32 for SmolLM2's 210
  linears (10 ms against 39 ms at one row, one thread) and 32 MB for its head.
* Llama's RMSNorm and rotary embedding, each one call instead of eight to ten torch
  operations (``cag.rms_norm``, ``cag.llama_step``); the rotary loop rounds as torch does.

Every output is summed in one order, whatever the number of rows or threads or a row's left
padding, so a question's result does not depend on what is batched with it.

The C source is compiled once per machine (``$CC``, else ``cc``, with ``-march=native``
and OpenMP) into ``<cag home>/kernels``, keyed by the source, the compiler and the CPU,
for AVX-512 or for AVX2 with FMA (the same sums in the same order on both). A machine
without a compiler or without either uses torch's operations instead, as does
``CAG_CPU_KERNELS=0``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch

from .home import cag_home

__all__ = ["attend", "available", "q4_1_product", "q8_0_product", "rms_norm", "rotary", "rotary_attend", "rows_to_tokens", "usable"]

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
_log = logging.getLogger(__name__)
_lock = threading.Lock()


def available() -> bool:
    """Whether the compiled kernels run on this machine."""
    return _library() is not None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: float32 on the CPU, the last dimension contiguous
    and a multiple of 16."""
    return available() and all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.shape[-1] % 16 == 0 and t.stride(-1) == 1
        for t in tensors
    )


def attend(query: torch.Tensor, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, keys: torch.Tensor,
           values: torch.Tensor, mask: torch.Tensor | None, query_length: int) -> torch.Tensor:
    """Attention over a shared prefix and each batch row's own suffix, one softmax over both.

    ``query`` ``[H, R, D]`` (contiguous, already scaled; batch b's rows are ``R / B`` consecutive
    rows, its row r being query token ``r % query_length``), prefix keys and values ``[H, N, D]``,
    the suffix's ``[B, H, S, D]``, ``mask`` None (every suffix key visible) or ``[B, query_length,
    S]`` booleans (True attends). Returns ``[H, R, D]``.
    """
    heads, rows, dim = query.shape
    batch, _, suffix, _ = keys.shape
    n = prefix_keys.shape[1]
    _check(
        query.is_contiguous() and rows % batch == 0 and prefix_keys.shape == (heads, n, dim)
        and prefix_values.shape == (heads, n, dim) and keys.shape == (batch, heads, suffix, dim)
        and values.shape == keys.shape
        and (mask is None or (mask.shape == (batch, query_length, suffix) and mask.dtype == torch.bool
                              and (suffix == 0 or mask.stride(-1) == 1)))
    )
    out = torch.empty(heads, rows, dim)
    failed = _library().cag_attend(
        query.data_ptr(), heads, rows, dim, rows // batch, query_length,
        prefix_keys.data_ptr(), prefix_values.data_ptr(), n, *prefix_keys.stride()[:2], *prefix_values.stride()[:2],
        keys.data_ptr(), values.data_ptr(), suffix, *keys.stride()[:3], *values.stride()[:3],
        None if mask is None else mask.data_ptr(), *(mask.stride()[:2] if mask is not None else (0, 0)),
        out.data_ptr(), torch.get_num_threads(),
    )
    if failed:
        raise MemoryError("no memory for the attention's scores")
    return out


def rotary_attend(qkv: torch.Tensor, batch: int, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                  scale: float, key_buffer: torch.Tensor, value_buffer: torch.Tensor, start: int,
                  prefix_keys: torch.Tensor, prefix_values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A step's ``rotary`` of q and k, the new keys and values written into their cache columns
    and ``attend``, in one call, each part bit for bit as alone.

    ``qkv`` ``[B * L, (heads + 2 * kv_heads) * D]`` (contiguous; the fused q|k|v product's rows),
    ``cos``/``sin`` ``[B, L, D]``, the suffix's buffers ``[B, kv_heads, capacity, D]`` whose columns
    ``start`` to ``start + L`` receive the keys and values, the attention then reading columns up to
    there; prefix keys/values ``[kv_heads, N, D]``, ``mask`` as ``attend``'s. Returns ``[kv_heads, R, D]``.
    """
    tokens, dim = cos.shape[1], cos.shape[2]
    n, end = prefix_keys.shape[1], start + cos.shape[1]
    _check(
        qkv.is_contiguous() and qkv.shape == (batch * tokens, (heads + 2 * kv_heads) * dim) and heads % kv_heads == 0
        and cos.shape == sin.shape == (batch, tokens, dim) and cos.is_contiguous() and sin.is_contiguous()
        and key_buffer.shape == value_buffer.shape and key_buffer.shape[:2] == (batch, kv_heads)
        and key_buffer.shape[3] == dim and end <= key_buffer.shape[2]
        and key_buffer.stride()[2:] == value_buffer.stride()[2:] == (dim, 1) and key_buffer.stride() == value_buffer.stride()
        and prefix_keys.shape == prefix_values.shape == (kv_heads, n, dim)
        and prefix_keys.stride(-1) == prefix_values.stride(-1) == 1
        and (mask is None or (mask.shape == (batch, tokens, end) and mask.dtype == torch.bool and mask.stride(-1) == 1))
    )
    rows = batch * tokens * (heads // kv_heads)
    query, out = torch.empty(kv_heads, rows, dim), torch.empty(kv_heads, rows, dim)
    failed = _library().cag_rotary_attend(
        qkv.data_ptr(), batch, tokens, heads, kv_heads, dim, cos.data_ptr(), sin.data_ptr(), scale,
        key_buffer.data_ptr(), value_buffer.data_ptr(), *key_buffer.stride()[:2], start,
        prefix_keys.data_ptr(), prefix_values.data_ptr(), n, *prefix_keys.stride()[:2], *prefix_values.stride()[:2],
        None if mask is None else mask.data_ptr(), *(mask.stride()[:2] if mask is not None else (0, 0)),
        query.data_ptr(), out.data_ptr(), torch.get_num_threads(),
    )
    if failed:
        raise MemoryError("no memory for the attention's scores")
    return out


def rows_to_tokens(out: torch.Tensor, batch: int, query_length: int) -> torch.Tensor:
    """``attend``'s ``[H, R, D]`` as ``[B, query_length, H * group, D]``, query head h * group + g of
    token t in batch b being key/value head h's row ``g * query_length + t`` of that batch."""
    heads, rows, dim = out.shape
    group = rows // (batch * query_length)
    return out.view(heads, batch, group, query_length, dim).permute(1, 3, 0, 2, 4).reshape(batch, query_length, -1, dim)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x**2, -1) + eps))`` for float32 ``x`` ``[..., D]`` (contiguous) and
    ``weight`` ``[D]``, D a multiple of 16: Llama's RMSNorm in one call instead of eight operations."""
    dim = x.shape[-1]
    _check(x.is_contiguous() and weight.shape == (dim,) and weight.is_contiguous() and weight.dtype == torch.float32)
    out = torch.empty_like(x)
    _library().cag_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps,
                            torch.get_num_threads())
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float = 1.0, group: int | None = None) -> torch.Tensor:
    """``(x * cos + rotate_half(x) * sin) * scale``, bit for bit torch's, for ``x`` ``[B, L, heads, D]``
    (float32, the last dimension contiguous; the projection's layout) and ``cos``/``sin`` ``[B, L, D]``.
    ``group`` None returns ``[B, heads, L, D]``, as the cache takes keys; else ``[heads / group,
    B * group * L, D]``, key/value head h // group's query rows as ``attend`` takes them."""
    batch, tokens, heads, dim = x.shape
    group = group or heads
    _check(x.stride(-1) == 1 and cos.shape == sin.shape == (batch, tokens, dim)
           and cos.is_contiguous() and sin.is_contiguous() and heads % group == 0 and dim % 2 == 0)
    shape = (batch, heads, tokens, dim) if group == heads else (heads // group, batch * group * tokens, dim)
    out = torch.empty(shape)
    _library().cag_rotary(x.data_ptr(), *x.stride()[:3], batch, tokens, heads, dim, cos.data_ptr(),
                          sin.data_ptr(), dim, scale, group, out.data_ptr())
    return out


def q4_1_product(codes: torch.Tensor, scales: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x @ weight.T`` for ``x`` ``[M, K]`` (float32, contiguous) and a weight held as ggml Q4_1
    blocks: ``codes`` ``[N, K / 32, 16]`` (the blocks' nibble bytes, uint8) and ``scales``
    ``[N, K / 32, 2]`` (their d and m in float32), N a multiple of 4."""
    _check(codes.dtype == torch.uint8 and codes.shape[2] == 16 and scales.shape == (*codes.shape[:2], 2))
    return _product(_library().cag_q4_1_linear, codes, scales)


def q8_0_product(codes: torch.Tensor, scales: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """As ``q4_1_product`` for ggml Q8_0 blocks: ``codes`` ``[N, K / 32, 32]`` (int8) and ``scales``
    ``[N, K / 32]`` (their d in float32)."""
    _check(codes.dtype == torch.int8 and codes.shape[2] == 32 and scales.shape == codes.shape[:2])
    return _product(_library().cag_q8_0_linear, codes, scales)


def _product(kernel, codes: torch.Tensor, scales: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The weight's shapes are checked once, here: a decode step calls a product 211 times."""
    outputs, blocks, _ = codes.shape
    inputs = blocks * 32
    _check(codes.is_contiguous() and scales.is_contiguous() and scales.dtype == torch.float32 and outputs % 4 == 0)
    codes_at, scales_at = codes.data_ptr(), scales.data_ptr()

    def product(x: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
        """``x @ weight.T``; with ``norm`` (an RMSNorm's weight ``[K]``, float32), of ``x``'s rows
        normalised first as ``rms_norm(x, norm, eps)`` would: the two in one call."""
        rows = x.shape[0]
        _check(x.shape[1] == inputs and x.is_contiguous() and x.dtype == torch.float32)
        _check(norm is None or norm.shape == (inputs,) and norm.is_contiguous() and norm.dtype == torch.float32)
        out = torch.empty(rows, outputs)
        if kernel(x.data_ptr(), codes_at, scales_at, out.data_ptr(), rows, outputs, inputs, inputs, outputs,
                  None if norm is None else norm.data_ptr(), eps, torch.get_num_threads()):
            raise MemoryError("no memory for the normalised rows")
        return out

    product.weights = (codes, scales)  # alive as long as the function: the kernel reads their memory
    return product


def _check(ok: bool) -> None:
    if not ok:
        raise ValueError("a CPU kernel was called with shapes it does not take")


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("CAG_CPU_KERNELS", "1") == "0":
        return None
    with _lock:
        try:
            lib = ctypes.CDLL(str(_compiled()))
        except (OSError, subprocess.SubprocessError) as exc:
            _log.info("CPU kernels unavailable, using torch's operations: %s", exc)
            return None
    if not lib.cag_available():
        return None
    pointer, integer, long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.cag_attend.argtypes = (
        [pointer, integer, integer, integer, integer, integer, pointer, pointer, integer] + [long] * 4
        + [pointer, pointer, integer] + [long] * 6 + [pointer, long, long, pointer, integer]
    )
    lib.cag_attend.restype = integer
    lib.cag_rotary_attend.argtypes = (
        [pointer] + [integer] * 5 + [pointer, pointer, ctypes.c_float, pointer, pointer, long, long, integer,
                                     pointer, pointer, integer] + [long] * 4 + [pointer, long, long, pointer, pointer, integer]
    )
    lib.cag_rotary_attend.restype = integer
    lib.cag_rotary.argtypes = [pointer, long, long, long] + [integer] * 4 + [pointer, pointer, long, ctypes.c_float,
                                                                       integer, pointer]
    lib.cag_rms_norm.argtypes = [pointer] * 3 + [long, integer, ctypes.c_float, integer]
    lib.cag_q4_1_linear.argtypes = lib.cag_q8_0_linear.argtypes = (
        [pointer] * 4 + [integer] * 3 + [long] * 2 + [pointer, ctypes.c_float, integer]
    )
    lib.cag_q4_1_linear.restype = lib.cag_q8_0_linear.restype = integer
    for name in ("cag_rotary", "cag_rms_norm"):
        getattr(lib, name).restype = None
    return lib


def _compiled() -> Path:
    """The shared library for this source, compiler and CPU, compiled on first use."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise OSError("no C compiler (set $CC)")
    version = subprocess.run([compiler, "--version"], capture_output=True, check=True, timeout=30).stdout
    key = hashlib.sha256(_SOURCE.read_bytes() + version + " ".join(_FLAGS).encode() + _cpu_flags()).hexdigest()[:16]
    target = cag_home() / "kernels" / f"cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(handle)
    try:
        done = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", partial], capture_output=True, timeout=120)
        if done.returncode != 0:
            raise OSError(f"{Path(compiler).name} failed: {done.stderr.decode(errors='replace').strip()[:500]}")
        os.replace(partial, target)  # another process compiling the same key writes the same bytes
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _cpu_flags() -> bytes:
    """The CPU's feature flags: a library compiled for one CPU must not load on another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.encode()
    except OSError:
        pass
    return os.uname().machine.encode()
