"""Automatic prompt caching for arbitrary chat prompts.

Every prompt is looked up in the store; the longest stored prefix is restored and
only the rest is prefilled. The prompt's own cache is then stored, so the next
prompt that extends it (the next turn of a conversation, another question over the
same long system prompt) starts from there.

The pieces (``stored_prefix``, ``store_prompt``, ``room_for_answer``,
``last_user_turn_start``) are shared with the server (``cag serve``), which keeps
restored prefixes in memory as well.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from transformers import DynamicCache

from .errors import ContextTooLongError, PromptError
from .generate import generate
from .hashing import common_prefix_length
from .kvcache import CacheMetadata, crop_to, now_iso
from .knowledge import open_store, resolve_model
from .model import LoadedModel
from .prefill import new_cache
from .prompt import PromptBuilder

__all__ = ["PromptCache", "CachedGeneration", "last_user_turn_start", "room_for_answer", "store_prompt", "stored_prefix"]


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
        max_new_tokens = min(max_new_tokens, room_for_answer(self.lm, ids))
        match = stored_prefix(self.store, self.lm, ids)
        if match is not None:
            cache = self.store.restore(match.entry, match.tokens, device=self.lm.device, dtype=self.lm.dtype).cache
        else:
            cache = new_cache()
        reused = cache.get_seq_length()
        restore_s = time.perf_counter() - start
        gen = generate(self.lm, cache, ids[reused:], max_new_tokens=max_new_tokens, temperature=temperature,
                       seed=seed, on_text=on_text)
        crop_to(cache, len(ids))
        key = store_prompt(self.store, self.lm, cache, ids).key if len(ids) >= self.min_store_tokens else None
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


def stored_prefix(store, lm: LoadedModel, ids: Sequence[int]):
    """The store's longest prefix of the prompt ``ids`` for this model and KV dtype (a ``PrefixMatch``), or None.

    The last prompt token is always fed again, never restored: its logits pick the first answer token.
    """
    return store.longest_prefix(ids[:-1], lm.fingerprint, lm.kv_dtype)


def store_prompt(store, lm: LoadedModel, cache: DynamicCache, ids: Sequence[int]):
    """Store the first ``len(ids)`` tokens of ``cache`` (the prompt ``ids``) as a prompt cache; returns its entry."""
    metadata = CacheMetadata(
        model_name=lm.name,
        fingerprint=lm.fingerprint,
        tokenizer_hash=lm.tokenizer_hash,
        kv_dtype=lm.kv_dtype,
        tokens=len(ids),
        num_layers=len(cache.layers),
        sources=("prompt",),
        created=now_iso(),
    )
    return store.put(cache, list(ids), metadata)


def room_for_answer(lm: LoadedModel, ids: Sequence[int]) -> int:
    """Tokens left in the model's window after the prompt; refuses a prompt that leaves none."""
    room = lm.max_context - len(ids)
    if room <= 0:
        raise ContextTooLongError(
            f"the prompt is {len(ids)} tokens but the model's context window is {lm.max_context} tokens "
            "(the answer needs at least one more): shorten the prompt or drop earlier turns"
        )
    return room


def last_user_turn_start(builder: PromptBuilder, messages: Sequence[dict[str, str]], ids: Sequence[int]) -> int:
    """How many leading tokens of ``ids`` (the chat's prompt) come before its last user turn.

    That much is what the next turn of the conversation and another question after the
    same system prompt share with this one, so it is what a server stores: one entry per
    conversation state rather than one per question. Found by tokenizing the chat without
    its last user turn and comparing, so it holds for any chat template.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=0)
    if last == 0:
        return 0
    try:
        earlier = builder.chat_ids(list(messages[:last]))
    except PromptError:  # a template that refuses the shorter chat (e.g. one that must end on a user turn)
        return 0
    return common_prefix_length(earlier, ids)
