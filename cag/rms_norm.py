"""Llama's RMSNorm in one compiled call (``cpu_kernels.rms_norm``) instead of eight torch operations.

A decode step of SmolLM2 runs 61 norms over one row each; torch's ``to, pow, mean, add,
rsqrt, mul, to, mul`` took about 30 us a norm, 1.8 ms of a 40 ms step, and the compiled
loop about 4 us. The formula is the model's own, ``weight * (x * rsqrt(mean(x^2) + eps))``;
only the order of the squares' sum differs from torch's. It runs for every row count, so
a prefill and a decode step normalise alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import cpu_kernels

__all__ = ["CompiledRMSNorm", "use_compiled_norms"]

# Norms computed as weight * normalised x (Gemma's 1 + weight is not among them).
_LLAMA_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


class CompiledRMSNorm(nn.Module):
    """A Llama-style RMSNorm whose float32 CPU forward is one ``cpu_kernels.rms_norm`` call."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled() and x.requires_grad:
            wide = x.float()
            return self.weight * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)
        return cpu_kernels.rms_norm(x.contiguous(), self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


def use_compiled_norms(model: Any) -> int:
    """Replace the model's Llama-style RMSNorms by ``CompiledRMSNorm``; returns how many (none
    without the CPU kernels, or for a model not in float32 on the CPU)."""
    weight = next(model.parameters())
    if not cpu_kernels.available() or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return 0
    replaced = 0
    for name, module in list(model.named_modules()):
        norm_weight = getattr(module, "weight", None)
        if type(module).__name__ not in _LLAMA_NORMS or norm_weight is None or norm_weight.dim() != 1:
            continue
        if norm_weight.dtype != torch.float32 or norm_weight.shape[0] % 16:
            continue
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, CompiledRMSNorm(norm_weight, module.variance_epsilon))
        replaced += 1
    return replaced
