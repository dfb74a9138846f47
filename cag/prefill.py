"""Run token ids through the model in chunks, filling a KV cache."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from .model import LoadedModel, forward

__all__ = ["DEFAULT_CHUNK_SIZE", "PrefillResult", "prefill", "new_cache"]

DEFAULT_CHUNK_SIZE = 512

ProgressCallback = Callable[[int, int], None]
"""Called with (tokens done, tokens total) after each chunk."""


@dataclass
class PrefillResult:
    cache: DynamicCache
    last_logits: torch.Tensor | None
    tokens: int
    seconds: float


def new_cache() -> DynamicCache:
    return DynamicCache()


@torch.inference_mode()
def prefill(
    lm: LoadedModel,
    token_ids: Sequence[int],
    cache: DynamicCache | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    on_progress: ProgressCallback | None = None,
) -> PrefillResult:
    """Append ``token_ids`` to ``cache`` (a new one if None); return the logits of the last token.

    Chunking bounds the attention's memory; only the last position's logits are
    computed, since a vocabulary-wide row per token would dwarf the cache itself.
    """
    cache = cache if cache is not None else new_cache()
    ids = torch.tensor([list(token_ids)], dtype=torch.long, device=lm.device)
    total = ids.shape[1]
    logits = None
    start = time.perf_counter()
    for begin in range(0, total, max(1, chunk_size)):
        chunk = ids[:, begin : begin + chunk_size]
        out = forward(lm.model, cache, input_ids=chunk, logits_to_keep=1)
        logits = out.logits[0, -1].float()
        if on_progress is not None:
            on_progress(min(begin + chunk.shape[1], total), total)
    return PrefillResult(cache=cache, last_logits=logits, tokens=total, seconds=time.perf_counter() - start)
