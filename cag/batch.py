"""Decode many sequences against one shared, read-only context cache.

A knowledge base's context cache is the same for every question. Appending each
question to it (transformers' ``DynamicCache`` concatenates the whole cache on every
step) costs a copy of the context per generated token, and batching questions the
usual way needs the context repeated once per row. Here the context is never written:

* ``SharedPrefixCache`` keeps the context's keys and values as they are (batch 1, any
  dtype: a bfloat16 context is read as bfloat16, never converted whole) and
  writes each row's question and answer tokens into a small preallocated suffix
  buffer, so a step copies only its own new keys and values;
* ``shared_prefix_attention`` (registered with transformers' ``AttentionInterface``)
  attends every row's queries to the shared context in one matrix product, folding the
  batch and the query heads of a key/value group into rows, so the context's keys and
  values are read once per step however many questions run, scores each row against
  its own suffix under a padding and causal mask, and takes one softmax over both;
* ``SharedPrefixBatch`` does the bookkeeping: left padding, position ids, masks, and
  dropping rows that have finished.

Models whose attention this does not cover (sliding windows, soft-capping, attention
sinks, no attention-backend support) are detected, and callers fall back to the plain
``DynamicCache`` loop.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from . import cpu_kernels
from .llama_step import llama_step
from .model import LoadedModel, forward

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
# Scores above this many elements are computed in slices of query rows. Besides bounding
# memory when a long prompt meets a long context, slices that stay in the CPU's caches
# (2**22 floats are 16 MB) made a batch of 8 questions' prefill at a 4k context 1.7x faster.
_MAX_SCORE_ELEMENTS = 1 << 22


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
        key_buffer, value_buffer, start = self.open_columns(key_states.shape[-2])
        key_buffer[:, :, start : self.length] = key_states
        value_buffer[:, :, start : self.length] = value_states
        return self.keys, self.values

    def open_columns(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for ``tokens`` more columns of an initialised layer, counted in at once: the key and
        value buffers and the first new column, for the caller to fill (a compiled step writes them
        in place)."""
        end = self.length + tokens
        if end > self._key_buffer.shape[-2]:
            self._grow(end)
        start, self.length = self.length, end
        self._publish()
        return self._key_buffer, self._value_buffer, start

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
            self._publish()

    def drop_leading(self, columns: int) -> None:
        """Forget the first ``columns`` suffix columns (padding in every row by then): a view, no copy."""
        if self.is_initialized and columns > 0:
            self._key_buffer = self._key_buffer[:, :, columns:]
            self._value_buffer = self._value_buffer[:, :, columns:]
            self.length -= columns
            self._publish()

    def join(self, other: "_SuffixLayer", shift_mine: int, shift_theirs: int, capacity: int) -> None:
        """Append ``other``'s rows, both moved right by their shift so every row ends in the same column.

        The columns a shift opens are zeros, not uninitialised memory: they are masked out,
        but a masked weight of 0 times a NaN left in memory would still be NaN.
        """
        width = self.length + shift_mine
        mine = self._key_buffer.shape[0] if self.is_initialized else 0
        if not self.is_initialized:
            self.dtype, self.device = other.dtype, other.device
        for name in ("_key_buffer", "_value_buffer"):
            theirs = getattr(other, name)
            rows, heads, _, dim = theirs.shape
            joined = theirs.new_zeros((mine + rows, heads, max(capacity, width), dim))
            if mine:
                joined[:mine, :, shift_mine:width] = getattr(self, name)[:, :, : self.length]
            joined[mine:, :, shift_theirs:width] = theirs[:, :, : other.length]
            setattr(self, name, joined)
        self.length = width
        self.is_initialized = True
        self._publish()

    def _publish(self) -> None:
        self.keys = self._key_buffer[:, :, : self.length]
        self.values = self._value_buffer[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.prefix_length + self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a shared-prefix cache is not cropped: start a new one")


class SharedPrefixCache(DynamicCache):
    """A ``DynamicCache`` for rows that all continue ``prefix``, which is never modified.

    ``get_seq_length()`` counts the prefix and the rows' suffix (padding included), as
    transformers expects; the keys and values returned to attention are the suffix only,
    and ``shared_prefix_attention`` adds the prefix.
    """

    def __init__(self, prefix: DynamicCache, num_layers: int, capacity: int) -> None:
        layers = []
        for i in range(num_layers):
            keys, values = prefix_tensors(prefix, i)
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


def prefix_tensors(prefix: DynamicCache, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Layer ``index``'s keys and values in a prefix cache; None past its last layer."""
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
    mask = _suffix_mask(attention_mask, key.shape[-2])
    scale = scaling if scaling is not None else dim**-0.5
    if layer.prefix_keys is not None and cpu_kernels.usable(query, key, value, layer.prefix_keys, layer.prefix_values):
        return _attend_kernels(query, key, value, mask, layer.prefix_keys[0], layer.prefix_values[0], scale), None
    # Bound the scores' memory when a long prompt meets a long context: slices of query tokens.
    width = layer.prefix_length + key.shape[-2]
    step = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * heads * width))
    parts = [
        _attend(query[:, :, i : i + step], key, value, None if mask is None else mask[:, :, i : i + step],
                layer.prefix_keys, layer.prefix_values, scale)
        for i in range(0, q_len, step)
    ]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return out.to(query.dtype), None


def _suffix_mask(mask: torch.Tensor | None, suffix: int) -> torch.Tensor | None:
    """The mask as [B, 1, L, suffix] booleans (True attends)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:  # an additive mask: 0 where attending
        mask = mask == 0
    return mask[..., -suffix:]  # a mask over prefix and suffix (another caller's): the suffix's columns


def _attend(query, key, value, mask, prefix_keys, prefix_values, scale) -> torch.Tensor:
    """softmax over [prefix scores | suffix scores] in one pass; returns [B, L, heads, dim].

    Query head h reads key/value head h // group, so each group's heads and tokens are
    folded into rows: [B, kv_heads, group * L, dim]. For the prefix, the batch is folded
    in too, so one matrix product per key/value head reads the prefix once for all rows.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group, rows = heads // kv_heads, heads // kv_heads * q_len
    q = (query * scale).reshape(batch, kv_heads, rows, dim)
    scores = torch.matmul(q, key.transpose(-1, -2).to(q.dtype))
    if mask is not None:
        _, _, m_len, s_len = mask.shape
        folded = mask[:, :, None].expand(mask.shape[0], 1, group, m_len, s_len).reshape(mask.shape[0], 1, rows, s_len)
        scores.masked_fill_(~folded, float("-inf"))
    if prefix_keys is None:
        out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(value.dtype), value)
    else:
        n = prefix_keys.shape[-2]
        # A reduced-precision prefix (bfloat16) is read as it is, never converted whole.
        flat = q.transpose(0, 1).reshape(kv_heads, batch * rows, dim).to(prefix_keys.dtype)
        prefix_scores = torch.matmul(flat, prefix_keys[0].transpose(-1, -2))
        prefix_scores = prefix_scores.view(kv_heads, batch, rows, n).transpose(0, 1)
        weights = torch.softmax(torch.cat([prefix_scores.float(), scores.float()], dim=-1), dim=-1)
        out = torch.matmul(weights[..., n:].to(value.dtype), value)
        prefix_weights = weights[..., :n].transpose(0, 1).reshape(kv_heads, batch * rows, n).to(prefix_values.dtype)
        out += torch.matmul(prefix_weights, prefix_values[0]).view(kv_heads, batch, rows, -1).transpose(0, 1).to(out.dtype)
    out = out.reshape(batch, kv_heads, group, q_len, -1).reshape(batch, heads, q_len, -1)
    return out.transpose(1, 2).contiguous()


def _attend_kernels(query, key, value, mask, prefix_keys, prefix_values, scale) -> torch.Tensor:
    """``_attend`` in one call of ``cpu_kernels.attend``: scores, softmax and weighted values of each
    tile of rows stay in that tile's own buffer. Returns [B, L, heads, dim]."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = (query * scale).reshape(batch, kv_heads, group * q_len, dim).transpose(0, 1).reshape(kv_heads, -1, dim)
    if mask is not None:
        mask = mask[:, 0].expand(batch, q_len, mask.shape[-1])
        mask = mask if mask.stride(-1) == 1 else mask.contiguous()
    return cpu_kernels.rows_to_tokens(cpu_kernels.attend(q, prefix_keys, prefix_values, key, value, mask, q_len), batch, q_len)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
    # Other callers of a model while it is swapped over build their masks as for SDPA,
    # which is what the attention does for them.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


_register()

_swap_lock = threading.Lock()
_swapped: dict[int, tuple[str | None, int]] = {}  # id(config) -> (implementation before, calls inside)


@contextlib.contextmanager
def _attention_swapped(model) -> Iterator[None]:
    """Route the model's attention through ``shared_prefix_attention`` for the calls inside.

    Counted per config, so overlapping calls from several threads restore the original
    implementation only when the last one leaves.
    """
    config = model.config
    with _swap_lock:
        before, depth = _swapped.get(id(config), (config._attn_implementation, 0))
        _swapped[id(config)] = (before, depth + 1)
        config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        with _swap_lock:
            before, depth = _swapped.pop(id(config))
            if depth > 1:
                _swapped[id(config)] = (before, depth - 1)
            else:
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
        self._prefix = prefix

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
        """Keep only these rows (by current index), e.g. when the others have finished or their client left.

        Columns that are padding in every row left are dropped, so a batch that rows keep
        joining and leaving is as wide as its longest row, not as old as the batch.
        """
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        self.cache.keep_rows(index)
        self._pad = self._pad.index_select(0, index)
        self._valid = self._valid.index_select(0, index)
        self.rows = len(rows)
        unused = int(self._pad.min()) if self.rows else self.cache.suffix_length
        if unused > 0:
            for layer in self.cache.layers:
                layer.drop_leading(unused)
            self._pad -= unused
            self._valid = self._valid[:, unused:]

    def add_rows(self, prompts: Sequence[Sequence[int]], chunk_size: int, reserve: int = 0) -> torch.Tensor:
        """Prefill new rows on the same context and join them to the running rows; returns their last logits.

        Called between steps: the new rows are prefilled as a batch of their own, then every
        row is right-aligned to one suffix column, the shorter side padded on the left, so
        each row's positions and mask stay what they were. ``reserve`` is room for tokens to come.
        """
        joining = SharedPrefixBatch(self.lm, self._prefix, len(prompts), capacity=max(map(len, prompts)) + reserve)
        logits = joining.prefill(prompts, chunk_size)
        if self.rows == 0:
            self.cache, self.rows, self._pad, self._valid = joining.cache, joining.rows, joining._pad, joining._valid
            return logits
        mine, theirs = self.cache.suffix_length, joining.cache.suffix_length
        width = max(mine, theirs)
        capacity = max(self.cache.layers[0]._key_buffer.shape[-2], width + reserve)
        for layer, other in zip(self.cache.layers, joining.cache.layers):
            layer.join(other, width - mine, width - theirs, capacity)
        self._pad = torch.cat([self._pad + (width - mine), joining._pad + (width - theirs)])
        self._valid = torch.cat([_pad_left(self._valid, width - mine), _pad_left(joining._valid, width - theirs)])
        self.rows += joining.rows
        return logits

    def suffix(self, layer: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A row's own keys and values of ``layer`` (what it appended to the prefix), [1, heads, tokens, dim]."""
        cached = self.cache.layers[layer]
        start = int(self._pad[row])
        return cached.keys[row : row + 1, :, start:], cached.values[row : row + 1, :, start:]

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        start = self.cache.suffix_length
        q_len = ids.shape[1]
        columns = torch.arange(start, start + q_len, device=self.device)
        positions = self.prefix_length + (columns[None, :] - self._pad[:, None]).clamp_(min=0)
        mask = None
        if q_len > 1 or bool((self._pad > 0).any()):
            mask = self._mask(columns)
        step = llama_step(self.lm.model)
        if step is not None and step.takes(self.cache):
            with torch.inference_mode():
                return step(self.cache, ids, positions, mask)
        with torch.inference_mode(), _attention_swapped(self.lm.model):
            out = forward(
                self.lm.model,
                self.cache,
                input_ids=ids,
                position_ids=positions,
                attention_mask=mask,
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


def _pad_left(valid: torch.Tensor, columns: int) -> torch.Tensor:
    """Prepend ``columns`` masked-out columns to a [rows, columns] validity mask."""
    if columns == 0:
        return valid
    return torch.cat([valid.new_zeros((valid.shape[0], columns)), valid], dim=1)


def _pad_token_id(lm: LoadedModel) -> int:
    pad = getattr(lm.tokenizer, "pad_token_id", None)
    if pad is None:
        pad = lm.eos_token_ids[0] if lm.eos_token_ids else 0
    return int(pad)
