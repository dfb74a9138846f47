"""The model worker of ``cag serve``: one thread owns the model, the store and the caches in memory.

The model is not re-entrant, so every request is decoded by this one thread; the async
front submits jobs and receives their events. Requests that continue the same context
(the same knowledge base, or the same cached prefix of a prompt) run as rows of one
``Decoder`` batch, and a request that arrives while that batch runs joins it at the next
step. A client that leaves has its row dropped at the next step. Restored caches live in
a ``ContextLRU`` bounded by ``--cache-ram``; new prompt caches are written to the store by
a writer thread, so a write never stalls the decoding of others.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from transformers import DynamicCache

from cag.errors import CacheMemoryError, CacheNotFoundError, CagError, ModelNotFoundError, RequestError, StoreError
from cag.generate import Decoder, Row, Sampling
from cag.hashing import chain_seed, sequence_key
from cag.knowledge import KnowledgeBase
from cag.kvcache import cache_from_layers
from cag.model import LoadedModel
from cag.prefill import DEFAULT_CHUNK_SIZE, new_cache
from cag.prompt import PromptBuilder
from cag.prompt_cache import last_user_turn_start, room_for_answer, store_prompt, stored_prefix

from .contexts import Context, ContextLRU

__all__ = ["Completion", "Delta", "Failed", "Finished", "GenerationRequest", "Job", "Started", "Worker",
           "WorkerConfig", "base_model_id"]

log = logging.getLogger("cag.server")


# ------------------------------------------------------------------ requests and events


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate, independent of the HTTP layer: a chat (``messages``) or a plain ``prompt``."""

    model: str
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    max_tokens: int = 256
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    completion_tokens: int
    finish_reason: str  # as OpenAI says it: "stop" (end of answer, or a stop string) or "length"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens restored from a cache (memory or store), not prefilled
    ttft_s: float  # from the job's arrival to its first token
    total_s: float


@dataclass(frozen=True)
class Started:
    """The prompt is prefilled and the row decodes: usage's prompt side is known."""

    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    completion: Completion


@dataclass(frozen=True)
class Failed:
    error: Exception


Event = Started | Delta | Finished | Failed


class StopText:
    """Releases answer text as it grows, holding back any tail that could begin a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that is safe to emit now, and whether a stop string was reached (nothing after it is emitted)."""
        held = self._held + text
        hits = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return held[: min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class Job:
    """One request inside the worker: its events go to ``emit`` (called on the worker thread)."""

    def __init__(self, request: GenerationRequest, emit: Callable[[Event], None]) -> None:
        self.request = request
        self.emit = emit
        self.received = time.perf_counter()
        self.cancelled = threading.Event()
        self.prompt: _Prompt | None = None  # tokenized on the worker, once
        self.first_token_s: float | None = None
        self.stopped = False  # a stop string was reached
        self._stop = StopText(request.stop)
        self._parts: list[str] = []

    def on_text(self, text: str) -> None:
        if self.stopped:
            return
        released, self.stopped = self._stop.feed(text)
        self._send(released)

    def finish(self, row: Row) -> None:
        if not self.stopped:
            self._send(self._stop.flush())
        now = time.perf_counter()
        completion = Completion(
            text="".join(self._parts),
            completion_tokens=len(row.token_ids),
            finish_reason="length" if row.finish_reason == "length" else "stop",
            prompt_tokens=self.prompt.prompt_tokens,
            cached_tokens=self.prompt.cached_tokens,
            ttft_s=(self.first_token_s if self.first_token_s is not None else now) - self.received,
            total_s=now - self.received,
        )
        self.emit(Finished(completion))

    def _send(self, text: str) -> None:
        if text:
            self._parts.append(text)
            self.emit(Delta(text))


@dataclass
class _Prompt:
    """A job's prompt, tokenized: ``feed`` goes after the context's first ``cached_tokens`` tokens."""

    ids: list[int]  # the whole prompt (a knowledge base's: its question only; the context is the entry)
    entry: Any | None  # the knowledge base's store entry, None for the served model
    limit: int  # most new tokens: the request's, within the room left in the window
    store_upto: int = 0  # leading prompt tokens worth storing as a prompt cache (0: none)
    context: Context | None = None
    cached_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return (self.entry.tokens if self.entry is not None else 0) + len(self.ids)

    @property
    def feed(self) -> list[int]:
        return self.ids if self.entry is not None else self.ids[self.cached_tokens :]


@dataclass(eq=False)
class _Group:
    """The rows decoding against one context (a whole cache or a prefix of one)."""

    context: Context
    decoder: Decoder
    jobs: dict[Row, Job] = field(default_factory=dict)


# ------------------------------------------------------------------------- worker


@dataclass(frozen=True)
class WorkerConfig:
    cache_ram: int = 2 << 30  # bytes of restored caches held in memory
    max_batch: int = 8  # rows decoding together against one context; more requests wait their turn
    chunk_size: int = DEFAULT_CHUNK_SIZE


def base_model_id(lm: LoadedModel) -> str:
    """The served model's id in the API: its name, or a local folder's last part (a full path is no id)."""
    return os.path.basename(lm.name.rstrip("/")) if os.path.isabs(lm.name) else lm.name


class Worker:
    """Runs every request on one thread; ``submit`` and ``call`` are safe from any thread."""

    def __init__(self, lm: LoadedModel, open_store: Callable[[], Any], config: WorkerConfig = WorkerConfig()) -> None:
        self.lm = lm
        self.config = config
        self.model_id = base_model_id(lm)
        self.contexts = ContextLRU(config.cache_ram)
        self._open_store = open_store
        self._builder = PromptBuilder(lm.tokenizer)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: deque[Job] = deque()
        self._groups: dict[tuple[str, int], _Group] = {}
        self._sizes: dict[str, int] = {}  # bytes a knowledge base took in memory, known after its first restore
        self._empty = Context("", new_cache(), [], lm.kv_dtype, nbytes=0)  # where a prompt with nothing cached starts
        self._stopping = False
        self._store = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="cag-store-writer")
        self._writer_local = threading.local()
        self._thread = threading.Thread(target=self._run, name="cag-model-worker", daemon=True)
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # ---------------------------------------------------------------- any thread

    def start(self) -> None:
        """Start the thread and wait until it has opened the store (its errors are raised here)."""
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self) -> None:
        """Finish every submitted job, then stop; pending store writes complete before this returns."""
        if self._thread.is_alive():
            self._inbox.put(("stop", None))
            self._thread.join()
        self._writer.shutdown(wait=True)

    def submit(self, job: Job) -> None:
        self._inbox.put(("job", job))

    def cancel(self, job: Job) -> None:
        """The client left: its row is dropped at the next step (nothing more is emitted)."""
        job.cancelled.set()
        self._inbox.put(("wake", None))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the worker thread between steps (it owns the store); returns its future."""
        future: Future = Future()
        self._inbox.put(("call", (fn, future)))
        return future

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def running(self) -> int:
        return sum(len(g.jobs) for g in list(self._groups.values()))

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def models(self) -> list[str]:
        """The served model's id, then every knowledge base (named cache) of this model in the store. Worker thread."""
        names = {name for e in self._store.entries() if e.fingerprint == self.lm.fingerprint for name in e.names}
        return [self.model_id, *sorted(names - {self.model_id})]

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        try:
            self._store = self._open_store()
        except BaseException as exc:  # reported by start()
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not (self._stopping and not self._groups and not self._pending):
                self._drain(block=not self._groups and not self._pending)
                self._admit()
                for key in list(self._groups):
                    self._step(key)
        finally:
            getattr(self._store, "close", lambda: None)()

    def _drain(self, block: bool) -> None:
        """Take what was sent: waits for the first message only when there is nothing to do."""
        try:
            message = self._inbox.get(block=block)
        except queue.Empty:
            return
        while True:
            self._handle(*message)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "job":
            self._pending.append(payload)
        elif kind == "call":
            fn, future = payload
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
        elif kind == "stop":
            self._stopping = True

    # ------------------------------------------------------------- admission

    def _admit(self) -> None:
        """Give every pending job a row: jobs of one context join its batch together, in one prefill."""
        joining: dict[tuple[str, int], list[Job]] = {}
        still: deque[Job] = deque()
        for job in self._pending:
            if job.cancelled.is_set():
                continue
            try:
                key = self._place(job, joining)
            except Exception as exc:  # a bad request (or a store that failed): this job only
                self._fail(job, exc)
                continue
            if key is None:
                still.append(job)
            else:
                joining.setdefault(key, []).append(job)
        self._pending = still
        for key, jobs in joining.items():
            self._join(self._groups[key], jobs)

    def _place(self, job: Job, joining: dict[tuple[str, int], list[Job]]) -> tuple[str, int] | None:
        """The group ``job`` joins now (created if need be), or None if it must wait (batch full, memory held)."""
        if job.prompt is None:
            job.prompt = self._tokenize(job.request)
        prompt = job.prompt
        if prompt.context is None:
            found = self._context(prompt)
            if found is None:
                return None
            prompt.context, prompt.cached_tokens = found
        key = (prompt.context.key, prompt.cached_tokens)
        group = self._groups.get(key)
        if group is not None and len(group.decoder) + len(joining.get(key, ())) >= self.config.max_batch:
            return None
        if group is None:
            if prompt.context is not self._empty and not self.contexts.add(prompt.context):
                prompt.context = None  # evicted while it waited, and no room now: look again next time
                return None
            self._groups[key] = self._new_group(prompt.context, prompt.cached_tokens)
        return key

    def _tokenize(self, request: GenerationRequest) -> _Prompt:
        entry = self._knowledge_base(request.model)
        if entry is not None:
            ids, room = KnowledgeBase(self.lm, self._store, entry).question_prompt(self._question(request, entry))
            return _Prompt(ids, entry, min(request.max_tokens, room))
        if request.messages is not None:
            messages = list(request.messages)
            ids = self._builder.chat_ids(messages)
            upto = last_user_turn_start(self._builder, messages, ids)
        else:
            # Plain text stays text: special-token strings in it are not control tokens.
            ids = list(self.lm.tokenizer(request.prompt, split_special_tokens=True)["input_ids"])
            upto = len(ids)
        if not ids:
            raise RequestError("the prompt is empty: send some text", "prompt")
        return _Prompt(ids, None, min(request.max_tokens, room_for_answer(self.lm, ids)), store_upto=upto)

    def _knowledge_base(self, model: str):
        """None for the served model; else the store entry of the knowledge base ``model`` names."""
        if model in (self.model_id, self.lm.name):
            return None
        try:
            entry = self._store.resolve(model)
        except (CacheNotFoundError, StoreError):  # no such name, or not a name at all
            entry = None
        if entry is None or model not in entry.names:
            raise ModelNotFoundError(
                f"the model {model!r} does not exist: this server answers as {self.model_id!r} or as a knowledge base "
                f"of its store (GET /v1/models lists them); make one with `cag build DOCS --name {model}`"
            )
        return entry

    @staticmethod
    def _question(request: GenerationRequest, entry) -> str:
        """A knowledge base answers one question, as `cag ask` does: its documents are the system turn."""
        if request.messages is None:
            return request.prompt
        if len(request.messages) != 1 or request.messages[0]["role"] != "user":
            raise RequestError(
                f"the knowledge base {entry.names[0]!r} answers one user message: its documents are the system turn, "
                "so send a single user message (for a longer chat, use the served model with your own system message)",
                "messages",
            )
        return request.messages[0]["content"]

    def _context(self, prompt: _Prompt) -> tuple[Context, int] | None:
        if prompt.entry is not None:
            context = self._knowledge_base_context(prompt.entry)
            return None if context is None else (context, prompt.entry.tokens)
        return self._prompt_context(prompt.ids)

    def _knowledge_base_context(self, entry) -> Context | None:
        """The knowledge base's cache in memory, restored as `cag ask` restores it; None while memory is held by others."""
        context = self.contexts.get(entry.key)
        if context is not None:
            return context
        known = self._sizes.get(entry.key)
        if known is not None and known <= self.contexts.limit and not self.contexts.can_hold(known):
            return None  # wait for running batches to release theirs, without restoring it again
        kb = KnowledgeBase(self.lm, self._store, entry)
        kb.restore()
        context = Context(entry.key, kb.cache, kb.context_ids, entry.kv_dtype)
        self._sizes[entry.key] = context.nbytes
        if context.nbytes > self.contexts.limit:
            raise CacheMemoryError(
                f"the knowledge base {entry.names[0]!r} takes {context.nbytes} bytes in memory, more than the "
                f"{self.contexts.limit} that --cache-ram allows: restart the server with a larger --cache-ram"
            )
        return context if self.contexts.add(context) else None

    def _prompt_context(self, ids: list[int]) -> tuple[Context, int]:
        """The longest cached prefix of a prompt: memory first, then the store; a whole block at least."""
        block = self._store.block_size
        best = self.contexts.longest_prefix(ids[:-1], self.lm.kv_dtype, minimum=block) or (self._empty, 0)
        match = stored_prefix(self._store, self.lm, ids)
        if match is not None and match.tokens > best[1]:
            restored = self._store.restore(match.entry, match.tokens, device=self.lm.device, dtype=self.lm.dtype)
            context = Context(f"{match.entry.key}@{match.tokens}", restored.cache, list(ids[: match.tokens]),
                              self.lm.kv_dtype)
            if self.contexts.add(context):
                return context, match.tokens
        return best

    def _new_group(self, context: Context, tokens: int) -> _Group:
        self.contexts.pin(context)
        cache = context.cache
        if tokens < len(context.token_ids):  # a prefix of a longer context: views, no copy
            cache = cache_from_layers([(l.keys[:, :, :tokens], l.values[:, :, :tokens]) for l in cache.layers])
        return _Group(context, Decoder(self.lm, cache, chunk_size=self.config.chunk_size))

    def _join(self, group: _Group, jobs: list[Job]) -> None:
        try:
            rows = group.decoder.add([j.prompt.feed for j in jobs], [j.prompt.limit for j in jobs],
                                     [j.request.sampling for j in jobs], [j.on_text for j in jobs])
        except Exception as exc:  # the batch may be half-changed: end it, with every job in it
            for job in jobs:
                self._fail(job, exc)
            self._retire(group, exc)
            return
        for row, job in zip(rows, jobs):
            group.jobs[row] = job
            job.emit(Started(job.prompt.prompt_tokens, job.prompt.cached_tokens))
            self._keep_prompt(group, row, job.prompt)

    def _keep_prompt(self, group: _Group, row: Row, prompt: _Prompt) -> None:
        """Store the prompt up to its last user turn (if new and a block at least): in memory now, on disk soon."""
        upto = prompt.store_upto
        if prompt.entry is not None or upto < self._store.block_size or upto <= prompt.cached_tokens:
            return
        if row not in group.decoder.rows:
            return  # the appending path: a row that waits its turn has no keys yet
        ids = prompt.ids[:upto]
        seed = chain_seed(self.lm.fingerprint, self.lm.kv_dtype, self._store.block_size)
        key = sequence_key(ids, seed, self._store.block_size)
        if self.contexts.get(key) is not None:
            return
        cache = group.decoder.prompt_cache(row, upto - prompt.cached_tokens)
        self.contexts.add(Context(key, cache, ids, self.lm.kv_dtype))
        self._writer.submit(self._write, cache, ids)

    def _write(self, cache: DynamicCache, ids: list[int]) -> None:
        """On the writer thread, with a store of its own (a store's connection belongs to one thread)."""
        try:
            if getattr(self._writer_local, "store", None) is None:
                self._writer_local.store = self._open_store()
            store_prompt(self._writer_local.store, self.lm, cache, ids)
        except Exception:
            log.exception("could not store a prompt cache of %d tokens", len(ids))

    # ------------------------------------------------------------------ steps

    def _step(self, key: tuple[str, int]) -> None:
        group = self._groups[key]
        try:
            finished = group.decoder.step()
        except Exception as exc:
            self._retire(group, exc)
            return
        now = time.perf_counter()
        for row, job in group.jobs.items():
            if job.first_token_s is None and (len(row.stream) or row.finish_reason is not None):
                job.first_token_s = now
        for row in finished:
            group.jobs.pop(row).finish(row)
        for row, job in list(group.jobs.items()):
            if job.stopped or job.cancelled.is_set():
                group.decoder.drop(row, "stop" if job.stopped else "cancelled")
                del group.jobs[row]
                if job.stopped:
                    job.finish(row)
        if not len(group.decoder):
            self._drop_group(group)

    def _retire(self, group: _Group, exc: Exception) -> None:
        """A batch failed mid-way: every job in it gets the error, the server goes on."""
        if not isinstance(exc, CagError):
            log.error("a batch of %d failed", len(group.jobs), exc_info=exc)
        for job in group.jobs.values():
            self._fail(job, exc)
        group.jobs.clear()
        self._drop_group(group)

    def _drop_group(self, group: _Group) -> None:
        group.decoder.close()
        self.contexts.unpin(group.context)
        self._groups = {k: g for k, g in self._groups.items() if g is not group}

    def _fail(self, job: Job, exc: Exception) -> None:
        if not isinstance(exc, CagError):
            log.error("request failed", exc_info=exc)
        job.emit(Failed(exc))
