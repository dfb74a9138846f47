"""A GGUF's Q4_1 linear weights as ggml stores them: blocks of 32, read by ``cag.int4`` and
``cag.block_linear``.

A Q4_1 block is 20 bytes: float16 ``d``, float16 ``m``, then 16 bytes whose byte ``j``
holds weight ``j``'s code in its low nibble and weight ``j + 16``'s in its high one;
weight = ``d * code + m``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["BLOCK_BYTES", "GROUP", "dequantize", "keep_tensors", "kept_tensors", "linear_blocks", "split_blocks"]

GROUP = 32  # weights per block
BLOCK_BYTES = 20
# GGUF tensor names of a llama block's linear layers -> the transformers module inside the block.
_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def linear_blocks(config: Any, gguf_path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Each Q4_1 linear weight of a llama GGUF as (module name under ``model.model``, uint8
    blocks ``[out, in / 32, 20]`` in transformers' row order)."""
    from gguf import GGMLQuantizationType, GGUFReader

    heads = {"attn_q": config.num_attention_heads,
             "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    for tensor in GGUFReader(str(gguf_path)).tensors:
        parts = tensor.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _LINEARS or tensor.tensor_type != GGMLQuantizationType.Q4_1:
            continue
        raw = np.asarray(tensor.data, dtype=np.uint8)
        blocks = torch.from_numpy(raw.reshape(raw.shape[0], -1, BLOCK_BYTES).copy())
        if parts[2] in heads:
            blocks = _unpermute_rows(blocks, heads[parts[2]])
        yield f"layers.{int(parts[1])}.{_LINEARS[parts[2]]}", blocks


def split_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks ``[out, in / 32, 20]`` as codes ``[out, in]`` (uint8, 0..15) and d, m ``[out, in / 32]`` (float16)."""
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]
    m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0]
    nibbles = blocks[..., 4:]
    codes = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).reshape(blocks.shape[0], -1)
    return codes, d, m


def dequantize(blocks: torch.Tensor) -> torch.Tensor:
    """The float32 weights ``[out, in]``: ``d * code + m`` per block, as ggml computes them."""
    codes, d, m = split_blocks(blocks)
    grouped = codes.float().view(codes.shape[0], -1, GROUP)
    return (d.float()[..., None] * grouped + m.float()[..., None]).view(codes.shape)


def _unpermute_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row order for q and k (transformers' GGUF loader does the same)."""
    dim = x.shape[0] // heads // 2
    return x.reshape(heads, dim, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape).contiguous()


def keep_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save work derived from a GGUF (a safetensors file, written whole or not at all); a failure is
    ignored: without the file the next load derives it again."""
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError:
        return
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def kept_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """What ``keep_tensors`` saved, with its metadata; None when missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except (OSError, SafetensorError):
        return None
