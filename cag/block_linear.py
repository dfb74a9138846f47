"""Linear layers that read the embedded GGUF's 4-bit blocks instead of their float32 copy.

The default model is de-quantized from Q4_1 blocks to float32 once, at load; a decode
step then reads 427 MB of float32 linear weights. ``BlockReadLinear`` keeps the blocks
beside the float32 weights (101 MB more in memory) and, for a few rows (decode steps),
computes each float32 weight in registers from its block with ``cpu_kernels.q4_1_linear``:
``d * code`` is exact in float32, so ``fma(d, code, m)`` is bit for bit the weight the
load produced, and a step reads the blocks only (101 MB, their d and m in float32). Only the order of each row's sum
differs from BLAS's, so answers are the float32 model's up to last-bit rounding (``cag
bench`` reports how often they are identical), and a restored cache and a full prefill
still run the same products. More rows (a prompt's prefill) are compute-bound and take
the float32 weights through BLAS, as before.

A layer is replaced only where its blocks de-quantize to exactly the model's weights,
so the model's fingerprint, and the caches it accepts, stay what they were.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from . import cpu_kernels
from .gguf_blocks import GROUP, dequantize, kept_tensors, keep_tensors, linear_blocks, split_blocks

__all__ = ["BlockReadLinear", "use_block_read_linears"]

_MAX_ROWS = 16  # at 8 rows the blocks still took half the float32 product's time; a prefill takes BLAS


class BlockReadLinear(nn.Module):
    """A bias-free float32 linear layer whose product at a few rows reads its Q4_1 blocks."""

    def __init__(self, weight: nn.Parameter, blocks: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        # The kernel's layout: each block's d and m in float32 (read with no conversion), its codes apart.
        _, d, m = split_blocks(blocks)
        self.register_buffer("codes", blocks[..., 4:].contiguous(), persistent=False)
        self.register_buffer("scales", torch.stack([d.float(), m.float()], dim=-1).contiguous(), persistent=False)
        self._product = cpu_kernels.q4_1_product(self.codes, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > _MAX_ROWS or x.dtype != torch.float32 or torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x, self.weight)
        return self._product(rows.contiguous()).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks=q4_1"


def use_block_read_linears(model: Any, gguf_path: str | os.PathLike, weights_hash: str, kept: Path | None = None) -> int:
    """Replace the llama model's float32 linear layers by ``BlockReadLinear`` where the GGUF's
    Q4_1 blocks give exactly their weights; returns how many (none without the CPU kernels).

    Reading the GGUF and checking every weight takes seconds, so the blocks that passed are
    kept in ``kept`` (a safetensors file) with the ``weights_hash`` of the weights they were
    checked against, and taken from there while the hash is the same."""
    if not cpu_kernels.available():
        return 0
    found = kept_tensors(kept) if kept is not None else None
    if found is not None and found[1].get("weights_hash") == weights_hash:
        checked = found[0]
    else:
        checked = {name: blocks for name, blocks in linear_blocks(model.config, gguf_path) if _gives_weights(model, name, blocks)}
        if kept is not None:
            keep_tensors(checked, kept, {"weights_hash": weights_hash})
    for name, blocks in checked.items():
        owner_path, _, attr = name.rpartition(".")
        owner = model.model.get_submodule(owner_path)
        setattr(owner, attr, BlockReadLinear(getattr(owner, attr).weight, blocks))
    return len(checked)


def blocks_file(folder: Path, gguf_path: str | os.PathLike) -> Path:
    """Where the checked blocks of this GGUF are kept under ``folder``."""
    return folder / f"{Path(gguf_path).stem}.{Path(gguf_path).stat().st_size}.q4_1-blocks.safetensors"


def _gives_weights(model: Any, name: str, blocks: torch.Tensor) -> bool:
    """Whether ``blocks`` de-quantize to exactly the weights of the model's float32 linear ``name``."""
    layer = model.model.get_submodule(name)
    if type(layer) is not nn.Linear or layer.bias is not None or layer.weight.dtype != torch.float32:
        return False
    if layer.weight.device.type != "cpu" or layer.out_features % 4 or blocks.shape[1] * GROUP != layer.in_features:
        return False
    return blocks.shape[0] == layer.out_features and torch.equal(dequantize(blocks), layer.weight)
