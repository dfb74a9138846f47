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

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ModelError

__all__ = ["GROUP", "Int4Linear", "q4_1_blocks", "use_gguf_int4"]

GROUP = 32  # weights per Q4_1 block, and per group of the int4 kernel
_BLOCK_BYTES = 20  # float16 d, float16 m, 16 bytes of nibbles
_INNER_K_TILES = 2
# GGUF tensor names of a llama block's linear layers -> the transformers module inside the block.
_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


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


def q4_1_blocks(tensor: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A GGUF Q4_1 tensor's codes [out, in] (uint8, 0..15) and its d, m [out, in / 32] (float16)."""
    raw = np.asarray(tensor.data, dtype=np.uint8)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, _BLOCK_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    nibbles = blocks[..., 4:]
    # ggml's Q4_1: byte j holds weight j in its low nibble and weight j + 16 in its high one.
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, -1)
    return torch.from_numpy(codes), torch.from_numpy(d.copy()), torch.from_numpy(m.copy())


def _unpermute_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row order for q and k (transformers' GGUF loader does the same)."""
    dim = x.shape[0] // heads // 2
    return x.reshape(heads, dim, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def use_gguf_int4(model: Any, gguf_path: str | Path, packs: Path | None = None) -> int:
    """Replace the llama model's linear layers by the GGUF's own Q4_1 weights; returns how many.

    Only layers stored as Q4_1 are replaced; the embeddings, norms and output head stay
    as transformers loaded them. Packing for the kernel takes seconds, so the packed
    buffers are kept in ``packs`` (a safetensors file, per torch version) when given.
    """
    if next(model.parameters()).device.type != "cpu":
        raise ModelError("int4 weights run on the CPU only: load the model on the CPU")
    layers = _load_packs(packs) if packs is not None and packs.is_file() else None
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
    from gguf import GGMLQuantizationType, GGUFReader

    heads = {"attn_q": config.num_attention_heads, "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    layers: dict[str, Int4Linear] = {}
    for tensor in GGUFReader(str(gguf_path)).tensors:
        parts = tensor.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _LINEARS or tensor.tensor_type != GGMLQuantizationType.Q4_1:
            continue
        kind = parts[2]
        codes, d, m = q4_1_blocks(tensor)
        if kind in heads:
            codes, d, m = (_unpermute_rows(t, heads[kind]) for t in (codes, d, m))
        layers[f"layers.{int(parts[1])}.{_LINEARS[kind]}"] = Int4Linear.from_q4_1(codes, d, m)
    if not layers:
        raise ModelError(f"{gguf_path} holds no Q4_1 linear weights of a llama model: drop --quantize q4")
    return layers


def _save_packs(layers: dict[str, Int4Linear], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.packed"] = layer.packed
        tensors[f"{name}.scales_and_zeros"] = layer.scales_and_zeros
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache of work only: without it the next load packs again
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_packs(path: Path) -> dict[str, Int4Linear] | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError):
        return None  # unreadable: pack again from the GGUF (and replace the file)
    names = sorted({key.rpartition(".")[0] for key in tensors})
    try:
        return {name: Int4Linear.from_packed(tensors[f"{name}.packed"], tensors[f"{name}.scales_and_zeros"]) for name in names}
    except KeyError:
        return None
