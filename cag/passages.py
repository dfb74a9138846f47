"""Cached passages: each passage prefilled once after the instruction prefix, composed per question.

A knowledge base caches all documents as one context; a small model reads a long
context badly, and retrieval's top-k passages differ from question to question, so
they are never a shared prefix. Here documents are cut at paragraph boundaries into
passages of at most ``passage_tokens`` tokens, and each passage is prefilled once, on
its own, right after the instruction prefix. A question retrieves its top-k passages
(BM25 or dense, ``cag.retrieval``) and their caches are composed behind the prefix
(``cag.compose``): no prefill but the question's and the ``recompute`` tokens.

In the store (any ``CacheStore``; nothing beyond its protocol is used), a collection
named ``manuals`` is:

* the instruction prefix (the chat template's start of the system turn and the
  instructions): one ordinary entry, labelled ``manuals``. Its content key depends only
  on the model and the instructions, so every collection shares it; it is never
  repeated per passage;
* each passage: an entry holding only its own tokens' keys and values, as prefilled
  right after the prefix. Its token ids are the passage's (its text, tagged with its
  source as a knowledge base renders documents), its sources the document's, and its
  label ``manuals@DDDDD.PPPPP`` says its position: passage P of document D. Its
  fingerprint is derived from the model's and the prefix entry's key, so a passage is
  never taken for the start of an ordinary prompt (``longest_prefix`` seeds its hashes
  with the fingerprint) and is refused after another prefix or model. The same passage
  in two collections is one entry with two labels.

Answers are approximate unless every token is recomputed: a stored passage never saw
the passages placed before it. ``ask(use_cache=False)`` prefills the same composed
tokens in full, the reference ``cag eval`` measures composition against.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence, TextIO

import torch
from transformers import DynamicCache

from .compose import Composition, Segment, compose, rotary_of
from .documents import Document
from .errors import CacheMismatchError, CacheNotFoundError, ContextTooLongError, InvalidNameError, PassageError
from .generate import generate
from .hashing import chain_seed, sequence_key
from .knowledge import Answer, KnowledgeBase, as_documents, open_store, resolve_model
from .kvcache import CacheMetadata, cache_from_layers, check_kv_dtype, crop_to, now_iso
from .model import LoadedModel
from .prefill import DEFAULT_CHUNK_SIZE, ProgressCallback, prefill
from .prompt import PromptBuilder
from .retrieval import BM25Retriever, DenseRetriever, Embedder, Hit, Passage, split_passages

__all__ = [
    "DEFAULT_PASSAGE_TOKENS",
    "RETRIEVERS",
    "ComposedAnswer",
    "PassageBuildReport",
    "PassageCollection",
    "StoredPassage",
    "build_passages",
    "is_collection",
    "load_passages",
    "passage_label",
    "remove_collection",
]

DEFAULT_PASSAGE_TOKENS = 256
RETRIEVERS = ("bm25", "dense")
_LABEL_SUFFIX = len("@00000.00000")
_MAX_NAME = 128 - _LABEL_SUFFIX
_RENDERED = re.compile(r'\s*<document source="(.*?)">\n(.*)\n</document>\s*', re.DOTALL)


def passage_label(name: str, document: int, index: int) -> str:
    """The store label of passage ``index`` of document ``document`` in collection ``name``."""
    return f"{name}@{document:05d}.{index:05d}"


def passage_fingerprint(fingerprint: str, prefix_key: str) -> str:
    """A passage entry's fingerprint: its model's, bound to the prefix it was prefilled after."""
    return hashlib.sha256(f"cag-passage-v1|{fingerprint}|{prefix_key}".encode()).hexdigest()


@dataclass
class StoredPassage:
    """A passage of a collection: where it came from, its store entry and its token ids."""

    passage: Passage
    entry: object  # stores.base.Entry
    token_ids: list[int]

    @property
    def label(self) -> str:
        return self.entry.names[0] if getattr(self.entry, "names", ()) else self.entry.key


@dataclass
class PassageBuildReport:
    name: str
    prefix_key: str
    passages: int
    tokens: int  # passage tokens, the prefix not counted
    prefix_tokens: int
    bytes: int
    seconds: float
    reused_passages: int  # already stored (same model, prefix and text): not prefilled again
    prefilled_tokens: int
    sources: list[str] = field(default_factory=list)


@dataclass
class ComposedAnswer(Answer):
    """An answer from composed passage caches, with what was retrieved and recomputed."""

    retriever: str = "bm25"
    top_k: int = 0
    recompute: int = 0
    recomputed_tokens: int = 0
    retrieval_s: float = 0.0
    compose_s: float = 0.0  # restoring, placing and recomputing the passages
    passages: list[dict] = field(default_factory=list)  # label, source, document, index, tokens, start, score
    first_logits: torch.Tensor | None = None  # the first answer token's logits, when asked for

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("first_logits", None)
        return d


class PassageCollection:
    """A stored passage collection and the model that composes it."""

    def __init__(self, lm: LoadedModel, store, name: str, prefix_entry, passages: Sequence[StoredPassage],
                 prefix_cache: DynamicCache | None = None, embedder: Embedder | None = None) -> None:
        if not passages:
            raise PassageError(f"collection {name!r} has no passages: build it with `cag build DOCS --name {name} --passages`")
        # The prefix is an ordinary entry: a knowledge base's checks say whether this model may read it.
        KnowledgeBase(lm, store, prefix_entry)
        self.lm, self.store, self.name = lm, store, name
        self.prefix_entry = prefix_entry
        self.passages = list(passages)
        self.prompt = PromptBuilder(lm.tokenizer)
        head, self.tail_ids = self.prompt.context_parts()
        self.prefix_ids = head
        self._prefix_cache = prefix_cache
        self._caches: dict[str, DynamicCache] = {}
        self._retrievers: dict[str, object] = {}
        self._embedder = embedder
        self._by_position = {(p.passage.document, p.passage.index): p for p in self.passages}
        expected = passage_fingerprint(lm.fingerprint, prefix_entry.key)
        stale = [p.label for p in self.passages if p.entry.fingerprint != expected]
        if stale:
            raise CacheMismatchError(
                f"passage {stale[0]!r} of collection {name!r} was prefilled by another model or after another prefix: "
                f"rebuild the collection with `cag build DOCS --name {name} --passages`"
            )
        self.report: PassageBuildReport | None = None

    # ------------------------------------------------------------------ caches

    @property
    def prefix_cache(self) -> DynamicCache:
        if self._prefix_cache is None:
            restored = self.store.restore(self.prefix_entry, device=self.lm.device, dtype=self.lm.dtype)
            if restored.token_ids != self.prefix_ids:
                raise CacheMismatchError(
                    f"collection {self.name!r}'s instruction prefix differs from this tokenizer's and instructions': "
                    f"rebuild it with `cag build DOCS --name {self.name} --passages`"
                )
            self._prefix_cache = restored.cache
        return self._prefix_cache

    def passage_cache(self, passage: StoredPassage) -> DynamicCache:
        """A passage's keys and values, restored from the store on first use and kept."""
        key = passage.entry.key
        if key not in self._caches:
            self._caches[key] = self.store.restore(passage.entry, device=self.lm.device, dtype=self.lm.dtype).cache
        return self._caches[key]

    # --------------------------------------------------------------- retrieval

    def search(self, question: str, top_k: int = 3, retriever: str = "bm25") -> list[tuple[StoredPassage, float | None]]:
        """The ``top_k`` passages for ``question``, best first, with their scores."""
        if top_k < 1:
            raise PassageError(f"top-k must be at least 1, got {top_k}")
        hits: list[Hit] = self.retriever(retriever).search(question, top_k)
        return [(self._by_position[(h.passage.document, h.passage.index)], h.score) for h in hits]

    def retriever(self, kind: str = "bm25"):
        """The collection's BM25 or dense index over its passages, built on first use."""
        if kind not in RETRIEVERS:
            raise PassageError(f"unknown retriever {kind!r}: choose from {', '.join(RETRIEVERS)}")
        if kind not in self._retrievers:
            passages = [p.passage for p in self.passages]
            if kind == "bm25":
                self._retrievers[kind] = BM25Retriever(passages)
            else:
                self._embedder = self._embedder or Embedder()
                self._retrievers[kind] = DenseRetriever(passages, self._embedder)
        return self._retrievers[kind]

    # ------------------------------------------------------------- answering

    def context_ids(self, passages: Sequence[StoredPassage]) -> list[int]:
        """The composed context's tokens: the prefix, then the passages in order."""
        return self.prefix_ids + [t for p in passages for t in p.token_ids]

    def question_ids(self, question: str) -> list[int]:
        """What follows the passages: the end of the system turn, then the question's turn."""
        return self.tail_ids + self.prompt.question_ids(question)

    def compose(self, passages: Sequence[StoredPassage], recompute: int = 0) -> Composition:
        """The prefix and ``passages``' caches placed one after another (see ``cag.compose.compose``)."""
        start = len(self.prefix_ids)
        segments = [Segment(self.passage_cache(p), p.token_ids, stored_at=start) for p in passages]
        return compose(self.lm, self.prefix_cache, self.prefix_ids, segments, recompute=recompute)

    def ask(
        self,
        question: str,
        *,
        top_k: int = 3,
        retriever: str = "bm25",
        recompute: int = 0,
        passages: Sequence[StoredPassage] | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int | None = 0,
        use_cache: bool = True,
        first_logits: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> ComposedAnswer:
        """Retrieve the top-k passages (or take ``passages``), compose their caches, answer.

        ``recompute`` re-runs the first tokens of each passage with the ones before it in
        view. ``use_cache=False`` prefills the same composed tokens in full instead (the
        exact reference). ``first_logits`` keeps the first answer token's logits.
        """
        start = time.perf_counter()
        if passages is None:
            found = self.search(question, top_k, retriever)
        else:
            found = [(p, None) for p in passages]
        chosen = [p for p, _ in found]
        retrieval_s = time.perf_counter() - start
        question_ids = self.question_ids(question)
        context_ids = self.context_ids(chosen)
        room = self.lm.max_context - len(context_ids) - len(question_ids)
        if room <= 0:
            raise ContextTooLongError(
                f"{len(chosen)} passages ({len(context_ids):,} tokens with the prefix) and the question exceed the "
                f"model's window of {self.lm.max_context:,} tokens: use a smaller --top-k"
            )
        composition = None
        if use_cache:
            composition = self.compose(chosen, recompute)
            cache = composition.cache
        else:
            cache = prefill(self.lm, context_ids).cache
        compose_s = time.perf_counter() - start - retrieval_s
        gen_start = time.perf_counter()
        gen = generate(self.lm, cache, question_ids, max_new_tokens=min(max_new_tokens, room), temperature=temperature,
                       seed=seed, on_text=on_text, extend_cache=False)
        total_s = time.perf_counter() - start
        logits = prefill(self.lm, question_ids, cache).last_logits if first_logits else None
        recomputed = composition.recomputed if composition else 0
        starts = composition.starts if composition else _starts(len(self.prefix_ids), chosen)
        prompt_tokens = len(context_ids) + len(question_ids)
        reused = len(context_ids) - recomputed if use_cache else 0
        return ComposedAnswer(
            question=question, text=gen.text.strip(), token_ids=gen.token_ids, new_tokens=len(gen.token_ids),
            prompt_tokens=prompt_tokens, reused_tokens=reused, prefilled_tokens=prompt_tokens - reused,
            ttft_s=gen_start - start + gen.prefill_s, total_s=total_s, finish_reason=gen.finish_reason,
            retriever=retriever if passages is None else "given", top_k=len(chosen), recompute=recompute if use_cache else 0,
            recomputed_tokens=recomputed, retrieval_s=retrieval_s, compose_s=compose_s,
            passages=[{"label": p.label, "source": p.passage.source, "document": p.passage.document,
                       "index": p.passage.index, "tokens": len(p.token_ids), "start": s, "score": score}
                      for (p, score), s in zip(found, starts)],
            first_logits=logits,
        )


def _starts(first: int, passages: Sequence[StoredPassage]) -> list[int]:
    starts = []
    for p in passages:
        starts.append(first)
        first += len(p.token_ids)
    return starts


# ---------------------------------------------------------------------- build


def build_passages(
    inputs: Sequence[str | os.PathLike | Document],
    name: str,
    *,
    model: str | LoadedModel | None = None,
    home: str | os.PathLike | None = None,
    store=None,
    passage_tokens: int = DEFAULT_PASSAGE_TOKENS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    kv_dtype: str | None = None,
    quantize: str | None = None,
    on_progress: ProgressCallback | None = None,
    stdin: TextIO | None = None,
    embedder: Embedder | None = None,
) -> PassageCollection:
    """Cut documents into passages, prefill each once after the instruction prefix, store them as ``name``.

    Passages already stored (same model, prefix, KV dtype and text) are labelled, not
    prefilled again; labels a previous build of ``name`` left beyond the new passages
    are removed. The model is checked for exact re-rotation first (CompositionError).
    ``embedder`` is the dense retriever's (loaded on first use when None).
    """
    start = time.perf_counter()
    _check_name(name)
    if passage_tokens < 16:
        raise PassageError(f"passages of {passage_tokens} tokens are too short: use --passage-tokens 16 or more")
    documents = as_documents(inputs, stdin)
    lm = resolve_model(model, home, quantize)
    rotary_of(lm)  # refused here, before any prefill, if its positions cannot be re-rotated exactly
    store = open_store(home, store)
    kv_dtype = check_kv_dtype(kv_dtype) if kv_dtype is not None else lm.kv_dtype
    prompt = PromptBuilder(lm.tokenizer)
    prefix_ids, tail_ids = prompt.context_parts()
    passages = split_passages(documents, passage_tokens, size=lambda text: len(prompt.text_ids(text)))
    if not passages:
        raise PassageError("the documents hold no text to cut into passages")
    # Passages are numbered per document that has any, so labels run without gaps.
    numbers = {doc: i for i, doc in enumerate(dict.fromkeys(p.document for p in passages))}
    passages = [Passage(p.source, p.text, numbers[p.document], p.index) for p in passages]
    ids = [prompt.passage_ids(p.as_document()) for p in passages]
    longest = len(prefix_ids) + max(map(len, ids)) + len(tail_ids)
    if longest >= lm.max_context:
        raise ContextTooLongError(f"a passage with the prefix takes {longest:,} tokens, more than the model's window "
                                  f"of {lm.max_context:,}: use a smaller --passage-tokens")

    prefix = prefill(lm, prefix_ids, chunk_size=chunk_size).cache
    prefix_entry = store.put(prefix, prefix_ids, _metadata(lm, kv_dtype, len(prefix_ids), (), lm.fingerprint))
    fingerprint = passage_fingerprint(lm.fingerprint, prefix_entry.key)
    seed = chain_seed(fingerprint, kv_dtype, store.block_size)
    total = sum(map(len, ids))
    done = reused = prefilled = 0
    stored: list[StoredPassage] = []
    if on_progress is not None:
        on_progress(0, total)
    for passage, passage_ids in zip(passages, ids):
        label = passage_label(name, passage.document, passage.index)
        entry = _stored(store, sequence_key(passage_ids, seed, store.block_size))
        if entry is None:
            progress = (lambda d, t, base=done: on_progress(base + d, total)) if on_progress else None
            prefill(lm, passage_ids, prefix, chunk_size=chunk_size, on_progress=progress)
            own = cache_from_layers([(layer.keys[:, :, len(prefix_ids):], layer.values[:, :, len(prefix_ids):])
                                     for layer in prefix.layers])
            entry = store.put(own, passage_ids, _metadata(lm, kv_dtype, len(passage_ids), (passage.source,), fingerprint),
                              name=label)
            crop_to(prefix, len(prefix_ids))
            prefilled += len(passage_ids)
        else:
            store.label(label, entry.key)
            entry = store.resolve(entry.key)
            reused += 1
        done += len(passage_ids)
        if on_progress is not None:
            on_progress(done, total)
        stored.append(StoredPassage(passage, entry, passage_ids))
    _drop_stale_labels(store, name, passages)
    store.label(name, prefix_entry.key)
    prefix_entry = store.resolve(prefix_entry.key)
    in_memory = prefix if kv_dtype == lm.kv_dtype else None
    collection = PassageCollection(lm, store, name, prefix_entry, stored, prefix_cache=in_memory, embedder=embedder)
    collection.report = PassageBuildReport(
        name=name, prefix_key=prefix_entry.key, passages=len(stored), tokens=total, prefix_tokens=len(prefix_ids),
        bytes=sum(p.entry.bytes for p in stored), seconds=time.perf_counter() - start, reused_passages=reused,
        prefilled_tokens=prefilled, sources=list(dict.fromkeys(p.source for p in passages)),
    )
    return collection


def _check_name(name: str) -> None:
    from .stores import validate_name

    validate_name(name)
    if len(name) > _MAX_NAME or "@" in name:
        raise PassageError(f"collection name {name!r}: use at most {_MAX_NAME} characters and no '@' "
                           "(its passages are labelled NAME@DOCUMENT.PASSAGE)")


def _metadata(lm: LoadedModel, kv_dtype: str, tokens: int, sources: tuple[str, ...], fingerprint: str) -> CacheMetadata:
    return CacheMetadata(model_name=lm.name, fingerprint=fingerprint, tokenizer_hash=lm.tokenizer_hash, kv_dtype=kv_dtype,
                         tokens=tokens, num_layers=lm.num_layers, sources=sources, created=now_iso())


def _stored(store, key: str):
    try:
        return store.resolve(key)
    except (CacheNotFoundError, InvalidNameError):  # a label too long to be one names nothing
        return None


def _labelled(store, name: str):
    """(document, index, entry) of each passage labelled in collection ``name``, in order."""
    document = index = 0
    while True:
        entry = _stored(store, passage_label(name, document, index))
        if entry is not None:
            yield document, index, entry
            index += 1
        elif index == 0:
            return
        else:
            document, index = document + 1, 0


def _drop_stale_labels(store, name: str, passages: Sequence[Passage]) -> None:
    keep = {passage_label(name, p.document, p.index) for p in passages}
    for document, index, _ in list(_labelled(store, name)):
        label = passage_label(name, document, index)
        if label not in keep:
            store.remove(label)


# ----------------------------------------------------------------------- load


def is_collection(name: str, *, home: str | os.PathLike | None = None, store=None) -> bool:
    """Whether ``name`` names a passage collection (built with ``--passages``)."""
    return _stored(open_store(home, store), passage_label(name, 0, 0)) is not None


def load_passages(
    name: str,
    *,
    model: str | LoadedModel | None = None,
    home: str | os.PathLike | None = None,
    store=None,
    quantize: str | None = None,
    embedder: Embedder | None = None,
) -> PassageCollection:
    """Open a stored passage collection, with the model that built it unless another is given."""
    _check_name(name)
    store = open_store(home, store)
    prefix_entry = store.resolve(name)
    labelled = list(_labelled(store, name))
    if not labelled:
        raise PassageError(f"cache {name!r} is not a passage collection: build one with "
                           f"`cag build DOCS --name {name} --passages`, or ask it without --top-k")
    lm = resolve_model(prefix_entry.model_name if model is None else model, home, quantize)
    passages = []
    for document, index, entry in labelled:
        token_ids = store.token_ids(entry)
        source = entry.sources[0] if entry.sources else f"document-{document}"
        passages.append(StoredPassage(Passage(source, _passage_text(lm, token_ids), document, index), entry, token_ids))
    return PassageCollection(lm, store, name, prefix_entry, passages, embedder=embedder)


def _passage_text(lm: LoadedModel, token_ids: Sequence[int]) -> str:
    """A passage's text from its tokens, without the document tag around it."""
    text = lm.tokenizer.decode(list(token_ids), skip_special_tokens=False)
    match = _RENDERED.fullmatch(text)
    return match.group(2) if match else text.strip()


def remove_collection(name: str, *, home: str | os.PathLike | None = None, store=None) -> list:
    """Remove a collection's passage labels and its name (entries go once no label points to them)."""
    store = open_store(home, store)
    removed = []
    for document, index, _ in list(_labelled(store, name)):
        removed += store.remove(passage_label(name, document, index))
    return removed + store.remove(name)
