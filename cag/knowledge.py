"""The knowledge base: documents prefilled once, many questions answered from the cache."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence, TextIO

import torch
from transformers import DynamicCache

from .batch import supports_shared_prefix
from .documents import Document, load_documents
from .errors import CacheMismatchError, ContextTooLongError, ModelError
from .generate import Generation, generate, generate_batch
from .kvcache import CacheMetadata, PendingCheck, check_kv_dtype, now_iso
from .model import LoadedModel, split_quantize, load_model
from .prefill import DEFAULT_CHUNK_SIZE, ProgressCallback, prefill
from .prompt import PromptBuilder

__all__ = ["Answer", "BuildReport", "KnowledgeBase", "build", "load", "open_store", "resolve_model", "store_context"]


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
    batch: int = 1  # answers generated together with this one (ask_many); their steps are shared

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
    """``store`` if it is a store; else the store its URL names; else ``$CAG_STORE``, else the local store under the cache home."""
    from .stores import open_store as open_url

    return open_url(store, home)


def resolve_model(
    model: str | LoadedModel | None, home: str | os.PathLike | None = None, quantize: str | None = None
) -> LoadedModel:
    if not isinstance(model, LoadedModel):
        return load_model(model, home=home, quantize=quantize)
    if quantize is not None and model.quantize != (None if quantize == "none" else quantize):
        raise ModelError(f"model {model.name!r} is already loaded without {quantize} quantization: "
                         f"load it with load_model(..., quantize={quantize!r})")
    return model


def _same_model_but_quantization(built_by: str, in_use: str) -> bool:
    try:
        return built_by != in_use and split_quantize(built_by, None)[0] == split_quantize(in_use, None)[0]
    except ModelError:
        return False


class KnowledgeBase:
    """A stored context cache and the model that reads it.

    The cache is restored once (lazily, on the first question) and kept in memory. It
    is only ever read: each question's and answer's keys and values go into a small
    buffer of their own (see ``cag.batch``), so nothing of the context is copied per
    question, or per batch of questions.
    """

    def __init__(self, lm: LoadedModel, store, entry, cache: DynamicCache | None = None, context_ids: list[int] | None = None) -> None:
        if entry.fingerprint != lm.fingerprint and _same_model_but_quantization(entry.model_name, lm.name):
            raise CacheMismatchError(
                f"cache {(entry.names or (entry.key,))[0]!r} was built by {entry.model_name!r}, but the model in use is "
                f"{lm.name!r}: a quantized model's keys and values differ from the full-precision model's, so its "
                f"caches are its own; ask with the quantization the cache was built with, or rebuild the cache"
            )
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
        self._pending: PendingCheck | None = None

    @property
    def name(self) -> str | None:
        return self.entry.names[0] if self.entry.names else None

    @property
    def key(self) -> str:
        return self.entry.key

    @property
    def boundary(self) -> int:
        return self.entry.tokens

    @property
    def sources(self) -> tuple[str, ...]:
        return self.entry.sources

    @property
    def cache(self) -> DynamicCache:
        """The context cache in memory, restored from the store (and checked) on first use."""
        self.restore()
        return self._cache

    def restore(self) -> float:
        """Load and check the context cache now (otherwise the first question does); returns seconds.

        The restore time is added to the next cached answer's time to first token.
        """
        self._restore(check_later=False)
        self._checked()
        return self.restore_s

    def _restore(self, check_later: bool) -> None:
        """Restore if not in memory; with ``check_later`` the store may check the data in the
        background while the first question is prefilled (``_checked`` waits for it)."""
        if self._cache is None:
            restored = self.store.restore(self.entry, self.boundary, device=self.lm.device, dtype=self._restore_dtype(),
                                          check_later=check_later)
            self._cache, self._context_ids, self._pending = restored.cache, restored.token_ids, restored.pending
            self.restore_s, self.bytes_read = restored.seconds, restored.bytes_read
            self._unbilled_restore_s = restored.seconds

    def _checked(self) -> None:
        """Wait for a background check of the restored cache; a failed one drops the cache and raises."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        try:
            self.restore_s = pending.wait()
        except BaseException:
            self._cache = None
            raise

    def _restore_dtype(self) -> torch.dtype | None:
        """The model's dtype, or None (as stored) for a bfloat16 cache the shared-prefix
        attention reads as it is: half the bytes per step, and no converted copy."""
        fast = self.lm.device.type == "cuda" or torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))
        if self.entry.kv_dtype == "bfloat16" and fast and supports_shared_prefix(self.lm, DynamicCache()):
            return None
        return self.lm.dtype

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
        """Answer one question, streaming its text to ``on_text``; ``use_cache=False`` re-prefills
        the whole prompt (the baseline). The context cache is read, never modified."""
        start = time.perf_counter()
        question_ids, room = self._question(question)
        if use_cache:
            self._restore(check_later=True)
            cache = self._cache
            offset, self._unbilled_restore_s = self._unbilled_restore_s, 0.0
        else:
            cache = prefill(self.lm, self.context_ids).cache
            offset = 0.0
        gen_start = time.perf_counter()
        gen = generate(
            self.lm, cache, question_ids, max_new_tokens=min(max_new_tokens, room), temperature=temperature, seed=seed,
            on_text=on_text, extend_cache=False, before_first_token=self._checked if use_cache else None,
        )
        ttft = (offset if use_cache else gen_start - start) + gen.prefill_s
        return self._answer(question, question_ids, gen, use_cache, ttft, time.perf_counter() - start)

    def ask_many(
        self,
        questions: Iterable[str],
        *,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = 0,
        use_cache: bool = True,
    ) -> list[Answer]:
        """Answer questions against the context cache, ``batch_size`` at a time, in their order.

        A batch decodes its questions together: the context's keys and values are read
        once per step for all of them and never copied. Each answer is the one ``ask``
        gives alone (greedy: token for token; sampling: each question draws from its own
        generator seeded with ``seed``). An answer's ``ttft_s`` and ``total_s`` count from
        the start of its batch. ``batch_size=1`` or ``use_cache=False`` asks one by one.
        """
        questions = list(questions)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not use_cache or batch_size == 1:
            return [self.ask(q, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, use_cache=use_cache)
                    for q in questions]
        prepared = [self._question(q) for q in questions]  # every question checked before any work
        # Questions of similar length share a batch: less padding.
        order = sorted(range(len(questions)), key=lambda i: len(prepared[i][0]))
        answers: list[Answer | None] = [None] * len(questions)
        for begin in range(0, len(order), batch_size):
            chunk = order[begin : begin + batch_size]
            start = time.perf_counter()
            self._restore(check_later=True)
            cache = self._cache
            offset, self._unbilled_restore_s = self._unbilled_restore_s, 0.0
            gen_start = time.perf_counter()
            gens = generate_batch(
                self.lm, cache, [prepared[i][0] for i in chunk],
                max_new_tokens=[min(max_new_tokens, prepared[i][1]) for i in chunk], temperature=temperature, seed=seed,
                before_first_token=self._checked,
            )
            for i, gen in zip(chunk, gens):
                answers[i] = self._answer(questions[i], prepared[i][0], gen, True, offset + gen.prefill_s,
                                          gen_start - start + gen.total_s, batch=len(chunk))
        return answers  # type: ignore[return-value]

    def question_prompt(self, question: str) -> tuple[list[int], int]:
        """The token ids ``ask`` feeds after the context for ``question``, and the room left for its answer."""
        return self._question(question)

    def _question(self, question: str) -> tuple[list[int], int]:
        """The question's token ids and the room left for its answer; refuses a question that cannot fit."""
        question_ids = self.prompt.question_ids(question)
        room = self.lm.max_context - self.boundary - len(question_ids)
        if room <= 0:
            raise ContextTooLongError(
                f"context ({self.boundary:,} tokens) plus question ({len(question_ids):,}) exceed the model's "
                f"window of {self.lm.max_context:,} tokens: ask a shorter question"
            )
        return question_ids, room

    def _answer(self, question: str, question_ids: list[int], gen: Generation, use_cache: bool, ttft_s: float,
                total_s: float, batch: int = 1) -> Answer:
        prompt_tokens = self.boundary + len(question_ids)
        reused = self.boundary if use_cache else 0
        return Answer(
            question=question,
            text=gen.text.strip(),
            token_ids=gen.token_ids,
            new_tokens=len(gen.token_ids),
            prompt_tokens=prompt_tokens,
            reused_tokens=reused,
            prefilled_tokens=prompt_tokens - reused,
            ttft_s=ttft_s,
            total_s=total_s,
            finish_reason=gen.finish_reason,
            batch=batch,
        )


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
    quantize: str | None = None,
    kv_dtype: str | None = None,
) -> KnowledgeBase:
    """Prefill documents once and store their KV cache; reuses the longest stored prefix.

    ``kv_dtype`` stores the cache as float32, bfloat16, float16 or int8 (default: the
    model's dtype); a smaller dtype trades answer agreement for bytes on disk.

    The returned knowledge base holds the cache in memory, ready for questions; its
    ``report`` says what was stored and what was reused. ``quantize="int8"`` builds
    with int8 weights (see ``load_model``); the cache then belongs to that model.
    """
    start = time.perf_counter()
    if name is not None:
        from .stores import validate_name

        validate_name(name)
    documents = as_documents(inputs, stdin)
    lm = resolve_model(model, home, quantize)
    ids = PromptBuilder(lm.tokenizer).context_ids(documents, lm.max_context)
    store = open_store(home, store)
    kv_dtype = check_kv_dtype(kv_dtype) if kv_dtype is not None else lm.kv_dtype
    cache, reused = _restore_longest_prefix(store, lm, ids, kv_dtype)
    if on_progress is not None:
        on_progress(reused, len(ids))
    if reused < len(ids):
        progress = (lambda done, total: on_progress(reused + done, len(ids))) if on_progress else None
        cache = prefill(lm, ids[reused:], cache, chunk_size=chunk_size, on_progress=progress).cache
    sources = tuple(doc.source for doc in documents)
    kb = store_context(lm, store, cache, ids, kv_dtype=kv_dtype, sources=sources, name=name)
    kb.report = BuildReport(
        name=name, key=kb.key, tokens=len(ids), bytes=kb.entry.bytes, seconds=time.perf_counter() - start,
        reused_tokens=reused, prefilled_tokens=len(ids) - reused, sources=list(sources),
    )
    return kb


def store_context(
    lm: LoadedModel,
    store,
    cache: DynamicCache,
    ids: list[int],
    *,
    kv_dtype: str,
    sources: Sequence[str],
    name: str | None = None,
) -> KnowledgeBase:
    """Store a prefilled context cache (``ids`` are its tokens) in ``kv_dtype``; returns its knowledge base.

    A cache stored in the model's dtype stays in memory; one stored in another dtype is
    answered from what was stored, restored on first use, as a later ``load`` would.
    """
    metadata = CacheMetadata(
        model_name=lm.name,
        fingerprint=lm.fingerprint,
        tokenizer_hash=lm.tokenizer_hash,
        kv_dtype=kv_dtype,
        tokens=len(ids),
        num_layers=len(cache.layers),
        sources=tuple(sources),
        created=now_iso(),
    )
    entry = store.put(cache, ids, metadata, name=name)
    in_memory = cache if kv_dtype == lm.kv_dtype else None
    return KnowledgeBase(lm, store, entry, cache=in_memory, context_ids=ids)


def as_documents(inputs: Sequence, stdin: TextIO | None) -> list[Document]:
    """Documents given as such are taken as they are; anything else is a path, glob or '-'."""
    if inputs and all(isinstance(item, Document) for item in inputs):
        return list(inputs)
    return load_documents(inputs, stdin=stdin)


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
    quantize: str | None = None,
) -> KnowledgeBase:
    """Open a stored cache by name or key, with the model that built it unless another is given.

    A cache built with a quantized model records it (e.g. ``SmolLM2-135M-Instruct:int8``),
    so it reloads that model. Asking for another quantization than the cache was built
    with is refused: the keys and values differ.
    """
    store = open_store(home, store)
    entry = store.resolve(name)
    lm = resolve_model(entry.model_name if model is None else model, home, quantize)
    return KnowledgeBase(lm, store, entry)
