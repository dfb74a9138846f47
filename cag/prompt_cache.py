"""Automatic prompt caching for arbitrary chat prompts.

Every prompt is looked up in the store; the longest stored prefix is restored and
only the rest is prefilled. The prompt's own cache is then stored, so the next
prompt that extends it (the next turn of a conversation, another question over the
same long system prompt) starts from there.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .generate import generate
from .kvcache import CacheMetadata, crop_to, now_iso
from .knowledge import open_store, resolve_model
from .model import LoadedModel
from .prefill import new_cache
from .prompt import PromptBuilder

__all__ = ["PromptCache", "CachedGeneration"]


@dataclass
class CachedGeneration:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    reused_tokens: int
    prefilled_tokens: int
    ttft_s: float
    total_s: float
    finish_reason: str
    key: str | None  # the stored entry of this prompt, None when too short to store


class PromptCache:
    """Generate from chat messages, reusing the longest cached prefix of each prompt.

    ``min_store_tokens`` keeps prompts shorter than one block out of the store: a
    prefix shorter than a block can never be found again by block hash.
    """

    def __init__(
        self,
        model: str | LoadedModel | None = None,
        *,
        home: str | os.PathLike | None = None,
        store=None,
        min_store_tokens: int | None = None,
    ) -> None:
        self.lm = resolve_model(model, home)
        self.store = open_store(home, store)
        self.prompt = PromptBuilder(self.lm.tokenizer)
        self.kv_dtype = self.lm.kv_dtype
        self.min_store_tokens = self.store.block_size if min_store_tokens is None else min_store_tokens

    def generate(
        self,
        messages: str | Sequence[dict[str, str]],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = 0,
        on_text: Callable[[str], None] | None = None,
    ) -> CachedGeneration:
        """Answer a chat (a list of {role, content}, or a plain user message)."""
        start = time.perf_counter()
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        ids = self.prompt.chat_ids(messages)
        # At least the last prompt token is fed again: its logits pick the first answer token.
        match = self.store.longest_prefix(ids[:-1], self.lm.fingerprint, self.kv_dtype)
        if match is not None:
            cache = self.store.restore(match.entry, match.tokens, device=self.lm.device, dtype=self.lm.dtype).cache
        else:
            cache = new_cache()
        reused = cache.get_seq_length()
        restore_s = time.perf_counter() - start
        gen = generate(self.lm, cache, ids[reused:], max_new_tokens=max_new_tokens, temperature=temperature,
                       seed=seed, on_text=on_text)
        crop_to(cache, len(ids))
        key = self._store_prompt(cache, ids) if len(ids) >= self.min_store_tokens else None
        return CachedGeneration(
            text=gen.text.strip(),
            token_ids=gen.token_ids,
            prompt_tokens=len(ids),
            reused_tokens=reused,
            prefilled_tokens=len(ids) - reused,
            ttft_s=restore_s + gen.prefill_s,
            total_s=time.perf_counter() - start,
            finish_reason=gen.finish_reason,
            key=key,
        )

    def _store_prompt(self, cache, ids: list[int]) -> str:
        metadata = CacheMetadata(
            model_name=self.lm.name,
            fingerprint=self.lm.fingerprint,
            tokenizer_hash=self.lm.tokenizer_hash,
            kv_dtype=self.kv_dtype,
            tokens=len(ids),
            num_layers=len(cache.layers),
            sources=("prompt",),
            created=now_iso(),
        )
        return self.store.put(cache, ids, metadata).key
