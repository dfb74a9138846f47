"""int8 weights for CPU decoding: each ``nn.Linear`` becomes an ``Int8Linear``.

Decoding a small model on a CPU is bound by memory bandwidth: every token streams
all the weights, and int8 weights are a quarter of the float32 bytes. The product runs
on PyTorch's own integer matrix multiply (``torch._int_mm``, int8 x int8 -> int32, the
kernel torchao's dynamic int8 quantization uses), with

* weights quantized symmetrically per output channel, once, at load;
* activations quantized symmetrically per row (per token), at every call;
* SmoothQuant's per-channel smoothing (Xiao et al., 2023): language models' activations
  have a few outlier channels that would eat an activation row's 8-bit range, so each
  input channel ``j`` is divided by ``s_j = max|X_j|^0.5 / max|W_j|^0.5`` before rounding
  and the weights' column ``j`` multiplied by it, which leaves the product unchanged in
  exact arithmetic. ``max|X_j|`` comes from one forward pass over a fixed calibration
  text (the bundled benchmark corpus), so the result is deterministic.

Per-row activation scales and the exact integer product make a row's linear layers
independent of the other rows in a batch. PyTorch's ``quantize_dynamic`` scales
activations per tensor (and is deprecated); on SmolLM2-135M it also agrees less with
the float32 model.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["SMOOTHING_ALPHA", "Int8Linear", "calibration_text", "quantize_linear_layers", "scheme"]

SMOOTHING_ALPHA = 0.5
CALIBRATION_TOKENS = 512


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with int8 ``W`` (per output channel) and int8 ``x`` (per row).

    ``smooth`` (per input channel, SmoothQuant) moves activation outliers into the weights.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        weight = weight.detach().float()
        if smooth is not None:
            weight = weight * smooth[None, :]
        scale = weight.abs().amax(dim=1).clamp_(min=1e-12) / 127.0
        codes = torch.round(weight / scale[:, None]).to(torch.int8)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # Stored as [in, out]: the right operand of torch._int_mm, contiguous.
        self.register_buffer("weight_t", codes.t().contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("inverse_smooth", None if smooth is None else (1.0 / smooth).float())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth: torch.Tensor | None = None) -> "Int8Linear":
        return cls(linear.weight, linear.bias, smooth).to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        if self.inverse_smooth is not None:
            rows = rows * self.inverse_smooth
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
        codes = torch.round(rows / scale).to(torch.int8)
        out = torch._int_mm(codes, self.weight_t).float().mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out += self.bias
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def calibration_text() -> str:
    """The text whose activations set the smoothing factors: the bundled benchmark corpus."""
    return (resources.files("cag") / "data" / "bench" / "corpus.md").read_text(encoding="utf-8")


def scheme() -> str:
    """What a quantized model's fingerprint records: another scheme or calibration text gives other keys and values."""
    digest = hashlib.sha256(calibration_text().encode()).hexdigest()[:16]
    return (f"int8:weights-per-channel,activations-per-row,symmetric;smoothquant-alpha={SMOOTHING_ALPHA},"
            f"calibration={digest}x{CALIBRATION_TOKENS}:v1")


@torch.inference_mode()
def quantize_linear_layers(model: nn.Module, calibration_ids: Sequence[int] | None = None) -> int:
    """Replace every ``nn.Linear`` of ``model`` by an ``Int8Linear``, in place; returns how many.

    With ``calibration_ids``, the model first reads them in full precision to measure each
    linear layer's input channels (SmoothQuant). Embeddings and norms stay as they are;
    a tied output projection gets int8 codes of its own.
    """
    if not hasattr(torch, "_int_mm"):
        raise RuntimeError("this PyTorch has no torch._int_mm: int8 weights need PyTorch 2.4 or newer")
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    peaks = _input_peaks(model, [child for _, _, child in targets], calibration_ids) if calibration_ids else {}
    for parent, name, child in targets:
        smooth = _smoothing(child.weight, peaks[id(child)]) if id(child) in peaks else None
        setattr(parent, name, Int8Linear.from_linear(child, smooth))
    return len(targets)


def _input_peaks(model: nn.Module, layers: list[nn.Linear], ids: Sequence[int]) -> dict[int, torch.Tensor]:
    """max |x_j| over the calibration tokens, per input channel of each layer."""
    peaks: dict[int, torch.Tensor] = {}

    def record(layer: nn.Module, inputs: tuple[Any, ...]) -> None:
        x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0).float()
        peaks[id(layer)] = torch.maximum(peaks[id(layer)], x) if id(layer) in peaks else x

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        device = next(model.parameters()).device
        model(input_ids=torch.tensor([list(ids)], dtype=torch.long, device=device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return peaks


def _smoothing(weight: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    w = weight.detach().float().abs().amax(dim=0).clamp_(min=1e-5)
    x = peak.to(w.device).clamp(min=1e-5)
    return (x.pow(SMOOTHING_ALPHA) / w.pow(1 - SMOOTHING_ALPHA)).clamp_(1e-4, 1e4)
