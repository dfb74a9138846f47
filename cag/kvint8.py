"""The int8 KV codec, as KIVI quantizes (Liu et al., 2024): keys per channel over groups
of tokens, values per token, asymmetric, ``x ~= q * scale + zero``.

Keys have outlier *channels*, so each channel gets its own range, taken over a group of
``INT8_KEY_GROUP_TOKENS`` tokens; values are quantized per token over each head's
channels. The file format (``kvcache``) stores what ``quantize_layer`` returns.
"""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["INT8_KEY_GROUP_TOKENS", "quantize_layer", "dequantize_layer"]

# Tokens per key quantization group: smaller groups follow the keys more closely and
# cost more scale bytes (8 bytes per channel per group). Must divide the file's CRC block.
INT8_KEY_GROUP_TOKENS = 64


def quantize_layer(keys: torch.Tensor, values: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """A layer's int8 codes and their float32 scales and zeros, by the names the file stores them under."""
    kq, ks, kz = _quantize_keys(keys, group)
    vq, vs, vz = _quantize_values(values)
    return {"keys": kq, "keys_scale": ks, "keys_zero": kz, "values": vq, "values_scale": vs, "values_zero": vz}


def _quantize_keys(keys: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel over groups of ``group`` tokens; a short last group is padded with its own last token."""
    x = keys.float().contiguous()
    b, h, t, d = x.shape
    groups = -(-t // group)
    pad = groups * group - t
    if pad:
        x = torch.cat([x, x[:, :, -1:].expand(b, h, pad, d)], dim=2)
    g = x.view(b, h, groups, group, d)
    scale, zero = _scale_zero(g.amin(dim=3), g.amax(dim=3))
    q = _codes(g, scale.unsqueeze(3), zero.unsqueeze(3)).view(b, h, groups * group, d)[:, :, :t]
    return q, scale, zero


def _quantize_values(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token (over the channels of each head)."""
    x = values.float()
    scale, zero = _scale_zero(x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True))
    return _codes(x, scale, zero), scale, zero


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map [lo, hi] onto the 256 codes -128..127; a constant range gets scale 1 (its code is exact)."""
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("the cache holds non-finite values (inf or nan): it cannot be quantized to int8")
    scale = (hi - lo) / 255
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, lo + 128 * scale


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.round((x - zero) / scale).clamp_(-128, 127).to(torch.int8)


def dequantize_layer(stored: Mapping[str, torch.Tensor], n: int, group: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """De-quantize the first ``n`` tokens of a layer's stored tensors (``quantize_layer``'s names) into ``keys`` and ``values``.

    The codes are widened by a plain copy, then scaled and shifted in place: mixed
    int8-float arithmetic in one op takes torch's slow path (~10x slower here).
    """
    device = keys.device
    get = lambda name, rows: stored[name][:, :, :rows].to(device)  # noqa: E731
    groups = -(-n // group)
    kq, ks, kz = get("keys", n), get("keys_scale", groups), get("keys_zero", groups)
    vq, vs, vz = get("values", n), get("values_scale", n), get("values_zero", n)
    b, h, _, d = kq.shape
    full = n // group
    for dest, codes, scale, zero in _scaled_pieces(keys, kq, ks, kz, full, group, n, (b, h, d)) + [(values, vq, vs, vz)]:
        work = dest if dest.dtype == torch.float32 else torch.empty(dest.shape, dtype=torch.float32, device=device)
        work.copy_(codes)
        work.mul_(scale).add_(zero)
        if work is not dest:
            dest.copy_(work)


def _scaled_pieces(keys, kq, ks, kz, full: int, group: int, n: int, bhd: tuple[int, int, int]) -> list:
    """Key pieces whose rows share a scale row: whole groups (viewed 5-D) and a short last group."""
    b, h, d = bhd
    pieces = []
    if full:
        rows, grouped = full * group, (b, h, full, group, d)
        pieces.append((keys[:, :, :rows].view(grouped), kq[:, :, :rows].view(grouped), ks[:, :, :full, None], kz[:, :, :full, None]))
    if n > full * group:
        tail = slice(full * group, n)
        pieces.append((keys[:, :, tail], kq[:, :, tail], ks[:, :, full : full + 1], kz[:, :, full : full + 1]))
    return pieces
