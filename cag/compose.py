"""Compose stored passage caches behind the instruction prefix, without a prefill.

Each passage of a collection (``cag.passages``) was prefilled once, on its own, right
after the instruction prefix: its keys carry the rotary position embedding (RoPE) of
the positions it then had. At question time the chosen passages are placed one after
another behind the prefix, so every passage but the first moves to later positions.
RoPE is a rotation whose angle is linear in the position, so a key at position ``p``
moved by ``d`` is the stored key rotated by ``d``: ``R(p + d) k = R(d) R(p) k``. Values
carry no position and are used as stored.

What composition cannot restore is attention *across* passages: a stored passage saw
only the prefix and itself. ``recompute=R`` re-runs the first ``R`` tokens of each
passage with everything before it in view (EPIC, arXiv 2410.15332, recomputes the
first tokens of each chunk); with every token recomputed the result is a full prefill
of the composed text, which the tests hold to.

Exactness of the rotation is checked, not assumed:

* the model must have one rotary embedding module (an ``inv_freq`` buffer) and its
  modeling module's ``apply_rotary_pos_emb``; absolute, learned or ALiBi positions are
  refused, as are per-layer rotary embeddings;
* the RoPE type must keep its frequencies fixed: ``default``, ``linear``, ``llama3`` and
  ``yarn``. ``dynamic`` and ``longrope`` recompute ``inv_freq`` from the sequence length,
  so a key stored at one length is not a rotation of the key the model computes at
  another, and they are refused. ``yarn`` (and any type) multiplies cos and sin by a
  constant ``attention_scaling``: stored keys are ``s R(p) k``, so rotating them by the
  *unscaled* ``R(d)`` gives ``s R(p + d) k``, exactly what a fresh prefill writes;
  rotating by the module's scaled cos and sin would scale them twice;
* partial rotary (phi, gpt_neox: the first ``rotary_dim`` dims) and interleaved layouts
  (cohere) are whatever the model's own rotary module and ``apply_rotary_pos_emb`` do;
* once per model, one token is run at two positions: with nothing else in the context
  every layer's pre-rotary key is independent of the position, so each layer's key at
  ``p + d`` must be its key at ``p`` rotated by ``d``. A layer without RoPE (NoPE) or
  any rotation this code does not reproduce fails the check, and the model is refused.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache

from .errors import CompositionError
from .kvcache import cache_from_layers
from .model import LoadedModel, forward
from .prefill import DEFAULT_CHUNK_SIZE, prefill

__all__ = ["EXACT_ROPE_TYPES", "Composition", "Rotary", "Segment", "compose", "rotary_of"]

EXACT_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_LENGTH_DEPENDENT = ("dynamic", "longrope")
_CHECK_POSITION, _CHECK_SHIFT = 5, 37

_rotaries: "weakref.WeakKeyDictionary[Any, Rotary]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Rotary:
    """A model's rotary embedding, used to move stored keys by a position difference."""

    module: torch.nn.Module
    apply: Callable
    scaling: float  # attention_scaling: the constant the module multiplies cos and sin by
    rope_type: str

    def rotate(self, keys: torch.Tensor, shift: int) -> torch.Tensor:
        """``keys`` ``[batch, heads, tokens, dim]`` moved ``shift`` positions later (any dtype; computed in float32)."""
        if shift == 0:
            return keys
        dummy = torch.empty(1, dtype=torch.float32, device=keys.device)
        position = torch.tensor([[shift]], dtype=torch.long, device=keys.device)
        cos, sin = self.module(dummy, position)
        cos, sin = cos.float() / self.scaling, sin.float() / self.scaling  # the rotation alone, unscaled
        width = cos.shape[-1]  # the rotary dims: the first `width` of each head (partial rotary)
        k = keys.float()
        rotated = self.apply(k[..., :width], k[..., :width], cos, sin)[1]
        if width < k.shape[-1]:
            rotated = torch.cat([rotated, k[..., width:]], dim=-1)
        return rotated.to(keys.dtype)


def rotary_of(lm: LoadedModel) -> Rotary:
    """The model's rotary embedding, checked to re-rotate stored keys exactly; CompositionError if not."""
    rotary = _rotaries.get(lm.model)
    if rotary is None:
        rotary = _find_rotary(lm)
        _check_rotation(lm, rotary)
        _rotaries[lm.model] = rotary
    return rotary


def _family(lm: LoadedModel) -> str:
    return str(getattr(lm.model.config, "model_type", None) or type(lm.model).__name__)


def _find_rotary(lm: LoadedModel) -> Rotary:
    family = _family(lm)
    found = [m for m in lm.model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if not found:
        raise CompositionError(
            f"model {lm.name!r} ({family}) has no rotary position embedding (its positions are absolute, learned or "
            "ALiBi), so stored passages cannot be moved to new positions: use a RoPE model (Llama, Qwen, Mistral, Phi, "
            "GPT-NeoX...) or `cag build` without --passages"
        )
    module = found[0]
    if any(type(m) is not type(module) or not torch.equal(m.inv_freq, module.inv_freq) for m in found[1:]):
        raise CompositionError(f"model {lm.name!r} ({family}) has rotary embeddings that differ by layer; composing "
                               "passages supports one rotary embedding for all layers: use `cag build` without --passages")
    rope_type = getattr(module, "rope_type", "default")
    parameters = inspect.signature(module.forward).parameters
    layer_type = parameters.get("layer_type")
    if not isinstance(rope_type, str) or (layer_type is not None and layer_type.default is inspect.Parameter.empty):
        raise CompositionError(f"model {lm.name!r} ({family}) uses a rotary embedding per layer type; composing "
                               "passages supports one rotary embedding for all layers: use `cag build` without --passages")
    if rope_type not in EXACT_ROPE_TYPES:
        why = ("its frequencies are recomputed from the sequence length, so a key stored at one length is not a "
               "rotation of the key computed at another") if any(t in rope_type for t in _LENGTH_DEPENDENT) else \
              "it is not one whose re-rotation by a position difference is known to be exact"
        raise CompositionError(
            f"model {lm.name!r} ({family}) uses RoPE type {rope_type!r}: {why}. Composing passages supports "
            f"{', '.join(EXACT_ROPE_TYPES)}: use `cag build` without --passages"
        )
    apply = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    scaling = float(getattr(module, "attention_scaling", 1.0) or 0.0)
    if not callable(apply) or not math.isfinite(scaling) or scaling == 0:
        raise CompositionError(f"model {lm.name!r} ({family}): its modeling code has no apply_rotary_pos_emb (or a "
                               "rotary scaling of 0), so keys cannot be re-rotated: use `cag build` without --passages")
    return Rotary(module=module, apply=apply, scaling=scaling, rope_type=rope_type)


@torch.inference_mode()
def _check_rotation(lm: LoadedModel, rotary: Rotary) -> None:
    """One token at two positions: every layer's later key must be its earlier key rotated by the shift."""
    token = lm.eos_token_ids[0] if lm.eos_token_ids else 0
    keys = []
    try:
        for position in (_CHECK_POSITION, _CHECK_POSITION + _CHECK_SHIFT):
            cache = DynamicCache()
            forward(lm.model, cache, input_ids=torch.tensor([[token]], device=lm.device),
                    position_ids=torch.tensor([[position]], device=lm.device))
            keys.append([layer.keys.float() for layer in cache.layers])
    except Exception as exc:  # a model whose forward rejects plain position ids
        raise CompositionError(f"model {lm.name!r} ({_family(lm)}) cannot be checked for re-rotation ({exc}): "
                               "use `cag build` without --passages") from exc
    tolerance = max(1e-4, 4 * torch.finfo(lm.dtype).eps)  # float32: 1e-4; bfloat16: 0.03 (a wrong rotation is ~1)
    for index, (before, after) in enumerate(zip(*keys)):
        error = float((rotary.rotate(before, _CHECK_SHIFT) - after).abs().max())
        if error > tolerance * max(1.0, float(after.abs().max())):
            raise CompositionError(
                f"model {lm.name!r} ({_family(lm)}): layer {index}'s keys do not move with the position as its rotary "
                f"embedding rotates them (error {error:.2g}: a layer without RoPE, or a rotation this version does not "
                "reproduce), so stored passages cannot be moved exactly: use `cag build` without --passages"
            )


@dataclass
class Segment:
    """One stored passage to place: its cache (its tokens only), token ids, and where it was prefilled."""

    cache: DynamicCache
    token_ids: list[int]
    stored_at: int  # the position its first token had when it was prefilled


@dataclass
class Composition:
    cache: DynamicCache  # prefix + passages, in the model's positions for this order
    token_ids: list[int]
    starts: list[int]  # each passage's first position
    recomputed: int  # tokens run through the model again
    seconds: float


@torch.inference_mode()
def compose(
    lm: LoadedModel,
    prefix: DynamicCache,
    prefix_ids: Sequence[int],
    segments: Sequence[Segment],
    *,
    recompute: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Composition:
    """The prefix followed by ``segments`` in order, keys re-rotated to their new positions.

    ``recompute`` re-runs the first ``recompute`` tokens of each passage with the prefix
    and every earlier passage in view (their stored keys and values are replaced); with
    ``recompute`` at least each passage's length this is a full prefill of the composed
    tokens. ``prefix`` and the segments' caches are read, never modified.
    """
    if recompute < 0:
        raise CompositionError(f"recompute must be 0 or more tokens, got {recompute}")
    start = time.perf_counter()
    rotary = rotary_of(lm)
    keys = [[layer.keys] for layer in prefix.layers]
    values = [[layer.values] for layer in prefix.layers]
    ids, starts, recomputed = list(prefix_ids), [], 0
    position = len(ids)
    if prefix.get_seq_length() != position:
        raise CompositionError(f"the prefix cache holds {prefix.get_seq_length()} tokens, its ids {position}")
    for segment in segments:
        n = len(segment.token_ids)
        if segment.cache.get_seq_length() != n or len(segment.cache.layers) != len(keys):
            raise CompositionError(f"a passage cache holds {segment.cache.get_seq_length()} tokens in "
                                   f"{len(segment.cache.layers)} layers; its ids say {n} tokens, the model {len(keys)} layers")
        ahead = min(recompute, n)
        if ahead:
            cache = cache_from_layers([(torch.cat(k, dim=-2), torch.cat(v, dim=-2)) for k, v in zip(keys, values)])
            prefill(lm, segment.token_ids[:ahead], cache, chunk_size=chunk_size)  # positions follow the cache's length
            keys = [[layer.keys] for layer in cache.layers]
            values = [[layer.values] for layer in cache.layers]
            recomputed += ahead
        if ahead < n:
            shift = position - segment.stored_at
            for i, layer in enumerate(segment.cache.layers):
                keys[i].append(rotary.rotate(layer.keys[:, :, ahead:n], shift).to(lm.dtype))
                values[i].append(layer.values[:, :, ahead:n].to(lm.dtype))
        starts.append(position)
        position += n
        ids += segment.token_ids
    cache = cache_from_layers([(torch.cat(k, dim=-2), torch.cat(v, dim=-2)) for k, v in zip(keys, values)])
    return Composition(cache=cache, token_ids=ids, starts=starts, recomputed=recomputed,
                       seconds=time.perf_counter() - start)
