"""Linear layers that read the embedded GGUF's blocks instead of their float32 copy.

The default model is de-quantized once, at load, from its GGUF: Q4_1 blocks for the
layers' linears, Q8_0 for the tied embeddings and output head. A decode step then reads
427 MB of float32 linear weights and a 113 MB head. ``BlockReadLinear`` keeps the blocks
beside the float32 weights (133 MB more in memory) and, for a few rows (decode steps),
computes each float32 weight in registers from its block (``cpu_kernels``): ``d * code``
is exact in float32, so ``fma(d, code, m)`` (Q4_1) and ``d * code`` (Q8_0) are bit for
bit the weights the load produced, and a step reads 101 MB of blocks for the linears and
32 MB for the head. Only the order of each row's sum differs from BLAS's, so answers are
the float32 model's up to last-bit rounding (identical on the bench's 8 questions), and a
restored cache and a full prefill still run the same products. More rows (a prompt's
prefill) are compute-bound and take the float32 weights through BLAS, as before.

A layer is replaced only where its blocks de-quantize to exactly the model's weights,
so the model's fingerprint, and the caches it accepts, stay what they were.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from . import cpu_kernels
from .gguf_blocks import GROUP, HEAD, Q8_0_BYTES, dequantize, kept_tensors, keep_tensors, linear_blocks, split_q4_1, split_q8_0

__all__ = ["BlockReadLinear", "fuse_block_linears", "use_block_read_linears"]

MAX_BLOCK_ROWS = 16  # at 8 rows the blocks still took half the float32 product's time; a prefill takes BLAS


class BlockReadLinear(nn.Module):
    """A bias-free float32 linear layer whose product at a few rows reads its Q4_1 or Q8_0 blocks."""

    def __init__(self, weight: nn.Parameter, blocks: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        # The kernel's layout: codes apart, each block's d (and m) in float32, read with no conversion.
        if blocks.shape[-1] == Q8_0_BYTES:
            self.format = "q8_0"
            codes, d = split_q8_0(blocks)
            scales = d.float()
        else:
            self.format = "q4_1"
            _, d, m = split_q4_1(blocks)
            codes, scales = blocks[..., 4:], torch.stack([d.float(), m.float()], dim=-1)
        self.register_buffer("codes", codes.contiguous(), persistent=False)
        self.register_buffer("scales", scales.contiguous(), persistent=False)
        self._product = self.product_of(self.codes, self.scales)

    def product_of(self, codes: torch.Tensor, scales: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The kernel's product over blocks of this layer's format."""
        return (cpu_kernels.q8_0_product if self.format == "q8_0" else cpu_kernels.q4_1_product)(codes, scales)

    @property
    def product(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The kernel's product itself, for ``[M, K]`` contiguous float32 rows, M at most
        ``MAX_BLOCK_ROWS`` to be worth it: what ``forward`` calls after its checks."""
        return self._product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > MAX_BLOCK_ROWS or x.dtype != torch.float32 or torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x, self.weight)
        return self._product(rows.contiguous()).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.format}"


def fuse_block_linears(linears: Sequence[BlockReadLinear]) -> Callable[[torch.Tensor], torch.Tensor]:
    """One product for layers of one format over the same input, their outputs side by side.

    The layers' blocks move into one tensor and each layer keeps views of its rows, so nothing
    is held twice. Each output is summed alone, so the fused product's columns are bit for bit
    the layers' own products."""
    codes, scales = torch.cat([m.codes for m in linears]), torch.cat([m.scales for m in linears])
    start = 0
    for m in linears:
        end = start + m.out_features
        m.codes, m.scales = codes[start:end], scales[start:end]
        m._product = m.product_of(m.codes, m.scales)
        start = end
    return linears[0].product_of(codes, scales)


def use_block_read_linears(model: Any, gguf_path: str | os.PathLike, weights_hash: str, kept: Path | None = None) -> int:
    """Replace the llama model's float32 linear layers and output head by ``BlockReadLinear``
    where the GGUF's blocks give exactly their weights; returns how many (none without the CPU
    kernels, or for a model not in float32 on the CPU).

    Reading the GGUF and checking every weight takes seconds, so the blocks that passed are
    kept in ``kept`` (a safetensors file) with the ``weights_hash`` of the weights they were
    checked against, and taken from there while the hash is the same."""
    weight = next(model.parameters())
    if not cpu_kernels.available() or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return 0
    found = kept_tensors(kept) if kept is not None else None
    if found is not None and found[1].get("weights_hash") == weights_hash:
        checked = found[0]
    else:
        checked = {name: blocks for name, blocks in linear_blocks(model.config, gguf_path)
                   if _gives_weights(_layer(model, name), blocks)}
        if kept is not None:
            keep_tensors(checked, kept, {"weights_hash": weights_hash})
    for name, blocks in checked.items():
        replacement = BlockReadLinear(_layer(model, name).weight, blocks)
        if name == HEAD:
            model.set_output_embeddings(replacement)  # the weight, tied or not, stays the same parameter
        else:
            owner_path, _, attr = name.rpartition(".")
            setattr(model.model.get_submodule(owner_path), attr, replacement)
    return len(checked)


def blocks_file(folder: Path, gguf_path: str | os.PathLike) -> Path:
    """Where the checked blocks of this GGUF are kept under ``folder``."""
    return folder / f"{Path(gguf_path).stem}.{Path(gguf_path).stat().st_size}.blocks.safetensors"


def _layer(model: Any, name: str) -> Any:
    return model.get_output_embeddings() if name == HEAD else model.model.get_submodule(name)


def _gives_weights(layer: Any, blocks: torch.Tensor) -> bool:
    """Whether ``blocks`` de-quantize to exactly the weights of ``layer``, a float32 linear on the CPU."""
    if type(layer) is not nn.Linear or layer.bias is not None or layer.weight.dtype != torch.float32:
        return False
    if layer.weight.device.type != "cpu" or layer.out_features % 4 or blocks.shape[1] * GROUP != layer.in_features:
        return False
    return blocks.shape[0] == layer.out_features and torch.equal(dequantize(blocks), layer.weight)
