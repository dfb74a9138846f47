"""Benchmark: time to first token with and without the cache, at several context lengths.

For each context length one cache is built from a cut of the documents (the bundled
corpus by default) and stored; then, side by side, the same question is timed

* ``full``: re-prefilling the whole prompt (``ask(use_cache=False)``), the baseline;
* ``restored_cold``: restoring the cache from disk with the file's pages dropped from
  the page cache first (where the OS lets us), then asking;
* ``restored_warm``: restoring it with the file in the page cache, then asking;
* ``in_memory``: asking with the cache already in memory.

It also measures

* per-question latency: each question asked alone, the way a user asks it: the cache
  restored from the store (warm), the question prefilled, the answer decoded;
* with ``peer="llamacpp"``, llama.cpp answering the same questions after the same
  context tokens with the same GGUF weights and thread count, alternated with cag
  question by question so both see the same machine;
* batched asking: ``ask_many`` of all the questions in batches against one asking them
  one by one, and whether the answers are the same;
* with a ``kv_dtype`` other than the model's, the share of answers from the stored
  cache identical to those from the cache as prefilled, in the model's dtype;
* the cache's bytes per token on disk, and restore throughput next to a plain
  ``safetensors`` read of the same file, warm (from the page cache) and cold (from the
  disk: the floor any cold restore is held to).

Each time-to-first-token mode is one function in ``TTFT_MODES`` and one field of
``BenchRow``: a new mode is one more of each. Nothing here prints; progress goes to
an optional callback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import inspect
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from ..documents import Document
from ..errors import BenchError
from ..knowledge import KnowledgeBase, load, open_store, store_context
from ..kvcache import check_kv_dtype
from ..model import DEFAULT_MODEL, EMBEDDED_NAME, LoadedModel
from ..generate import generate
from ..block_linear import BlockReadLinear
from ..head import HalfReadHead
from ..prefill import prefill
from ..prompt import PromptBuilder
from .peers.llamacpp import LlamaCppPeer, llama_cpp_module
from .workload import checked_questions, bundled_corpus, bundled_questions, context_of_length, fit_lengths, read_questions

__all__ = [
    "BenchError",
    "BenchRow",
    "TTFT_MODES",
    "MODE_LABELS",
    "DEFAULT_LENGTHS",
    "PEERS",
    "bundled_corpus",
    "bundled_questions",
    "read_questions",
    "fit_lengths",
    "run_bench",
    "machine_info",
    "plot_rows",
]

DEFAULT_LENGTHS = (512, 1024, 2048, 4096)
PEERS = ("llamacpp",)
_MB = 1e6  # throughput in MB/s means 10^6 bytes per second

BenchProgress = Callable[[str, int, int], None]
"""Called with (what is being measured, steps done, steps total)."""


@dataclass
class BenchRow:
    """What one context length measured; times are medians over the repeats, in seconds."""

    requested_tokens: int
    context_tokens: int
    ttft_full_s: float
    ttft_restored_cold_s: float
    ttft_restored_warm_s: float
    ttft_in_memory_s: float
    # Each question alone, as a user asks it: warm restore from the store + question prefill + answer.
    # Per question: the median over the repeats; here: the mean over the questions.
    per_question_s: float
    per_question_ttft_s: float  # restore + question prefill, up to the first new token
    per_question_restore_s: float
    new_tokens: float  # mean new tokens per answer (an answer ends at max_new_tokens or the end-of-turn token)
    decode_tok_s: float  # tokens after each answer's first / the seconds they took, summed over the questions
    # What a decode step must read: every weight it multiplies by (the input embedding only
    # where it is also the output head) and the KV of the context; at decode_tok_s steps a
    # second that is decode_gb_s, a share decode_bandwidth_share of memory_gb_s, this machine's
    # copy bandwidth at the same threads (measured once per run).
    decode_bytes_per_step: int
    decode_gb_s: float
    memory_gb_s: float
    decode_bandwidth_share: float
    questions: int
    max_new_tokens: int
    prefill_tok_s: float  # prompt tokens / ttft_full_s
    cache_bytes: int
    bytes_per_token: float  # file bytes / context tokens: KV tensors, token ids and header
    kv_bytes_per_token: float  # the KV tensors in memory as restored, whose dtype may differ from the file's
    restore_warm_s: float
    restore_cold_s: float
    restore_mb_s: float  # file bytes / warm restore seconds
    restore_cold_mb_s: float
    raw_read_mb_s: float | None  # file bytes / a plain safetensors.torch.load_file reading all of it (warm)
    raw_read_cold_mb_s: float | None  # the same read with the file's pages dropped first: the disk's floor
    cold_dropped: bool  # whether the file's pages were really out of the page cache for the cold runs
    kv_dtype: str  # how the cache is stored
    # Share of the per-question answers (from the stored cache) token-identical to the answers of
    # full precision: the reference model's (run_bench's ``reference``, e.g. the float32 weights of
    # a q4 model) when given, else the cache as prefilled in the model's dtype; None when neither
    # the weights nor the stored cache differ from full precision.
    identical_to_full_precision: float | None
    batch_size: int
    one_by_one_s: float  # all the questions asked one by one, cache in memory (median of the repeats)
    batched_s: float  # the same questions through ask_many in batches of batch_size
    batch_identical: float  # share of batched answers token-identical to the one-by-one answers
    peer: str | None  # the engine the per-question latency is compared with, None without a peer
    peer_per_question_s: float | None  # its restore (from memory) + question + answer, as per_question_s
    peer_ttft_s: float | None
    peer_new_tokens: float | None
    peer_decode_tok_s: float | None
    peer_identical: float | None  # share of its answers token-identical to cag's
    repeats: int
    cache_name: str
    model: str
    device: str
    threads: int

    @property
    def speedup_warm(self) -> float:
        """How many times sooner the first token comes from a warm restore than from re-prefill."""
        return self.ttft_full_s / self.ttft_restored_warm_s if self.ttft_restored_warm_s > 0 else math.inf

    @property
    def batch_speedup(self) -> float:
        """Throughput of batched asking over asking one by one."""
        return self.one_by_one_s / self.batched_s if self.batched_s > 0 else math.inf

    @property
    def vs_peer(self) -> float | None:
        """cag's per-question latency over the peer's: 1.5 means cag takes 1.5 times as long."""
        return self.per_question_s / self.peer_per_question_s if self.peer_per_question_s else None

    def to_dict(self) -> dict:
        row = asdict(self)
        row.update(speedup_warm=self.speedup_warm, batch_speedup=self.batch_speedup, vs_peer=self.vs_peer)
        # JSON has no infinity: a ratio over a zero time is reported as null.
        return {k: (round(v, 6) if math.isfinite(v) else None) if isinstance(v, float) else v for k, v in row.items()}


# --------------------------------------------------------------- page cache


def _drop_from_page_cache(path: Path) -> bool:
    """Ask the OS to evict the file's pages; True only if none remain resident afterwards."""
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except OSError:
        return False
    resident = _resident_fraction(path)
    # Without mincore we cannot check; the advice was accepted, so trust it.
    return resident is None or resident == 0.0


def _resident_fraction(path: Path) -> float | None:
    """Share of the file's pages in the page cache (Linux mincore), None where it cannot be asked."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        size = path.stat().st_size
        if size == 0:
            return 0.0
        page = os.sysconf("SC_PAGE_SIZE")
        pages = (size + page - 1) // page
        fd = os.open(path, os.O_RDONLY)
        try:
            prot_read, map_shared = 1, 1
            addr = libc.mmap(None, size, prot_read, map_shared, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                return sum(v & 1 for v in vec) / pages
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    except (OSError, AttributeError, ValueError):
        return None


# --------------------------------------------------------------- measurements


@dataclass
class _Target:
    """Everything the measurements of one context length share."""

    lm: LoadedModel
    store: object
    kb: KnowledgeBase  # holds the context cache in memory
    path: Path | None  # the cache file, where the store keeps one on this machine
    question: str
    repeats: int
    cold_dropped: list[bool] = field(default_factory=list)
    restore_warm: list[float] = field(default_factory=list)
    restore_cold: list[float] = field(default_factory=list)


def _ttft_full(t: _Target) -> float:
    return t.kb.ask(t.question, max_new_tokens=1, use_cache=False).ttft_s


def _ttft_in_memory(t: _Target) -> float:
    return t.kb.ask(t.question, max_new_tokens=1).ttft_s


def _ttft_restored(t: _Target, cold: bool) -> float:
    """Open the cache afresh and ask: the first answer restores it, and its wait includes the restore."""
    if cold:
        t.cold_dropped.append(t.path is not None and _drop_from_page_cache(t.path))
    kb = load(t.kb.key, model=t.lm, store=t.store)
    answer = kb.ask(t.question, max_new_tokens=1)
    (t.restore_cold if cold else t.restore_warm).append(kb.restore_s)
    return answer.ttft_s


def _ttft_restored_warm(t: _Target) -> float:
    return _ttft_restored(t, cold=False)


def _ttft_restored_cold(t: _Target) -> float:
    return _ttft_restored(t, cold=True)


# Row field -> measurement of one time to first token. Order is run order: the warm
# restore follows a read of the file, and the cold one evicts it.
TTFT_MODES: dict[str, Callable[[_Target], float]] = {
    "ttft_in_memory_s": _ttft_in_memory,
    "ttft_full_s": _ttft_full,
    "ttft_restored_warm_s": _ttft_restored_warm,
    "ttft_restored_cold_s": _ttft_restored_cold,
}

# Labels for tables and plots.
MODE_LABELS: dict[str, str] = {
    "ttft_full_s": "full re-prefill",
    "ttft_restored_cold_s": "restored (cold)",
    "ttft_restored_warm_s": "restored (warm)",
    "ttft_in_memory_s": "in memory",
}


def _raw_read_seconds(path: Path) -> float:
    """A plain safetensors read of the whole file into memory: the floor any restore is held to.

    safetensors maps the file by default and only touches pages when a tensor is used,
    which would time nothing; its ``pread`` backend (0.8+) reads every byte, and older
    versions are made to by copying each mapped tensor.
    """
    from safetensors.torch import load_file

    start = time.perf_counter()
    if "backend" in inspect.signature(load_file).parameters:
        load_file(str(path), backend="pread")
    else:
        for tensor in load_file(str(path)).values():
            tensor.clone()
    return time.perf_counter() - start


def _raw_reads(path: Path, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of plain reads of the file, warm then cold; the last read leaves it in the page cache."""
    _raw_read_seconds(path)  # untimed: puts the file in the page cache
    warm = [_raw_read_seconds(path) for _ in range(repeats)]
    cold = []
    for _ in range(repeats):
        if not _drop_from_page_cache(path):
            break  # it would be one more warm read
        cold.append(_raw_read_seconds(path))
    return warm, cold


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _entry_path(store, entry) -> Path | None:
    """The file holding an entry, for stores that keep files on this machine (``LocalStore.path``)."""
    path = Path(store.path(entry)) if hasattr(store, "path") else None
    return path if path is not None and path.is_file() else None


# ----------------------------------------------------------------------- run


def run_bench(
    lm: LoadedModel,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    questions: Sequence[str] | None = None,
    *,
    documents: Sequence[Document] | None = None,
    store=None,
    home: str | os.PathLike | None = None,
    max_new_tokens: int = 32,
    repeats: int = 3,
    kv_dtype: str | None = None,
    batch_size: int = 8,
    peer: str | None = None,
    reference: LoadedModel | None = None,
    on_progress: BenchProgress | None = None,
) -> list[BenchRow]:
    """Measure every mode at every context length (clipped to the model's window); one row per length.

    Caches are stored as ``bench-<tokens>`` in the store (``home``'s local store by
    default), in ``kv_dtype`` (default: the model's dtype), so the numbers describe the
    same files ``cag ask`` would read. ``peer="llamacpp"`` times llama.cpp on the same
    questions (it needs ``llama-cpp-python`` and the default model). ``reference``, the
    full-precision model of a quantized ``lm``, answers the same questions from its own
    prefill, for the share of answers that quantization leaves unchanged.
    """
    questions = checked_questions(bundled_questions() if questions is None else questions)
    documents = list(documents) if documents else bundled_corpus()
    if repeats < 1:
        raise BenchError(f"repeats must be at least 1, got {repeats}")
    if max_new_tokens < 1:
        raise BenchError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise BenchError(f"batch size must be at least 1, got {batch_size}")
    kv_dtype = check_kv_dtype(kv_dtype if kv_dtype is not None else lm.dtype)
    _check_peer(lm, peer)
    targets = fit_lengths(lm, lengths, questions, max_new_tokens)
    store = open_store(home, store)
    builder = PromptBuilder(lm.tokenizer)
    steps_per_length = 5 + (len(TTFT_MODES) + 2) * repeats
    total = steps_per_length * len(targets)
    done = 0

    def step(what: str) -> None:
        nonlocal done
        if on_progress is not None:
            on_progress(what, done, total)
        done += 1

    bandwidth = memory_bandwidth()
    rows = []
    for tokens in targets:
        step(f"{tokens} tokens: cutting the documents")
        ids = context_of_length(builder, documents, tokens)
        step(f"{tokens} tokens: prefilling and storing the cache")
        kb, prefilled = _build_cache(lm, store, ids, f"bench-{tokens}", kv_dtype)
        path = _entry_path(store, kb.entry)
        target = _Target(lm, store, kb, path, questions[0], repeats)
        step(f"{tokens} tokens: warming up, plain reads of the file")
        kb.ask(questions[0], max_new_tokens=1)  # first call at a new length pays one-off allocations
        raw_warm, raw_cold = _raw_reads(path, repeats) if path is not None else ([], [])
        times: dict[str, float] = {}
        for column, measure in TTFT_MODES.items():
            runs = []
            for r in range(repeats):
                step(f"{tokens} tokens: {MODE_LABELS.get(column, column)} ({r + 1}/{repeats})")
                runs.append(measure(target))
            times[column] = _median(runs)
        step(f"{tokens} tokens: starting {peer}" if peer else f"{tokens} tokens: per question")
        step_here = lambda what: step(f"{tokens} tokens: {what}")  # noqa: E731
        alone = _per_question(target, questions, max_new_tokens, peer, ids, step_here)
        if reference is not None:
            step(f"{tokens} tokens: reference answers from {reference.name}")
            ref_cache = prefill(reference, ids).cache
            reference_answers = [generate(reference, ref_cache, builder.question_ids(q), max_new_tokens=max_new_tokens)
                                 for q in questions]
        elif prefilled is kb.cache:
            reference_answers = None
            step(f"{tokens} tokens: stored as prefilled, no reference answers needed")
        else:
            step(f"{tokens} tokens: reference answers from the cache as prefilled ({lm.dtype})")
            ref = KnowledgeBase(lm, store, kb.entry, cache=prefilled, context_ids=ids)
            reference_answers = [ref.ask(q, max_new_tokens=max_new_tokens) for q in questions]
        batched = _batched(kb, questions, batch_size, max_new_tokens, repeats, step_here)
        rows.append(_row(lm, kb, ids, tokens, path, times, (raw_warm, raw_cold), target, alone, reference_answers, batch_size,
                         batched, max_new_tokens, repeats, bandwidth))
    if on_progress is not None:
        on_progress("done", total, total)
    return rows


def _check_peer(lm: LoadedModel, peer: str | None) -> None:
    """Refuse a peer that cannot run, before any measurement."""
    if peer is None:
        return
    if peer not in PEERS:
        raise BenchError(f"unknown peer {peer!r}: choose one of {', '.join(PEERS)}")
    if lm.name.split(":")[0] != EMBEDDED_NAME:
        raise BenchError(f"the {peer} peer runs the embedded model's GGUF: bench the default model "
                         f"({DEFAULT_MODEL!r}), not {lm.name!r}")
    if lm.device.type != "cpu":
        raise BenchError(f"the {peer} peer runs on the CPU: bench on the CPU to compare like with like")

    llama_cpp_module()  # raises PeerError, with how to install it, when it is missing


@dataclass
class _Alone:
    """Each question asked alone, ``repeats`` times; per question the median time, the last answer."""

    answers: list = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    restore: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)  # after the first token
    peer_answers: list = field(default_factory=list)
    peer_total: list[float] = field(default_factory=list)
    peer_ttft: list[float] = field(default_factory=list)
    peer_decode_s: list[float] = field(default_factory=list)


def _per_question(t: _Target, questions: list[str], max_new_tokens: int, peer: str | None, ids: list[int],
                  step: Callable[[str], None]) -> _Alone:
    """Each question alone: restore from the store (warm) + ask; the peer, if any, right after each one.

    Alternating question by question puts both engines under the same load, which on a
    shared machine drifts more between minutes than between seconds.
    """
    question_ids = [t.kb.prompt.question_ids(q) for q in questions]
    engine = _open_peer(t.lm, peer, ids, question_ids, max_new_tokens) if peer else None
    runs: list[list[tuple]] = [[] for _ in questions]
    peer_runs: list[list] = [[] for _ in questions]
    try:
        for r in range(t.repeats):
            step(f"{len(questions)} questions one at a time ({r + 1}/{t.repeats})")
            for i, question in enumerate(questions):
                kb = load(t.kb.key, model=t.lm, store=t.store)
                runs[i].append((kb.ask(question, max_new_tokens=max_new_tokens), kb.restore_s))
                if engine is not None:
                    peer_runs[i].append(engine.answer(question_ids[i]))
    finally:
        if engine is not None:
            engine.close()
    out = _Alone()
    for own, theirs in zip(runs, peer_runs):
        out.answers.append(own[-1][0])
        out.total.append(_median([a.total_s for a, _ in own]))
        out.ttft.append(_median([a.ttft_s for a, _ in own]))
        out.restore.append(_median([s for _, s in own]))
        out.decode_s.append(_median([a.total_s - a.ttft_s for a, _ in own]))
        if theirs:
            out.peer_answers.append(theirs[-1])
            out.peer_total.append(_median([p.total_s for p in theirs]))
            out.peer_ttft.append(_median([p.restore_s + p.prefill_s for p in theirs]))
            out.peer_decode_s.append(_median([p.decode_s for p in theirs]))
    return out


def _decode_rate(new_tokens: Sequence[int], seconds: Sequence[float]) -> float:
    """Decoding speed over all the answers: the tokens after each answer's first (which the
    prefill's logits give) over the seconds they took. Summed, so a one-token answer adds no
    time and no tokens instead of a rate of zero."""
    tokens = sum(max(0, n - 1) for n in new_tokens)
    spent = sum(seconds)
    return tokens / spent if spent > 0 else 0.0


def _open_peer(lm: LoadedModel, peer: str, ids: list[int], question_ids: list[list[int]], max_new_tokens: int):

    return LlamaCppPeer(ids, threads=torch.get_num_threads(), max_question_tokens=max(map(len, question_ids)),
                        new_tokens=max_new_tokens, eos_token_ids=lm.eos_token_ids)


def _batched(kb: KnowledgeBase, questions: list[str], batch_size: int, max_new_tokens: int, repeats: int,
             step: Callable[[str], None]) -> tuple[float, float, float]:
    """Seconds to answer all the questions one by one and in batches (medians), and the share of equal answers."""
    one, many = [], []
    for r in range(repeats):
        step(f"{len(questions)} questions one by one, then in batches of {batch_size} ({r + 1}/{repeats})")
        start = time.perf_counter()
        alone = kb.ask_many(questions, batch_size=1, max_new_tokens=max_new_tokens)
        one.append(time.perf_counter() - start)
        start = time.perf_counter()
        together = kb.ask_many(questions, batch_size=batch_size, max_new_tokens=max_new_tokens)
        many.append(time.perf_counter() - start)
    return _median(one), _median(many), _share_identical(together, alone)


def _share_identical(answers: Sequence, references: Sequence) -> float:
    """Share of answers whose token ids equal the reference's (Answer or PeerQuestion rows)."""
    same = sum(list(a.token_ids) == list(b.token_ids) for a, b in zip(answers, references))
    return same / len(references) if references else 0.0


def _build_cache(lm: LoadedModel, store, ids: list[int], name: str, kv_dtype: str) -> tuple[KnowledgeBase, DynamicCache]:
    """Prefill the context and store it in ``kv_dtype``; returns the knowledge base (which answers from
    what was stored) and the cache as prefilled."""
    cache = prefill(lm, ids).cache
    return store_context(lm, store, cache, ids, kv_dtype=kv_dtype, sources=("cag bench",), name=name), cache


def _row(lm, kb, ids, requested, path, times, raw: tuple[list[float], list[float]], target: _Target, alone: _Alone,
         reference, batch_size: int, batched: tuple[float, float, float], max_new_tokens, repeats,
         memory_gb_s: float) -> BenchRow:
    size = path.stat().st_size if path is not None else kb.entry.bytes
    kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in
                   ((layer.keys, layer.values) for layer in kb.cache.layers))
    prompt_tokens = len(ids) + len(kb.prompt.question_ids(target.question))
    restore_warm = _median(target.restore_warm)
    restore_cold = _median(target.restore_cold)
    mean = statistics.fmean
    has_peer = bool(alone.peer_answers)
    decode_tok_s = _decode_rate([a.new_tokens for a in alone.answers], alone.decode_s)
    step_bytes = weight_bytes_per_step(lm.model) + kv_bytes
    return BenchRow(
        requested_tokens=requested,
        context_tokens=len(ids),
        ttft_full_s=times["ttft_full_s"],
        ttft_restored_cold_s=times["ttft_restored_cold_s"],
        ttft_restored_warm_s=times["ttft_restored_warm_s"],
        ttft_in_memory_s=times["ttft_in_memory_s"],
        per_question_s=mean(alone.total),
        per_question_ttft_s=mean(alone.ttft),
        per_question_restore_s=mean(alone.restore),
        new_tokens=mean(a.new_tokens for a in alone.answers),
        decode_tok_s=decode_tok_s,
        decode_bytes_per_step=step_bytes,
        decode_gb_s=step_bytes * decode_tok_s / 1e9,
        memory_gb_s=memory_gb_s,
        decode_bandwidth_share=step_bytes * decode_tok_s / 1e9 / memory_gb_s,
        questions=len(alone.answers),
        max_new_tokens=max_new_tokens,
        prefill_tok_s=prompt_tokens / times["ttft_full_s"],
        cache_bytes=size,
        bytes_per_token=size / len(ids),
        kv_bytes_per_token=kv_bytes / len(ids),
        restore_warm_s=restore_warm,
        restore_cold_s=restore_cold,
        restore_mb_s=size / restore_warm / _MB,
        restore_cold_mb_s=size / restore_cold / _MB,
        raw_read_mb_s=size / _median(raw[0]) / _MB if raw[0] else None,
        raw_read_cold_mb_s=size / _median(raw[1]) / _MB if raw[1] else None,
        cold_dropped=bool(target.cold_dropped) and all(target.cold_dropped),
        kv_dtype=kb.entry.kv_dtype,
        identical_to_full_precision=None if reference is None else _share_identical(alone.answers, reference),
        batch_size=min(batch_size, len(alone.answers)),
        one_by_one_s=batched[0],
        batched_s=batched[1],
        batch_identical=batched[2],
        peer="llama.cpp" if has_peer else None,
        peer_per_question_s=mean(alone.peer_total) if has_peer else None,
        peer_ttft_s=mean(alone.peer_ttft) if has_peer else None,
        peer_new_tokens=mean(len(p.token_ids) for p in alone.peer_answers) if has_peer else None,
        peer_decode_tok_s=_decode_rate([len(p.token_ids) for p in alone.peer_answers], alone.peer_decode_s) if has_peer else None,
        peer_identical=_share_identical(alone.peer_answers, alone.answers) if has_peer else None,
        repeats=repeats,
        cache_name=f"bench-{requested}",
        model=lm.name,
        device=str(lm.device),
        threads=torch.get_num_threads(),
    )


def weight_bytes_per_step(model) -> int:
    """Bytes of the weights one decode step reads: every parameter and buffer once, except an
    input embedding that is not also the output head (a step reads one row of it), and the
    float32 weights of a half-read head (a step reads their float16 copy and a few rows) and of
    block-read linears (a step reads their blocks)."""
    head = model.get_output_embeddings()
    not_whole = {model.get_input_embeddings().weight.data_ptr()}  # a step reads a row of these
    if isinstance(head, HalfReadHead):
        not_whole.add(head.weight.data_ptr())
    elif head is not None:
        not_whole.discard(head.weight.data_ptr())  # a plain head reads all of its weights, tied or not
    not_whole |= {m.weight.data_ptr() for m in model.modules() if isinstance(m, BlockReadLinear)}
    seen, total = set(not_whole), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """GB/s of a large tensor copy at torch's thread count, counting the bytes read and written (best run)."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


# ------------------------------------------------------------------- report


def machine_info() -> dict[str, object]:
    """What the numbers depend on: CPU, cores, torch threads, GPU, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "os": f"{platform.system()} {platform.release()}",
    }


def plot_rows(rows: Sequence[BenchRow], path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw time to first token against context length, one line per mode, into a PNG."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BenchError("plotting needs matplotlib: pip install matplotlib (or pip install 'cag[eval]')") from None
    if not rows:
        raise BenchError("nothing to plot: the benchmark produced no rows")
    # The object API draws without pyplot, so no GUI backend is chosen and a
    # notebook's inline backend is left alone.
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.add_subplot()
    x = [r.context_tokens for r in rows]
    for column, label in MODE_LABELS.items():
        ax.plot(x, [getattr(r, column) for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{n:,}" for n in x])
    ax.minorticks_off()
    ax.set_xlabel("context tokens")
    ax.set_ylabel("time to first token (s)")
    ax.set_title(title or f"cag bench: {rows[0].model} on {rows[0].device}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    except OSError as exc:
        raise BenchError(f"cannot write the plot to {path}: {exc.strerror or exc}") from exc
    return path
