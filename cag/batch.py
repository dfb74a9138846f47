"""Decode many sequences against one shared, read-only context cache.

A knowledge base's context cache is the same for every question. Appending each
question to it (transformers' ``DynamicCache`` concatenates the whole cache on every
step) costs a copy of the context per generated token, and batching questions the
usual way needs the context repeated once per row. Here the context is never written:

* ``SharedPrefixCache`` keeps the context's keys and values as they are (batch 1) and
  writes each row's question and answer tokens into a small preallocated suffix
  buffer, so a step copies only its own new keys and values;
* ``shared_prefix_attention`` (registered with transformers' ``AttentionInterface``)
  attends every row's queries to the shared context in one matrix product, folding the
  batch and the query heads of a key/value group into rows, so the context's keys and
  values are read once per step however many questions run, then attends each row to
  its own suffix under a padding and causal mask, and merges the two softmaxes by
  their log-sum-exp;
* ``SharedPrefixBatch`` does the bookkeeping: left padding, position ids, masks, and
  dropping rows that have finished.

Models whose attention this does not cover (sliding windows, soft-capping, attention
sinks, no attention-backend support) are detected, and callers fall back to the plain
``DynamicCache`` loop.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .model import LoadedModel

__all__ = [
    "ATTENTION_NAME",
    "SharedPrefixBatch",
    "SharedPrefixCache",
    "UnsupportedAttention",
    "shared_prefix_attention",
    "supports_shared_prefix",
]

ATTENTION_NAME = "cag_shared_prefix"
_STATE_KWARG = "cag_shared_prefix"
# Scores above this many elements are computed in slices of query rows, bounding memory
# when a long prompt meets a long context (2**25 floats are 128 MB).
_MAX_SCORE_ELEMENTS = 1 << 25


class UnsupportedAttention(RuntimeError):
    """The model's attention needs something the shared-prefix attention does not do."""


# ------------------------------------------------------------------------ cache


class _SuffixLayer(DynamicLayer):
    """One layer: the shared prefix (read-only) and each row's own tokens in a preallocated buffer."""

    is_croppable = False

    def __init__(self, prefix_keys: torch.Tensor | None, prefix_values: torch.Tensor | None, capacity: int) -> None:
        super().__init__()
        self.prefix_keys = prefix_keys
        self.prefix_values = prefix_values
        self.prefix_length = 0 if prefix_keys is None else int(prefix_keys.shape[-2])
        self.length = 0
        self._capacity = max(1, capacity)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, key_dim = key_states.shape
        self._key_buffer = key_states.new_empty((batch, heads, self._capacity, key_dim))
        self._value_buffer = value_states.new_empty((batch, heads, self._capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._key_buffer.shape[-2]:
            self._grow(end)
        self._key_buffer[:, :, self.length : end] = key_states
        self._value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self._key_buffer.shape[-2])
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], capacity, old.shape[-1]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def keep_rows(self, rows: torch.Tensor) -> None:
        if self.is_initialized:
            self._key_buffer = self._key_buffer.index_select(0, rows)
            self._value_buffer = self._value_buffer.index_select(0, rows)
            self.keys = self._key_buffer[:, :, : self.length]
            self.values = self._value_buffer[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.prefix_length + self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a shared-prefix cache is not cropped: start a new one")


class SharedPrefixCache(DynamicCache):
    """A ``DynamicCache`` for ``batch`` rows that all continue ``prefix``, which is never modified.

    ``get_seq_length()`` counts the prefix and the rows' suffix (padding included), as
    transformers expects; the keys and values returned to attention are the suffix only,
    and ``shared_prefix_attention`` adds the prefix.
    """

    def __init__(self, prefix: DynamicCache, num_layers: int, capacity: int) -> None:
        layers = []
        for i in range(num_layers):
            keys, values = _prefix_tensors(prefix, i)
            layers.append(_SuffixLayer(keys, values, capacity))
        super().__init__()
        self.layers = layers
        self.layer_class_to_replicate = None
        self.prefix_length = prefix.get_seq_length() if len(prefix.layers) else 0

    @property
    def suffix_length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop the other rows (finished sequences) from every layer."""
        for layer in self.layers:
            layer.keep_rows(rows)


def _prefix_tensors(prefix: DynamicCache, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if index >= len(prefix.layers):
        return None, None
    layer = prefix.layers[index]
    if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
        return None, None
    return layer.keys, layer.values


# -------------------------------------------------------------------- attention


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over a shared prefix plus each row's suffix (an ``AttentionInterface`` function).

    ``key``/``value`` are the rows' suffix ``[B, kv_heads, S, dim]``; ``attention_mask`` is
    ``[B, 1, L, S]`` booleans over the suffix (True attends), or None when every suffix
    key is visible (one query token per row, no padding). Every query sees the whole
    prefix. Called without the cache keyword (another caller of the same model), it is
    plain SDPA.
    """
    cache = kwargs.pop(_STATE_KWARG, None)
    if cache is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    for unsupported in ("sliding_window", "softcap", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise UnsupportedAttention(f"the model's attention uses {unsupported}")
    layer = cache.layers[module.layer_idx]
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads:
        raise UnsupportedAttention(f"{heads} query heads do not group over {kv_heads} key/value heads")
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    # Query head h reads key/value head h // group: fold each group's heads and tokens into rows.
    q = (query * scale).reshape(batch, kv_heads, group * q_len, dim)

    out, top, total = _suffix_part(q, key, value, attention_mask, group)
    if layer.prefix_keys is not None:
        rows = q.transpose(0, 1).reshape(kv_heads, batch * group * q_len, dim)
        p_out, p_top, p_total = _prefix_part(rows, layer.prefix_keys, layer.prefix_values)
        p_out, p_top, p_total = (t.reshape(kv_heads, batch, group * q_len, -1).transpose(0, 1) for t in (p_out, p_top, p_total))
        top_all = torch.maximum(top, p_top)
        w_suffix = (top - top_all).exp_()
        w_prefix = (p_top - top_all).exp_()
        out = (out * w_suffix + p_out * w_prefix) / (total * w_suffix + p_total * w_prefix)
    else:
        out = out / total
    out = out.reshape(batch, kv_heads, group, q_len, -1).reshape(batch, heads, q_len, -1)
    return out.transpose(1, 2).contiguous().to(query.dtype), None


def _softmax_parts(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised softmax(scores) @ values, with the row maxima and sums that normalise and merge it."""
    top = scores.amax(-1, keepdim=True)
    weights = scores.sub_(top).exp_()
    total = weights.sum(-1, keepdim=True)
    return torch.matmul(weights.to(values.dtype), values).to(top.dtype), top, total


def _suffix_part(q, key, value, mask, group):
    scores = torch.matmul(q, key.transpose(-1, -2).to(q.dtype)).float()
    if mask is not None:
        batch, _, q_len, s_len = mask.shape
        rows = mask[:, :, None].expand(batch, 1, group, q_len, s_len).reshape(batch, 1, group * q_len, s_len)
        scores.masked_fill_(~rows, float("-inf"))
    return _softmax_parts(scores, value)


def _prefix_part(rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    """``rows`` [kv_heads, R, dim] against the prefix [1, kv_heads, N, dim], in slices of rows if large."""
    keys_t, values = keys[0].transpose(-1, -2), values[0]
    if rows.dtype != keys.dtype:
        rows = rows.to(keys.dtype)  # a reduced-precision prefix is read as it is, never converted whole
    heads, count, _ = rows.shape
    step = max(1, _MAX_SCORE_ELEMENTS // max(1, heads * keys.shape[-2]))
    parts = [_softmax_parts(torch.matmul(rows[:, i : i + step], keys_t).float(), values) for i in range(0, count, step)]
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(items, dim=1) for items in zip(*parts))


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)


_register()


@contextlib.contextmanager
def _attention_swapped(model) -> Iterator[None]:
    """Route the model's attention through ``shared_prefix_attention`` for the calls inside."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before


# --------------------------------------------------------------------- support


def supports_shared_prefix(lm: LoadedModel, cache: DynamicCache) -> bool:
    """Whether ``lm`` can decode on top of ``cache`` with the shared-prefix attention."""
    model = lm.model
    if not getattr(type(model), "_supports_attention_backend", False):
        return False
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return False
    if layer_types is None and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            return False
        if layer.is_initialized and layer.keys is not None and layer.keys.numel() and layer.keys.shape[0] != 1:
            return False
    return True


# ----------------------------------------------------------------------- batch


class SharedPrefixBatch:
    """Rows of token ids that continue one context cache, fed through the model together.

    Prompts are left-padded to a common length, so every row's next token lands in the
    same suffix column; padding is masked out, and each row's positions count from the
    end of the context as if the row ran alone.
    """

    def __init__(self, lm: LoadedModel, prefix: DynamicCache, batch: int, capacity: int) -> None:
        self.lm = lm
        self.cache = SharedPrefixCache(prefix, lm.num_layers, capacity)
        self.prefix_length = self.cache.prefix_length
        self.device = lm.device
        self.rows = batch
        self._pad = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._valid = torch.zeros((batch, 0), dtype=torch.bool, device=self.device)
        self._pad_id = _pad_token_id(lm)

    def prefill(self, prompts: Sequence[Sequence[int]], chunk_size: int) -> torch.Tensor:
        """Feed each row its prompt (all rows at once, in chunks); returns the last logits, [rows, vocab]."""
        if len(prompts) != self.rows or any(len(p) == 0 for p in prompts):
            raise ValueError("one non-empty prompt per row is needed")
        width = max(len(p) for p in prompts)
        pad = [width - len(p) for p in prompts]
        ids = torch.tensor([[self._pad_id] * n + list(p) for n, p in zip(pad, prompts)], dtype=torch.long, device=self.device)
        self._pad = torch.tensor(pad, dtype=torch.long, device=self.device)
        self._valid = torch.arange(width, device=self.device)[None, :] >= self._pad[:, None]
        logits = None
        for begin in range(0, width, max(1, chunk_size)):
            logits = self._forward(ids[:, begin : begin + chunk_size])
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([rows]); returns the next logits, [rows, vocab]."""
        self._valid = torch.cat([self._valid, torch.ones((self.rows, 1), dtype=torch.bool, device=self.device)], dim=1)
        return self._forward(tokens.reshape(self.rows, 1))

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only these rows (by current index), e.g. when the others have finished."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        self.cache.keep_rows(index)
        self._pad = self._pad.index_select(0, index)
        self._valid = self._valid.index_select(0, index)
        self.rows = len(rows)

    def suffix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row 0's own keys and values of ``layer`` (what it appended to the prefix)."""
        cached = self.cache.layers[layer]
        start = int(self._pad[0])
        return cached.keys[:1, :, start:], cached.values[:1, :, start:]

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        start = self.cache.suffix_length
        q_len = ids.shape[1]
        columns = torch.arange(start, start + q_len, device=self.device)
        positions = self.prefix_length + (columns[None, :] - self._pad[:, None]).clamp_(min=0)
        mask = None
        if q_len > 1 or bool((self._pad > 0).any()):
            mask = self._mask(columns)
        with _attention_swapped(self.lm.model):
            out = self.lm.model(
                input_ids=ids,
                position_ids=positions,
                attention_mask=mask,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
                **{_STATE_KWARG: self.cache},
            )
        return out.logits[:, -1].float()

    def _mask(self, columns: torch.Tensor) -> torch.Tensor:
        """[rows, 1, q_len, suffix]: valid keys up to each query's column; a padding query sees itself."""
        end = int(columns[-1]) + 1
        keys = torch.arange(end, device=self.device)
        causal = keys[None, :] <= columns[:, None]
        own = keys[None, :] == columns[:, None]  # keeps padding rows finite: no row is fully masked
        mask = (self._valid[:, None, :end] & causal[None]) | own[None]
        return mask[:, None]


def _pad_token_id(lm: LoadedModel) -> int:
    pad = getattr(lm.tokenizer, "pad_token_id", None)
    if pad is None:
        pad = lm.eos_token_ids[0] if lm.eos_token_ids else 0
    return int(pad)
