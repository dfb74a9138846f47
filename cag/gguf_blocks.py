"""A GGUF's block-quantized weights as ggml stores them, read by ``cag.int4`` and ``cag.block_linear``.

A Q4_1 block is 20 bytes: float16 ``d``, float16 ``m``, then 16 bytes whose byte ``j``
holds weight ``j``'s code in its low nibble and weight ``j + 16``'s in its high one;
weight = ``d * code + m``. A Q8_0 block is 34 bytes: float16 ``d``, then 32 int8 codes;
weight = ``d * code``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["GROUP", "HEAD", "Q4_1_BYTES", "Q8_0_BYTES", "dequantize", "keep_tensors", "kept_tensors", "linear_blocks",
           "split_q4_1", "split_q8_0"]

GROUP = 32  # weights per block
Q4_1_BYTES, Q8_0_BYTES = 20, 34
HEAD = "lm_head"  # linear_blocks' name for the output head
# GGUF tensor names of a llama block's linear layers -> the transformers module inside the block.
_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def linear_blocks(config: Any, gguf_path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """A llama GGUF's block-quantized linear weights as (name, uint8 blocks ``[out, in / 32, bytes]``
    in transformers' row order): each Q4_1 linear of a layer, by module name under ``model.model``,
    and a Q8_0 output head (``output``, else the tied ``token_embd``) as ``HEAD``."""
    from gguf import GGMLQuantizationType, GGUFReader

    heads = {"attn_q": config.num_attention_heads,
             "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    tensors = GGUFReader(str(gguf_path)).tensors
    names = {tensor.name for tensor in tensors}
    head = "output.weight" if "output.weight" in names else "token_embd.weight"
    for tensor in tensors:
        parts = tensor.name.split(".")
        if tensor.name == head and tensor.tensor_type == GGMLQuantizationType.Q8_0:
            yield HEAD, _blocks(tensor, Q8_0_BYTES)
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in _LINEARS and tensor.tensor_type == GGMLQuantizationType.Q4_1:
            blocks = _blocks(tensor, Q4_1_BYTES)
            if parts[2] in heads:
                blocks = _unpermute_rows(blocks, heads[parts[2]])
            yield f"layers.{int(parts[1])}.{_LINEARS[parts[2]]}", blocks


def _blocks(tensor: Any, size: int) -> torch.Tensor:
    raw = np.asarray(tensor.data, dtype=np.uint8)
    return torch.from_numpy(raw.reshape(raw.shape[0], -1, size).copy())


def split_q4_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks ``[out, in / 32, 20]`` as codes ``[out, in]`` (uint8, 0..15) and d, m ``[out, in / 32]`` (float16)."""
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]
    m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0]
    nibbles = blocks[..., 4:]
    codes = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).reshape(blocks.shape[0], -1)
    return codes, d, m


def split_q8_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 blocks ``[out, in / 32, 34]`` as codes ``[out, in / 32, 32]`` (int8) and d ``[out, in / 32]`` (float16)."""
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]
    return blocks[..., 2:].contiguous().view(torch.int8), d


def dequantize(blocks: torch.Tensor) -> torch.Tensor:
    """The float32 weights ``[out, in]`` of Q4_1 or Q8_0 blocks, as ggml computes them."""
    if blocks.shape[-1] == Q8_0_BYTES:
        codes, d = split_q8_0(blocks)
        return (d.float()[..., None] * codes.float()).reshape(blocks.shape[0], -1)
    codes, d, m = split_q4_1(blocks)
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
