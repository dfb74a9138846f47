"""The output head: logits read from a float16 copy of its weights, exact where a pick can land.

A decode step of a small model reads its whole output head: 113 MB of float32 for
SmolLM2's 49,152 x 576, a sixth of every step. ``HalfReadHead`` reads a float16 copy
(half the bytes) and then makes the logits that can matter exact. Rounding the hidden
state, the weights and the result to float16 moves logit ``j`` by at most
``2**-9 * |h| * |w_j|`` (Cauchy-Schwarz, with room to spare), so every token whose
upper bound reaches the largest lower bound is a candidate: usually one or two. Those
get their float32 logit, each one summed over the hidden size in the same order
whatever the batch, so a greedy pick depends on the hidden state alone: the same
token for a row alone or in a batch, from a restored cache or a full prefill. The
other logits stay within the bound, which moves a sampled distribution by no more.

The bound is checked when the head is installed (an arithmetic that accumulates in
half precision would break it) and, with too many candidates or a value float16
cannot hold, a call falls back to the float32 product.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["HalfReadHead", "use_half_read_head"]

_RELATIVE_BOUND = 2.0**-9  # three float16 roundings (2**-11 each) and float32 accumulation
_ABSOLUTE_BOUND = 2.0**-20  # float16 subnormals
_MAX_CANDIDATES = 256
_MAX_ROWS = 64  # more rows (full-sequence logits) are a compute-bound product: float32 as it is
_MIN_VOCABULARY = 4096  # below this the head is too small for its read to matter


class HalfReadHead(nn.Module):
    """A bias-free float32 linear output head whose product is read in float16 (see the module)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight  # the float32 weights themselves (tied to the embeddings, if they were)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("half_weight", weight.detach().to(torch.float16), persistent=False)
        norms = weight.detach().norm(dim=-1)
        # The bound, slack_j = R |h| |w_j| + A (|h| + |w_j|), is |h| * scale_j + offset_j.
        self.register_buffer("slack_scale", _RELATIVE_BOUND * norms + _ABSOLUTE_BOUND, persistent=False)
        self.register_buffer("slack_offset", _ABSOLUTE_BOUND * norms, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, self.in_features)
        logits = self._half_read(rows) if rows.shape[0] <= _MAX_ROWS else None
        if logits is None:
            logits = F.linear(rows, self.weight)
        return logits.reshape(*hidden.shape[:-1], self.out_features)

    def _half_read(self, rows: torch.Tensor) -> torch.Tensor | None:
        if rows.dtype != torch.float32 or not bool(rows.abs().amax() < 6e4):  # float16 holds up to 65,504
            return None
        approx = F.linear(rows.to(torch.float16), self.half_weight).float()
        slack = torch.addcmul(self.slack_offset, rows.norm(dim=-1, keepdim=True), self.slack_scale)
        floor = (approx - slack).amax(dim=-1, keepdim=True)
        candidates = ((approx + slack) >= floor).any(dim=0).nonzero().squeeze(1)
        if not bool(torch.isfinite(floor).all()) or candidates.numel() > _MAX_CANDIDATES:
            return None
        approx[:, candidates] = exact_logits(rows, self.weight.index_select(0, candidates))
        return approx

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, read=float16"


def exact_logits(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[rows, tokens] float32 dot products, each reduced in one fixed order (a matrix product's
    order depends on its shape)."""
    return (rows[:, None, :] * weights[None]).sum(dim=-1)


def use_half_read_head(model: Any) -> bool:
    """Install a ``HalfReadHead`` as ``model``'s output head where it is safe and pays; returns whether it did.

    Safe: a bias-free float32 ``nn.Linear`` head on the CPU whose float16 product keeps
    within the bound on a sample of its own rows. Pays: a vocabulary of thousands.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None or head.weight.dtype != torch.float32:
        return False
    if head.weight.device.type != "cpu" or head.out_features < _MIN_VOCABULARY:
        return False
    replacement = HalfReadHead(head.weight)
    if not _keeps_bound(replacement):
        return False
    model.set_output_embeddings(replacement)
    return True


def _keeps_bound(head: HalfReadHead, samples: int = 8) -> bool:
    """Whether the float16 product stays within a quarter of the bound on rows of the head itself."""
    with torch.no_grad():
        step = max(1, head.out_features // samples)
        rows = head.weight[::step][:samples].detach() * 8.0  # hidden states are larger than weight rows
        approx = F.linear(rows.to(torch.float16), head.half_weight).float()
        exact = F.linear(rows, head.weight)
        bound = rows.norm(dim=-1, keepdim=True) * head.weight.norm(dim=-1)
        return bool(((approx - exact).abs() <= 0.25 * _RELATIVE_BOUND * bound + _ABSOLUTE_BOUND).all())
