"""Compute with a GGUF's own 4-bit weights: Q4_1 blocks through PyTorch's packed int4 CPU matmul.

The embedded model is a Q4_1 GGUF. De-quantized to float32, a decode step reads 540 MB
of weights; kept as they are, the linear layers' weights are ~60 MB, what llama.cpp
reads. A Q4_1 block holds 32 weights as ``d * q + m`` (``q`` in 0..15, ``d`` and ``m``
float16); torch's kernel computes ``(q - 8) * scale + zero`` per group of 32, so the
same block is ``scale = d``, ``zero = m + 8 * d``. The kernel runs in bfloat16 (its
float32 path is a slow reference), so activations, scales and outputs are rounded to
bfloat16: answers can differ from the float32 de-quantized model's (``cag bench``
reports how often), never between a restored cache and a full prefill of this model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelError
from .gguf_blocks import GROUP, HEAD, keep_tensors, kept_tensors, linear_blocks, split_q4_1

__all__ = ["Int4Linear", "use_gguf_int4"]

_INNER_K_TILES = 2


class Int4Linear(nn.Module):
    """A bias-free linear layer over packed 4-bit weights in groups of 32 along the input."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """``codes``: int [out, in] in 0..15; ``scale``, ``zero``: [out, in / 32], weight = (codes - 8) * scale + zero."""
        super().__init__()
        self.out_features, self.in_features = codes.shape
        if self.in_features % GROUP or scale.shape != (self.out_features, self.in_features // GROUP):
            raise ModelError(f"int4 weights need groups of {GROUP} inputs, got codes {tuple(codes.shape)} and scales {tuple(scale.shape)}")
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), _INNER_K_TILES)
        self._set(packed, torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous())

    def _set(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> None:
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    @classmethod
    def from_packed(cls, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> "Int4Linear":
        """A layer from the buffers of one packed before (by this torch version: the layout is the kernel's)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features = packed.shape[0]
        layer.in_features = scales_and_zeros.shape[0] * GROUP
        layer._set(packed, scales_and_zeros)
        return layer

    @classmethod
    def from_q4_1(cls, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> "Int4Linear":
        """Q4_1 blocks (weight = d * codes + m) as the kernel's (codes - 8) * d + (m + 8 d)."""
        d, m = d.float(), m.float()
        return cls(codes, d, m + 8 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales_and_zeros)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={GROUP}"


def use_gguf_int4(model: Any, gguf_path: str | Path, packs: Path | None = None) -> int:
    """Replace the llama model's linear layers by the GGUF's own Q4_1 weights; returns how many.

    Only layers stored as Q4_1 are replaced; the embeddings, norms and output head stay
    as transformers loaded them. Packing for the kernel takes seconds, so the packed
    buffers are kept in ``packs`` (a safetensors file, per torch version) when given.
    """
    if next(model.parameters()).device.type != "cpu":
        raise ModelError("int4 weights run on the CPU only: load the model on the CPU")
    layers = _load_packs(packs) if packs is not None else None
    if layers is None:
        layers = _layers_from_gguf(model.config, gguf_path)
        if packs is not None:
            _save_packs(layers, packs)
    for name, layer in layers.items():
        owner_path, _, attr = name.rpartition(".")
        owner = model.model.get_submodule(owner_path)
        old = getattr(owner, attr)
        if not isinstance(old, nn.Linear) or old.bias is not None or (old.out_features, old.in_features) != (layer.out_features, layer.in_features):
            raise ModelError(f"int4 weights for {name} ({layer.out_features}x{layer.in_features}) do not fit the model's layer")
        setattr(owner, attr, layer)
    return len(layers)


def packs_file(folder: Path, gguf_path: str | Path) -> Path:
    """Where the packed weights of this GGUF, for this torch version, are kept under ``folder``."""
    stat = Path(gguf_path).stat()
    return folder / f"{Path(gguf_path).stem}.{stat.st_size}.torch-{torch.__version__}.int4.safetensors"


def _layers_from_gguf(config: Any, gguf_path: str | Path) -> dict[str, Int4Linear]:
    """The GGUF's Q4_1 linear weights, by module name under ``model.model``."""
    layers = {name: Int4Linear.from_q4_1(*split_q4_1(blocks))
              for name, blocks in linear_blocks(config, gguf_path) if name != HEAD}
    if not layers:
        raise ModelError(f"{gguf_path} holds no Q4_1 linear weights of a llama model: drop --quantize q4")
    return layers


def _save_packs(layers: dict[str, Int4Linear], path: Path) -> None:
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.packed"] = layer.packed
        tensors[f"{name}.scales_and_zeros"] = layer.scales_and_zeros
    keep_tensors(tensors, path)


def _load_packs(path: Path) -> dict[str, Int4Linear] | None:
    kept = kept_tensors(path)
    if kept is None:
        return None  # unreadable: pack again from the GGUF (and replace the file)
    tensors = kept[0]
    names = sorted({key.rpartition(".")[0] for key in tensors})
    try:
        return {name: Int4Linear.from_packed(tensors[f"{name}.packed"], tensors[f"{name}.scales_and_zeros"]) for name in names}
    except KeyError:
        return None
