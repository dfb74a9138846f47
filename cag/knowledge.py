"""The knowledge base: documents prefilled once, many questions answered from the cache."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence, TextIO

import torch
from transformers import DynamicCache

from .documents import load_documents
from .errors import CacheMismatchError, ContextTooLongError
from .generate import generate
from .home import store_dir
from .kvcache import CacheMetadata, crop_to, now_iso
from .model import LoadedModel, load_model
from .prefill import DEFAULT_CHUNK_SIZE, ProgressCallback, prefill
from .prompt import PromptBuilder

__all__ = ["Answer", "BuildReport", "KnowledgeBase", "build", "load", "open_store", "resolve_model"]


@dataclass
class Answer:
    """One answer, with what it cost."""

    question: str
    text: str
    token_ids: list[int]
    new_tokens: int
    prompt_tokens: int  # context + question
    reused_tokens: int  # restored from the cache
    prefilled_tokens: int  # computed for this answer
    ttft_s: float  # time to first token, restore included when this call restored
    total_s: float
    finish_reason: str

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["answer"] = d.pop("text")
        d.pop("token_ids")
        return d


@dataclass
class BuildReport:
    name: str | None
    key: str
    tokens: int
    bytes: int
    seconds: float
    reused_tokens: int
    prefilled_tokens: int
    sources: list[str] = field(default_factory=list)


def open_store(home: str | os.PathLike | None = None, store=None):
    """The store passed in, else the local store under the cache home."""
    if store is not None:
        return store
    from .stores import LocalStore

    return LocalStore(store_dir(home))


def resolve_model(model: str | LoadedModel | None, home: str | os.PathLike | None = None) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model, home=home)


def _kv_dtype_name(lm: LoadedModel) -> str:
    return str(lm.dtype).removeprefix("torch.")


class KnowledgeBase:
    """A stored context cache and the model that reads it.

    The cache is restored once (lazily, on the first question) and kept in memory;
    each answer grows it by the question and answer tokens, then crops it back to the
    context boundary, so nothing is copied per question.
    """

    def __init__(self, lm: LoadedModel, store, entry, cache: DynamicCache | None = None, context_ids: list[int] | None = None) -> None:
        if entry.fingerprint != lm.fingerprint:
            raise CacheMismatchError(
                f"cache {(entry.names or (entry.key,))[0]!r} was built by model {entry.model_name!r} "
                f"(fingerprint {entry.fingerprint[:12]}), but the model in use is {lm.name!r} "
                f"(fingerprint {lm.fingerprint[:12]}): ask with --model {entry.model_name!r} or rebuild the cache"
            )
        self.lm = lm
        self.store = store
        self.entry = entry
        self.prompt = PromptBuilder(lm.tokenizer)
        self._cache = cache
        self._context_ids = context_ids
        self.restore_s = 0.0
        self.bytes_read = 0
        self._unbilled_restore_s = 0.0

    @property
    def name(self) -> str | None:
        return self.entry.names[0] if self.entry.names else None

    @property
    def key(self) -> str:
        return self.entry.key

    @property
    def boundary(self) -> int:
        return self.entry.boundary

    @property
    def sources(self) -> tuple[str, ...]:
        return self.entry.sources

    @property
    def cache(self) -> DynamicCache:
        """The context cache in memory, restored from the store on first use."""
        if self._cache is None:
            self.restore()
        return self._cache

    def restore(self) -> float:
        """Load the context cache from the store now (otherwise the first question does); returns seconds.

        The restore time is added to the next cached answer's time to first token.
        """
        if self._cache is None:
            restored = self.store.restore(self.entry, self.boundary, device=self.lm.device, dtype=self.lm.dtype)
            self._cache, self._context_ids = restored.cache, restored.token_ids
            self.restore_s, self.bytes_read = restored.seconds, restored.bytes_read
            self._unbilled_restore_s = restored.seconds
        return self.restore_s

    @property
    def context_ids(self) -> list[int]:
        if self._context_ids is None:
            self._context_ids = self.store.token_ids(self.entry)[: self.boundary]
        return self._context_ids

    def ask(
        self,
        question: str,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = 0,
        use_cache: bool = True,
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        """Answer one question; ``use_cache=False`` re-prefills the whole prompt (the baseline)."""
        start = time.perf_counter()
        question_ids = self.prompt.question_ids(question)
        prompt_tokens = self.boundary + len(question_ids)
        room = self.lm.max_context - prompt_tokens
        if room <= 0:
            raise ContextTooLongError(
                f"context ({self.boundary:,} tokens) plus question ({len(question_ids):,}) exceed the model's "
                f"window of {self.lm.max_context:,} tokens: ask a shorter question"
            )
        if use_cache:
            cache = self.cache
            reused = self.boundary
            offset, self._unbilled_restore_s = self._unbilled_restore_s, 0.0
        else:
            cache = prefill(self.lm, self.context_ids).cache
            reused, offset = 0, 0.0
        gen_start = time.perf_counter()
        try:
            gen = generate(
                self.lm, cache, question_ids,
                max_new_tokens=min(max_new_tokens, room), temperature=temperature, seed=seed, on_text=on_text,
            )
        finally:
            if use_cache:
                crop_to(cache, self.boundary)
        prefill_before = gen_start - start
        return Answer(
            question=question,
            text=gen.text.strip(),
            token_ids=gen.token_ids,
            new_tokens=len(gen.token_ids),
            prompt_tokens=prompt_tokens,
            reused_tokens=reused,
            prefilled_tokens=prompt_tokens - reused,
            ttft_s=(offset if use_cache else prefill_before) + gen.prefill_s,
            total_s=time.perf_counter() - start,
            finish_reason=gen.finish_reason,
        )

    def ask_many(self, questions: Iterable[str], **kwargs) -> list[Answer]:
        """Answer questions one after another against the same restored cache."""
        return [self.ask(q, **kwargs) for q in questions]


def build(
    inputs: Sequence[str | os.PathLike],
    name: str | None = None,
    *,
    model: str | LoadedModel | None = None,
    home: str | os.PathLike | None = None,
    store=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    on_progress: ProgressCallback | None = None,
    stdin: TextIO | None = None,
) -> KnowledgeBase:
    """Prefill documents once and store their KV cache; reuses the longest stored prefix.

    The returned knowledge base holds the cache in memory, ready for questions; its
    ``report`` says what was stored and what was reused.
    """
    start = time.perf_counter()
    if name is not None:
        from .stores import validate_name

        validate_name(name)
    documents = load_documents(inputs, stdin=stdin)
    lm = resolve_model(model, home)
    ids = PromptBuilder(lm.tokenizer).context_ids(documents, lm.max_context)
    store = open_store(home, store)
    kv_dtype = _kv_dtype_name(lm)
    cache, reused = _restore_longest_prefix(store, lm, ids, kv_dtype)
    if on_progress is not None:
        on_progress(reused, len(ids))
    if reused < len(ids):
        progress = (lambda done, total: on_progress(reused + done, len(ids))) if on_progress else None
        cache = prefill(lm, ids[reused:], cache, chunk_size=chunk_size, on_progress=progress).cache
    metadata = CacheMetadata(
        model_name=lm.name,
        fingerprint=lm.fingerprint,
        tokenizer_hash=lm.tokenizer_hash,
        kv_dtype=kv_dtype,
        tokens=len(ids),
        boundary=len(ids),
        num_layers=len(cache.layers),
        sources=tuple(doc.source for doc in documents),
        created=now_iso(),
    )
    entry = store.put(cache, ids, metadata, name=name)
    kb = KnowledgeBase(lm, store, entry, cache=cache, context_ids=ids)
    kb.report = BuildReport(
        name=name, key=entry.key, tokens=len(ids), bytes=entry.bytes, seconds=time.perf_counter() - start,
        reused_tokens=reused, prefilled_tokens=len(ids) - reused, sources=list(metadata.sources),
    )
    return kb


def _restore_longest_prefix(store, lm: LoadedModel, ids: list[int], kv_dtype: str) -> tuple[DynamicCache | None, int]:
    match = store.longest_prefix(ids, lm.fingerprint, kv_dtype)
    if match is None:
        return None, 0
    restored = store.restore(match.entry, min(match.tokens, len(ids)), device=lm.device, dtype=lm.dtype)
    return restored.cache, restored.cache.get_seq_length()


def load(
    name: str,
    *,
    model: str | LoadedModel | None = None,
    home: str | os.PathLike | None = None,
    store=None,
) -> KnowledgeBase:
    """Open a stored cache by name or key, with the model that built it unless another is given."""
    store = open_store(home, store)
    entry = store.resolve(name)
    lm = resolve_model(model if model is not None else entry.model_name, home)
    return KnowledgeBase(lm, store, entry)
